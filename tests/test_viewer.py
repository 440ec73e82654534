"""`emserve view`: the neuroglancer state it builds (layers, kinds, placement in nm) and its server on 127.0.0.1."""

import shutil
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

from emserve.viewer import BROWSERS, parse_size, viewer_state  # noqa: E402 - only once neuroglancer is there


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


def test_the_first_view_is_the_middle_section_of_the_em_whole_on_the_screen(stores):
    state = viewer_state([str(stores[0])], screen=(200, 100))
    assert list(state.display_dimensions) == ["x", "y", "z"] and state.layout.type == "xy"  # a section, not a reslice
    # EM: 4 sections of 50 nm from z = 100 nm, 64 x 48 pixels of 4 nm from (8, 12) nm
    assert list(state.position) == [100 + 4 * 50 / 2, 8 + 64 * 4 / 2, 12 + 48 * 4 / 2]
    assert state.cross_section_scale == max(48 * 4 / 200, 64 * 4 / 100)  # the taller side fills the height


@pytest.mark.parametrize("text", ["1000", "0x100", "100x5000", "wide x tall", "-100x100"])
def test_a_screen_size_outside_what_is_allowed_is_refused_naming_it(text):
    with pytest.raises(ValueError, match=f"size: {text!r} is not allowed; give WIDTHxHEIGHT"):
        parse_size(text)


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, BROWSERS)), reason="--screenshot needs Chrome or Chromium")
def test_emserve_view_screenshot_pictures_the_section_with_its_predictions(stores, tmp_path):
    """The picture is the view: EM grey, predicted masks in colour, at the size asked for."""
    out = tmp_path / "view.png"
    done = subprocess.run([sys.executable, "-m", "emserve.cli", "view", str(stores[1]), str(stores[0]),
                           "--screenshot", str(out), "--size", "320x240"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert picture.shape == (240, 320, 3)
    coloured = np.ptp(picture, axis=2) > 30  # segment colours; EM and background are grey
    assert 0.05 < coloured.mean() < 0.95
    assert len(list(tmp_path.iterdir())) == 1  # nothing half-written beside it


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

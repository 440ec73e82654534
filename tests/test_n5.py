"""OpenOrganelle N5 EM (`<ds>.n5/em/fibsem-uint16/s0`, x-y-z attributes) read through tensorstore, as z-y-x."""

from __future__ import annotations

import json

import cellmap_fixtures as fx
import numpy as np
import pytest

from emserve.data.ngff import ScaleLevel
from emserve.data.store import EMStore

pytest.importorskip("tensorstore", reason="N5 is read through the optional 'n5' extra (tensorstore)")

LEVELS = [ScaleLevel("s0", (5.24, 4.0, 4.0), (0.0, 0.0, 0.0)), ScaleLevel("s1", (10.48, 8.0, 8.0), (2.62, 2.0, 2.0))]


@pytest.fixture(scope="module")
def n5(tmp_path_factory):
    root = tmp_path_factory.mktemp("n5")
    return {"cosem": fx.write_openorganelle_n5(root / "jrc_fixture.n5"),
            "neuroglancer": fx.write_openorganelle_n5(root / "jrc_plain.n5", cosem_multiscales=False)}


def test_attributes_are_stored_x_y_z(n5):
    """The fixture really is x-y-z on disk (so the z-y-x results below are the reader's doing)."""
    s0 = json.loads((n5["cosem"] / "em/fibsem-uint16/s0/attributes.json").read_text())
    assert s0["dimensions"] == [24, 20, 6] and s0["dataType"] == "uint16"
    assert s0["pixelResolution"] == {"dimensions": [4.0, 4.0, 5.24], "unit": "nm"}
    assert s0["transform"]["axes"] == ["z", "y", "x"]


@pytest.mark.parametrize("kind", ["cosem", "neuroglancer"])
def test_levels_in_nm_zyx(n5, kind):
    store = EMStore(n5[kind])
    assert store.em_group_path == "em/fibsem-uint16"
    assert store.em_levels == LEVELS
    assert store.crops == ()


def test_values_at_known_coordinates(n5):
    store = EMStore(n5["cosem"])
    s0 = store.em_volume(store.em_level((5.24, 4, 4)))
    assert s0.shape == fx.N5_SHAPE and s0.dtype == np.uint16
    for z, y, x in [(0, 0, 0), (5, 19, 23), (2, 7, 13), (1, 0, 22)]:
        assert int(s0[z, y, x]) == z * 1024 + y * 32 + x
    np.testing.assert_array_equal(s0[1:4, 3:9, 10:17], fx.n5_volume()[1:4, 3:9, 10:17])
    s1 = store.em_volume(store.em_level((10.48, 8, 8)))
    assert s1.shape == (3, 10, 12)
    assert int(s1[1, 2, 3]) == 2 * 1024 + 4 * 32 + 6  # s1 voxel (1, 2, 3) was s0 voxel (2, 4, 6)


def test_contrast_from_percentiles_of_uint16(n5):
    store = EMStore(n5["cosem"])
    lo, hi = np.percentile(fx.subsample(fx.n5_volume()).astype(np.float32), (0.5, 99.5))
    assert store.contrast_window == pytest.approx((lo, hi))
    assert store.normalize(np.array([0, 65535], np.uint16)).tolist() == [-1.0, 1.0]


def test_missing_n5_container(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected an N5 container") as err:
        EMStore(tmp_path / "nope.n5")
    assert "\n" not in str(err.value)


def test_n5_without_em(tmp_path):
    (tmp_path / "x.n5").mkdir()
    (tmp_path / "x.n5" / "attributes.json").write_text('{"n5": "2.5.1"}')
    with pytest.raises(ValueError, match=r"no EM group em/<fibsem-uint8\|fibsem-uint16\|fibsem-int16>"):
        _ = EMStore(tmp_path / "x.n5").em_levels


def test_container_without_root_attributes_is_still_read(tmp_path):
    root = fx.write_openorganelle_n5(tmp_path / "bare.n5")
    (root / "attributes.json").unlink()  # tensorstore itself never writes the root {"n5": version}
    store = EMStore(root)
    assert store.em_levels == LEVELS
    assert store.em_volume(store.em_levels[1])[...].shape == (3, 10, 12)  # Ellipsis, as the patch sampler asks

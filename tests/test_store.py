"""The reader against hand-written stores that mimic the published CellMap metadata (zarr v2 and v3)."""

from __future__ import annotations

import json

import cellmap_fixtures as fx
import numpy as np
import pytest

from emserve.classes import ABSENT, PRESENT, UNKNOWN
from emserve.data.ngff import ScaleLevel, level_from_transform, parse_multiscales, select_level
from emserve.data.sources import codec_names
from emserve.data.store import EMStore, decode_labels

CLASSES = ["mito_mem", "mito_lum", "mito", "er", "er_mem", "nuc", "ld_mem", "ld"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cellmap")
    return {
        "v2": fx.write_cellmap_v2(root / "jrc_fixture.zarr"),
        "v2_contrast": fx.write_cellmap_v2(root / "jrc_contrast.zarr", contrast=True),
        "v3": fx.write_cellmap_v3(root / "jrc_fixture3.zarr"),
    }


def expected_crop1_s1() -> dict[str, np.ndarray]:
    """crop1 at s1 (the EM voxel size), decoded by hand from what the fixture wrote."""
    a = {k: fx.subsample(v) for k, v in fx.crop1_arrays().items()}

    def semantic(v):
        return np.where(v == 1, PRESENT, np.where(v == 0, ABSENT, UNKNOWN)).astype(np.uint8)

    er_mem = semantic(a["er_mem"])
    return {
        "mito_mem": semantic(a["mito_mem"]),
        "mito_lum": semantic(a["mito_lum"]),
        "mito": np.where(a["mito"] == 255, UNKNOWN, np.where(a["mito"] > 0, PRESENT, ABSENT)),  # instance ids
        "er_mem": er_mem,
        # er = er_mem + er_lum + eres_* + ne_* + np_*: only er_mem was annotated, so never known absent
        "er": np.where(er_mem == PRESENT, PRESENT, UNKNOWN),
        "nuc": np.full(a["mito"].shape, UNKNOWN),  # no member annotated in this crop
        "ld_mem": np.where(a["ld_mem"] == 1, PRESENT, UNKNOWN),  # encoding {"unknown": 0, "present": 1}
        "ld": np.where(a["ld_mem"] == 1, PRESENT, UNKNOWN),
    }


# --- EM levels --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_em_levels_as_published(stores, kind):
    store = EMStore(stores[kind])
    assert store.em_group_path == "recon-1/em/fibsem-uint8"
    assert store.em_levels == [ScaleLevel("s0", (5.24, 4.0, 4.0), (0.0, 0.0, 0.0)),
                               ScaleLevel("s1", (10.48, 8.0, 8.0), (2.62, 2.0, 2.0))]
    em = fx.em_volume()
    np.testing.assert_array_equal(store.em_volume(store.em_levels[0])[...], em)
    np.testing.assert_array_equal(store.em_volume(store.em_levels[1])[2:5, 1:3, 4:9], fx.em_s1(em)[2:5, 1:3, 4:9])


def test_level_selection_by_voxel_size(stores):
    store = EMStore(stores["v2"])
    assert store.em_level((10.48, 8, 8)).path == "s1"
    assert store.em_level((5.25, 4.01, 4.0)).path == "s0"  # within 1%
    assert store.em_level().path == "s0"
    with pytest.raises(ValueError) as err:
        store.em_level((8, 8, 8))
    message = str(err.value)
    assert "8x8x8" in message and "s0=5.24x4x4" in message and "s1=10.48x8x8" in message
    assert "\n" not in message


def test_crops_in_natural_order_with_their_own_class_names(stores):
    store = EMStore(stores["v2"])
    assert store.crops == ("crop1", "crop10")
    assert store.crop_classes("crop1") == ("cyto", "er_mem", "ld_mem", "mito", "mito_lum", "mito_mem")


# --- crops ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_crop_placed_from_translation_on_the_em_grid(stores, kind):
    store = EMStore(stores[kind])
    crop = store.read_crop("crop1", ["mito_mem"])
    # crop s0 is at half the EM voxel size; the default level is the finest one the EM has (crop s1 = EM s0)
    assert crop.voxel_size == (5.24, 4.0, 4.0)
    z, y, x = fx.CROP1_EM_OFFSET  # 3, 5, 7: written only as nm translations (15.72, 20, 28), never as voxels
    dz, dy, dx = fx.subsample(fx.crop1_arrays()["mito_mem"]).shape
    block = fx.em_volume()[z:z + dz, y:y + dy, x:x + dx]
    np.testing.assert_array_equal(crop.raw, store.normalize(block))
    shifted = fx.em_volume()[z:z + dz, y + 1:y + 1 + dy, x:x + dx]
    assert not np.array_equal(crop.raw, store.normalize(shifted))


def test_crop_on_the_coarser_level_uses_the_half_voxel_shift(stores):
    store = EMStore(stores["v2"])
    crop = store.read_crop("crop10", ["ecs"], voxel_size=(10.48, 8.0, 8.0))
    assert crop.translation == pytest.approx((44.54, 2.0, 66.0))
    # (44.54 - 2.62) / 10.48 = 4, (2 - 2) / 8 = 0, (66 - 2) / 8 = 8: EM s1 voxels, not s0 offset / 2 rounded
    np.testing.assert_array_equal(crop.raw, store.normalize(fx.em_s1(fx.em_volume())[4:6, 0:4, 8:12]))


def test_float_label_array_decodes_like_integers(stores):
    crop = EMStore(stores["v2"]).read_crop("crop10", ["ecs"], voxel_size=(5.24, 4.0, 4.0))
    ecs = fx.crop10_ecs()
    np.testing.assert_array_equal(crop.labels[0], np.where(ecs == 1, PRESENT, np.where(ecs == 0, ABSENT, UNKNOWN)))


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_labels_follow_each_arrays_encoding(stores, kind):
    crop = EMStore(stores[kind]).read_crop("crop1", CLASSES)
    expected = expected_crop1_s1()
    for i, name in enumerate(CLASSES):
        np.testing.assert_array_equal(crop.labels[i], expected[name], err_msg=name)
    assert crop.labels.dtype == np.uint8
    # ld_mem's zeros are "unknown" by its own encoding: with the default 0/1/255 they would read as absent
    assert (crop.labels[CLASSES.index("ld_mem")] == ABSENT).sum() == 0
    assert (crop.labels[CLASSES.index("ld_mem")] == UNKNOWN).sum() > 0


def test_crop_at_its_finest_level_has_no_em_and_says_so(stores):
    store = EMStore(stores["v2"])
    with pytest.raises(ValueError, match=r"no scale level has voxel size 2\.62x2x2 nm.*available: s0=5\.24x4x4"):
        store.read_crop("crop1", ["mito_mem"], voxel_size=(2.62, 2.0, 2.0))


def test_decode_labels_encodings():
    data = np.array([0, 1, 2, 7, 255], np.uint8)
    semantic = {"encoding": {"absent": 0, "present": 1, "unknown": 255}}
    np.testing.assert_array_equal(decode_labels(data, semantic), [ABSENT, PRESENT, UNKNOWN, UNKNOWN, UNKNOWN])
    instance = {"type": "instance_segmentation", "encoding": {"absent": 0, "unknown": 255}}
    np.testing.assert_array_equal(decode_labels(data, instance), [ABSENT, PRESENT, PRESENT, PRESENT, UNKNOWN])
    shifted = {"encoding": {"absent": 2, "present": 7, "unknown": 0}}
    np.testing.assert_array_equal(decode_labels(data, shifted), [UNKNOWN, UNKNOWN, ABSENT, PRESENT, UNKNOWN])
    floats = np.array([0.0, 1.0, np.nan, 255.0], np.float32)
    np.testing.assert_array_equal(decode_labels(floats, instance), [ABSENT, PRESENT, UNKNOWN, UNKNOWN])
    np.testing.assert_array_equal(decode_labels(data, None), decode_labels(data, semantic))


# --- contrast ---------------------------------------------------------------------------------------------------
def test_contrast_from_omero_window(stores):
    store = EMStore(stores["v2_contrast"])
    assert store.contrast_window == fx.WINDOW
    out = store.normalize(np.array([0, 20, 120, 220, 255], np.uint8))
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1])


def test_contrast_from_percentiles_of_the_coarsest_level(stores):
    store = EMStore(stores["v2"])
    lo, hi = np.percentile(fx.em_s1(fx.em_volume()).astype(np.float32), (0.5, 99.5))
    assert store.contrast_window == pytest.approx((lo, hi))
    assert store.contrast_window != fx.WINDOW


# --- metadata edge cases ------------------------------------------------------------------------------------------
def ms(datasets, axes=None, **extra):
    axes = axes or [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    return {"multiscales": [{"version": "0.4", "axes": axes, "datasets": datasets, **extra}]}


def level(path, scale, translation=None):
    transforms = [{"type": "scale", "scale": scale}]
    if translation is not None:
        transforms.append({"type": "translation", "translation": translation})
    return {"path": path, "coordinateTransformations": transforms}


def test_multiscale_level_transforms_apply_after_the_dataset_ones():
    attrs = ms([level("s0", [1, 2, 2], [0, 1, 1])],
               coordinateTransformations=[{"type": "scale", "scale": [4, 2, 2]},
                                          {"type": "translation", "translation": [10, 0, 0]}])
    assert parse_multiscales(attrs, "g") == [ScaleLevel("s0", (4.0, 4.0, 4.0), (10.0, 2.0, 2.0))]


def test_units_and_axis_order_are_converted_to_nm_zyx():
    axes = [{"name": "x", "type": "space", "unit": "micrometer"}, {"name": "y", "type": "space", "unit": "nm"},
            {"name": "z", "type": "space", "unit": "nanometer"}]
    attrs = ms([level("s0", [0.004, 4, 8], [0.1, 0, 0])], axes=axes)
    assert parse_multiscales(attrs, "g") == [ScaleLevel("s0", (8.0, 4.0, 4.0), (0.0, 0.0, 100.0))]


def test_ngff_05_and_cosem_transform_spellings():
    v05 = {"ome": {"version": "0.5", "multiscales": ms([level("s0", [8, 8, 8])])["multiscales"]}}
    assert parse_multiscales(v05, "g")[0].voxel_size == (8.0, 8.0, 8.0)
    xyz = level_from_transform("s1", {"axes": ["x", "y", "z"], "scale": [8, 8, 10.48],
                                      "translate": [2, 2, 2.62], "units": ["nm", "nm", "nm"]}, "g")
    assert xyz == ScaleLevel("s1", (10.48, 8.0, 8.0), (2.62, 2.0, 2.0))


@pytest.mark.parametrize(("attrs", "match"), [
    ({}, "no OME-NGFF 'multiscales'"),
    (ms([level("s0", [1, 1, 1])], axes=[{"name": "c", "type": "channel"}, {"name": "y"}, {"name": "x"}]),
     r"axes \['c', 'y', 'x'\] are not z, y, x"),
    (ms([level("s0", [1, 1])]), "has 2 values; expected 3"),
    (ms([level("s0", [1, 1, 1])], axes=[{"name": a, "unit": "second"} for a in "zyx"]),
     "unit 'second' is not a length unit"),
])
def test_bad_metadata_gets_one_line_naming_it(attrs, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_multiscales(attrs, "store/group")
    assert "store/group" in str(err.value) and "\n" not in str(err.value)


def test_select_level_rejects_malformed_voxel_size():
    with pytest.raises(ValueError, match=r"voxel_size: \[4, 4\] is not three positive numbers"):
        select_level([ScaleLevel("s0", (4, 4, 4), (0, 0, 0))], [4, 4], "g")


# --- bad input -----------------------------------------------------------------------------------------------------
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        EMStore(tmp_path / "nope.zarr")
    assert "nope.zarr does not exist" in one_line(err) and "expected a <dataset>.zarr" in one_line(err)


def test_folder_that_is_not_a_zarr_group(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a zarr group \(no \.zgroup / zarr\.json\)") as err:
        EMStore(tmp_path / "empty.zarr")
    one_line(err)


def test_store_without_the_cellmap_groups(tmp_path):
    root = tmp_path / "other.zarr"
    root.mkdir()
    (root / ".zgroup").write_text(fx.ZGROUP)
    (root / "raw").mkdir()
    (root / "raw" / ".zgroup").write_text(fx.ZGROUP)
    store = EMStore(root)
    with pytest.raises(ValueError) as err:
        _ = store.em_levels
    message = one_line(err)
    assert "no group recon-1/em" in message and "['raw']" in message and "recon-1/em/fibsem-uint8/s0" in message
    assert store.crops == ()


def test_unknown_class_and_unknown_crop(stores):
    store = EMStore(stores["v2"])
    with pytest.raises(ValueError) as err:
        store.read_crop("crop1", ["mitochondria"])
    assert "unknown class name 'mitochondria'" in one_line(err) and "mito_mem" in one_line(err)
    with pytest.raises(ValueError) as err:
        store.read_crop("crop7", ["mito"])
    assert "'crop7' is not in" in one_line(err) and "available: crop1, crop10" in one_line(err)


def test_published_attributes_are_plain_json(stores):
    """The fixture is literal text: parse it back to be sure it says what the reader was shown."""
    zattrs = json.loads((stores["v2"] / "recon-1/labels/groundtruth/crop1/er_mem/s0/.zattrs").read_text())
    assert zattrs["cellmap"]["annotation"]["annotation_type"]["encoding"] == {"absent": 0, "unknown": 255}
    group = json.loads((stores["v2"] / "recon-1/labels/groundtruth/crop1/er_mem/.zattrs").read_text())
    assert "cellmap" not in group  # the encoding lives on the arrays only for this class


# --- codecs -------------------------------------------------------------------------------------------------------
def with_filter(array_dir, codec: dict) -> None:
    """Rewrite a zarr v2 array's metadata to name one more filter."""
    meta = json.loads((array_dir / ".zarray").read_text())
    (array_dir / ".zarray").write_text(json.dumps({**meta, "filters": [codec]}))


def test_arrays_with_codecs_outside_the_allow_list_are_refused_before_a_chunk_is_read(stores, tmp_path):
    import shutil

    path = shutil.copytree(stores["v2"], tmp_path / "hostile.zarr")
    with_filter(path / "recon-1/em/fibsem-uint8/s0", {"id": "base64"})  # zarr would decode it: a codec it knows
    with_filter(path / "recon-1/labels/groundtruth/crop1/mito_mem/s1", {"id": "packbits"})
    store = EMStore(path)
    with pytest.raises(ValueError) as err:
        store.em_volume(store.em_levels[0])
    message = one_line(err)
    assert "recon-1/em/fibsem-uint8/s0: codecs ['base64'] are not read" in message and "allowed: adler32" in message
    np.testing.assert_array_equal(store.em_volume(store.em_levels[1])[...], fx.em_s1(fx.em_volume()))  # untouched
    with pytest.raises(ValueError, match=r"crop1/mito_mem/s1: codecs \['packbits'\] are not read"):
        store.read_crop("crop1", ["mito_mem"])


def test_codec_names_include_the_codecs_inside_a_shard():
    metadata = {"zarr_format": 3, "codecs": [{"name": "sharding_indexed", "configuration": {
        "codecs": [{"name": "bytes"}, {"name": "numcodecs.pickle"}], "index_codecs": [{"name": "crc32c"}]}}]}
    assert codec_names(metadata) == ["sharding_indexed", "bytes", "pickle", "crc32c"]

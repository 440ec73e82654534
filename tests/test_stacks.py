"""Stack import: generated PNG/TIFF fixtures round-trip exactly; the two real ssTEM datasets (when present) import
with their documented class fractions and with labels that sit on darker EM; bad input fails cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from emserve.classes import ABSENT, PRESENT, UNKNOWN
from emserve.data.stacks import (
    discover,
    import_stack,
    parse_masks,
    parse_slices,
    parse_value_map,
    parse_voxel_size,
)
from emserve.data.store import EMStore, natural_key

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VNC = SHARED / "drosophila_vnc_sstem_gerhard2013" / "train"
ISBI = SHARED / "isbi2012_drosophila_vnc_membranes" / "train"

Z, Y, X = 12, 40, 48  # 12 slices so that lexicographic order (0, 1, 10, 11, 2, ...) would be wrong


def _raw_s0(path: Path) -> np.ndarray:
    store = EMStore(path)
    return np.asarray(store.em_volume(store.em_level())[...])


def _save_pngs(folder: Path, stack: np.ndarray, mode_1: set[int] = frozenset()) -> Path:
    folder.mkdir(parents=True)
    for z, plane in enumerate(stack):
        im = Image.fromarray(plane > 0) if z in mode_1 else Image.fromarray(plane)  # mode "1" for some files
        im.save(folder / f"{z}.png")
    return folder


def _save_tiffs(folder: Path, stack: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for z, plane in enumerate(stack):
        tifffile.imwrite(folder / f"s{z}.tif", plane)
    return folder


@pytest.fixture
def fixture(tmp_path):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (Z, Y, X), dtype=np.uint8)
    raw[:, 0, 0] = np.arange(Z)  # every slice is recognisable
    masks = {"mito": rng.random((Z, Y, X)) < 0.3, "pm": rng.random((Z, Y, X)) < 0.5}
    return tmp_path, raw, masks


# --- round trips on generated fixtures -----------------------------------------------------------------------
def test_png_masks_round_trip_with_holdout(fixture):
    tmp, raw, masks = fixture
    imgs = _save_pngs(tmp / "img", raw)
    mito = _save_pngs(tmp / "mito", masks["mito"].astype(np.uint8) * 255, mode_1={1, 10})  # mixed "L" and "1"
    pm = _save_pngs(tmp / "pm", np.where(masks["pm"], 0, 255).astype(np.uint8))  # ISBI convention: 0 = class
    out = tmp / "ds.zarr"
    summary = import_stack(imgs, out, "50,4,4", masks={"mito": mito, "pm": pm}, invert=["pm"], holdout=3,
                           command=["emserve", "data", "import", str(imgs)])
    assert summary.crops == {"crop1": {"split": "train", "slices": [0, 9]},
                             "crop2": {"split": "test", "slices": [9, 12]}}
    np.testing.assert_array_equal(_raw_s0(out), raw)
    store = EMStore(out)
    assert store.crops == ("crop1", "crop2")
    for name, (z0, z1) in (("crop1", (0, 9)), ("crop2", (9, 12))):
        crop = store.read_crop(name, ["mito", "pm"])
        assert crop.voxel_size == (50.0, 4.0, 4.0)
        assert crop.translation == (z0 * 50.0, 0.0, 0.0)
        for k, cls in enumerate(("mito", "pm")):
            np.testing.assert_array_equal(crop.labels[k], np.where(masks[cls][z0:z1], PRESENT, ABSENT))
        assert store.crop_group(name).attrs["split"] == ("train" if name == "crop1" else "test")
    prov = store.root.attrs["emserve"]
    assert prov["source"]["images"]["folder"] == str(imgs.resolve())
    assert prov["source"]["images"]["files"][:3] == ["0.png", "1.png", "2.png"]
    assert prov["command"][:3] == ["emserve", "data", "import"]
    assert prov["labels"]["pm"]["inverted"] is True
    assert summary.class_fractions["mito"] == pytest.approx(masks["mito"].mean())


def test_uint16_tiffs_and_multipage_masks(fixture):
    tmp, _, masks = fixture
    rng = np.random.default_rng(3)
    raw16 = rng.integers(1000, 60000, (Z, Y, X), dtype=np.uint16)
    imgs = _save_tiffs(tmp / "img", raw16)
    tifffile.imwrite(tmp / "mito.tif", masks["mito"].astype(np.uint8))  # one multi-page TIFF of 0/1 values
    out = tmp / "ds.zarr"
    summary = import_stack(sorted(imgs.iterdir(), key=natural_key), out, (30, 8, 8),
                           masks={"mito": tmp / "mito.tif"})
    lo, hi = float(raw16.min()), float(raw16.max())
    expected = np.round((raw16.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_raw_s0(out), expected)
    assert summary.rescale["lo"] == lo and summary.rescale["hi"] == hi
    crop = EMStore(out).read_crop("crop1", ["mito"])
    np.testing.assert_array_equal(crop.labels[0], masks["mito"].astype(np.uint8))

    out2 = tmp / "shift.zarr"
    import_stack(imgs, out2, (30, 8, 8), rescale="shift")
    np.testing.assert_array_equal(_raw_s0(out2), (raw16 >> 8).astype(np.uint8))


def test_uint16_png_multipage_tiff_images(tmp_path):
    raw16 = (np.arange(Z * Y * X, dtype=np.uint32) * 7 % 65536).astype(np.uint16).reshape(Z, Y, X)
    tifffile.imwrite(tmp_path / "vol.tif", raw16)
    pngs = _save_pngs(tmp_path / "png", raw16)
    a = import_stack(tmp_path / "vol.tif", tmp_path / "a.zarr", "10,10,10")
    b = import_stack(pngs, tmp_path / "b.zarr", "10,10,10")
    assert a.shape == b.shape == (Z, Y, X)
    np.testing.assert_array_equal(_raw_s0(tmp_path / "a.zarr"), _raw_s0(tmp_path / "b.zarr"))
    assert EMStore(tmp_path / "a.zarr").crops == ()  # raw only


def test_index_map_round_trip_with_unknown_and_sparse_slices(fixture):
    tmp, raw, _ = fixture
    rng = np.random.default_rng(11)
    labelled = [0, 1, 2, 5, 6, 7]
    index = rng.choice(np.array([0, 32, 64, 159, 191, 223, 255], dtype=np.uint8), (len(labelled), Y, X))
    index[:, 0, :7] = [0, 32, 64, 159, 191, 223, 255]  # every value occurs
    imgs = _save_pngs(tmp / "img", raw)
    maps = _save_pngs(tmp / "maps", index)
    value_map = parse_value_map(["0,32=pm", "191=mito", "223=syn", "159=unknown"])
    out = tmp / "ds.zarr"
    summary = import_stack(imgs, out, "50,4.6,4.6", index_maps=maps, value_map=value_map,
                           labelled_slices="0:3,5:8", holdout=2)
    assert summary.crops == {"crop1": {"split": "train", "slices": [0, 3]},
                             "crop2": {"split": "train", "slices": [5, 6]},
                             "crop3": {"split": "test", "slices": [6, 8]}}
    store = EMStore(out)
    got = np.concatenate([store.read_crop(c, ["pm", "mito", "syn"]).labels for c in store.crops], axis=1)
    for k, values in enumerate(([0, 32], [191], [223])):
        want = np.where(np.isin(index, values), PRESENT, ABSENT)
        want[index == 159] = UNKNOWN  # unknown in every class; 64 and 255 are unmapped -> absent
        np.testing.assert_array_equal(got[k], want)
    crop = store.read_crop("crop2", ["mito"])
    np.testing.assert_array_equal(crop.raw, store.normalize(raw[5:6]))  # the crop sits on its own raw slice
    assert store.root.attrs["emserve"]["value_map"]["191"] == "mito"


def test_masks_for_labelled_slices_only(fixture):
    tmp, raw, masks = fixture
    imgs = _save_pngs(tmp / "img", raw)
    mito = _save_pngs(tmp / "mito", masks["mito"][4:8].astype(np.uint8) * 255)
    import_stack(imgs, tmp / "ds.zarr", "50,4,4", masks={"mito": mito}, labelled_slices="4:8")
    crop = EMStore(tmp / "ds.zarr").read_crop("crop1", ["mito"])
    assert crop.translation == (200.0, 0.0, 0.0)
    np.testing.assert_array_equal(crop.labels[0], masks["mito"][4:8].astype(np.uint8))


def test_natural_order_and_discover(tmp_path):
    names = ["10.png", "2.png", "1.png", "img_9.tif", "img_10.tif", "notes.txt"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert [p.name for p in discover(tmp_path)] == ["1.png", "2.png", "10.png", "img_9.tif", "img_10.tif"]
    assert [p.name for p in discover(str(tmp_path / "*.png"))] == ["1.png", "2.png", "10.png"]


def test_parsers():
    assert parse_voxel_size("50,4.6,4.6") == (50.0, 4.6, 4.6)
    assert parse_masks(["mito=a/", "pm = b"]) == {"mito": "a/", "pm": "b"}
    assert parse_value_map(["0,32=pm", "7=unknown"]) == {0: "pm", 32: "pm", 7: "unknown"}
    assert [s.indices(20) for s in parse_slices("0:16,-2:,5")] == [(0, 16, 1), (18, 20, 1), (5, 6, 1)]


# --- bad input ---------------------------------------------------------------------------------------------
def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_bad_input(fixture):
    tmp, raw, masks = fixture
    imgs = _save_pngs(tmp / "img", raw)
    mito = _save_pngs(tmp / "mito", masks["mito"].astype(np.uint8) * 255)
    short = _save_pngs(tmp / "short", masks["mito"][:5].astype(np.uint8) * 255)
    small = _save_pngs(tmp / "small", masks["mito"][:, :20].astype(np.uint8) * 255)
    (tmp / "empty").mkdir()
    out = tmp / "out.zarr"
    _raises(FileNotFoundError, r"images: .*nope does not exist; expected", import_stack, tmp / "nope", out, "1,1,1")
    _raises(ValueError, r"images: folder .*empty holds no .*png", import_stack, tmp / "empty", out, "1,1,1")
    _raises(ValueError, r"images: the file list is empty", import_stack, [], out, "1,1,1")
    _raises(ValueError, r"mask\[mito\]: 5 label slices for 12 image slices; expected 12", import_stack, imgs, out,
            "1,1,1", masks={"mito": short})
    _raises(ValueError, r"mask\[mito\]: 5 label slices; expected 4 .* or 12", import_stack, imgs, out, "1,1,1",
            masks={"mito": short}, labelled_slices="0:4")
    _raises(ValueError, r"mask\[mito\]: slices have shape \(20, 48\); expected .*\(40, 48\)", import_stack, imgs,
            out, "1,1,1", masks={"mito": small})
    _raises(ValueError, r"mask: unknown class name 'mitochondria'; allowed: .*mito", import_stack, imgs, out,
            "1,1,1", masks={"mitochondria": mito})
    _raises(ValueError, r"map: unknown class name 'membrane'", parse_value_map, ["0=membrane"])
    _raises(ValueError, r"map: '191' is malformed; expected KEY=VALUE", parse_value_map, ["191"])
    _raises(ValueError, r"map: .*pixel value 'x' that is not an integer", parse_value_map, ["x=mito"])
    _raises(ValueError, r"map: pixel value 1 is mapped twice", parse_value_map, ["1=mito", "1=pm"])
    _raises(ValueError, r"map: pixel value 7 \(-> 'pm'\) does not occur in the index maps", import_stack, imgs,
            out, "1,1,1", index_maps=mito, value_map={255: "mito", 7: "pm"})
    _raises(ValueError, r"map: key '255' is not an integer", import_stack, imgs, out, "1,1,1", index_maps=mito,
            value_map={"255": "mito"})
    _raises(ValueError, r"map: index_maps were given without a value map", import_stack, imgs, out, "1,1,1",
            index_maps=mito)
    _raises(ValueError, r"index_maps: pixel value 0 has no class", import_stack, imgs, out, "1,1,1",
            index_maps=mito, value_map={255: "mito"}, unmapped="error")
    _raises(ValueError, r"voxel_size: '50,4' has 2 values; expected 3 positive numbers", import_stack, imgs, out,
            "50,4")
    _raises(ValueError, r"voxel_size: \(50, -4, 4\) has a value that is not a positive", import_stack, imgs, out,
            (50, -4, 4))
    _raises(ValueError, r"voxel_size: 'a,b,c' is not numeric", parse_voxel_size, "a,b,c")
    _raises(ValueError, r"invert: class 'pm' has no mask", import_stack, imgs, out, "1,1,1",
            masks={"mito": mito}, invert=["pm"])
    _raises(ValueError, r"holdout: 13 is out of range; expected .* 0 to .* \(12\)", import_stack, imgs, out,
            "1,1,1", masks={"mito": mito}, holdout=13)
    _raises(ValueError, r"labelled_slices: slice 12 is out of range; expected 0..11", import_stack, imgs, out,
            "1,1,1", masks={"mito": short}, labelled_slices=[8, 9, 10, 11, 12])
    _raises(ValueError, r"labelled_slices: 'a:b' is malformed", parse_slices, "a:b")
    _raises(ValueError, r"mask: '=dir' is malformed", parse_masks, ["=dir"])
    _raises(ValueError, r"mask: class 'mito' is given twice", parse_masks, ["mito=a", "mito=b"])
    assert not out.exists()
    out.mkdir()
    _raises(FileExistsError, r"output: .*out.zarr already exists", import_stack, imgs, out, "1,1,1")


def test_a_real_write_failure_leaves_nothing(fixture):
    """A file-size limit on the importing process (what a full disk does) stops it at the EM's first chunk, after
    the store's metadata is written: the import fails and leaves neither the store nor a temporary folder."""
    tmp, raw, masks = fixture
    imgs = _save_pngs(tmp / "img", raw)
    mito = _save_pngs(tmp / "mito", masks["mito"].astype(np.uint8) * 255)
    out = tmp / "out" / "ds.zarr"
    out.parent.mkdir()
    arguments = ["data", "import", str(imgs), str(out), "--voxel-size", "50,4,4", "--mask", f"mito={mito}",
                 "--holdout", "2"]
    # the limit is set in the child's own Python (preexec_fn is unsafe in a threaded parent); writes past 10 kB
    # then raise EFBIG instead of a SIGXFSZ kill
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000)); sys.argv = ['emserve', *sys.argv[1:]]; "
               "runpy.run_module('emserve.cli', run_name='__main__')")
    assert raw.nbytes > 10_000  # random uint8 does not compress: the EM chunk cannot fit
    failed = subprocess.run([sys.executable, "-c", limited, *arguments], capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "File too large" in failed.stderr
    assert "emserve/data/writer.py" in failed.stderr  # it failed writing the store, not somewhere before
    assert list(out.parent.iterdir()) == []
    done = subprocess.run([sys.executable, "-m", "emserve.cli", *arguments], capture_output=True, text=True,
                          timeout=120)  # the limit was the only cause
    assert done.returncode == 0, done.stderr
    assert EMStore(out).crops


# --- the two real datasets ---------------------------------------------------------------------------------
needs_vnc = pytest.mark.skipif(not VNC.is_dir(), reason=f"shared data not present at {VNC} (optional real-data test)")
needs_isbi = pytest.mark.skipif(not ISBI.is_dir(), reason=f"shared data not present at {ISBI} (optional real-data "
                                                          f"test)")


def _darker_in_std(raw: np.ndarray, present: np.ndarray) -> float:
    """How much darker labelled pixels are than the rest, in units of the raw's standard deviation."""
    return float((raw[~present].mean() - raw[present].mean()) / raw.std())


def _all_slices(store: EMStore, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    crops = [store.read_crop(c, classes) for c in store.crops]
    return np.concatenate([c.raw for c in crops]), np.concatenate([c.labels for c in crops], axis=1)


@needs_vnc
@pytest.mark.slow
def test_real_vnc_stack(tmp_path):
    out = tmp_path / "vnc.zarr"
    labels = VNC / "labels"
    summary = import_stack(VNC / "images", out, "50,4.6,4.6", holdout=4,
                           masks={"mito": labels / "mitochondria", "pm": labels / "membranes",
                                  "syn": labels / "synapses"})
    assert summary.shape == (20, 1024, 1024)
    assert summary.crops == {"crop1": {"split": "train", "slices": [0, 16]},
                             "crop2": {"split": "test", "slices": [16, 20]}}
    # PROVENANCE.md: mito 5.4 %, membranes 20.4 %, synapses ~0.6 % of all 20 slices
    assert summary.class_fractions["mito"] == pytest.approx(0.054, abs=0.002)
    assert summary.class_fractions["pm"] == pytest.approx(0.204, abs=0.002)
    assert summary.class_fractions["syn"] == pytest.approx(0.006, abs=0.001)
    store = EMStore(out)
    classes = ["mito", "pm", "syn"]
    test_crop = store.read_crop("crop2", classes)
    for z in (16, 19):  # held-out slices, read back from the named test crop, pixel for pixel
        for k, folder in enumerate(("mitochondria", "membranes", "synapses")):
            source = np.array(Image.open(labels / folder / f"{z:02d}.png").convert("L")) > 127
            np.testing.assert_array_equal(test_crop.labels[k, z - 16], source.astype(np.uint8))
        np.testing.assert_array_equal(_raw_s0(out)[z], tifffile.imread(VNC / "images" / f"{z:02d}.tif"))
    raw, lab = _all_slices(store, classes)
    darker = {c: _darker_in_std(raw, lab[k] == PRESENT) for k, c in enumerate(classes)}
    # PROVENANCE.md: 0.8 (mito), 1.45 (membrane), 1.7 (synapse) std darker; inverted labels would be brighter
    assert darker["mito"] > 0.5 and darker["pm"] > 1.0 and darker["syn"] > 1.0, darker
    # the check can tell: membranes paired with the wrong sections, or shifted by 32 pixels, are barely darker
    assert _darker_in_std(raw[10:], lab[1, :10] == PRESENT) < 0.3
    assert _darker_in_std(raw, np.roll(lab[1], 32, axis=2) == PRESENT) < 0.3


@needs_vnc
def test_real_vnc_index_map_matches_masks(tmp_path):
    files = sorted((VNC / "labels" / "labels").iterdir(), key=natural_key)[6:8]
    images = sorted((VNC / "images").iterdir(), key=natural_key)[6:8]
    value_map = parse_value_map(["0,32,64,96,128=pm", "191=mito", "223=syn", "159=unknown"])
    import_stack(images, tmp_path / "idx.zarr", "50,4.6,4.6", index_maps=files, value_map=value_map)
    crop = EMStore(tmp_path / "idx.zarr").read_crop("crop1", ["mito", "syn"])
    assert (crop.labels == UNKNOWN).mean() > 0.01  # glia / extracellular (159) is unknown
    for k, folder in enumerate(("mitochondria", "synapses")):
        source = np.stack([np.array(Image.open(VNC / "labels" / folder / f"{z:02d}.png").convert("L")) > 127
                           for z in (6, 7)]).astype(np.uint8)
        # PROVENANCE.md: on slice 07, 191 equals the mito mask and 223 the synapse mask pixel for pixel
        # (159, mapped to unknown, is absent in both masks)
        got = np.where(crop.labels[k] == UNKNOWN, ABSENT, crop.labels[k])
        assert not source[crop.labels[k] == UNKNOWN].any()
        np.testing.assert_array_equal(got[1], source[1])
        assert (got[0] != source[0]).mean() < 1e-3  # slice 06: a few dozen pixels differ in the source


@needs_isbi
def test_real_isbi_stack(tmp_path):
    out = tmp_path / "isbi.zarr"
    summary = import_stack(ISBI / "images", out, "50,4,4", masks={"pm": ISBI / "labels"}, invert=["pm"],
                           holdout=6)
    assert summary.shape == (30, 512, 512)
    assert summary.crops["crop2"] == {"split": "test", "slices": [24, 30]}
    assert summary.class_fractions["pm"] == pytest.approx(0.22, abs=0.005)  # PROVENANCE.md: 22 %
    store = EMStore(out)
    test_crop = store.read_crop("crop2", ["pm"])
    for z in (24, 29):  # 0 = membrane in the source PNGs
        source = np.array(Image.open(ISBI / "labels" / f"{z}.png")) == 0
        np.testing.assert_array_equal(test_crop.labels[0, z - 24], source.astype(np.uint8))
    raw, lab = _all_slices(store, ["pm"])
    assert _darker_in_std(raw, lab[0] == PRESENT) > 0.8  # PROVENANCE.md: 1.2 std; without invert it is negative
    assert _darker_in_std(raw[15:], lab[0, :15] == PRESENT) < 0.3
    assert _darker_in_std(raw, np.roll(lab[0], 32, axis=2) == PRESENT) < 0.3

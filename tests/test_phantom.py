"""The phantom generator: determinism, CellMap layout, class balance, physical sanity and imaging differences."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from scipy import ndimage as ndi

from emserve.classes import ABSENT, BY_NAME, PRESENT, UNKNOWN
from emserve.data.phantom import PHANTOM_CLASSES, PRESETS, RARE_CLASSES, make_phantom, write_phantoms
from emserve.data.sources import GROUNDTRUTH_GROUP
from emserve.data.store import EMStore

SHAPE = (32, 160, 160)
CROP = (16, 96, 96)
ID = {c: BY_NAME[c].id for c in PHANTOM_CLASSES}
MEMBRANES = ("pm", "mito_mem", "er_mem", "ves_mem", "ne_mem")
# inner compartment -> what it may touch (itself, its wall, what lies inside it)
ENCLOSED = {
    "mito_lum": ("mito_lum", "mito_mem", "mito_ribo"),
    "ld_lum": ("ld_lum", "ld_mem"),
    "ves_lum": ("ves_lum", "ves_mem"),
    "er_lum": ("er_lum", "er_mem"),
    "ne_lum": ("ne_lum", "ne_mem"),
    "nucpl": ("nucpl", "hchrom", "nucleo", "ne_mem"),
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    paths = write_phantoms(out, seed=3, datasets=3, crops_per_dataset=3, shape=SHAPE, crop_shape=CROP, levels=1)
    return out, [EMStore(p) for p in paths]


@pytest.fixture(scope="module")
def crops(phantoms):
    """Every crop read back through EMStore: (store, crop name, annotated classes, LabelledCrop, `all` ids)."""
    _, stores = phantoms
    out = []
    for store in stores:
        for crop in store.crops:
            ids = np.asarray(store.crop_group(crop)["all"]["s0"][...])
            out.append((store, crop, store.crop_classes(crop), store.read_crop(crop, PHANTOM_CLASSES), ids))
    return out


@pytest.fixture(scope="module")
def volumes():
    """The same three datasets in memory, whole volumes (labels exist there beyond the crops)."""
    return [make_phantom(index, seed=3, shape=SHAPE) for index in range(3)]


def test_writes_one_store_and_png_per_dataset(phantoms):
    out, stores = phantoms
    assert [s.name for s in stores] == [p.name for p in PRESETS]
    for store in stores:
        png = out / f"{store.name}.png"
        image = np.asarray(Image.open(png).convert("RGB"))
        assert image.shape[0] > 2 * CROP[1] and image.shape[1] > 3 * CROP[2]
        assert (image[..., 0] != image[..., 2]).any()  # coloured labels, not only grey EM
        em = store.em_volume(store.em_levels[0])
        assert em.shape == SHAPE and em.dtype == np.uint8
        assert len(store.crops) == 3
        attrs = store.root.attrs.asdict()
        assert attrs["emserve"]["generator"] == "phantom" and attrs["emserve"]["seed"] == 3
        assert attrs["phantom"]["imaging"]["voxel_size"] == list(store.em_levels[0].voxel_size)
    names = [c for s in stores for c in s.crops]
    assert len(set(names)) == len(names)  # crop names are unique across datasets, as in CellMap


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kwargs = dict(datasets=2, crops_per_dataset=1, shape=(16, 96, 96), crop_shape=(8, 64, 64), levels=1,
                  montage=False)
    first = write_phantoms(tmp_path / "a", seed=11, **kwargs)
    second = write_phantoms(tmp_path / "b", seed=11, **kwargs)
    for p, q in zip(first, second, strict=True):
        ga, gb = zarr.open_group(str(p), mode="r"), zarr.open_group(str(q), mode="r")
        arrays = ["recon-1/em/fibsem-uint8/s0"] + [
            f"{GROUNDTRUTH_GROUP}/{crop}/{name}/s0" for crop, _ in ga[GROUNDTRUTH_GROUP].groups()
            for name, _ in ga[f"{GROUNDTRUTH_GROUP}/{crop}"].groups()]
        assert len(arrays) > 10
        for name in arrays:
            assert np.array_equal(ga[name][...], gb[name][...]), name
    a, b = make_phantom(0, seed=11, shape=(16, 96, 96)), make_phantom(0, seed=12, shape=(16, 96, 96))
    assert not np.array_equal(a.raw, b.raw) and not np.array_equal(a.ids, b.ids)


def test_many_classes_with_rare_ones_rare(crops, volumes):
    present = set()
    for *_, ids in crops:
        present |= {c for c in PHANTOM_CLASSES if (ids == ID[c]).any()}
    assert len(present) >= 12, sorted(present)
    assert set(RARE_CLASSES) <= present
    for volume in volumes:  # whole volumes: rare classes rare, background and nucleoplasm common
        assert np.array_equal(volume.ids == 0, ~np.isin(volume.ids, list(ID.values())))
        fractions = volume.fractions()
        for name in RARE_CLASSES:
            assert fractions[name] < 0.02, (volume.name, name, fractions[name])
        assert fractions["mito_ribo"] < 0.002 and fractions["mt_in"] < 0.005
        assert fractions["background"] > 0.3 and fractions["nucpl"] > 0.01


def test_labels_exclusive_and_consistent_with_all_ids(crops):
    for _, crop, classes, lc, ids in crops:
        assert ids.shape == lc.labels.shape[1:] == CROP
        assert ((lc.labels == PRESENT).sum(0) <= 1).all()
        for k, name in enumerate(PHANTOM_CLASSES):
            if name not in classes:
                continue
            assert np.array_equal(lc.labels[k] == PRESENT, ids == ID[name]), (crop, name)
            assert set(np.unique(lc.labels[k])) <= {ABSENT, PRESENT}
        annotated = [k for k, name in enumerate(PHANTOM_CLASSES) if name in classes]
        background = ids == 0
        assert background.any() and (lc.labels[annotated][:, background] == ABSENT).all()


@pytest.mark.parametrize("inner", sorted(ENCLOSED))
def test_lumens_are_enclosed_by_their_membranes(crops, volumes, inner):
    """A 1-voxel (26-neighbour) dilation of a lumen never reaches cytosol or another compartment."""
    allowed = [ID[c] for c in ENCLOSED[inner]] + [UNKNOWN]
    seen = 0
    for ids in [c[-1] for c in crops] + [v.ids for v in volumes]:
        mask = ids == ID[inner]
        seen += int(mask.sum())
        ring = ndi.binary_dilation(mask, structure=np.ones((3, 3, 3), bool)) & ~mask
        assert np.isin(ids[ring], allowed).all(), (inner, np.unique(ids[ring]))
    assert seen > 0, f"no {inner} anywhere: the check would be vacuous"


def test_membranes_darker_than_cytosol_in_every_dataset(phantoms, crops):
    _, stores = phantoms
    for store in stores:
        mem, cyto = [], []
        for _, _, _, lc, ids in (c for c in crops if c[0] is store):
            mem.append(lc.raw[np.isin(ids, [ID[c] for c in MEMBRANES])])
            cyto.append(lc.raw[ids == 0])
        m, c = np.concatenate(mem).mean(), np.concatenate(cyto).mean()
        assert m < c - 0.15, (store.name, m, c)


def _noise(raw: np.ndarray) -> float:
    """Robust noise estimate: median absolute difference of neighbouring voxels along x."""
    diff = np.diff(raw.astype(np.float32), axis=2)
    return float(np.median(np.abs(diff - np.median(diff))))


def test_datasets_differ_like_acquisitions(phantoms):
    _, stores = phantoms
    voxel_sizes = {s.em_levels[0].voxel_size for s in stores}
    assert len(voxel_sizes) == 3 and any(len(set(v)) > 1 for v in voxel_sizes)  # one anisotropic
    raws = [np.asarray(s.em_volume(s.em_levels[0])[...]) for s in stores]
    means = [float(r.mean()) for r in raws]
    noise = [_noise(r) for r in raws]
    assert max(means) - min(means) > 10, means
    assert max(noise) > 1.5 * min(noise), noise


def test_unannotated_class_reads_back_unknown(crops):
    partial = [(s, c, ids) for s, c, _, _, ids in crops if s.crop_group(c).attrs["phantom"]["unannotated"]]
    assert len(partial) == 1
    store, crop, ids = partial[0]
    (missing,) = store.crop_group(crop).attrs["phantom"]["unannotated"]
    assert missing not in store.crop_classes(crop) and len(store.crop_classes(crop)) == len(PHANTOM_CLASSES) - 1
    lc = store.read_crop(crop, [missing, "mito_lum"])
    assert (lc.labels[0] == UNKNOWN).all()
    assert set(np.unique(lc.labels[1])) <= {ABSENT, PRESENT}
    assert (ids == UNKNOWN).any() and not (ids == ID[missing]).any()  # the class was there; `all` says unknown


def test_refuses_to_overwrite_and_checks_crop_shape(phantoms, tmp_path):
    out, _ = phantoms
    with pytest.raises(FileExistsError):
        write_phantoms(out, seed=3, datasets=1, shape=SHAPE, crop_shape=CROP)
    with pytest.raises(ValueError, match=r"crop_shape: \(8, 96, 96\) must be three sizes between 1 and the EM shape"):
        write_phantoms(tmp_path, datasets=1, shape=(16, 64, 64), crop_shape=(8, 96, 96))
    assert not list(Path(tmp_path).iterdir())


@pytest.mark.slow
def test_the_cli_writes_what_write_phantoms_writes_and_refuses_to_overwrite(tmp_path):
    def cli(seed: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "emserve.cli", "data", "phantom", str(tmp_path / "cli"),
                               "--datasets", "1", "--crops", "1", "--seed", str(seed), *extra],
                              capture_output=True, text=True, timeout=300)

    def content(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
        store = EMStore(path)
        level = store.em_level()
        crop = store.crops[0]
        return np.asarray(store.em_volume(level)[...]), list(store.crops), store.read_crop(crop, PHANTOM_CLASSES).labels

    done = cli(5)
    assert done.returncode == 0, done.stderr
    (api,) = write_phantoms(tmp_path / "api", seed=5, datasets=1, crops_per_dataset=1)
    written = tmp_path / "cli" / api.name
    assert (tmp_path / "cli" / f"{api.stem}.png").is_file()
    raw, crops, labels = content(written)
    api_raw, api_crops, api_labels = content(api)
    np.testing.assert_array_equal(raw, api_raw)
    assert crops == api_crops and len(crops) == 1
    np.testing.assert_array_equal(labels, api_labels)

    again = cli(6)
    assert again.returncode == 2
    assert f"{written} already exists; choose another folder or pass --overwrite" in " ".join(again.stderr.split())
    np.testing.assert_array_equal(content(written)[0], raw)  # refused: nothing touched
    replaced = cli(6, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not np.array_equal(content(written)[0], raw)

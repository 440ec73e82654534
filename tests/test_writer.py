"""The writer: the published layout, atomically, with provenance; and read back by the reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emserve import __version__
from emserve.classes import ABSENT, PRESENT, UNKNOWN
from emserve.data.lock import writer_tag
from emserve.data.store import EMStore
from emserve.data.writer import CropToWrite, add_crop, atomic_directory, provenance, write_store

VOXEL = (8.0, 4.0, 4.0)
ORIGIN = (80.0, 0.0, 40.0)


def raw_volume() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (8, 16, 16), dtype=np.uint8)


def labels(shape=(4, 8, 8)) -> dict[str, np.ndarray]:
    mito_mem = np.zeros(shape, np.uint8)
    mito_mem[1:3, 2:6, 2:6] = PRESENT
    er_mem = np.full(shape, UNKNOWN, np.uint8)
    er_mem[:, :2] = ABSENT
    er_mem[:, 0, :3] = PRESENT
    return {"mito_mem": mito_mem, "er_mem": er_mem}


def crop(name="crop1", offset=(2, 4, 6)) -> CropToWrite:
    return CropToWrite(name, offset, labels(), ids=np.full((4, 8, 8), 35, np.uint8), attrs={"note": "test"})


def first_level(path) -> np.ndarray:
    store = EMStore(path)
    return store.em_volume(store.em_levels[0])[...]


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_through_the_reader(tmp_path, zarr_format):
    raw = raw_volume()
    path = write_store(tmp_path / "gen.zarr", raw, VOXEL, [crop()], translation=ORIGIN, zarr_format=zarr_format,
                       attrs={"contrastAdjustment": {"min": 0, "max": 255}})
    store = EMStore(path)
    assert [lv.voxel_size for lv in store.em_levels] == [VOXEL, (8.0, 8.0, 8.0)]  # z is already twice y, x
    assert store.em_levels[1].translation == (80.0, 2.0, 42.0)  # half an s0 voxel in where halved
    np.testing.assert_array_equal(store.em_volume(store.em_levels[0])[...], raw)
    got = store.read_crop("crop1", ["mito_mem", "er_mem", "mito", "er"])
    assert got.translation == (96.0, 16.0, 64.0)  # origin + offset * voxel size
    np.testing.assert_array_equal(got.raw, store.normalize(raw[2:6, 4:12, 6:14]))
    np.testing.assert_array_equal(got.labels[0], labels()["mito_mem"])
    np.testing.assert_array_equal(got.labels[1], labels()["er_mem"])
    # mito from mito_mem alone: mito_lum and mito_ribo were not annotated, so it is never known to be absent
    np.testing.assert_array_equal(got.labels[2], np.where(labels()["mito_mem"] == PRESENT, PRESENT, UNKNOWN))
    assert store.crop_classes("crop1") == ("er_mem", "mito_mem")


@pytest.mark.parametrize(("voxel", "expected"), [
    ((4.0, 4.0, 4.0), [(4.0, 4.0, 4.0), (8.0, 8.0, 8.0), (16.0, 16.0, 16.0)]),
    ((5.24, 4.0, 4.0), [(5.24, 4.0, 4.0), (10.48, 8.0, 8.0), (20.96, 16.0, 16.0)]),  # CellMap FIB-SEM
    ((50.0, 4.0, 4.0), [(50.0, 4.0, 4.0), (50.0, 8.0, 8.0), (50.0, 16.0, 16.0)]),  # serial-section TEM
])
def test_pyramid_halves_only_axes_finer_than_twice_the_finest(tmp_path, voxel, expected):
    raw = raw_volume()
    store = EMStore(write_store(tmp_path / "s.zarr", raw, voxel, [crop()], levels=3))
    assert [lv.voxel_size for lv in store.em_levels] == expected
    s1 = store.em_volume(store.em_levels[1])[...]
    crop_s1 = store.read_crop("crop1", ["mito_mem"], voxel_size=expected[1]).labels[0]
    sections = 8 if expected[1][0] == voxel[0] else 4
    assert s1.shape == (sections, 8, 8) and crop_s1.shape == (sections // 2, 4, 4)
    if sections == 8:  # each s1 section comes from its own s0 section only, for EM and labels
        np.testing.assert_array_equal(s1, np.round(raw.reshape(8, 8, 2, 8, 2).mean((2, 4))).astype(np.uint8))
        assert (crop_s1 == PRESENT).sum() == 8 and (crop_s1[1:3, 1:3, 1:3] == PRESENT).all()


def test_v2_layout_matches_the_published_one(tmp_path):
    path = write_store(tmp_path / "gen.zarr", raw_volume(), VOXEL, [crop()])
    zarray = json.loads((path / "recon-1/em/fibsem-uint8/s0/.zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["dtype"] == "|u1" and zarray["order"] == "C"
    assert (path / "recon-1/em/fibsem-uint8/s0/0/0/0").is_file()  # "/"-separated chunk keys
    group = json.loads((path / "recon-1/labels/groundtruth/crop1/mito_mem/.zattrs").read_text())
    annotation = group["cellmap"]["annotation"]
    assert annotation["class_name"] == "mito_mem"
    assert annotation["annotation_type"] == {"type": "semantic_segmentation",
                                             "encoding": {"absent": 0, "present": 1, "unknown": 255}}
    s0 = json.loads((path / "recon-1/labels/groundtruth/crop1/er_mem/s0/.zattrs").read_text())
    counts = s0["cellmap"]["annotation"]["complement_counts"]
    er = labels()["er_mem"]
    assert counts == {"absent": int((er == ABSENT).sum()), "unknown": int((er == UNKNOWN).sum())}
    crop_attrs = json.loads((path / "recon-1/labels/groundtruth/crop1/.zattrs").read_text())
    assert crop_attrs["cellmap"]["annotation"]["class_names"] == ["mito_mem", "er_mem"]
    assert crop_attrs["note"] == "test"
    em = json.loads((path / "recon-1/em/fibsem-uint8/.zattrs").read_text())["multiscales"][0]
    assert em["version"] == "0.4" and [a["unit"] for a in em["axes"]] == ["nanometer"] * 3


def test_provenance_is_written(tmp_path):
    path = write_store(tmp_path / "a.zarr", raw_volume(), VOXEL)
    attrs = json.loads((path / ".zattrs").read_text())
    assert attrs["emserve"]["version"] == __version__ and "created" in attrs["emserve"]
    path = write_store(tmp_path / "b.zarr", raw_volume(), VOXEL,
                       attrs=provenance(seed=np.int64(3), model_sha256="ab" * 32, command=["emserve", "generate"]))
    attrs = json.loads((path / ".zattrs").read_text())["emserve"]
    assert attrs["seed"] == 3 and attrs["model_sha256"] == "ab" * 32 and attrs["command"] == ["emserve", "generate"]


def bad_crop() -> CropToWrite:
    """A crop with a class array holding a value that is no label: writing it fails with the EM pyramid already
    on disk."""
    data = labels()
    data["er_mem"] = np.full((4, 8, 8), 7, np.uint8)
    return CropToWrite("crop1", (2, 4, 6), data)


def test_failure_in_the_middle_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"crop crop1/er_mem: label values must be 0 \(absent\), 1 \(present\) or "
                                         r"255 \(unknown\); found \[7\]"):
        write_store(tmp_path / "out" / "gen.zarr", raw_volume(), VOXEL, [bad_crop()])
    assert siblings(tmp_path / "out" / "gen.zarr") == []  # neither the store nor its temporary folder


def test_failed_overwrite_keeps_the_old_store(tmp_path):
    path = write_store(tmp_path / "gen.zarr", raw_volume(), VOXEL, attrs={"generation": 1})
    with pytest.raises(ValueError, match="label values must be"):
        write_store(path, raw_volume(), VOXEL, [bad_crop()], attrs={"generation": 2}, overwrite=True)
    assert json.loads((path / ".zattrs").read_text())["generation"] == 1
    assert siblings(path) == ["gen.zarr"]


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = write_store(tmp_path / "gen.zarr", raw_volume(), VOXEL, attrs={"generation": 1})
    with pytest.raises(FileExistsError, match="already exists; choose another path or pass --overwrite") as err:
        write_store(path, raw_volume(), VOXEL, attrs={"generation": 2})
    assert "\n" not in str(err.value)
    write_store(path, raw_volume(), VOXEL, attrs={"generation": 2}, overwrite=True)
    assert json.loads((path / ".zattrs").read_text())["generation"] == 2
    assert siblings(path) == ["gen.zarr"]


def test_overwrite_replaces_only_stores_model_folders_and_empty_folders(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"notes is neither a store nor a model folder \(it has none of "
                                              r"\.zgroup, zarr\.json, attributes\.json, card\.json\); "
                                              r"--overwrite refuses to delete it"):
        write_store(notes, raw_volume(), VOXEL, overwrite=True)
    (tmp_path / "file.zarr").write_text("a file")
    with pytest.raises(FileExistsError, match=r"file\.zarr exists and is not a folder"):
        write_store(tmp_path / "file.zarr", raw_volume(), VOXEL, overwrite=True)
    assert (notes / "thesis.txt").read_text() == "years of work" and (tmp_path / "file.zarr").read_text() == "a file"
    (tmp_path / "empty").mkdir()
    assert first_level(write_store(tmp_path / "empty", raw_volume(), VOXEL, overwrite=True)).shape == (8, 16, 16)


@pytest.mark.parametrize("out", ["in.zarr", "in.zarr/inner.zarr", "."])
def test_an_output_that_is_inside_or_holds_an_input_is_refused_and_the_input_kept(tmp_path, out):
    source = write_store(tmp_path / "in.zarr", raw_volume(), VOXEL)
    with pytest.raises(ValueError, match=f"output: .* is the input {source}, inside it or around it"):
        write_store(tmp_path / out, raw_volume(), VOXEL, overwrite=True, inputs=[source])
    np.testing.assert_array_equal(first_level(source), raw_volume())


def test_the_next_writer_clears_what_killed_writers_left_and_only_that(tmp_path, dead_writer):
    store = write_store(tmp_path / "gen.zarr", raw_volume(), VOXEL)
    killed = [tmp_path / f".gen.zarr.tmp-{dead_writer}-1a2b3c4d", tmp_path / f".gen.zarr.old-{dead_writer}-5e6f7a8b",
              store / ".staging" / f"{dead_writer}-9c0d1e2f"]
    running = [tmp_path / f".gen.zarr.tmp-{writer_tag()}-1a2b3c4d", store / ".staging" / f"{writer_tag()}-00000000"]
    for folder in killed + running:
        folder.mkdir(parents=True)
    add_crop(store, crop(), VOXEL)
    write_store(store, raw_volume(), VOXEL, overwrite=True)
    assert [p.exists() for p in killed + running] == [False] * 3 + [True, False]  # the store was replaced whole
    assert siblings(store) == sorted(["gen.zarr", running[0].name])


def test_atomic_directory_refuses_remote_paths(tmp_path):
    with pytest.raises(ValueError, match="remote"), atomic_directory("s3://bucket/x.zarr"):
        pass


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_add_crop_is_atomic(tmp_path, zarr_format):
    path = write_store(tmp_path / "gen.zarr", raw_volume(), VOXEL, translation=ORIGIN, zarr_format=zarr_format)
    add_crop(path, crop("crop2", offset=(0, 0, 0)), VOXEL, ORIGIN)
    store = EMStore(path)
    assert store.crops == ("crop2",)
    np.testing.assert_array_equal(store.read_crop("crop2", ["mito_mem"]).labels[0], labels()["mito_mem"])
    with pytest.raises(FileExistsError, match="crop2 already exists"):
        add_crop(path, crop("crop2"), VOXEL, ORIGIN)
    bad = CropToWrite("crop3", (0, 0, 0), {"mito_mem": np.full((4, 8, 8), 256)})
    with pytest.raises(ValueError, match=r"label values must be 0 \(absent\), 1 \(present\) or 255.*\[256\]"):
        add_crop(path, bad, VOXEL, ORIGIN)
    assert not (path / "recon-1/labels/groundtruth/crop3").exists()
    assert not (path / ".staging").exists()
    assert EMStore(path).crops == ("crop2",)


def test_add_crop_to_a_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a local zarr store"):
        add_crop(tmp_path / "none.zarr", crop(), VOXEL)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"raw": np.zeros((4, 4), np.uint8)}, "raw: expected a z-y-x volume"),
    ({"raw": np.zeros((4, 4, 4), np.uint16)}, "raw: expected uint8"),
    ({"voxel_size": (4, 4)}, r"voxel_size: \[4, 4\] is not three positive numbers"),
    ({"voxel_size": (4, 0, 4)}, "voxel_size"),
    ({"levels": 0}, "levels: 0 is not a positive integer"),
    ({"zarr_format": 4}, "zarr_format: 4 is not supported"),
    ({"crops": [CropToWrite("c", (0, 0, 0), {"mitochondria": np.zeros((2, 2, 2), np.uint8)})]},
     "unknown class name 'mitochondria'"),
])
def test_bad_input_is_named(tmp_path, kwargs, match):
    args = {"raw": raw_volume(), "voxel_size": VOXEL, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        write_store(tmp_path / "bad.zarr", **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad.zarr").exists()
    assert list(tmp_path.iterdir()) == []

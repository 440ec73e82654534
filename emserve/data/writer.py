"""Write vEM stores in the CellMap layout, atomically.

Everything is written under a temporary name beside its destination and renamed into place at the end, so a
crash or Ctrl-C never leaves a half-written store or crop where a reader would find it. Stores are zarr v2 with
"/"-separated chunk keys, OME-NGFF 0.4 multiscales and `cellmap.annotation` attributes, like the published
CellMap data (readable by napari, neuroglancer and the CellMap tools); zarr v3 is available for tools that want
it. The root carries provenance (`emserve`: version, creation time, and whatever the caller adds).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emserve.classes import ABSENT, ENCODING, PRESENT, UNKNOWN, check_class_names
from emserve.data.lock import LOCK_NAME, clear_leftovers, store_lock, temporary_name
from emserve.data.ngff import multiscales_attrs, pyramid_factors, pyramid_levels
from emserve.data.sources import EM_GROUP, GROUNDTRUTH_GROUP, is_remote

EM_NAME = "fibsem-uint8"
INFERENCE_GROUP = "recon-1/labels/inference"  # predictions of `emserve segment`, beside labels/groundtruth
CHUNKS = 64


@dataclass
class CropToWrite:
    """Labels of one crop: per-class uint8 arrays (0 absent, 1 present, 255 unknown) placed at `offset` voxels
    of the EM's finest level. `ids` optionally holds atomic class ids for the `all` array."""

    name: str
    offset: tuple[int, int, int]
    labels: Mapping[str, np.ndarray]
    ids: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)


def provenance(**fields: Any) -> dict[str, Any]:
    """Provenance attributes: who wrote the store, when, and how (JSON-safe Python types only)."""
    from emserve import __version__

    return {"emserve": {"version": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                        **_json_safe(fields)}}


# What emserve writes carries one of these at its root: a zarr v2 / v3 or N5 store, a model or checkpoint folder.
OWN_MARKERS = (".zgroup", "zarr.json", "attributes.json", "card.json")


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False,
                     inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block finishes without an exception.

    `overwrite` replaces only an empty folder or one emserve could have written (`OWN_MARKERS`), never an input
    of the job (`inputs`), a folder holding one or a folder inside one: a mistyped path loses nothing."""
    final = check_output(path, overwrite, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    for kind in (".tmp-", ".old-"):  # what killed writers of this path left
        clear_leftovers(final.parent, f".{final.name}{kind}")
    tmp = final.with_name(temporary_name(f".{final.name}.tmp-", uuid.uuid4().hex[:8]))
    try:
        yield tmp
        fsync_tree(tmp)  # on disk before it has its name: a power cut never leaves a named but empty file
        if not final.exists():
            tmp.rename(final)
        elif overwrite:  # move the old one aside first: a rename cannot replace a non-empty folder
            trash = _aside(final)
            tmp.rename(final)
            shutil.rmtree(trash)
        else:
            raise FileExistsError(f"output: {final} appeared while writing; choose another path or pass --overwrite")
        fsync_tree(final.parent, recursive=False)  # the rename itself
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_output(path: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike]) -> Path:
    """`path` as a local output that may be written: not remote, apart from the inputs, and new unless
    `overwrite` (and then replaceable)."""
    if is_remote(path):
        raise ValueError(f"output: {path} is remote; emserve writes stores to local paths only")
    final = Path(path)
    check_apart(final, inputs)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output: {final} already exists; choose another path or pass --overwrite")
        check_replaceable(final)
    return final


PARTIAL_SUFFIX = ".partial"


@contextmanager
def resumable_directory(path: str | os.PathLike, differs: Callable[[Path], str], overwrite: bool = False,
                        inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a work folder `.<name>.partial` beside `path`, which may hold an earlier run to continue; it becomes
    `path` only if the block finishes. Unlike `atomic_directory` a failure keeps the work folder, so a long job
    killed mid-way continues where it stopped when rerun with the same settings.

    `differs(folder)` says how an earlier run's settings differ from this one's ("" when they agree): such a run is
    refused, or discarded with `overwrite`, which also replaces an existing `path` (only once the new one is
    complete). One writer at a time holds the work folder's lock (`emserve.data.lock`)."""
    final = check_output(path, overwrite, inputs)
    work = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
    if work.is_dir():
        difference = differs(work)
        if difference and not overwrite:
            raise ValueError(f"output: {work} holds an unfinished run with other settings ({difference}); rerun "
                             f"with those to continue it, or pass --overwrite to discard it")
        if difference:
            remove_directory(work)
    work.mkdir(parents=True, exist_ok=True)
    with store_lock(work):
        yield work
        (work / LOCK_NAME).unlink()
        fsync_tree(work)
        trash = _aside(final) if final.exists() else None
        work.rename(final)
        if trash is not None:
            shutil.rmtree(trash)
        fsync_tree(final.parent, recursive=False)


def fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush a file, or a folder's entries (and with `recursive` everything below it), to disk.

    A rename is what marks a store, crop or checkpoint done; without this, after a power cut the name could
    survive while the data written before it did not."""
    if path.is_dir():
        if recursive:
            for child in path.iterdir():
                if not child.is_symlink():
                    fsync_tree(child)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_replaceable(path: Path) -> None:
    """Refuse to replace anything but an empty folder or a store / model folder (`OWN_MARKERS`)."""
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"output: {path} exists and is not a folder; --overwrite replaces only stores and "
                              f"model folders")
    if any(path.iterdir()) and not any((path / marker).is_file() for marker in OWN_MARKERS):
        raise FileExistsError(f"output: {path} is neither a store nor a model folder (it has none of "
                              f"{', '.join(OWN_MARKERS)}); --overwrite refuses to delete it")


def check_apart(out: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output that is an input, lies inside one or holds one: replacing it would delete the input."""
    target = out.resolve()
    for given in inputs:
        if is_remote(given):
            continue
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"output: {out} is the input {given}, inside it or around it; choose another path")


def remove_directory(path: Path) -> None:
    """Delete a folder so that a kill mid-way never leaves a partial one under its name: it is renamed to a hidden
    name first (readers skip names starting with a dot), then deleted."""
    shutil.rmtree(_aside(path))


def _aside(path: Path) -> Path:
    trash = path.with_name(temporary_name(f".{path.name}.old-", uuid.uuid4().hex[:8]))
    path.rename(trash)
    return trash


def write_store(
    path: str | os.PathLike,
    raw: np.ndarray,
    voxel_size: Sequence[float],
    crops: Sequence[CropToWrite] = (),
    *,
    translation: Sequence[float] = (0.0, 0.0, 0.0),
    levels: int = 2,
    attrs: Mapping[str, Any] | None = None,
    zarr_format: int = 2,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write an EM volume (uint8 z-y-x) and its labelled crops as `<path>` in the CellMap layout.

    The root carries provenance attributes (emserve version, creation time) unless `attrs` brings its own
    `emserve` entry, e.g. from `provenance(seed=..., model_sha256=...)`. `inputs`: the files the store was made
    from, which the output may not be, lie in or hold (see `atomic_directory`).
    """
    raw = _check_raw(raw)
    voxel_size, translation = _check_geometry(voxel_size, translation, levels)
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format: {zarr_format} is not supported; expected 2 (as published) or 3")
    with atomic_directory(path, overwrite, inputs) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        root.attrs.update({**provenance(), **_json_safe(dict(attrs or {}))})
        em = root.require_group(EM_GROUP).create_group(EM_NAME)
        em_levels = pyramid_levels(voxel_size, translation, levels)
        em.attrs.update(multiscales_attrs(EM_NAME, em_levels))
        for level, data in zip(em_levels, _pyramid(raw, voxel_size, levels, block_mean), strict=True):
            _create(em, level.path, data, zarr_format)
        for crop in crops:
            _write_crop(root.require_group(GROUNDTRUTH_GROUP), crop, voxel_size, translation, levels, zarr_format)
    return Path(path)


def add_crop(
    path: str | os.PathLike,
    crop: CropToWrite,
    voxel_size: Sequence[float],
    translation: Sequence[float] = (0.0, 0.0, 0.0),
    levels: int = 1,
) -> None:
    """Add one crop to an existing local store atomically: staged inside the store, then renamed into place.

    Staging inside the store keeps the final rename on one file system; a crash leaves only a folder in
    `.staging/`, which no reader looks at, and the next `add_crop` clears it.
    """
    voxel_size, translation = _check_geometry(voxel_size, translation, levels)
    if is_remote(path) or not Path(path).is_dir():
        raise FileNotFoundError(f"store: {path} is not a local zarr store; add_crop needs one written by write_store")
    try:
        root = zarr.open_group(str(path), mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise FileNotFoundError(f"store: {path} is not a zarr group (no .zgroup / zarr.json)") from None
    zarr_format = root.metadata.zarr_format
    root.require_group(GROUNDTRUTH_GROUP)
    final = Path(path) / GROUNDTRUTH_GROUP / crop.name
    if final.exists():
        raise FileExistsError(f"crop: {final} already exists")
    clear_leftovers(Path(path) / ".staging", "")
    staging = Path(path) / ".staging" / temporary_name("", uuid.uuid4().hex[:8])
    try:
        parent = zarr.open_group(str(staging), mode="w", zarr_format=zarr_format)
        _write_crop(parent, crop, voxel_size, translation, levels, zarr_format)
        fsync_tree(staging / crop.name)
        (staging / crop.name).rename(final)
        fsync_tree(final.parent, recursive=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # left while another writer stages there
            staging.parent.rmdir()


def create_class_arrays(root: zarr.Group, group: str, classes: Sequence[str], shapes: Sequence[Sequence[int]],
                        voxel_size: Sequence[float], translation: Sequence[float], chunks: Sequence[int],
                        annotation: bool = True) -> None:
    """Empty uint8 arrays `<group>/<class>/s0..`, one pyramid level per shape in `shapes` (levels as
    `pyramid_levels`), to be filled block by block (predictions).

    With `annotation` they carry the `cellmap.annotation` encoding (0 absent, 1 present); without, they hold
    other per-class values (probabilities scaled to 0..255) and only the geometry.
    """
    levels = pyramid_levels(voxel_size, translation, len(shapes))
    for cls in check_class_names(classes):
        g = root.require_group(group).create_group(cls)
        g.attrs.update({**multiscales_attrs(cls, levels), **(_annotation_attrs(cls) if annotation else {})})
        for level, shape in zip(levels, shapes, strict=True):
            g.create_array(level.path, shape=tuple(shape), dtype=np.uint8, fill_value=0,
                           chunks=tuple(min(c, s) for c, s in zip(chunks, shape, strict=True)),
                           chunk_key_encoding={"name": "v2", "separator": "/"})


def _write_crop(parent: zarr.Group, crop: CropToWrite, voxel_size: Sequence[float], em_translation: Sequence[float],
                levels: int, zarr_format: int) -> None:
    classes = check_class_names(crop.labels) if crop.labels else ()  # a crop may only carry attributes
    shapes = {k: np.shape(v) for k, v in crop.labels.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"crop {crop.name}: class arrays differ in shape: {shapes}")
    group = parent.create_group(crop.name)
    group.attrs.update({**_crop_attrs(crop.name, classes), **_json_safe(dict(crop.attrs))})
    translation = [t + o * v for t, o, v in zip(em_translation, crop.offset, voxel_size, strict=True)]
    crop_levels = pyramid_levels(voxel_size, translation, levels)
    for cls in classes:
        data = _check_labels(crop.labels[cls], f"crop {crop.name}/{cls}")
        g = group.create_group(cls)
        g.attrs.update({**multiscales_attrs(cls, crop_levels), **_annotation_attrs(cls)})
        for level, arr in zip(crop_levels, _pyramid(data, voxel_size, levels, block_vote), strict=True):
            _create(g, level.path, arr, zarr_format).attrs.update(_annotation_attrs(cls, arr))
    if crop.ids is not None:
        g = group.create_group("all")
        g.attrs.update(multiscales_attrs("all", crop_levels[:1]))
        _create(g, "s0", np.asarray(crop.ids), zarr_format)


def _annotation_attrs(name: str, data: np.ndarray | None = None) -> dict[str, Any]:
    """The `cellmap.annotation` attributes of a class group (name, encoding) or, given its data, of one array.

    As in cellmap-schemas (`AnnotationGroupAttrs` / `AnnotationArrayAttrs`): only arrays carry
    `complement_counts`, the number of absent and unknown voxels, from which the present count follows.
    """
    annotation: dict[str, Any] = {
        "class_name": name,
        "annotation_type": {"type": "semantic_segmentation", "encoding": dict(ENCODING)},
    }
    if data is not None:
        annotation["complement_counts"] = {"absent": int((data == ABSENT).sum()),
                                           "unknown": int((data == UNKNOWN).sum())}
    return {"cellmap": {"annotation": annotation}}


def _crop_attrs(name: str, classes: Sequence[str]) -> dict[str, Any]:
    """The crop group's `cellmap.annotation` (cellmap-schemas `CropGroupAttrs` 0.1.1): which classes it holds."""
    return {"cellmap": {"annotation": {
        "version": "0.1.1", "name": name, "description": None, "created_by": [], "created_with": ["emserve"],
        "start_date": None, "end_date": None, "duration_days": None, "protocol_uri": None,
        "class_names": list(classes),
    }}}


def _create(group: zarr.Group, name: str, data: np.ndarray, zarr_format: int) -> zarr.Array:
    """A chunked array like the published ones: v2 chunk keys use "/" (`dimension_separator`), v3 names axes."""
    chunks = tuple(min(CHUNKS, s) for s in data.shape)
    layout = ({"dimension_names": ["z", "y", "x"]} if zarr_format == 3
              else {"chunk_key_encoding": {"name": "v2", "separator": "/"}})
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0, **layout)
    arr[...] = data
    return arr


def _check_geometry(voxel_size: Sequence[float], translation: Sequence[float],
                    levels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    vs = tuple(float(v) for v in voxel_size)
    tr = tuple(float(t) for t in translation)
    if len(vs) != 3 or not all(v > 0 for v in vs):
        raise ValueError(f"voxel_size: {list(voxel_size)} is not three positive numbers; expected z, y, x in nm")
    if len(tr) != 3:
        raise ValueError(f"translation: {list(translation)} is not three numbers; expected z, y, x in nm")
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels: {levels} is not a positive integer; expected 1 or more pyramid levels")
    return vs, tr


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as uint8, checked before the cast so that 256 or -1 cannot wrap round into a valid value."""
    labels = np.asarray(labels)
    bad = ~np.isin(labels, (ABSENT, PRESENT, UNKNOWN))
    if bad.any():
        raise ValueError(f"{where}: label values must be 0 (absent), 1 (present) or 255 (unknown); "
                         f"found {sorted(np.unique(labels[bad]).tolist())[:5]}")
    return labels.astype(np.uint8)


def _check_raw(raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise ValueError(f"raw: expected a z-y-x volume with 3 dimensions, got shape {raw.shape}")
    if raw.dtype != np.uint8:
        raise ValueError(f"raw: expected uint8 EM (fibsem-uint8), got {raw.dtype}")
    return raw


def _pyramid(data: np.ndarray, voxel_size: Sequence[float], levels: int, reduce) -> list[np.ndarray]:
    """`data` at every level of `pyramid_factors`, each level reduced from the one before."""
    out = [data]
    for before, after in itertools.pairwise(pyramid_factors(voxel_size, levels)):
        out.append(reduce(out[-1], tuple(a // b for a, b in zip(after, before, strict=True))))
    return out


def _blocks(data: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """[z', y', x', n] view of the blocks `step` (1 or 2 per axis) spans (odd edges dropped); a single plane
    stays single."""
    fz, fy, fx = (s if n > 1 else 1 for s, n in zip(step, data.shape, strict=True))
    z, y, x = data.shape[0] // fz, data.shape[1] // fy, data.shape[2] // fx
    d = data[: z * fz, : y * fy, : x * fx].reshape(z, fz, y, fy, x, fx)
    return d.transpose(0, 2, 4, 1, 3, 5).reshape(z, y, x, -1)


def block_mean(data: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """Mean of each block, rounded back to the EM's integer type."""
    return np.round(_blocks(data, step).mean(-1)).astype(data.dtype)


def block_vote(data: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """Majority vote among annotated voxels; unknown where most of the block is unknown."""
    blocks = _blocks(data, step)
    known = (blocks != UNKNOWN).sum(-1)
    present = (blocks == PRESENT).sum(-1)
    out = np.where(present * 2 > known, PRESENT, ABSENT).astype(np.uint8)
    out[known * 2 < blocks.shape[-1]] = UNKNOWN
    return out


def _json_safe(value: Any) -> Any:
    """Attributes must be plain JSON types: numpy scalars break zarr's attribute store."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value

"""Read vEM stores in the CellMap / OpenOrganelle layout, locally or from `s3://`, zarr v2 or v3 (and N5 EM).

    <ds>.zarr/recon-1/em/fibsem-uint8/s0..sN                  EM, OME-NGFF 0.4 multiscale, z-y-x, nm
    <ds>.zarr/recon-1/labels/groundtruth/crop<N>/<class>/s0..  one array per annotated class (0/1/255)
    <ds>.zarr/recon-1/labels/groundtruth/crop<N>/all/s0..      atomic class ids
    <ds>.n5/em/fibsem-uint16/s0..                              EM only, attributes in x-y-z order

A class with no array in a crop was not annotated there: it reads as UNKNOWN (255) everywhere, never as absent,
so that the loss can leave it out. A group class (mito, ...) with no array of its own is derived from its atomic
members: present where any member is present, absent only where all members are known to be absent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr

from emserve.classes import ABSENT, PRESENT, UNKNOWN, atomic_members, check_class_names, get_class
from emserve.data.ngff import ScaleLevel, parse_multiscales, select_level

EM_GROUP = "recon-1/em"
GROUNDTRUTH_GROUP = "recon-1/labels/groundtruth"
PREFERRED_EM = ("fibsem-uint8", "fibsem-uint16", "fibsem-int16")
RAW_PERCENTILES = (0.5, 99.5)


class Volume(Protocol):
    """A z-y-x array that reads a numpy block when sliced (zarr arrays, and the N5 wrapper below)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: Any) -> np.ndarray: ...


@dataclass
class LabelledCrop:
    """One annotated crop read at one voxel size: raw EM in [-1, 1] and per-class labels (0/1/255)."""

    dataset: str
    name: str
    classes: tuple[str, ...]
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    raw: np.ndarray  # float32 [z, y, x] in [-1, 1]
    labels: np.ndarray  # uint8 [len(classes), z, y, x]: ABSENT, PRESENT or UNKNOWN

    @property
    def annotated(self) -> np.ndarray:
        """Bool [len(classes), z, y, x]: where each class was annotated (known present or absent)."""
        return self.labels != UNKNOWN


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def storage_options_for(path: str | os.PathLike) -> dict[str, Any] | None:
    """Anonymous access for public buckets; the endpoint comes from AWS_ENDPOINT_URL like every AWS tool."""
    if not is_remote(path):
        return None
    options: dict[str, Any] = {"anon": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def open_group(path: str | os.PathLike) -> zarr.Group:
    """Open a zarr group read-only; a missing local path is an error here, not a silently created group."""
    if is_remote(path):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{path}: reading s3:// needs the 's3' extra: pip install 'emserve[s3]'") from None
        store = zarr.storage.FsspecStore.from_url(str(path), storage_options=storage_options_for(path),
                                                  read_only=True)
    else:
        if not Path(path).exists():
            raise FileNotFoundError(f"store: {path} does not exist; expected a <dataset>.zarr folder")
        store = zarr.storage.LocalStore(str(path), read_only=True)
    try:
        return zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise FileNotFoundError(f"store: {path} is not a zarr group (no .zgroup / zarr.json)") from None


class N5Volume:
    """An N5 dataset read through tensorstore, presented z-y-x (N5 stores dimensions in x-y-z order)."""

    def __init__(self, path: str, dataset: str):
        try:
            import tensorstore as ts
        except ImportError:
            raise RuntimeError(f"{path}: reading N5 needs the 'n5' extra: pip install 'emserve[n5]'") from None
        if is_remote(path):
            bucket, _, prefix = path[len("s3://"):].partition("/")
            kvstore: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": f"{prefix}/{dataset}/"}
            endpoint = (storage_options_for(path) or {}).get("client_kwargs", {}).get("endpoint_url")
            if endpoint:
                kvstore["endpoint"] = endpoint
                kvstore["aws_credentials"] = {"type": "anonymous"}
        else:
            kvstore = {"driver": "file", "path": str(Path(path) / dataset)}
        self._array = ts.open({"driver": "n5", "kvstore": kvstore, "open": True}, read=True).result()
        self.shape = tuple(int(s) for s in self._array.shape[::-1])
        self.dtype = np.dtype(self._array.dtype.numpy_dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array.T[key].read().result())


class EMStore:
    """One vEM dataset: its EM multiscale image and its ground-truth crops."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.name = Path(self.path.rstrip("/")).name.removesuffix(".zarr").removesuffix(".n5")
        self.is_n5 = self.path.rstrip("/").endswith(".n5")
        if self.is_n5:
            self._n5_attrs = _read_n5_json(self.path)
            self.root = None
        else:
            self.root = open_group(self.path)

    # --- EM -------------------------------------------------------------------------------------------------
    @cached_property
    def em_group_path(self) -> str:
        if self.is_n5:
            return _find_n5_em(self.path, self._n5_attrs)
        try:
            em = self.root[EM_GROUP]
        except KeyError:
            raise ValueError(f"store {self.path}: no group {EM_GROUP}; expected the CellMap layout "
                             f"<ds>.zarr/{EM_GROUP}/fibsem-uint8/s0") from None
        names = [n for n, _ in em.groups()]
        for name in (*PREFERRED_EM, *sorted(names)):
            if name in names:
                return f"{EM_GROUP}/{name}"
        raise ValueError(f"store {self.path}: {EM_GROUP} holds no EM image group; expected one of {PREFERRED_EM}")

    @cached_property
    def em_attrs(self) -> Mapping[str, Any]:
        if self.is_n5:
            return _read_n5_json(f"{self.path.rstrip('/')}/{self.em_group_path}")
        return self.root[self.em_group_path].attrs.asdict()

    @cached_property
    def em_levels(self) -> list[ScaleLevel]:
        where = f"{self.path}/{self.em_group_path}"
        if self.is_n5:
            return _n5_levels(self.path, self.em_group_path, self.em_attrs)
        return parse_multiscales(self.em_attrs, where)

    def em_level(self, voxel_size: Sequence[float] | None = None) -> ScaleLevel:
        return select_level(self.em_levels, voxel_size, f"{self.path}/{self.em_group_path}")

    def em_volume(self, level: ScaleLevel) -> Volume:
        if self.is_n5:
            return N5Volume(self.path, f"{self.em_group_path}/{level.path}")
        return self.root[f"{self.em_group_path}/{level.path}"]

    @cached_property
    def contrast_window(self) -> tuple[float, float]:
        """Raw values that map to -1 and +1.

        From attributes when the store has them (OME-NGFF `omero` channel window, or CellMap's
        `contrastAdjustment`), else from the 0.5 / 99.5 percentiles of the coarsest level (cheap to read whole).
        """
        attrs = self.em_attrs
        try:
            window = attrs["omero"]["channels"][0]["window"]
            return float(window["start"]), float(window["end"])
        except (KeyError, IndexError, TypeError):
            pass
        if "contrastAdjustment" in attrs:
            adj = attrs["contrastAdjustment"]
            return float(adj["min"]), float(adj["max"])
        coarse = np.asarray(self.em_volume(self.em_levels[-1])[...], dtype=np.float32)
        lo, hi = np.percentile(coarse, RAW_PERCENTILES)
        return float(lo), float(max(hi, lo + 1))

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw EM values to float32 in [-1, 1] with this store's contrast window."""
        lo, hi = self.contrast_window
        return np.clip((raw.astype(np.float32) - lo) / (hi - lo) * 2 - 1, -1, 1)

    # --- ground truth -----------------------------------------------------------------------------------------
    @cached_property
    def crops(self) -> tuple[str, ...]:
        """Names of the ground-truth crops, in natural order (crop2 before crop10)."""
        if self.is_n5 or GROUNDTRUTH_GROUP not in self.root:
            return ()
        names = [n for n, _ in self.root[GROUNDTRUTH_GROUP].groups()]
        return tuple(sorted(names, key=_natural_key))

    def crop_group(self, crop: str) -> zarr.Group:
        if crop not in self.crops:
            raise ValueError(f"crop: {crop!r} is not in {self.path}; available: {', '.join(self.crops) or 'none'}")
        return self.root[f"{GROUNDTRUTH_GROUP}/{crop}"]

    def crop_classes(self, crop: str) -> tuple[str, ...]:
        """Classes annotated in `crop` (arrays present), without the `all` id array."""
        return tuple(sorted(n for n, _ in self.crop_group(crop).groups() if n != "all"))

    def read_crop(self, crop: str, classes: Sequence[str], voxel_size: Sequence[float] | None = None) -> LabelledCrop:
        """Raw EM and labels of one crop at one voxel size (the crop's finest level when none is given)."""
        classes = check_class_names(classes)
        group = self.crop_group(crop)
        annotated = self.crop_classes(crop)
        if not annotated:
            raise ValueError(f"crop {self.path}/{crop}: holds no class arrays")
        ref = annotated[0]
        level = select_level(parse_multiscales(group[ref].attrs.asdict(), f"{crop}/{ref}"), voxel_size,
                             f"{self.path}/{crop}/{ref}")
        shape = group[f"{ref}/{level.path}"].shape
        labels = np.stack([self._read_class(group, crop, name, annotated, level, shape) for name in classes])
        raw = self.normalize(self._em_block(level, shape, crop))
        return LabelledCrop(self.name, crop, classes, level.voxel_size, level.translation, raw, labels)

    def _read_class(self, group: zarr.Group, crop: str, name: str, annotated: Sequence[str], level: ScaleLevel,
                    shape: tuple[int, ...]) -> np.ndarray:
        if name in annotated:
            return _read_label_array(group[name], level, f"{self.path}/{crop}/{name}", shape)
        members = atomic_members(name)
        if get_class(name).is_group and any(m in annotated for m in members):
            # present where any member is present; absent only where every member is known absent
            parts = np.stack([
                _read_label_array(group[m], level, f"{self.path}/{crop}/{m}", shape) if m in annotated
                else np.full(shape, UNKNOWN, dtype=np.uint8)
                for m in members
            ])
            out = np.full(shape, UNKNOWN, dtype=np.uint8)
            out[(parts == ABSENT).all(0)] = ABSENT
            out[(parts == PRESENT).any(0)] = PRESENT
            return out
        return np.full(shape, UNKNOWN, dtype=np.uint8)

    def _em_block(self, level: ScaleLevel, shape: tuple[int, ...], crop: str) -> np.ndarray:
        """The EM voxels under a crop: its translation (nm) minus the EM's, in EM voxels of the same size."""
        em = self.em_level(level.voxel_size)
        offset = (np.asarray(level.translation) - np.asarray(em.translation)) / np.asarray(em.voxel_size)
        start = np.round(offset).astype(int)
        if not np.allclose(offset, start, atol=0.05):
            raise ValueError(f"crop {self.path}/{crop}: translation {level.translation} nm is not on the EM grid "
                             f"(EM {em.path} starts at {em.translation} nm with voxel size {em.voxel_size})")
        volume = self.em_volume(em)
        stop = start + np.asarray(shape)
        if (start < 0).any() or (stop > np.asarray(volume.shape)).any():
            raise ValueError(f"crop {self.path}/{crop}: voxels {start.tolist()}..{stop.tolist()} lie outside the "
                             f"EM volume of shape {list(volume.shape)} at {em.path}")
        return np.asarray(volume[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))])


def _read_label_array(group: zarr.Group, level: ScaleLevel, where: str, shape: tuple[int, ...]) -> np.ndarray:
    """A class array at `level`, re-encoded from the store's `cellmap.annotation` encoding to 0/1/255."""
    lv = select_level(parse_multiscales(group.attrs.asdict(), where), level.voxel_size, where)
    data = np.asarray(group[lv.path][...])
    if data.shape != tuple(shape):
        raise ValueError(f"{where}: shape {data.shape} differs from the crop's other classes {tuple(shape)}")
    encoding = _annotation_encoding(group.attrs.asdict())
    out = np.full(data.shape, UNKNOWN, dtype=np.uint8)
    out[data == encoding.get("absent", ABSENT)] = ABSENT
    out[data == encoding.get("present", PRESENT)] = PRESENT
    if "unknown" not in encoding:  # stores without an explicit unknown value: anything else is present
        out[(data != encoding.get("absent", ABSENT))] = PRESENT
    return out


def _annotation_encoding(attrs: Mapping[str, Any]) -> dict[str, int]:
    try:
        return dict(attrs["cellmap"]["annotation"]["annotation_type"]["encoding"])
    except (KeyError, TypeError):
        return {"absent": ABSENT, "present": PRESENT, "unknown": UNKNOWN}


def _natural_key(name: str) -> tuple:
    digits = "".join(c for c in name if c.isdigit())
    return (name.rstrip("0123456789"), int(digits) if digits else -1, name)


# --- N5 ------------------------------------------------------------------------------------------------------
def _read_n5_json(path: str) -> dict[str, Any]:
    import json

    if is_remote(path):
        import fsspec

        fs = fsspec.filesystem("s3", **storage_options_for(path))
        target = f"{path.rstrip('/')}/attributes.json"
        if not fs.exists(target):
            raise FileNotFoundError(f"store: {target} does not exist; expected an N5 container")
        return json.loads(fs.cat(target))
    p = Path(path) / "attributes.json"
    if not p.exists():
        raise FileNotFoundError(f"store: {p} does not exist; expected an N5 container (<ds>.n5/attributes.json)")
    return json.loads(p.read_text())


def _find_n5_em(path: str, root_attrs: Mapping[str, Any]) -> str:
    for name in PREFERRED_EM:
        try:
            _read_n5_json(f"{path.rstrip('/')}/em/{name}")
            return f"em/{name}"
        except FileNotFoundError:
            continue
    raise ValueError(f"store {path}: no EM group em/<{'|'.join(PREFERRED_EM)}> in this N5 container")


def _n5_levels(path: str, group: str, attrs: Mapping[str, Any]) -> list[ScaleLevel]:
    """Levels of an N5 multiscale group; N5 attributes list x, y, z, so everything is reversed to z, y, x."""
    if "multiscales" in attrs:  # N5 written with OME-NGFF-style metadata (already in z, y, x)
        return parse_multiscales(attrs, f"{path}/{group}")
    levels = []
    for i in range(len(attrs.get("scales", [[1, 1, 1]]))):
        level_attrs = _read_n5_json(f"{path.rstrip('/')}/{group}/s{i}")
        transform = level_attrs.get("transform", {})
        res = transform.get("scale") or level_attrs.get("pixelResolution", {}).get("dimensions")
        if res is None:
            raise ValueError(f"{path}/{group}/s{i}: no 'transform' or 'pixelResolution' attribute")
        translation = transform.get("translate", [0.0, 0.0, 0.0])
        axes = transform.get("axes", ["x", "y", "z"])
        order = [axes.index(a) for a in ("z", "y", "x")]
        levels.append(ScaleLevel(f"s{i}", tuple(float(res[j]) for j in order),
                                 tuple(float(translation[j]) for j in order)))
    return levels

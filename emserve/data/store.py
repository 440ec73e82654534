"""Read vEM stores in the CellMap / OpenOrganelle layout, locally or from `s3://`, zarr v2 or v3 (and N5 EM).

    <ds>.zarr/recon-1/em/fibsem-uint8/s0..sN                  EM, OME-NGFF 0.4 multiscale, z-y-x, nm
    <ds>.zarr/recon-1/labels/groundtruth/crop<N>/<class>/s0..  one array per annotated class (0/1/255)
    <ds>.zarr/recon-1/labels/groundtruth/crop<N>/all/s0..      atomic class ids
    <ds>.n5/em/fibsem-uint16/s0..                              EM only, attributes in x-y-z order

A class with no array in a crop was not annotated there: it reads as UNKNOWN (255) everywhere, never as absent,
so that the loss can leave it out. A group class (mito, ...) with no array of its own is derived from its atomic
members: present where any member is present, absent only where all members are known to be absent.

Label values are decoded with the array's own `cellmap.annotation.annotation_type.encoding` (array attributes
first, then its class group's): published crops use absent 0 / present 1 / unknown 255 for semantic classes and
absent 0 / unknown 255 with instance ids 1..N for instance classes (mito, nuc, ves, ...), and the schema allows
other encodings (unknown 0 / present 1). Everything is returned as ABSENT / PRESENT / UNKNOWN.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emserve.classes import (
    ABSENT,
    CLASS_TABLE,
    ENCODING,
    PRESENT,
    UNKNOWN,
    atomic_members,
    check_class_names,
    get_class,
)
from emserve.data.ngff import (
    ScaleLevel,
    format_nm,
    parse_multiscales,
    select_level,
)
from emserve.data.sources import Volume, checked_array, open_source

RAW_PERCENTILES = (0.5, 99.5)
PERCENTILE_SAMPLE = 1 << 24  # voxels read at most to estimate the contrast window (a central block)


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

class EMStore:
    """One vEM dataset: its EM multiscale image and its ground-truth crops."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path).rstrip("/")
        self.name = Path(self.path).name.removesuffix(".zarr").removesuffix(".n5")
        self.source = open_source(self.path)
        self.root = self.source.root  # the zarr group (None for N5): its attributes say how a store was made

    # --- EM -------------------------------------------------------------------------------------------------
    @cached_property
    def em_group_path(self) -> str:
        return self.source.em_group()

    @cached_property
    def em_attrs(self) -> Mapping[str, Any]:
        return self.source.attrs(self.em_group_path)

    @cached_property
    def em_levels(self) -> list[ScaleLevel]:
        return self.source.levels(self.em_group_path, self.em_attrs)

    def em_level(self, voxel_size: Sequence[float] | None = None) -> ScaleLevel:
        return select_level(self.em_levels, voxel_size, f"{self.path}/{self.em_group_path}")

    def em_volume(self, level: ScaleLevel) -> Volume:
        return self.source.volume(f"{self.em_group_path}/{level.path}")

    @cached_property
    def contrast_window(self) -> tuple[float, float]:
        """Raw values that map to -1 and +1.

        From attributes when the store has them (the OME-NGFF `omero` channel window, or a `contrastAdjustment`
        {min, max}), else from the 0.5 / 99.5 percentiles of the coarsest level. Published CellMap EM groups
        carry neither (OpenOrganelle keeps display limits in its separate dataset manifest), so percentiles are
        the usual path for real data; a fixed window from attributes makes generated stores reproducible.
        """
        window = _attr_window(self.em_attrs)
        if window is not None:
            return window
        coarse = self.em_volume(self.em_levels[-1])
        sample = np.asarray(coarse[_central_block(coarse.shape, PERCENTILE_SAMPLE)], dtype=np.float32)
        lo, hi = np.percentile(sample, RAW_PERCENTILES)
        return float(lo), float(max(hi, lo + 1))

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw EM values to float32 in [-1, 1] with this store's contrast window."""
        lo, hi = self.contrast_window
        return np.clip((raw.astype(np.float32) - lo) / (hi - lo) * 2 - 1, -1, 1)

    # --- ground truth -----------------------------------------------------------------------------------------
    @cached_property
    def crops(self) -> tuple[str, ...]:
        """Names of the ground-truth crops, in natural order (crop2 before crop10)."""
        groundtruth = self.source.groundtruth()
        if groundtruth is None:
            return ()
        return tuple(sorted((n for n, _ in groundtruth.groups()), key=natural_key))

    def crop_group(self, crop: str) -> zarr.Group:
        if crop not in self.crops:
            raise ValueError(f"crop: {crop!r} is not in {self.path}; available: {', '.join(self.crops) or 'none'}")
        return self.source.groundtruth()[crop]

    def crop_classes(self, crop: str) -> tuple[str, ...]:
        """Classes annotated in `crop` (arrays present), without the `all` id array.

        Names are the store's own; published crops also hold classes emserve does not model (cell, cyto, ...).
        """
        return tuple(sorted(n for n, _ in self.crop_group(crop).groups() if n != "all"))

    def read_crop(self, crop: str, classes: Sequence[str], voxel_size: Sequence[float] | None = None) -> LabelledCrop:
        """Raw EM and labels of one crop at one voxel size.

        Without a voxel size, the crop's finest level that the EM also has: CellMap annotates at half the EM
        voxel size (crop s0 2 nm over EM s0 4 nm), so the crop's s1 is what lies on the EM grid.
        """
        classes = check_class_names(classes)
        group = self.crop_group(crop)
        annotated = self.crop_classes(crop)
        if not annotated:
            raise ValueError(f"crop {self.path}/{crop}: holds no class arrays")
        ref = annotated[0]
        where = f"{self.path}/{crop}/{ref}"
        level = self._crop_level(parse_multiscales(group[ref].attrs.asdict(), where), voxel_size, where)
        shape = group[f"{ref}/{level.path}"].shape
        labels = np.stack([self._read_class(group, crop, name, annotated, level, shape) for name in classes])
        raw = self.normalize(self._em_block(level, shape, crop))
        return LabelledCrop(self.name, crop, classes, level.voxel_size, level.translation, raw, labels)

    def _crop_level(self, levels: Sequence[ScaleLevel], voxel_size: Sequence[float] | None,
                    where: str) -> ScaleLevel:
        if voxel_size is not None:
            return select_level(levels, voxel_size, where)
        em_sizes = [lv.voxel_size for lv in self.em_levels]
        for lv in levels:
            if any(np.allclose(lv.voxel_size, size, rtol=0.01) for size in em_sizes):
                return lv
        crop_have = ", ".join(f"{lv.path}={format_nm(lv.voxel_size)}" for lv in levels)
        em_have = ", ".join(f"{lv.path}={format_nm(lv.voxel_size)}" for lv in self.em_levels)
        raise ValueError(f"crop {where}: no level shares a voxel size with the EM; crop has {crop_have}, "
                         f"EM has {em_have} (nm, z-y-x)")

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
    """A class array at `level`, decoded from the store's `cellmap.annotation` encoding to 0/1/255."""
    lv = select_level(parse_multiscales(group.attrs.asdict(), where), level.voxel_size, where)
    array = checked_array(group[lv.path], f"{where}/{lv.path}")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{where}: shape {tuple(array.shape)} differs from the crop's other classes {tuple(shape)}")
    annotation_type = _annotation_type(array.attrs.asdict()) or _annotation_type(group.attrs.asdict())
    return decode_labels(np.asarray(array[...]), annotation_type)


def decode_labels(data: np.ndarray, annotation_type: Mapping[str, Any] | None) -> np.ndarray:
    """Values of a CellMap class array -> ABSENT / PRESENT / UNKNOWN (uint8), following its encoding.

    With a `present` value, only that value is present and anything unlisted is unknown. Without one
    (instance segmentation, whose ids 1..N are all present; or a semantic array that lists only its special
    values), everything that is neither `absent` nor `unknown` is present. Arrays with no annotation
    attributes follow the CellMap default 0 / 1 / 255. Works for integer and float arrays (NaN is unknown).
    """
    encoding = dict((annotation_type or {}).get("encoding") or ENCODING)
    absent, present, unknown = encoding.get("absent"), encoding.get("present"), encoding.get("unknown")
    out = np.full(data.shape, UNKNOWN, dtype=np.uint8)
    if present is not None:
        out[data == present] = PRESENT
    else:
        special = np.isin(data, [v for v in (absent, unknown) if v is not None])
        out[~special & ~_isnan(data)] = PRESENT
    if absent is not None:
        out[data == absent] = ABSENT
    return out


def _isnan(data: np.ndarray) -> np.ndarray:
    return np.isnan(data) if np.issubdtype(data.dtype, np.floating) else np.zeros(data.shape, dtype=bool)


def _annotation_type(attrs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    try:
        annotation_type = attrs["cellmap"]["annotation"]["annotation_type"]
    except (KeyError, TypeError):
        return None
    return annotation_type if isinstance(annotation_type, Mapping) else None


def _attr_window(attrs: Mapping[str, Any]) -> tuple[float, float] | None:
    """A contrast window from attributes: `omero.channels[0].window` {start, end}, or `contrastAdjustment`."""
    omero = attrs.get("omero") or (attrs.get("ome") or {}).get("omero")
    try:
        window = omero["channels"][0]["window"]
        return float(window["start"]), float(window["end"])
    except (KeyError, IndexError, TypeError):
        pass
    adjustment = attrs.get("contrastAdjustment")
    if isinstance(adjustment, Mapping) and "min" in adjustment and "max" in adjustment:
        return float(adjustment["min"]), float(adjustment["max"])
    return None


def _central_block(shape: Sequence[int], max_voxels: int) -> tuple[slice, ...]:
    """Slices of a centred block of at most `max_voxels` (a cube side per axis), so percentiles stay cheap."""
    side = max(1, round(max_voxels ** (1 / len(shape))))
    starts = [max(0, (s - side) // 2) for s in shape]
    return tuple(slice(a, min(s, a + side)) for a, s in zip(starts, shape, strict=True))


def natural_key(path: str | os.PathLike) -> tuple:
    """Sort key that orders 2.png before 10.png and crop2 before crop10 (digit runs compare as numbers)."""
    name = Path(path).name
    return tuple((0, int(tok), tok) if tok.isdigit() else (1, 0, tok.lower()) for tok in re.split(r"(\d+)", name)
                 if tok)




def is_store(path: str) -> bool:
    """A zarr / N5 store (local or s3://), as opposed to image files."""
    local = Path(path)
    return (path.startswith("s3://") or local.suffix.lower() in (".zarr", ".n5")
            or (local / ".zgroup").exists() or (local / "zarr.json").exists())


def annotated_classes(paths: Sequence[str]) -> list[str]:
    """Every class annotated in any crop of the stores, in class-table order."""
    stores = [EMStore(p) for p in paths]
    found = {c for s in stores for crop in s.crops for c in s.crop_classes(crop)}
    return [c.name for c in CLASS_TABLE if c.name in found]

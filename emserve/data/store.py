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

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

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
    level_from_transform,
    multiscales_of,
    parse_multiscales,
    select_level,
    unit_to_nm,
)

EM_GROUP = "recon-1/em"
GROUNDTRUTH_GROUP = "recon-1/labels/groundtruth"
PREFERRED_EM = ("fibsem-uint8", "fibsem-uint16", "fibsem-int16")
RAW_PERCENTILES = (0.5, 99.5)
PERCENTILE_SAMPLE = 1 << 24  # voxels read at most to estimate the contrast window (a central block)


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
    """Anonymous access for public buckets; the endpoint comes from AWS_ENDPOINT_URL like every AWS tool.

    The published data (`s3://janelia-cosem-datasets`) is public, so no credentials are looked up: a user with
    stale keys in the environment still reads it, and nothing is signed with keys it was not meant for.
    """
    if not is_remote(path):
        return None
    options: dict[str, Any] = {"anon": True}
    endpoint = s3_endpoint()
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def s3_endpoint() -> str | None:
    """An S3-compatible endpoint from the environment (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL), if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def open_group(path: str | os.PathLike) -> zarr.Group:
    """Open a zarr group (v2 or v3) read-only; a missing path is an error here, not a silently created group."""
    if is_remote(path):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{path}: reading s3:// needs the 's3' extra: pip install 'emserve[s3]'") from None
        _check_remote_group(str(path))
        store = zarr.storage.FsspecStore.from_url(str(path), storage_options=storage_options_for(path),
                                                  read_only=True)
    else:
        if not Path(path).exists():
            raise FileNotFoundError(f"store: {path} does not exist; expected a <dataset>.zarr folder")
        store = zarr.storage.LocalStore(str(path), read_only=True)
    try:
        return zarr.open_group(store, mode="r")
    except PermissionError:
        raise _not_public(path) from None
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise _not_a_group(path) from None


def _check_remote_group(path: str) -> None:
    """Look for the group's metadata object first, so that 403 and 404 each get their own clear line.

    zarr's own probe asks for zarr.json, .zgroup and .zattrs at once; when one fails the others are left
    unawaited, and the error is a bare "Forbidden".
    """
    import fsspec

    fs = fsspec.filesystem("s3", **storage_options_for(path))
    key = path[len("s3://"):].rstrip("/")
    try:
        found = any(fs.exists(f"{key}/{name}") for name in ("zarr.json", ".zgroup"))
    except PermissionError:
        raise _not_public(path) from None
    if not found:
        raise _not_a_group(path)


def _not_public(path: str | os.PathLike) -> PermissionError:
    return PermissionError(f"store: {path} is not readable anonymously (access denied); emserve reads public "
                           f"buckets without credentials, expected a public-read store")


def _not_a_group(path: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"store: {path} does not exist or is not a zarr group (no .zgroup / zarr.json); "
                             f"expected a <dataset>.zarr in the CellMap layout")


class N5Volume:
    """An N5 dataset read through tensorstore, presented z-y-x (N5 stores dimensions in x-y-z order)."""

    def __init__(self, path: str, dataset: str):
        try:
            import tensorstore as ts
        except ImportError:
            raise RuntimeError(f"{path}: reading N5 needs the 'n5' extra: pip install 'emserve[n5]'") from None
        self._array = ts.open({"driver": "n5", "kvstore": n5_kvstore(path, dataset), "open": True},
                              read=True).result()
        self.shape = tuple(int(s) for s in self._array.shape[::-1])
        self.dtype = np.dtype(self._array.dtype.numpy_dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array.T[key].read().result())


def n5_kvstore(path: str, dataset: str) -> dict[str, Any]:
    """The tensorstore kvstore spec of `dataset` inside the N5 container `path` (local folder or s3:// URL).

    Remote reads are anonymous, like the s3fs ones, and honour AWS_ENDPOINT_URL for S3-compatible servers.
    """
    if not is_remote(path):
        return {"driver": "file", "path": f"{Path(path) / dataset}/"}
    bucket, _, prefix = path[len("s3://"):].partition("/")
    key = "/".join(p for p in (prefix.strip("/"), dataset.strip("/")) if p)
    kvstore: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": f"{key}/",
                               "aws_credentials": {"type": "anonymous"}}
    endpoint = s3_endpoint()
    if endpoint:
        kvstore["endpoint"] = endpoint
    return kvstore


class EMStore:
    """One vEM dataset: its EM multiscale image and its ground-truth crops."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path).rstrip("/")
        self.name = Path(self.path).name.removesuffix(".zarr").removesuffix(".n5")
        self.is_n5 = self.path.endswith(".n5")
        if self.is_n5:
            self._n5_attrs = _n5_root_attrs(self.path)
            self.root = None
        else:
            self.root = open_group(self.path)

    # --- EM -------------------------------------------------------------------------------------------------
    @cached_property
    def em_group_path(self) -> str:
        if self.is_n5:
            return _find_n5_em(self.path)
        try:
            em = self.root[EM_GROUP]
        except KeyError:
            found = sorted(n for n, _ in self.root.members())
            raise ValueError(f"store {self.path}: no group {EM_GROUP} (top level holds {found or 'nothing'}); "
                             f"expected the CellMap layout <ds>.zarr/{EM_GROUP}/fibsem-uint8/s0") from None
        names = [n for n, _ in em.groups()]
        for name in (*PREFERRED_EM, *sorted(names)):
            if name in names:
                return f"{EM_GROUP}/{name}"
        raise ValueError(f"store {self.path}: {EM_GROUP} holds no EM image group; expected one of {PREFERRED_EM}")

    @cached_property
    def em_attrs(self) -> Mapping[str, Any]:
        if self.is_n5:
            return _read_n5_json(f"{self.path}/{self.em_group_path}")
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
        if self.is_n5 or GROUNDTRUTH_GROUP not in self.root:
            return ()
        names = [n for n, _ in self.root[GROUNDTRUTH_GROUP].groups()]
        return tuple(sorted(names, key=natural_key))

    def crop_group(self, crop: str) -> zarr.Group:
        if crop not in self.crops:
            raise ValueError(f"crop: {crop!r} is not in {self.path}; available: {', '.join(self.crops) or 'none'}")
        return self.root[f"{GROUNDTRUTH_GROUP}/{crop}"]

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
    array = group[lv.path]
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




# --- N5 ------------------------------------------------------------------------------------------------------
def _read_n5_json(path: str) -> dict[str, Any]:
    """The `attributes.json` of an N5 group or dataset, local or on S3."""
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


def _n5_root_attrs(path: str) -> dict[str, Any]:
    """The container's root attributes ({"n5": version}); a container folder without them is still read."""
    try:
        return _read_n5_json(path)
    except FileNotFoundError:
        if is_remote(path):
            import fsspec

            exists = fsspec.filesystem("s3", **storage_options_for(path)).exists(path)
        else:
            exists = Path(path).is_dir()
        if not exists:
            raise
        return {}


def _find_n5_em(path: str) -> str:
    for name in PREFERRED_EM:
        try:
            _read_n5_json(f"{path}/em/{name}")
            return f"em/{name}"
        except FileNotFoundError:
            continue
    raise ValueError(f"store {path}: no EM group em/<{'|'.join(PREFERRED_EM)}> in this N5 container")


def _n5_levels(path: str, group: str, attrs: Mapping[str, Any]) -> list[ScaleLevel]:
    """Levels of an N5 multiscale group, in z-y-x.

    OpenOrganelle groups carry a COSEM `multiscales` list with a z-y-x `transform` per level, which says
    everything. Without it (plain Neuroglancer N5), each level's own `transform` is used when present, else the
    x-y-z `pixelResolution` and `scales` (downsampling factors): a level downsampled by f starts half a coarse
    voxel minus half a fine voxel in, (f - 1) * resolution / 2, where the first averaged block is centred.
    """
    where = f"{path}/{group}"
    if multiscales_of(attrs):
        return parse_multiscales(attrs, where)
    factors_by_level = attrs.get("scales") or attrs.get("downsamplingFactors") or [[1, 1, 1]]
    levels = []
    for i, factors in enumerate(factors_by_level):
        level_attrs = _read_n5_json(f"{path}/{group}/s{i}")
        if "transform" in level_attrs:
            levels.append(level_from_transform(f"s{i}", level_attrs["transform"], f"{where}/s{i}"))
        else:
            levels.append(_n5_resolution_level(f"s{i}", attrs, level_attrs, factors, f"{where}/s{i}"))
    return levels


def _n5_resolution_level(name: str, group_attrs: Mapping[str, Any], level_attrs: Mapping[str, Any],
                         factors: Sequence[float], where: str) -> ScaleLevel:
    """A level from Neuroglancer-style x-y-z `pixelResolution` and downsampling factors."""
    f = np.asarray(level_attrs.get("downsamplingFactors") or factors, dtype=float)
    if "pixelResolution" in level_attrs:
        level_res = level_attrs["pixelResolution"]
        vs = np.asarray(level_res["dimensions"], dtype=float) * unit_to_nm(level_res.get("unit"), where)
        base = vs / f
    elif "pixelResolution" in group_attrs:
        group_res = group_attrs["pixelResolution"]
        base = np.asarray(group_res["dimensions"], dtype=float) * unit_to_nm(group_res.get("unit"), where)
        vs = base * f
    else:
        raise ValueError(f"{where}: no 'transform' or 'pixelResolution' attribute; expected the OpenOrganelle "
                         f"N5 metadata (pixelResolution {{dimensions: [x, y, z], unit: nm}})")
    translation = (f - 1) * base / 2
    return ScaleLevel(name, tuple(float(v) for v in vs[::-1]), tuple(float(t) for t in translation[::-1]))


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

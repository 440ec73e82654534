"""Files into and out of the service, decoded and encoded in memory.

Everything a client uploads is untrusted bytes, so this module is strict where a file reader is usually lenient:

- formats are recognised by their first bytes (.npy, .npz, zipped zarr, PNG, TIFF), never by the file name;
- sizes, voxel counts, zip members and their declared sizes are checked before anything large is allocated,
  and a zip member that inflates past its declared size is refused (zip bombs);
- .npy / .npz are read with allow_pickle=False; zipped zarr stores are read into an in-memory zarr store,
  never unpacked to disk, so no name inside an upload ever becomes a path;
- every refusal is an UploadError naming the field, what came and what is allowed.

Results are encoded to bytes with fixed zip timestamps, so the same request and seed give the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
from PIL import Image, PngImagePlugin
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from emserve.card import ModelCard
from emserve.classes import ABSENT, PRESENT, UNKNOWN, get_class
from emserve.data.patches import label_channels
from emserve.data.store import EM_GROUP, GROUNDTRUTH_GROUP, PREFERRED_EM
from emserve.pipelines import label_maps_from_ids

NPY_MAGIC, ZIP_MAGIC, PNG_MAGIC = b"\x93NUMPY", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n"
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
KINDS = ("npy", "npz", "zarr", "png", "tiff")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: results do not depend on the clock
# zarr codecs that only rearrange or decompress bytes; anything else (pickle, msgpack, vlen objects) is refused
SAFE_CODECS = frozenset({"blosc", "zstd", "gzip", "zlib", "lz4", "bz2", "lzma", "crc32", "crc32c", "adler32",
                         "bytes", "transpose", "sharding_indexed", "shuffle"})
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class UploadError(ValueError):
    """An upload the service refuses; `status` is the HTTP status to answer with (400, or 413 for size)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one uploaded file. Unzipped bytes may reach 8 per voxel (float64) plus 1 MiB of metadata."""

    max_bytes: int
    max_voxels: int
    max_members: int = 4096  # zip members: zarr metadata and chunk files

    @property
    def max_unzipped(self) -> int:
        return 8 * self.max_voxels + (1 << 20)


@dataclass
class Decoded:
    """An uploaded array, with the class names of its channels when the file carries them (npz, zarr)."""

    array: np.ndarray
    classes: tuple[str, ...] | None
    kind: str


# ---- reading uploads -----------------------------------------------------------------------------------------

def read_upload(path: Path, field: str, limits: UploadLimits) -> bytes:
    """The bytes of an upload the server itself stored at `path`, refused when empty or over the size limit."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise UploadError(f"{field}: {size} bytes uploaded; at most {limits.max_bytes} are allowed "
                          f"(EMSERVE_MAX_UPLOAD_BYTES)", 413)
    if size == 0:
        raise UploadError(f"{field}: the upload is empty; give a {' / '.join(KINDS)} file")
    return path.read_bytes()


def file_kind(data: bytes, field: str) -> str:
    """The upload's format from its first bytes: npy, npz (a zip of .npy), zarr (any other zip), png or tiff."""
    if data.startswith(NPY_MAGIC):
        return "npy"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(TIFF_MAGIC):
        return "tiff"
    if data.startswith(ZIP_MAGIC):
        try:
            names = [n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if not n.endswith("/")]
        except zipfile.BadZipFile as error:
            raise UploadError(f"{field}: a damaged zip file ({error})") from None
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zarr"
    raise UploadError(f"{field}: not a file format this service reads (first bytes {data[:8]!r}); "
                      f"allowed: .npy, .npz, zipped zarr, PNG, TIFF")


def decode(data: bytes, field: str, limits: UploadLimits, allowed: Sequence[str], purpose: str) -> Decoded:
    """Decode an upload of one of the `allowed` kinds. `purpose` is "em" or "labels" (which zarr arrays to read).

    Third-party parsers raise all sorts of exceptions on malformed input; all of them become an UploadError,
    since a broken upload is the client's problem and must not look like a server fault.
    """
    kind = file_kind(data, field)
    if kind not in allowed:
        raise UploadError(f"{field}: a {kind} file; this endpoint takes {', '.join(allowed)}")
    readers = {"npy": _read_npy_file, "npz": _read_npz, "zarr": _read_zarr, "png": _read_png, "tiff": _read_tiff}
    try:
        array, classes = readers[kind](data, field, limits, purpose)
    except UploadError:
        raise
    except Exception as error:  # any parser failure on untrusted bytes: see the docstring
        raise UploadError(f"{field}: not a readable {kind} file ({type(error).__name__}: {error})") from None
    return Decoded(array, classes, kind)


def _check_voxels(shape: Sequence[int], field: str, limits: UploadLimits, what: str = "array") -> None:
    voxels = math.prod(int(s) for s in shape)
    if voxels > limits.max_voxels:
        raise UploadError(f"{field}: {what} of shape {tuple(shape)} has {voxels} voxels; at most {limits.max_voxels} "
                          f"are allowed (EMSERVE_MAX_VOXELS)", 413)


def _read_npy(data: bytes, field: str, limits: UploadLimits) -> np.ndarray:
    """One .npy, its header checked (no objects, voxel limit) before the data are read."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    if version not in NPY_HEADERS:
        raise UploadError(f"{field}: .npy format version {version}; this service reads versions 1.0 and 2.0")
    shape, _, dtype = NPY_HEADERS[version](buffer)
    if dtype.hasobject:
        raise UploadError(f"{field}: dtype {dtype} holds Python objects; give numeric arrays (never pickles)")
    _check_voxels(shape, field, limits)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _read_npy_file(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, None]:
    return _read_npy(data, field, limits), None


def zip_members(data: bytes, field: str, limits: UploadLimits) -> dict[str, bytes]:
    """The files of a zip (name -> bytes), each read no further than its declared size; refused when it has too
    many members, declares too many bytes in all, or holds names that climb out of it."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > limits.max_members:
            raise UploadError(f"{field}: the zip holds {len(infos)} files; at most {limits.max_members} are allowed",
                              413)
        total = sum(i.file_size for i in infos)
        if total > limits.max_unzipped:
            raise UploadError(f"{field}: the zip unpacks to {total} bytes; at most {limits.max_unzipped} are "
                              f"allowed (8 per voxel of EMSERVE_MAX_VOXELS)", 413)
        members = {}
        for info in infos:
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise UploadError(f"{field}: the zip holds the path {info.filename!r}; member names must be relative "
                                  f"and stay inside the zip")
            with archive.open(info) as member:
                content = member.read(info.file_size + 1)
            if len(content) > info.file_size:
                raise UploadError(f"{field}: zip member {info.filename!r} unpacks past its declared size")
            members[info.filename] = content
    return members


def _read_npz(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """An .npz: its only array, or the array `labels` / `raw` beside an optional `classes` array of names."""
    arrays = {name.removesuffix(".npy"): _read_npy(content, field, limits)
              for name, content in zip_members(data, field, limits).items()}
    classes = arrays.pop("classes", None)
    if len(arrays) == 1:
        (array,) = arrays.values()
    else:
        wanted = [name for name in ("labels", "raw") if name in arrays]
        if not wanted:
            raise UploadError(f"{field}: the .npz holds {sorted(arrays)}; give one array, or name it 'labels' "
                              f"(label maps) or 'raw' (EM), optionally with 'classes'")
        array = arrays[wanted[0]]
    return array, None if classes is None else _class_names(classes, field)


def _class_names(values: np.ndarray, field: str) -> tuple[str, ...]:
    if values.dtype.kind != "U" or values.ndim != 1:
        raise UploadError(f"{field}: 'classes' must be a 1-D array of class names (strings), got {values.dtype} "
                          f"of shape {values.shape}")
    return tuple(str(v) for v in values)


def _memory_group(members: Mapping[str, bytes]) -> zarr.Group | zarr.Array:
    """The zarr node of a zipped store, held in memory. A zip of a folder `x.zarr/...` is read as `x.zarr`."""
    tops = {PurePosixPath(name).parts[0] for name in members}
    metadata = {".zgroup", ".zarray", "zarr.json"}
    if len(tops) == 1 and not tops & metadata:
        prefix = f"{tops.pop()}/"
        members = {name.removeprefix(prefix): content for name, content in members.items()}
    store = MemoryStore({name: cpu.Buffer.from_bytes(content) for name, content in members.items()}, read_only=True)
    return zarr.open(store=store, mode="r")


def _read_array(node: zarr.Array, field: str, limits: UploadLimits, where: str) -> np.ndarray:
    """A zarr array, checked before any chunk is decoded: numeric dtype, codecs that only decompress (a zarr v2
    `pickle` filter would unpickle the chunks), shape and chunk (shard) shape within the voxel limit."""
    if np.dtype(node.dtype).kind not in "biuf":
        raise UploadError(f"{field}: zarr array {where!r} has dtype {node.dtype}; give numeric arrays")
    unsafe = sorted(set(codec_names(node.metadata.to_dict())) - SAFE_CODECS)
    if unsafe:
        raise UploadError(f"{field}: zarr array {where!r} uses the codecs {unsafe}; allowed: "
                          f"{', '.join(sorted(SAFE_CODECS))}")
    _check_voxels(node.shape, field, limits, f"zarr array {where!r}")
    _check_voxels(node.shards or node.chunks, field, limits, f"the chunks of zarr array {where!r}")
    return np.asarray(node[...])


def codec_names(metadata: Mapping[str, Any]) -> list[str]:
    """The codecs of zarr array metadata (as `metadata.to_dict()` gives it): v2 compressor and filter ids, v3
    codec names, including those nested in a sharding codec."""
    if metadata.get("zarr_format") == 2:
        return [str(c["id"]) for c in [metadata.get("compressor"), *(metadata.get("filters") or [])] if c]
    return [name.removeprefix("numcodecs.") for name in _v3_codec_names(metadata.get("codecs") or [])]


def _v3_codec_names(codecs: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for codec in codecs:
        names.append(str(codec["name"]))
        configuration = codec.get("configuration") or {}
        names += _v3_codec_names([*configuration.get("codecs", []), *configuration.get("index_codecs", [])])
    return names


def _read_zarr(data: bytes, field: str, limits: UploadLimits,
               purpose: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A zipped zarr store: an array at its root, or a CellMap-layout store (EM at recon-1/em/fibsem-uint8/s0;
    labels as per-class arrays of the first crop under recon-1/labels/groundtruth, 0/1/255)."""
    node = _memory_group(zip_members(data, field, limits))
    if isinstance(node, zarr.Array):
        return _read_array(node, field, limits, "/"), None
    if purpose == "em":
        for name in PREFERRED_EM:
            if f"{EM_GROUP}/{name}/s0" in node:
                return _read_array(node[f"{EM_GROUP}/{name}/s0"], field, limits, f"{EM_GROUP}/{name}/s0"), None
        raise UploadError(f"{field}: the zarr store has no array at its root nor at {EM_GROUP}/<"
                          f"{'|'.join(PREFERRED_EM)}>/s0")
    return _read_crop(node, field, limits)


def _read_crop(root: zarr.Group, field: str, limits: UploadLimits) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label codes [Z, K, Y, X] of the first crop's class arrays, and their class names."""
    crops = sorted(root[GROUNDTRUTH_GROUP].group_keys()) if GROUNDTRUTH_GROUP in root else []
    if not crops:
        raise UploadError(f"{field}: the zarr store has no array at its root and no crop under {GROUNDTRUTH_GROUP}")
    crop = root[f"{GROUNDTRUTH_GROUP}/{crops[0]}"]
    classes = tuple(sorted(name for name in crop.group_keys() if name != "all" and "s0" in crop[name]))
    if not classes:
        raise UploadError(f"{field}: crop {crops[0]} holds no class arrays <class>/s0")
    where = f"{GROUNDTRUTH_GROUP}/{crops[0]}"
    masks = [_read_array(crop[f"{name}/s0"], field, limits, f"{where}/{name}/s0") for name in classes]
    if len({m.shape for m in masks}) > 1 or masks[0].ndim != 3:
        raise UploadError(f"{field}: the class arrays of {where} must be z-y-x volumes of one shape, got "
                          f"{[m.shape for m in masks]}")
    return np.stack(masks, axis=1), classes


def _read_png(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, None]:
    """A greyscale (EM, uint8) or index-map (labels: 8- or 16-bit grey, or palette indices) PNG."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        _check_voxels((image.height, image.width), field, limits, "image")
        if image.mode not in ("L", "P", "I", "I;16"):
            raise UploadError(f"{field}: PNG mode {image.mode}; give a greyscale (EM) or index-map (labels) PNG, "
                              f"not colour")
        return np.asarray(image), None


def _read_tiff(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, None]:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        _check_voxels(tiff.series[0].shape, field, limits, "TIFF image")
        return tiff.series[0].asarray(), None


# ---- label maps for em-from-labels models --------------------------------------------------------------------

def label_maps(card: ModelCard, decoded: Decoded, classes: Sequence[str] | None, field: str) -> np.ndarray:
    """Uploaded labels -> the label-map condition [N, K, H, W] of an em-from-labels model (+1/-1/0).

    Two shapes are understood. Index maps [H, W] or [N, H, W] of integers: CellMap class ids, or with
    `classes`, value i means classes[i - 1] (0: none). Per-class masks [N, C, H, W] whose C channels are named by
    `classes` (else by the file, else they must be the model's classes in order): integer or bool masks use the
    CellMap codes (1 present, 0 absent, 255 unannotated); float masks are the condition itself, in [-1, 1].
    Model classes no channel names are "not given" (0).
    """
    array = decoded.array
    names = tuple(classes) if classes else decoded.classes
    if array.ndim in (2, 3) and (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        ids = array[None] if array.ndim == 2 else array
        return label_maps_from_ids(card, _cellmap_ids(ids, names, field) if names else ids)
    if array.ndim != 4:
        raise UploadError(f"{field}: shape {array.shape}; give index maps [N, H, W] (integer class ids) or per-class "
                          f"masks [N, C, H, W]")
    _check_patch(card, array.shape[2:], field)
    names = names or _model_channels(card, array.shape[1], field)
    if len(names) != array.shape[1]:
        raise UploadError(f"classes: {len(names)} names {list(names)} for {array.shape[1]} mask channels")
    values = _condition_values(array, field)
    out = np.zeros((array.shape[0], len(card.classes), *array.shape[2:]), np.float32)
    for channel, name in enumerate(names):
        out[:, _model_index(card, name)] = values[:, channel]
    return out


def _cellmap_ids(values: np.ndarray, names: Sequence[str], field: str) -> np.ndarray:
    """Index-map values 1..len(names) -> the CellMap ids of those (atomic) classes; 0 stays 0."""
    for name in names:
        if get_class(name).is_group:
            raise UploadError(f"classes: {name!r} is a group class; index maps take atomic classes "
                              f"({', '.join(get_class(name).members)})")
    if values.min() < 0 or values.max() > len(names):
        raise UploadError(f"{field}: index-map values in [{values.min()}, {values.max()}]; with classes "
                          f"{list(names)} they must be in [0, {len(names)}] (0 = none)")
    lookup = np.array([0, *(get_class(name).id for name in names)], np.int64)
    return lookup[values.astype(np.int64)]


def _check_patch(card: ModelCard, size: Sequence[int], field: str) -> None:
    if tuple(size) != (card.patch_size, card.patch_size):
        raise UploadError(f"{field}: label maps of {size[0]}x{size[1]}; this model takes {card.patch_size}x"
                          f"{card.patch_size} (its patch size)")


def _model_channels(card: ModelCard, channels: int, field: str) -> tuple[str, ...]:
    if channels != len(card.classes):
        raise UploadError(f"{field}: {channels} mask channels and no class names; name them with 'classes', or give "
                          f"all {len(card.classes)} of the model's classes in order ({', '.join(card.classes)})")
    return tuple(card.classes)


def _model_index(card: ModelCard, name: str) -> int:
    get_class(name)  # an unknown name gets the error listing every known class
    if name not in card.classes:
        raise UploadError(f"classes: {name!r} is not one of the model's classes; allowed: {', '.join(card.classes)}")
    return card.classes.index(name)


def _condition_values(masks: np.ndarray, field: str) -> np.ndarray:
    """Masks -> condition values: CellMap codes (integer or bool) to +1/-1/0; float checked to lie in [-1, 1]."""
    if masks.dtype == bool or np.issubdtype(masks.dtype, np.integer):
        bad = ~np.isin(masks, (ABSENT, PRESENT, UNKNOWN))
        if bad.any():
            raise UploadError(f"{field}: integer masks hold {sorted(np.unique(masks[bad]).tolist())[:5]}; allowed: "
                              f"1 present, 0 absent, 255 unannotated")
        return label_channels(masks)
    if not np.issubdtype(masks.dtype, np.floating):
        raise UploadError(f"{field}: dtype {masks.dtype}; masks are integer / bool (0/1/255) or float in [-1, 1]")
    if not np.isfinite(masks).all():
        raise UploadError(f"{field}: float masks contain NaN or infinite values")
    if masks.min() < -1 or masks.max() > 1:
        raise UploadError(f"{field}: float masks in [{masks.min():.3g}, {masks.max():.3g}]; they must be in [-1, 1] "
                          f"(+1 present, -1 absent, 0 not given)")
    return masks.astype(np.float32)


# ---- encoding results ----------------------------------------------------------------------------------------

def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load with allow_pickle=False) whose bytes depend only on the arrays."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), member.getvalue(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def zip_folder(folder: Path) -> bytes:
    """A zarr store folder as a zip with the store's keys at its root (what zarr.storage.ZipStore reads)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), ZIP_TIME)
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def png_bytes(rgb: np.ndarray, metadata: Mapping[str, Any]) -> bytes:
    """A PNG of an RGB picture with the result's metadata as JSON in its `emserve` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("emserve", json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

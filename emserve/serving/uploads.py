"""Files into the service, decoded in memory.

Everything a client uploads is untrusted bytes, so this module is strict where a file reader is usually lenient:

- formats are recognised by their first bytes (.npy, .npz, zipped zarr, PNG, TIFF), never by the file name;
- what a file declares (a .npy header's shape and dtype, a PNG's or TIFF page's size, a zip's directory and
  member sizes, a zarr array's shape and chunks) is checked against the limits before anything is decoded, and
  every decompression is bounded while it runs by the size its header declares: a zip member, a TIFF strip or
  a zarr chunk that inflates past it is refused (decompression bombs), never inflated whole and then measured;
- .npy / .npz are read with allow_pickle=False; zipped zarr stores are read into an in-memory zarr store,
  never unpacked to disk, so no name inside an upload ever becomes a path; TIFFs are read page by page, never
  as tifffile's series, which open other files beside the one given (OME, MicroManager);
- every refusal is an UploadError naming the field, what came and what is allowed.

What the decoded arrays mean as label maps is emserve.serving.label_maps; results go out through
emserve.serving.encoding.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numcodecs
import numpy as np
import zarr
from PIL import Image
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from emserve.data.sources import EM_GROUP, GROUNDTRUTH_GROUP, PREFERRED_EM, codec_names
from emserve.data.store import natural_key

NPY_MAGIC, ZIP_MAGIC, PNG_MAGIC = b"\x93NUMPY", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n"
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
KINDS = ("npy", "npz", "zarr", "png", "tiff")
ZIP_END_MAGIC, ZIP_END = b"PK\x05\x06", struct.Struct("<4s4H2LH")  # end of central directory record: magic,
#                disk numbers, entries (on this disk, in all), directory size and offset, comment length
ZIP_ENTRY = 256  # directory bytes allowed per member: a CellMap chunk's entry takes ~120
# zip members' compression: zipfile inflates bz2 and lzma members a read's worth at a time, unbounded
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
METADATA = (".zarray", ".zgroup", ".zattrs", ".zmetadata", "zarr.json")
METADATA_BYTES = 1 << 20  # zarr metadata documents of one upload, in all: parsed JSON takes ~10x its bytes
# zarr codecs of uploaded stores. Compressors are bounded while decoding (see _check_chunks), one per array;
# the others rearrange bytes or add a 4-byte checksum. Anything else (pickle, msgpack, vlen objects; sharding,
# whose inner chunks would need their own bounds) is refused.
STREAM_CODECS = {"zlib": zlib.MAX_WBITS, "gzip": 16 + zlib.MAX_WBITS}  # zlib wbits of each container
SIZED_CODECS = ("blosc", "lz4", "zstd")  # their chunks declare their decoded size; numcodecs checks it against out
CHECKSUMS = ("crc32", "crc32c", "adler32")
SAFE_CODECS = frozenset({*STREAM_CODECS, *SIZED_CODECS, *CHECKSUMS, "bytes", "transpose", "shuffle"})
TIFF_COMPRESSIONS = {1: "none", 8: "deflate", 32946: "deflate"}  # read without imagecodecs, bounded below
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class UploadError(ValueError):
    """An upload the service refuses; `status` is the HTTP status to answer with (400, or 413 for size)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one uploaded file. Unzipped bytes may reach 8 per voxel (float64) plus the metadata."""

    max_bytes: int
    max_voxels: int
    max_members: int = 4096  # zip members: zarr metadata and chunk files
    max_pages: int = 4096  # TIFF pages (slices of a volume): 4096 slices of 64x64 are 16 Mi voxels

    @property
    def max_unzipped(self) -> int:
        return 8 * self.max_voxels + METADATA_BYTES


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


def file_kind(data: bytes, field: str, limits: UploadLimits) -> str:
    """The upload's format from its first bytes: npy, npz (a zip of .npy), zarr (any other zip), png or tiff."""
    if data.startswith(NPY_MAGIC):
        return "npy"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(TIFF_MAGIC):
        return "tiff"
    if data.startswith(ZIP_MAGIC):
        try:
            names = [n for n in open_zip(data, field, limits).namelist() if not n.endswith("/")]
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
    kind = file_kind(data, field, limits)
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
    """One .npy, its header checked (no objects, voxel limit, shape x item size = the bytes the file holds) before
    the data are read: numpy allocates the declared array before it reads, whatever the file holds."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    if version not in NPY_HEADERS:
        raise UploadError(f"{field}: .npy format version {version}; this service reads versions 1.0 and 2.0")
    shape, _, dtype = NPY_HEADERS[version](buffer)
    if dtype.hasobject:
        raise UploadError(f"{field}: dtype {dtype} holds Python objects; give numeric arrays (never pickles)")
    _check_voxels(shape, field, limits)
    declared, held = math.prod(shape) * dtype.itemsize, len(data) - buffer.tell()
    if declared != held:
        raise UploadError(f"{field}: the .npy header declares shape {shape} of {dtype}, {declared} bytes; the file "
                          f"holds {held}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _read_npy_file(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, None]:
    return _read_npy(data, field, limits), None


def open_zip(data: bytes, field: str, limits: UploadLimits) -> zipfile.ZipFile:
    """The zip, once its end record says that its directory is within max_members entries of ZIP_ENTRY bytes:
    zipfile makes an object of every entry it finds in the directory (~10x the entry's bytes), whatever count the
    record gives, so a 64 MB upload of empty entries would take ~1 GB. zipfile takes the last end record too."""
    end = data.rfind(ZIP_END_MAGIC, max(0, len(data) - ZIP_END.size - 0xFFFF))  # after it: a comment of < 64 KiB
    if end < 0 or end + ZIP_END.size > len(data):
        raise UploadError(f"{field}: a damaged zip file (no end of central directory record)")
    _, _, _, _, entries, size, _, _ = ZIP_END.unpack_from(data, end)
    if entries > limits.max_members or size > limits.max_members * ZIP_ENTRY:
        raise UploadError(f"{field}: the zip's directory lists {entries} entries in {size} bytes; at most "
                          f"{limits.max_members} entries in {limits.max_members * ZIP_ENTRY} bytes are allowed", 413)
    return zipfile.ZipFile(io.BytesIO(data))


def zip_members(data: bytes, field: str, limits: UploadLimits) -> dict[str, bytes]:
    """The files of a zip (name -> bytes), each read no further than its declared size; refused when it has too
    many members, declares too many bytes in all, holds names that climb out of it or members compressed other
    than by deflate."""
    with open_zip(data, field, limits) as archive:
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
            if info.compress_type not in ZIP_METHODS:
                raise UploadError(f"{field}: zip member {info.filename!r} is compressed by method "
                                  f"{info.compress_type}; allowed: {', '.join(ZIP_METHODS.values())}")
            try:  # zipfile stops at the declared size, then finds that the CRC does not match
                with archive.open(info) as member:
                    members[info.filename] = member.read(info.file_size)
            except zipfile.BadZipFile as error:
                raise UploadError(f"{field}: zip member {info.filename!r} does not unpack to its declared "
                                  f"{info.file_size} bytes and their CRC ({error})") from None
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


def _store_members(members: Mapping[str, bytes], field: str) -> dict[str, bytes]:
    """The zipped store's files by their key in the store (a zip of a folder `x.zarr/...` is read as `x.zarr`),
    its metadata documents within METADATA_BYTES in all."""
    tops = {PurePosixPath(name).parts[0] for name in members}
    if len(tops) == 1 and not tops & set(METADATA):
        prefix = f"{tops.pop()}/"
        members = {name.removeprefix(prefix): content for name, content in members.items()}
    metadata = sum(len(content) for name, content in members.items() if PurePosixPath(name).name in METADATA)
    if metadata > METADATA_BYTES:
        raise UploadError(f"{field}: the zarr store's metadata documents ({', '.join(METADATA)}) take {metadata} "
                          f"bytes; at most {METADATA_BYTES} are allowed", 413)
    return dict(members)


def _read_array(node: zarr.Array, store: Mapping[str, bytes], field: str, limits: UploadLimits,
                where: str) -> np.ndarray:
    """A zarr array, checked before zarr decodes a chunk: numeric dtype, codecs of SAFE_CODECS (a zarr v2
    `pickle` filter would unpickle the chunks), shape and chunk shape within the voxel limit, every stored chunk
    within the size its metadata declares (_check_chunks)."""
    if np.dtype(node.dtype).kind not in "biuf":
        raise UploadError(f"{field}: zarr array {where!r} has dtype {node.dtype}; give numeric arrays")
    codecs = codec_names(node.metadata.to_dict())
    unsafe = sorted(set(codecs) - SAFE_CODECS)
    compressors = [name for name in codecs if name in STREAM_CODECS or name in SIZED_CODECS]
    if unsafe or len(compressors) > 1:
        raise UploadError(f"{field}: zarr array {where!r} uses the codecs {unsafe or compressors}; allowed: at most "
                          f"one of {', '.join([*STREAM_CODECS, *SIZED_CODECS])} and any of "
                          f"{', '.join(sorted(SAFE_CODECS - {*STREAM_CODECS, *SIZED_CODECS}))}")
    _check_voxels(node.shape, field, limits, f"zarr array {where!r}")
    _check_voxels(node.chunks, field, limits, f"the chunks of zarr array {where!r}")
    if compressors:
        prefix = f"{node.path}/" if node.path else ""
        chunks = {key[len(prefix):]: content for key, content in store.items()
                  if key.startswith(prefix) and PurePosixPath(key).name not in METADATA}
        after = codecs[codecs.index(compressors[0]) + 1:]
        size = math.prod(node.chunks) * np.dtype(node.dtype).itemsize + 4 * sum(c in CHECKSUMS for c in codecs)
        _check_chunks(chunks, compressors[0], 4 * sum(c in CHECKSUMS for c in after), size, field, where)
    return np.asarray(node[...])


def _check_chunks(chunks: Mapping[str, bytes], compressor: str, trailing: int, size: int, field: str,
                  where: str) -> None:
    """Decode each stored chunk by its compressor no further than `size` bytes (chunk shape x item size, and the
    checksums' 4 bytes each) before zarr decodes it: numcodecs inflates zlib and gzip chunks whole, and allocates
    whatever decoded size a blosc, lz4 or zstd chunk's own header declares (a 50-byte zstd frame declares 1 MB,
    and a chunk of a thousand frames 1 GB). `trailing` bytes of checksums follow the compressed stream (zarr v3
    applies checksum codecs listed after the compressor to its output)."""
    for key, content in chunks.items():
        stream = memoryview(content)[:len(content) - trailing]
        if compressor in STREAM_CODECS:
            decoded = _inflated_size(stream, size, STREAM_CODECS[compressor])
            if decoded > size:
                raise UploadError(f"{field}: chunk {key!r} of zarr array {where!r} decodes to more than the {size} "
                                  f"bytes its metadata declares (chunk shape x item size)", 413)
            continue
        try:
            numcodecs.get_codec({"id": compressor}).decode(stream, out=np.empty(size, np.uint8))
        except Exception as error:  # the size its header declares, or a damaged chunk: numcodecs says which
            raise UploadError(f"{field}: chunk {key!r} of zarr array {where!r} does not decode within the {size} "
                              f"bytes its metadata declares ({compressor}: {error})", 413) from None


def _inflated_size(stream: memoryview, limit: int, wbits: int) -> int:
    """The bytes a zlib stream (or each member of a gzip one) inflates to, inflated no further than limit + 1."""
    total = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        total += len(inflater.decompress(stream, limit + 1 - total))
        stream = memoryview(inflater.unused_data)
        if total > limit or wbits == zlib.MAX_WBITS or not stream:  # zlib, like numcodecs, reads one stream
            return total


def _read_zarr(data: bytes, field: str, limits: UploadLimits,
               purpose: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A zipped zarr store: an array at its root, or a CellMap-layout store (EM at recon-1/em/fibsem-uint8/s0;
    labels as per-class arrays of the first crop under recon-1/labels/groundtruth, 0/1/255)."""
    store = _store_members(zip_members(data, field, limits), field)
    node = zarr.open(store=MemoryStore({k: cpu.Buffer.from_bytes(v) for k, v in store.items()}, read_only=True),
                     mode="r")
    if isinstance(node, zarr.Array):
        return _read_array(node, store, field, limits, "/"), None
    if purpose == "em":
        for name in PREFERRED_EM:
            if f"{EM_GROUP}/{name}/s0" in node:
                where = f"{EM_GROUP}/{name}/s0"
                return _read_array(node[where], store, field, limits, where), None
        raise UploadError(f"{field}: the zarr store has no array at its root nor at {EM_GROUP}/<"
                          f"{'|'.join(PREFERRED_EM)}>/s0")
    return _read_crop(node, store, field, limits)


def _read_crop(root: zarr.Group, store: Mapping[str, bytes], field: str,
               limits: UploadLimits) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label codes [Z, K, Y, X] of the first crop's class arrays (natural order, as EMStore.crops: crop2 before
    crop10), and their class names."""
    crops = sorted(root[GROUNDTRUTH_GROUP].group_keys(), key=natural_key) if GROUNDTRUTH_GROUP in root else []
    if not crops:
        raise UploadError(f"{field}: the zarr store has no array at its root and no crop under {GROUNDTRUTH_GROUP}")
    crop = root[f"{GROUNDTRUTH_GROUP}/{crops[0]}"]
    classes = tuple(sorted(name for name in crop.group_keys() if name != "all" and "s0" in crop[name]))
    if not classes:
        raise UploadError(f"{field}: crop {crops[0]} holds no class arrays <class>/s0")
    where = f"{GROUNDTRUTH_GROUP}/{crops[0]}"
    masks = [_read_array(crop[f"{name}/s0"], store, field, limits, f"{where}/{name}/s0") for name in classes]
    if len({m.shape for m in masks}) > 1 or masks[0].ndim != 3:
        raise UploadError(f"{field}: the class arrays of {where} must be z-y-x volumes of one shape, got "
                          f"{[m.shape for m in masks]}")
    return np.stack(masks, axis=1), classes


def _read_png(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, None]:
    """A greyscale (EM, uint8) or index-map (labels: 8- or 16-bit grey, or palette indices) PNG. Its size is
    checked from its IHDR chunk (the first of every PNG) before PIL opens it, and PIL's own decompression-bomb
    check (which refuses past twice MAX_IMAGE_PIXELS) is set from the same limit; PIL's decoder inflates no
    further than the image it fills."""
    width, height = struct.unpack_from(">II", data, len(PNG_MAGIC) + 8)  # after the chunk's length and type
    _check_voxels((height, width), field, limits, "image")
    Image.MAX_IMAGE_PIXELS = limits.max_voxels  # process-wide: one server, one limit
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise UploadError(f"{field}: PNG mode {image.mode}; give a greyscale (EM) or index-map (labels) PNG, "
                              f"not colour")
        return np.asarray(image), None


def _read_tiff(data: bytes, field: str, limits: UploadLimits, _: str) -> tuple[np.ndarray, None]:
    """Greyscale pages of one shape and dtype: an image [Y, X], or a volume [Z, Y, X] of several. Pages are
    counted, their shape and compression checked from their headers, and each compressed strip or tile inflated
    no further than the size its page declares (tifffile would inflate it whole) before any page is decoded."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        count = len(tiff.pages)  # walks the chain of page offsets, parsing no page
        if count > limits.max_pages:
            raise UploadError(f"{field}: the TIFF holds {count} pages; at most {limits.max_pages} are allowed", 413)
        pages = list(tiff.pages)
        if len({(page.shape, page.dtype) for page in pages}) > 1 or len(pages[0].shape) != 2:
            raise UploadError(f"{field}: TIFF pages of shapes and dtypes "
                              f"{sorted({(page.shape, str(page.dtype)) for page in pages})[:4]}; give greyscale "
                              f"pages (one sample per pixel, not colour) of one shape and dtype")
        _check_voxels((len(pages), *pages[0].shape), field, limits, "TIFF image")
        for index, page in enumerate(pages):
            _check_segments(page, index, data, field)
        volume = np.empty((len(pages), *pages[0].shape), pages[0].dtype)
        for index, page in enumerate(pages):
            page.asarray(out=volume[index])
        return volume[0] if len(pages) == 1 else volume, None


def _check_segments(page: Any, index: int, data: bytes, field: str) -> None:
    """A page's compression among TIFF_COMPRESSIONS, and each of its compressed strips or tiles inflating to at
    most the size the page declares for it (its rows or tile shape x item size)."""
    if page.compression not in TIFF_COMPRESSIONS:
        name = getattr(page.compression, "name", page.compression)  # tifffile's enum, or the number it does not know
        raise UploadError(f"{field}: TIFF page {index} is compressed by {name}; allowed: "
                          f"{', '.join(sorted(set(TIFF_COMPRESSIONS.values())))}")
    if page.compression == 1:  # tifffile reads the declared bytes of an uncompressed page, no more
        return
    size = math.prod(page.chunks) * page.dtype.itemsize
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
        if _inflated_size(memoryview(data)[offset:offset + count], size, zlib.MAX_WBITS) > size:
            raise UploadError(f"{field}: a strip or tile of TIFF page {index} inflates to more than the {size} bytes "
                              f"its header declares", 413)

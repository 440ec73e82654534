"""Decoding uploads in memory (emserve.serving.uploads) against hostile files, without a server.

HOSTILE is a corpus of small files that declare or inflate to far more than the limits (zip, TIFF, PNG, .npy and
zarr bombs, directories of thousands of entries, codecs that are not allowed): each is refused with a message
naming the field and the limit before the memory is spent. tests/test_service.py sends the same corpus to a real
`bentoml serve` and reads the server's peak memory before and after. Legitimate files of every codec the
refusals touch are still read.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable

import numcodecs
import numpy as np
import pytest
import zarr
from PIL import Image

from emserve.serving.uploads import UploadError, UploadLimits, decode

LIMITS = UploadLimits(max_bytes=200_000, max_voxels=40_000)  # those of tests/test_service.py's server
EM_KINDS = ("npy", "tiff", "zarr", "png")
BOMB = 100 << 20  # bytes a bomb inflates to: ~100 kB deflated


def deflated(size: int, wbits: int = zlib.MAX_WBITS) -> bytes:
    """`size` zero bytes deflated (zlib stream; wbits -15: raw), made a MiB at a time."""
    compressor, block = zlib.compressobj(9, zlib.DEFLATED, wbits), bytes(1 << 20)
    return b"".join(compressor.compress(block[:min(1 << 20, size - done)]) for done in range(0, size, 1 << 20)) + \
        compressor.flush()


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def zarr_v2(chunk: bytes, compressor: dict | None, shape=(16, 16), chunks=(16, 16)) -> bytes:
    """A zipped zarr v2 array of uint8 at the store's root, with one stored chunk."""
    meta = {"zarr_format": 2, "shape": list(shape), "chunks": list(chunks), "dtype": "|u1", "compressor": compressor,
            "fill_value": 0, "filters": None, "order": "C"}
    return zipped({".zarray": json.dumps(meta).encode(), "0.0": chunk})


def lying_zip(declared: int, inflated: int) -> bytes:
    """A zip of one deflated member `c` whose headers declare `declared` bytes but which inflates to `inflated`."""
    data, name = deflated(inflated, -zlib.MAX_WBITS), b"c"
    sizes = struct.pack("<3I", 0, len(data), declared)  # crc, compressed, uncompressed
    local = struct.pack("<4s5H", b"PK\x03\x04", 20, 0, 8, 0, 0) + sizes + struct.pack("<2H", len(name), 0) + name
    central = struct.pack("<4s6H", b"PK\x01\x02", 20, 20, 0, 8, 0, 0) + sizes + \
        struct.pack("<5H2I", len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def many_entries(count: int, declared: int | None = None) -> bytes:
    """A zip directory of `count` empty entries (no member data: zipfile reads the directory first), whose end
    record says `declared` entries (default: `count`)."""
    entries = b"".join(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
                       + b"x" for _ in range(count))
    listed = count if declared is None else declared
    return b"PK\x03\x04" + bytes(26) + entries + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, listed, listed,
                                                              len(entries), 30, 0)


def tiff(width: int, height: int, strip: bytes, compression: int) -> bytes:
    """A little-endian TIFF of one 8-bit greyscale page stored as one strip."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, compression), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<2H2I", tag, kind, 1, offset if tag == 273 else value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + strip


def png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit greyscale PNG of the given header size and image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">2I5B", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    """A .npy of this header and no data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


ZSTD_FRAME = numcodecs.Zstd().encode(bytes(1 << 20))  # ~50 bytes declaring 1 MiB

# (what, file, status, message): each file is made when a test asks for it, ~100 kB at most
HOSTILE: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("zip bomb", lambda: lying_zip(1024, BOMB), 400,
     "image: zip member 'c' does not unpack to its declared 1024 bytes and their CRC"),
    ("zip of 4097 entries", lambda: many_entries(4097), 413,
     "image: the zip's directory lists 4097 entries in 192559 bytes; at most 4096 entries in 1048576 bytes"),
    ("zip listing 1 of 4097 entries", lambda: many_entries(4097, declared=1), 413,
     "image: the zip holds 4097 files; at most 4096 are allowed"),
    ("zip of bz2 members", lambda: _bz2_zip(), 400, "image: zip member 'c' is compressed by method 12; allowed: "
                                                    "stored, deflated"),
    ("TIFF strip bomb", lambda: tiff(16, 16, deflated(BOMB), 8), 413,
     "image: a strip or tile of TIFF page 0 inflates to more than the 256 bytes its header declares"),
    ("TIFF of 10^10 pixels", lambda: tiff(100_000, 100_000, b"", 1), 413,
     "image: TIFF image of shape (1, 100000, 100000) has 10000000000 voxels; at most 40000 are allowed"),
    ("TIFF packbits", lambda: tiff(16, 16, b"\x81\x00" * 2, 32773), 400,
     "image: TIFF page 0 is compressed by"),
    ("PNG of 10^10 pixels", lambda: png(100_000, 100_000, zlib.compress(bytes(1000))), 413,
     "image: image of shape (100000, 100000) has 10000000000 voxels; at most 40000 are allowed (EMSERVE_MAX_VOXELS)"),
    (".npy of 10^15 voxels", lambda: npy_header((100_000,) * 3, "|u1"), 413,
     "image: array of shape (100000, 100000, 100000) has 1000000000000000 voxels; at most 40000 are allowed"),
    (".npy of 10 GB in items", lambda: npy_header((100, 100), "|V1000000"), 400,
     "image: the .npy header declares shape (100, 100) of |V1000000, 10000000000 bytes; the file holds 0"),
    ("zarr codec bz2", lambda: zarr_v2(b"", {"id": "bz2"}), 400,
     "image: zarr array '/' uses the codecs ['bz2']; allowed: at most one of zlib, gzip, blosc, lz4, zstd"),
    ("zarr huge chunk", lambda: zarr_v2(b"", None, chunks=(100_000, 100_000)), 413,
     "image: the chunks of zarr array '/' of shape (100000, 100000) has 10000000000 voxels; at most 40000"),
    ("zarr zlib chunk bomb", lambda: zarr_v2(deflated(BOMB), {"id": "zlib"}), 413,
     "image: chunk '0.0' of zarr array '/' decodes to more than the 256 bytes its metadata declares"),
    ("zarr zstd chunk bomb", lambda: zarr_v2(ZSTD_FRAME * 1000, {"id": "zstd"}), 413,
     "image: chunk '0.0' of zarr array '/' does not decode within the 256 bytes its metadata declares (zstd: "),
    ("zarr metadata bomb", lambda: zipped({".zarray": b"[" + b"0," * 600_000 + b"0]"}), 413,
     "image: the zarr store's metadata documents (.zarray, .zgroup, .zattrs, .zmetadata, zarr.json) take 1200003 "
     "bytes; at most 1048576 are allowed"),
]


def _bz2_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("c", bytes(100))
    return buffer.getvalue()


@pytest.mark.parametrize(("what", "make", "status", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_files_are_refused_naming_field_and_limit(what, make, status, message):
    content = make()
    assert len(content) < LIMITS.max_bytes, what  # small on disk, past the limits once decoded
    with pytest.raises(UploadError) as refused:
        decode(content, "image", LIMITS, EM_KINDS, "em")
    assert message in str(refused.value), str(refused.value)
    assert refused.value.status == status


def test_a_label_upload_is_counted_and_shaped_before_it_is_converted():
    from emserve.card import ModelCard
    from emserve.serving.label_maps import label_maps
    from emserve.serving.uploads import Decoded

    card = ModelCard(mode="em-from-labels", classes=["mito_mem", "ld_lum"], patch_size=16, unet={})
    many = Decoded(np.broadcast_to(np.uint8(1), (10_000, 16, 16)), None, "npy")  # a view: no memory
    with pytest.raises(UploadError, match=r"labels: 10000 label maps; at most 8 per request"):
        label_maps(card, many, None, "labels", 8)
    wide = Decoded(np.broadcast_to(np.uint8(1), (2, 16, 100_000)), None, "npy")
    with pytest.raises(UploadError, match=r"labels: label maps of 16x100000; this model takes 16x16"):
        label_maps(card, wide, ["mito_mem"], "labels", 8)


# ---- what is still read ----------------------------------------------------------------------------------------

IMAGE = np.random.default_rng(0).integers(0, 256, (3, 40, 32), dtype=np.uint8)


@pytest.mark.parametrize("layout", [{"rowsperstrip": 8}, {"tile": (16, 16)}, {"rowsperstrip": 8, "predictor": 2}])
def test_deflated_tiffs_in_strips_and_tiles_are_read_within_their_declared_sizes(layout):
    import tifffile

    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for page in IMAGE:  # one page per slice
            writer.write(page, photometric="minisblack", compression="zlib", **layout)
    assert np.array_equal(decode(buffer.getvalue(), "image", LIMITS, EM_KINDS, "em").array, IMAGE)


@pytest.mark.parametrize(("zarr_format", "compressors"), [
    (2, numcodecs.Zlib()), (2, numcodecs.GZip()), (2, numcodecs.Blosc()), (2, numcodecs.LZ4()), (2, None),
    (3, zarr.codecs.ZstdCodec()), (3, zarr.codecs.GzipCodec()), (3, zarr.codecs.BloscCodec()),
    (3, (zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec())),  # a checksum after the compressed stream
])
def test_zarr_stores_of_every_allowed_codec_are_read(tmp_path, zarr_format, compressors):
    from emserve.serving.encoding import zip_folder

    folder = tmp_path / "image.zarr"
    array = zarr.create_array(str(folder), shape=IMAGE.shape, chunks=(1, 16, 16), dtype="u1",
                              zarr_format=zarr_format, compressors=compressors)
    array[...] = IMAGE
    assert np.array_equal(decode(zip_folder(folder), "image", LIMITS, EM_KINDS, "em").array, IMAGE)


def test_pngs_and_npys_within_the_limits_are_read():
    buffer = io.BytesIO()
    Image.fromarray(IMAGE[0]).save(buffer, format="PNG")
    assert np.array_equal(decode(buffer.getvalue(), "image", LIMITS, EM_KINDS, "em").array, IMAGE[0])
    buffer = io.BytesIO()
    np.save(buffer, IMAGE)
    assert np.array_equal(decode(buffer.getvalue(), "image", LIMITS, EM_KINDS, "em").array, IMAGE)


def test_a_zipped_store_of_label_crops_is_read_from_its_first_crop_in_natural_order(tmp_path):
    """crop2 comes before crop10, in an upload as in EMStore.crops (a plain sort would read crop10)."""
    from emserve.serving.encoding import zip_folder

    folder = tmp_path / "labels.zarr"
    for crop, value in (("crop10", 0), ("crop2", 1)):
        array = zarr.create_array(str(folder / "recon-1/labels/groundtruth" / crop / "mito_mem" / "s0"),
                                  shape=(1, 8, 8), chunks=(1, 8, 8), dtype="u1", zarr_format=2)
        array[...] = value
    for group in ("", "recon-1", "recon-1/labels", "recon-1/labels/groundtruth", "recon-1/labels/groundtruth/crop2",
                  "recon-1/labels/groundtruth/crop10", "recon-1/labels/groundtruth/crop2/mito_mem",
                  "recon-1/labels/groundtruth/crop10/mito_mem"):
        zarr.open_group(str(folder / group), mode="a", zarr_format=2)
    decoded = decode(zip_folder(folder), "labels", LIMITS, ("zarr",), "labels")
    assert decoded.classes == ("mito_mem",) and (decoded.array == 1).all()

"""Where a store's EM comes from, opened once: a zarr group (local, `s3://`, or already open, e.g. in memory) or an
N5 container (OpenOrganelle EM, read through tensorstore). `EMStore` asks its source four things (where the EM
group is, its attributes, its scale levels, a level's voxels) and never branches on the format itself.

Remote reads are anonymous and honour AWS_ENDPOINT_URL for S3-compatible servers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr

from emserve.data.ngff import ScaleLevel, level_from_transform, multiscales_of, parse_multiscales, unit_to_nm

EM_GROUP = "recon-1/em"
GROUNDTRUTH_GROUP = "recon-1/labels/groundtruth"
PREFERRED_EM = ("fibsem-uint8", "fibsem-uint16", "fibsem-int16")
# Codecs of the zarr arrays emserve reads from stores (s3:// and local alike: a store is data someone else may have
# written). A codec is code: zarr runs whichever registered codec a store's metadata names (numcodecs' own and any
# installed plugin's), so only byte decoders known to yield numbers are read, and anything else is refused before
# a chunk is (pickle, msgpack and vlen object codecs among them, which zarr 3 also refuses on numeric arrays).
STORE_CODECS = frozenset({"bytes", "transpose", "shuffle", "delta", "zlib", "gzip", "bz2", "lzma", "blosc", "lz4",
                          "zstd", "crc32", "crc32c", "adler32", "sharding_indexed"})


class Volume(Protocol):
    """A z-y-x array that reads a numpy block when sliced (zarr arrays, and the N5 wrapper below)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: Any) -> np.ndarray: ...


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


def codec_names(metadata: Mapping[str, Any]) -> list[str]:
    """The codecs of zarr array metadata (as `metadata.to_dict()` gives it) in the order they encode: v2 filter
    ids then the compressor's; v3 codec names (numcodecs' without their `numcodecs.` prefix), a shard's inner and
    index codecs after the sharding codec itself."""
    if metadata.get("zarr_format") == 2:
        return [str(c["id"]) for c in [*(metadata.get("filters") or []), metadata.get("compressor")] if c]
    return _v3_codec_names(metadata.get("codecs") or [])


def _v3_codec_names(codecs: list[Mapping[str, Any]]) -> list[str]:
    names = []
    for codec in codecs:
        names.append(str(codec["name"]).removeprefix("numcodecs."))
        inner = codec.get("configuration") or {}
        names += _v3_codec_names([*(inner.get("codecs") or []), *(inner.get("index_codecs") or [])])
    return names


def checked_array(array: zarr.Array, where: str) -> zarr.Array:
    """`array` if emserve may read it: a numeric dtype, and only codecs of STORE_CODECS."""
    if np.dtype(array.dtype).kind not in "biuf":
        raise ValueError(f"{where}: dtype {array.dtype}; emserve reads numeric arrays only")
    refused = sorted(set(codec_names(array.metadata.to_dict())) - STORE_CODECS)
    if refused:
        raise ValueError(f"{where}: codecs {refused} are not read (only byte decoders known to yield numbers); "
                         f"allowed: {', '.join(sorted(STORE_CODECS))}")
    return array


class ZarrSource:
    """A CellMap-layout zarr group: EM under recon-1/em, ground-truth crops under recon-1/labels/groundtruth."""

    def __init__(self, root: zarr.Group, path: str):
        self.root, self.path = root, path

    def em_group(self) -> str:
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

    def attrs(self, group: str) -> Mapping[str, Any]:
        return self.root[group].attrs.asdict()

    def levels(self, group: str, attrs: Mapping[str, Any]) -> list[ScaleLevel]:
        return parse_multiscales(attrs, f"{self.path}/{group}")

    def volume(self, dataset: str) -> Volume:
        return checked_array(self.root[dataset], f"{self.path}/{dataset}")

    def groundtruth(self) -> zarr.Group | None:
        return self.root.get(GROUNDTRUTH_GROUP)


class N5Source:
    """An OpenOrganelle N5 container: EM only (em/fibsem-uint8 ...), attributes in x-y-z order."""

    root = None

    def __init__(self, path: str):
        self.path = path
        _n5_root_attrs(path)  # a missing container fails here, when the store is opened

    def em_group(self) -> str:
        return _find_n5_em(self.path)

    def attrs(self, group: str) -> Mapping[str, Any]:
        return _read_n5_json(f"{self.path}/{group}")

    def levels(self, group: str, attrs: Mapping[str, Any]) -> list[ScaleLevel]:
        return _n5_levels(self.path, group, attrs)

    def volume(self, dataset: str) -> Volume:
        return N5Volume(self.path, dataset)

    def groundtruth(self) -> None:
        return None


def open_source(path: str) -> ZarrSource | N5Source:
    """The source of the store at `path`: N5 by its .n5 suffix, zarr otherwise."""
    return N5Source(path) if path.endswith(".n5") else ZarrSource(open_group(path), path)


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

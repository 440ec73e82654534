"""Hand-written stores that mimic the published CellMap / OpenOrganelle metadata, for testing the reader.

Nothing here goes through emserve's writer or zarr-python's writer: `.zgroup` / `.zattrs` / `.zarray` are
literal JSON text, chunks are encoded with numcodecs and laid out by hand with dimension_separator "/", so the
reader is tested against what is published rather than against what our own code writes.

Where the published metadata was taken from (public sources, read through the project's search tool):

- Layout `<ds>.zarr/recon-1/em/fibsem-uint8/s0..`, `<ds>.n5/em/fibsem-uint16/s0..`, bucket
  `janelia-cosem-datasets`: janelia-cellmap/cellmap-schemas, docs/cellmap-conventions/s3-overview.md.
- Label attributes `cellmap.annotation` = {class_name, annotation_type: {type, encoding}, complement_counts}
  on arrays, {class_name, annotation_type} on class groups, and the crop group's {version "0.1.1", name,
  created_by, ..., class_names}: janelia-cellmap/cellmap-schemas, src/cellmap_schemas/annotation.py
  (`AnnotationArrayAttrs`, `AnnotationGroupAttrs`, `CropGroupAttrs`). Its docstring's example encoding
  {"unknown": 0, "present": 1} is used for `ld_mem` below: 0 there means unannotated, not absent.
- Semantic encoding written without a `present` key, {"absent": 0, "unknown": 255}:
  janelia-cellmap/fibsem-tools, ground_truth_test.py (used for `er_mem`).
- Instance classes (mito, nuc, ves, ...) with encoding {"absent": 0, "unknown": 255} and ids 1..N, crops at
  half the EM voxel size (jrc_hela-2 crop1/all/s0: scale [2.62, 2.0, 2.0], translation [3132.21, 899.0,
  25863.0]; EM s0 scale [5.24, 4.0, 4.0] translation [0, 0, 0]; EM s1 translation [2.62, 2, 2], i.e. voxel
  centres), classes unknown to emserve in crops (cell, cyto), zarr v2 with zstd `{"id": "zstd", "level": 6,
  "checksum": false}` and dimension_separator "/", chunks [64, 128, 128]: a public design note of a viewer
  that reads these stores live (found by content: "Each crop's all/.zattrs carries ordinary OME-NGFF
  coordinateTransformations"; repository not named by the index).
- N5: group attributes `pixelResolution` {dimensions [x, y, z], unit "nm"}, `axes` ["x","y","z"], `units`,
  `scales` [[1,1,1],[2,2,2],..] and a COSEM `multiscales` [{datasets: [{path, transform}]}]; per array
  `pixelResolution` plus `transform` {axes ["z","y","x"], scale, translate, units} (C order):
  janelia-cellmap/cellmap-schemas, src/cellmap_schemas/multiscale/cosem.py and .../neuroglancer_n5.py;
  transform axes z,y,x with scale [5.24, 4.0, 4.0] in janelia-cellmap/fibsem-metadata,
  api/jrc_hela-2/manifest.json; N5 gzip compression {"type": "gzip", "useZlib": false, "level": -1}.
- Contrast: OpenOrganelle keeps display limits ({start, end, min, max}) in the dataset manifest
  (fibsem-metadata api/<ds>/manifest.json `displaySettings.contrastLimits`), not in the zarr attributes; the
  OME-NGFF `omero.channels[].window` {start, end, min, max} is the standard place and is what the variant uses.

What is reconstructed rather than copied: the exact byte layout (key order, indentation) of the published
JSON, the label arrays' compressor (gzip here) and the `all` dtype. Keys and values follow the sources above.
"""

from __future__ import annotations

import json
from pathlib import Path

import numcodecs
import numpy as np

# --- geometry (nm, z-y-x), modelled on jrc_hela-2 ------------------------------------------------------------
EM_VOXEL = (5.24, 4.0, 4.0)
EM_SHAPE = (16, 24, 32)
EM_CHUNKS = (8, 16, 16)
CROP1_EM_OFFSET = (3, 5, 7)  # EM s0 voxels under crop1 (as crop1 of jrc_hela-2 sits at EM voxels 598, 225, 6466)
CROP1_S0_SHAPE = (8, 16, 20)  # at 2.62 x 2 x 2 nm: half the EM voxel size
CROP10_EM_OFFSET = (8, 0, 16)  # crop10 is annotated at the EM voxel size; its s1 lies on EM s1
CROP10_S0_SHAPE = (4, 8, 8)
WINDOW = (20.0, 220.0)  # the omero window of the contrast variant
ZSTD = '{"checksum": false, "id": "zstd", "level": 6}'
GZIP = '{"id": "gzip", "level": 5}'


def em_volume() -> np.ndarray:
    """EM s0: seeded noise, so a block of it identifies its position (a one-voxel shift changes every value)."""
    return np.random.default_rng(1234).integers(0, 256, EM_SHAPE, dtype=np.uint8)


def em_s1(s0: np.ndarray) -> np.ndarray:
    """EM s1: 2x2x2 means, rounded (what CellMap's pyramids do), so its voxel centres are half a voxel in."""
    z, y, x = (s // 2 for s in s0.shape)
    blocks = s0[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2).astype(np.float64)
    return np.round(blocks.mean(axis=(1, 3, 5))).astype(np.uint8)


def crop1_ids() -> np.ndarray:
    """Atomic class ids of crop1 at s0: two mitochondria (membrane 3, lumen 4), ER membrane 16, cytosol 35."""
    ids = np.full(CROP1_S0_SHAPE, 35, dtype=np.uint8)
    ids[:, :, :2] = 16
    for (z0, z1), (y0, y1), (x0, x1) in (((0, 8), (2, 10), (2, 10)), ((0, 8), (10, 16), (12, 20))):
        ids[z0:z1, y0:y1, x0:x1] = 3
        ids[z0 + 2:z1 - 2, y0 + 2:y1 - 2, x0 + 2:x1 - 2] = 4
    return ids


def crop1_arrays() -> dict[str, np.ndarray]:
    """Each class array of crop1 at s0, in its own published encoding."""
    ids = crop1_ids()
    mito_mem = (ids == 3).astype(np.uint8)
    mito_mem[-2:] = 255  # the last planes were not annotated for this class
    mito = np.zeros(ids.shape, np.uint8)  # instance ids: mito 1 on the left, mito 2 on the right
    mito[np.isin(ids, (3, 4)) & (np.arange(20) < 11)] = 1
    mito[np.isin(ids, (3, 4)) & (np.arange(20) >= 11)] = 2
    mito[-2:] = 255
    ld_mem = np.zeros(ids.shape, np.uint8)  # encoding {"unknown": 0, "present": 1}: 0 is NOT absent here
    ld_mem[2:6, 12:14, 4:8] = 1
    return {
        "mito_mem": mito_mem,
        "mito_lum": (ids == 4).astype(np.uint8),
        "mito": mito,
        "er_mem": (ids == 16).astype(np.uint8),  # encoding {"absent": 0, "unknown": 255}, on the arrays only
        "ld_mem": ld_mem,
        "cyto": (ids == 35).astype(np.uint8),  # a published class emserve does not model
        "all": ids,
    }


def crop10_ecs() -> np.ndarray:
    """crop10's `ecs` array, float32 like some exported label arrays: 0.0 absent, 1.0 present, 255.0 unknown."""
    ecs = np.zeros(CROP10_S0_SHAPE, np.float32)
    ecs[:, :4] = 1.0
    ecs[0] = 255.0
    return ecs


def subsample(data: np.ndarray) -> np.ndarray:
    """A label pyramid level: every second voxel (the published pyramids use a windowed mode; any rule works)."""
    return data[::2, ::2, ::2]


# --- literal metadata text ------------------------------------------------------------------------------------
def _floats(values) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _ints(values) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


ZGROUP = '{\n    "zarr_format": 2\n}'


def zarray_text(shape, chunks, dtype: str, compressor: str) -> str:
    """A `.zarray` as zarr-python 2 writes it (keys sorted, indent 4), with CellMap's "/" separator."""
    return (
        "{\n"
        f'    "chunks": {_ints(chunks)},\n'
        f'    "compressor": {compressor},\n'
        '    "dimension_separator": "/",\n'
        f'    "dtype": "{dtype}",\n'
        '    "fill_value": 0,\n'
        '    "filters": null,\n'
        '    "order": "C",\n'
        f'    "shape": {_ints(shape)},\n'
        '    "zarr_format": 2\n'
        "}"
    )


def multiscales_text(name: str, levels) -> str:
    """OME-NGFF 0.4 `multiscales` (z, y, x in nanometer; scale + translation per level) as JSON text."""
    datasets = ",\n".join(
        '                {"coordinateTransformations": ['
        f'{{"scale": {_floats(scale)}, "type": "scale"}}, '
        f'{{"translation": {_floats(translation)}, "type": "translation"}}], "path": "{path}"}}'
        for path, scale, translation in levels
    )
    return (
        '    "multiscales": [\n'
        "        {\n"
        '            "axes": [\n'
        '                {"name": "z", "type": "space", "unit": "nanometer"},\n'
        '                {"name": "y", "type": "space", "unit": "nanometer"},\n'
        '                {"name": "x", "type": "space", "unit": "nanometer"}\n'
        "            ],\n"
        '            "datasets": [\n'
        f"{datasets}\n"
        "            ],\n"
        f'            "name": "{name}",\n'
        '            "version": "0.4"\n'
        "        }\n"
        "    ]"
    )


def annotation_text(class_name: str, encoding: str, counts: str | None = None,
                    kind: str = "semantic_segmentation") -> str:
    counts_text = f', "complement_counts": {counts}' if counts is not None else ""
    return (f'    "cellmap": {{"annotation": {{"annotation_type": {{"encoding": {encoding}, "type": "{kind}"}}, '
            f'"class_name": "{class_name}"{counts_text}}}}}')


def omero_text(window) -> str:
    return ('    "omero": {"channels": [{"active": true, "color": "FFFFFF", "label": "fibsem-uint8", "window": '
            f'{{"end": {window[1]}, "max": 255.0, "min": 0.0, "start": {window[0]}}}}}], "version": "0.4"}}')


def em_levels_nm():
    """(path, scale, translation) of EM s0 and s1: s1 voxel centres sit half an s0 voxel in."""
    s1 = tuple(2 * v for v in EM_VOXEL)
    return [("s0", EM_VOXEL, (0.0, 0.0, 0.0)), ("s1", s1, tuple(v / 2 for v in EM_VOXEL))]


def crop1_levels_nm():
    """crop1: s0 at half the EM voxel size, placed so that s1 lands exactly on EM s0 voxels CROP1_EM_OFFSET."""
    half = tuple(v / 2 for v in EM_VOXEL)
    s1_translation = tuple(round(o * v, 6) for o, v in zip(CROP1_EM_OFFSET, EM_VOXEL, strict=True))
    s0_translation = tuple(round(t - h / 2, 6) for t, h in zip(s1_translation, half, strict=True))
    return [("s0", half, s0_translation), ("s1", EM_VOXEL, s1_translation)]


def crop10_levels_nm():
    s0_translation = tuple(round(o * v, 6) for o, v in zip(CROP10_EM_OFFSET, EM_VOXEL, strict=True))
    s1 = tuple(2 * v for v in EM_VOXEL)
    s1_translation = tuple(round(t + v / 2, 6) for t, v in zip(s0_translation, EM_VOXEL, strict=True))
    return [("s0", EM_VOXEL, s0_translation), ("s1", s1, s1_translation)]


ENCODINGS = {  # class -> (encoding JSON text, type, where the annotation attributes are written)
    "mito_mem": ('{"absent": 0, "present": 1, "unknown": 255}', "semantic_segmentation", "both"),
    "mito_lum": ('{"absent": 0, "present": 1, "unknown": 255}', "semantic_segmentation", "both"),
    "mito": ('{"absent": 0, "unknown": 255}', "instance_segmentation", "both"),
    "er_mem": ('{"absent": 0, "unknown": 255}', "semantic_segmentation", "arrays"),
    "ld_mem": ('{"present": 1, "unknown": 0}', "semantic_segmentation", "both"),
    "cyto": ('{"absent": 0, "present": 1, "unknown": 255}', "semantic_segmentation", "both"),
    "ecs": ('{"absent": 0, "present": 1, "unknown": 255}', "semantic_segmentation", "both"),
}


# --- zarr v2 ---------------------------------------------------------------------------------------------------
def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)


def _chunk_blocks(data: np.ndarray, chunks):
    """(chunk index, full-size chunk padded with the fill value 0) for every chunk of `data`, C order."""
    grid = [-(-s // c) for s, c in zip(data.shape, chunks, strict=True)]
    for index in np.ndindex(*grid):
        block = np.zeros(chunks, dtype=data.dtype)
        part = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))]
        block[tuple(slice(0, s) for s in part.shape)] = part
        yield index, block


def write_v2_array(path: Path, data: np.ndarray, chunks, compressor_json: str, attrs_text: str | None) -> None:
    """A zarr v2 array: literal `.zarray` (+ `.zattrs`), chunks under "z/y/x" keys (dimension_separator "/")."""
    codec = numcodecs.get_codec(json.loads(compressor_json))
    _write(path / ".zarray", zarray_text(data.shape, chunks, data.dtype.str, compressor_json))
    if attrs_text is not None:
        _write(path / ".zattrs", attrs_text)
    for index, block in _chunk_blocks(data, chunks):
        _write(path.joinpath(*map(str, index)), codec.encode(np.ascontiguousarray(block)))


def _group(path: Path, attrs_text: str | None = None) -> None:
    _write(path / ".zgroup", ZGROUP)
    if attrs_text is not None:
        _write(path / ".zattrs", attrs_text)


def _counts(data: np.ndarray, encoding: dict) -> str:
    parts = [f'"{k}": {int((data == encoding[k]).sum())}' for k in ("absent", "unknown") if k in encoding]
    return "{" + ", ".join(parts) + "}"


def write_class_v2(crop: Path, name: str, s0: np.ndarray, levels, chunks, kind_override: str | None = None) -> None:
    """One class group with s0 and s1 arrays and `cellmap.annotation` attributes where the source puts them."""
    encoding_text, kind, where = ENCODINGS.get(name, ENCODINGS["cyto"])
    kind = kind_override or kind
    encoding = json.loads(encoding_text)
    group_attrs = [multiscales_text(name, levels)]
    if where == "both":
        group_attrs.append(annotation_text(name, encoding_text, kind=kind))
    _group(crop / name, "{\n" + ",\n".join(group_attrs) + "\n}")
    for (path, _, _), data in zip(levels, (s0, subsample(s0)), strict=True):
        attrs = "{\n" + annotation_text(name, encoding_text, _counts(data, encoding), kind) + "\n}"
        write_v2_array(crop / name / path, data, tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
                       GZIP, attrs)


def crop_group_text(name: str, class_names) -> str:
    names = ", ".join(f'"{n}"' for n in class_names)
    return ('{\n    "cellmap": {"annotation": {"class_names": [' + names + '], "created_by": ["CellMap annotators"], '
            '"created_with": ["Amira", "Paintera"], "description": null, "duration_days": null, "end_date": null, '
            f'"name": "{name}", "protocol_uri": null, "start_date": null, "version": "0.1.1"}}}}\n}}')


def write_cellmap_v2(root: Path, *, contrast: bool = False) -> Path:
    """`<root>` as a published CellMap zarr v2 store: EM s0/s1 (zstd) and crops crop1 and crop10 (gzip).

    With `contrast`, the EM group also carries an OME-NGFF `omero` window (WINDOW).
    """
    em = em_volume()
    _group(root)
    _group(root / "recon-1")
    _group(root / "recon-1" / "em")
    em_attrs = [multiscales_text("fibsem-uint8", em_levels_nm())] + ([omero_text(WINDOW)] if contrast else [])
    _group(root / "recon-1/em/fibsem-uint8", "{\n" + ",\n".join(em_attrs) + "\n}")
    for (path, _, _), data in zip(em_levels_nm(), (em, em_s1(em)), strict=True):
        write_v2_array(root / "recon-1/em/fibsem-uint8" / path, data, EM_CHUNKS, ZSTD, None)
    gt = root / "recon-1/labels/groundtruth"
    for part in (root / "recon-1/labels", gt):
        _group(part)
    arrays = crop1_arrays()
    _group(gt / "crop1", crop_group_text("crop1", [n for n in arrays if n != "all"]))
    for name, data in arrays.items():
        if name == "all":
            _group(gt / "crop1/all", "{\n" + multiscales_text("all", crop1_levels_nm()[:1]) + "\n}")
            write_v2_array(gt / "crop1/all/s0", data, (8, 16, 16), GZIP, None)
        else:
            write_class_v2(gt / "crop1", name, data, crop1_levels_nm(), (8, 16, 16))
    _group(gt / "crop10", crop_group_text("crop10", ["ecs"]))
    write_class_v2(gt / "crop10", "ecs", crop10_ecs(), crop10_levels_nm(), (4, 8, 8))
    return root


# --- zarr v3 + OME-NGFF 0.5 -------------------------------------------------------------------------------------
def _v3_group(path: Path, attributes: dict | None = None) -> None:
    _write(path / "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                           "attributes": attributes or {}}, indent=2))


def _v3_array(path: Path, data: np.ndarray, chunks, attributes: dict | None = None) -> None:
    """A zarr v3 array of one-byte or little-endian data: bytes + zstd codecs, "c/z/y/x" chunk keys."""
    bytes_codec = {"name": "bytes"} if data.dtype.itemsize == 1 else {"name": "bytes",
                                                                       "configuration": {"endian": "little"}}
    meta = {
        "zarr_format": 3, "node_type": "array", "shape": list(data.shape), "data_type": str(data.dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0, "codecs": [bytes_codec, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
        "attributes": attributes or {}, "dimension_names": ["z", "y", "x"],
    }
    _write(path / "zarr.json", json.dumps(meta, indent=2))
    codec = numcodecs.Zstd(level=3)
    for index, block in _chunk_blocks(data, chunks):
        _write(path.joinpath("c", *map(str, index)), codec.encode(np.ascontiguousarray(block.astype(
            block.dtype.newbyteorder("<")))))


def _ome05(multiscales_json: str) -> dict:
    """NGFF 0.5 puts `multiscales` under `ome` (with the version there, not per multiscale)."""
    ms = json.loads("{" + multiscales_json + "}")["multiscales"]
    for m in ms:
        m.pop("version", None)
    return {"ome": {"version": "0.5", "multiscales": ms}}


def write_cellmap_v3(root: Path) -> Path:
    """The same store as `write_cellmap_v2`, as zarr v3 with OME-NGFF 0.5 attributes (crop1 only)."""
    em = em_volume()
    for part in ("", "recon-1", "recon-1/em", "recon-1/labels", "recon-1/labels/groundtruth"):
        _v3_group(root / part)
    _v3_group(root / "recon-1/em/fibsem-uint8", _ome05(multiscales_text("fibsem-uint8", em_levels_nm())))
    for (path, _, _), data in zip(em_levels_nm(), (em, em_s1(em)), strict=True):
        _v3_array(root / "recon-1/em/fibsem-uint8" / path, data, EM_CHUNKS)
    crop = root / "recon-1/labels/groundtruth/crop1"
    arrays = {k: v for k, v in crop1_arrays().items() if k != "all"}
    _v3_group(crop, json.loads(crop_group_text("crop1", list(arrays))))
    for name, s0 in arrays.items():
        encoding_text, kind, _ = ENCODINGS[name]
        annotation = json.loads("{" + annotation_text(name, encoding_text, kind=kind) + "}")
        _v3_group(crop / name, {**_ome05(multiscales_text(name, crop1_levels_nm())), **annotation})
        for (path, _, _), data in zip(crop1_levels_nm(), (s0, subsample(s0)), strict=True):
            _v3_array(crop / name / path, data, tuple(min(8, s) for s in data.shape), annotation)
    return root


# --- N5 (OpenOrganelle) ------------------------------------------------------------------------------------------
N5_SHAPE = (6, 20, 24)  # z, y, x: small enough that z * 1024 + y * 32 + x is a unique uint16 per voxel


def n5_volume() -> np.ndarray:
    """uint16 EM whose values are their own coordinates: value = z * 1024 + y * 32 + x."""
    z, y, x = np.indices(N5_SHAPE)
    return (z * 1024 + y * 32 + x).astype(np.uint16)


def _n5_dataset(path: Path, data_zyx: np.ndarray, block_xyz) -> None:
    """An N5 dataset written by tensorstore (x-y-z dimensions, gzip), as N5 writers lay it out."""
    import tensorstore as ts

    array = ts.open({
        "driver": "n5", "kvstore": {"driver": "file", "path": f"{path}/"},
        "metadata": {"dimensions": list(data_zyx.shape[::-1]), "blockSize": list(block_xyz),
                     "dataType": str(data_zyx.dtype), "compression": {"type": "gzip"}},
        "create": True, "delete_existing": True,
    }).result()
    array.write(np.ascontiguousarray(data_zyx.T)).result()


def _merge_json(path: Path, extra: dict) -> None:
    attrs = json.loads(path.read_text())
    attrs.update(extra)
    path.write_text(json.dumps(attrs))


def write_openorganelle_n5(root: Path, *, cosem_multiscales: bool = True) -> Path:
    """`<root>` (a `<ds>.n5`) with em/fibsem-uint16 s0, s1 and the OpenOrganelle attributes.

    With `cosem_multiscales` False the group has only the Neuroglancer keys (pixelResolution, scales) and the
    arrays only `pixelResolution`, so the reader must derive the s1 offset from the downsampling factor.
    """
    data = n5_volume()
    group = root / "em" / "fibsem-uint16"
    levels = [("s0", data, (1, 1, 1)), ("s1", subsample(data), (2, 2, 2))]
    datasets = []
    for name, level, factor in levels:
        _n5_dataset(group / name, level, (16, 16, 4))
        scale_zyx = [v * f for v, f in zip(EM_VOXEL, factor[::-1], strict=True)]
        translate_zyx = [(f - 1) * v / 2 for v, f in zip(EM_VOXEL, factor[::-1], strict=True)]
        transform = {"axes": ["z", "y", "x"], "scale": scale_zyx, "translate": translate_zyx,
                     "units": ["nm", "nm", "nm"]}
        level_attrs = {"pixelResolution": {"dimensions": scale_zyx[::-1], "unit": "nm"}}
        if cosem_multiscales:
            level_attrs["transform"] = transform
        _merge_json(group / name / "attributes.json", level_attrs)
        datasets.append({"path": name, "transform": transform})
    group_attrs = {"axes": ["x", "y", "z"], "units": ["nm", "nm", "nm"], "scales": [[1, 1, 1], [2, 2, 2]],
                   "pixelResolution": {"dimensions": list(EM_VOXEL[::-1]), "unit": "nm"}}
    if cosem_multiscales:
        group_attrs["multiscales"] = [{"name": "fibsem-uint16", "datasets": datasets}]
    _write(group / "attributes.json", json.dumps(group_attrs))
    _write(root / "attributes.json", json.dumps({"n5": "2.5.1"}))
    return root


# --- S3 upload --------------------------------------------------------------------------------------------------
def upload_tree(client, bucket: str, local_root: Path, prefix: str, *, public: bool = True) -> int:
    """Upload every file under `local_root` to s3://bucket/prefix/..., readable anonymously (public-read ACL).

    The public bucket grants anonymous reads with a bucket policy; moto ignores bucket policies for unsigned
    requests and checks object ACLs instead, so each object is made public-read, which is what an anonymous
    reader needs either way. Uploads run on a few threads (boto3 clients are thread-safe) to keep tests fast.
    """
    from concurrent.futures import ThreadPoolExecutor

    acl = {"ACL": "public-read"} if public else {}
    files = sorted(p for p in Path(local_root).rglob("*") if p.is_file())

    def put(path: Path) -> None:
        key = f"{prefix}/{path.relative_to(local_root).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **acl)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, files))
    return len(files)

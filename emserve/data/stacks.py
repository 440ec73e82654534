"""Import real image stacks (PNG / TIFF slices) into a vEM store in the CellMap layout.

Most public EM ground truth outside CellMap ships as a folder of 2D slices plus either one mask folder per class
(ISBI 2012, the Drosophila VNC stack of Gerhard et al.) or one index-map folder with a legend of pixel values.
`import_stack` reads such stacks, checks them, and writes one store with `write_store` (atomically):

    <out>.zarr/recon-1/em/fibsem-uint8/s0..                the raw slices, z-y-x, uint8
    <out>.zarr/recon-1/labels/groundtruth/crop<N>/<class>/  one 0/1/255 array per class, per contiguous run of
                                                            labelled slices; held-out slices get their own crops
                                                            with attrs {"split": "test"}

Conventions:
- Slices are ordered by natural sort of their file names (2.png before 10.png); a multi-page TIFF contributes its
  pages in order. Several files are concatenated along z.
- Raw: uint8 is kept as is. Other dtypes (uint16, int16, float) become uint8 by a linear map of one window over
  the whole stack (never per slice, so slices stay comparable): `rescale="minmax"` (stack min..max),
  `"percentile"` (0.05..99.95 percentiles, robust to hot pixels) or `"shift"` (uint16 only: the high byte,
  v >> 8, for data that already uses the full 16-bit range). The formula is
  `uint8 = round(clip((v - lo) / (hi - lo), 0, 1) * 255)`; lo and hi go into the provenance.
- Masks: a pixel is present where its value is > `threshold`. By default the threshold is half the mask's dtype
  range (127 for uint8, 32767 for uint16), or 0 for masks whose values are only 0 and 1; 1-bit (PNG mode "1") files
  are read as 0 / 255 (Pillow's convert("L")). `invert` flips a class after binarising (ISBI 2012 draws membrane as 0).
- Index maps: `value_map` maps pixel values to class names; several values may share a class (VNC draws membrane
  as 0/32/64/96/128). A value mapped to "unknown" marks the pixel unknown (255) in every class; values not in the
  map are background (absent in every class) unless `unmapped` says otherwise.
- Class names are CellMap names (`emserve.classes`); group classes such as "mito" are written as arrays of their
  own (the reader reads a class's own array before deriving it from atomic members).
- Without labels the store is raw only (unlabelled data for unconditional training).

Every bad input raises before anything is written (ValueError / FileNotFoundError / FileExistsError) with a
one-line message naming the field, the bad value and what is expected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from emserve.classes import ABSENT, PRESENT, UNKNOWN, get_class
from emserve.data.store import natural_key
from emserve.data.writer import CropToWrite, provenance, write_store

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
UNKNOWN_NAME = "unknown"
PERCENTILE_WINDOW = (0.05, 99.95)

PathLike = str | os.PathLike
Files = PathLike | Sequence[PathLike]
Rescale = Literal["minmax", "percentile", "shift"]
Unmapped = Literal["absent", "unknown", "error"]


@dataclass
class ImportSummary:
    """What `import_stack` wrote: the store, the raw shape, the crops and the class fractions."""

    path: Path
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    classes: tuple[str, ...]
    crops: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"split", "slices": [a, b)}
    class_fractions: dict[str, float] = field(default_factory=dict)  # present / all labelled pixels
    rescale: dict[str, Any] | None = None  # set when the raw was not uint8


# --- parsers for CLI strings ---------------------------------------------------------------------------------
def parse_voxel_size(value: str | Sequence[float], field_name: str = "voxel_size") -> tuple[float, float, float]:
    """"50,4.6,4.6" (or a sequence) -> (50.0, 4.6, 4.6): three positive finite numbers, z, y, x in nm."""
    expected = "expected 3 positive numbers Z,Y,X in nm, e.g. 50,4.6,4.6"
    items = [s.strip() for s in value.replace("x", ",").split(",")] if isinstance(value, str) else list(value)
    if len(items) != 3:
        raise ValueError(f"{field_name}: {value!r} has {len(items)} values; {expected}")
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name}: {value!r} is not numeric; {expected}") from None
    if not all(np.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{field_name}: {value!r} has a value that is not a positive number; {expected}")
    return out  # type: ignore[return-value]


def parse_assignment(text: str, field_name: str) -> tuple[str, str]:
    """"KEY=VALUE" -> (KEY, VALUE), both stripped and non-empty."""
    key, sep, value = str(text).partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise ValueError(f"{field_name}: {text!r} is malformed; expected KEY=VALUE, e.g. mito=labels/mito/")
    return key, value


def parse_masks(items: Iterable[str]) -> dict[str, str]:
    """["mito=dir/", "pm=dir2/"] (`--mask CLASS=PATH`) -> {"mito": "dir/", "pm": "dir2/"}; class names checked."""
    out: dict[str, str] = {}
    for item in items:
        cls, path = parse_assignment(item, "mask")
        _check_class(cls, "mask")
        if cls in out:
            raise ValueError(f"mask: class {cls!r} is given twice ({out[cls]!r} and {path!r}); expected one per class")
        out[cls] = path
    return out


def parse_value_map(items: Iterable[str]) -> dict[int, str]:
    """["0,32,64=pm", "191=mito", "159=unknown"] (`--map VALUES=CLASS`) -> {0: "pm", 32: "pm", ...}."""
    out: dict[int, str] = {}
    for item in items:
        values, cls = parse_assignment(item, "map")
        if cls != UNKNOWN_NAME:
            _check_class(cls, "map")
        for v in values.split(","):
            try:
                value = int(v.strip())
            except ValueError:
                raise ValueError(f"map: {item!r} has pixel value {v.strip()!r} that is not an integer; expected "
                                 f"VALUE[,VALUE...]=CLASS, e.g. 191=mito") from None
            if value in out and out[value] != cls:
                raise ValueError(f"map: pixel value {value} is mapped twice ({out[value]!r} and {cls!r}); "
                                 f"expected one class per value")
            out[value] = cls
    if not out:
        raise ValueError("map: no VALUE=CLASS pairs given; expected at least one, e.g. 191=mito")
    return out


def parse_slices(text: str) -> list[slice]:
    """"A:B" (Python slice: A..B-1), "A", ":B", "-6:", or a comma list of these -> slices, resolved later
    against the number of slices."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, _, b = part.partition(":")
                out.append(slice(int(a) if a.strip() else None, int(b) if b.strip() else None))
            else:
                i = int(part)
                out.append(slice(i, i + 1 if i != -1 else None))
        except ValueError:
            raise ValueError(f"labelled_slices: {text!r} is malformed at {part!r}; expected A:B (slices A..B-1), "
                             f"A, or a comma list such as 0:16,20:24") from None
    return out


# --- file discovery and reading ------------------------------------------------------------------------------
def discover(source: Files, field_name: str = "images") -> list[Path]:
    """Slice files in order: a folder (its *.png / *.tif / *.tiff, natural order), a glob pattern, one file (a
    multi-page TIFF or a single slice) or an explicit list of files (kept in the given order)."""
    if isinstance(source, str | os.PathLike):
        text = str(source)
        if any(c in text for c in "*?["):
            parent = Path(text).parent
            files = sorted((p for p in parent.glob(Path(text).name) if p.is_file()), key=natural_key)
            if not files:
                raise FileNotFoundError(f"{field_name}: pattern {text!r} matches no files; expected PNG/TIFF slices")
            return _check_suffixes(files, field_name)
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{field_name}: {path} does not exist; expected a folder of PNG/TIFF slices "
                                    f"or a (multi-page) TIFF file")
        if path.is_file():
            return _check_suffixes([path], field_name)
        files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                        and not p.name.startswith(".")), key=natural_key)
        if not files:
            raise ValueError(f"{field_name}: folder {path} holds no *.png/*.tif/*.tiff files; expected at least one "
                             f"slice")
        return files
    files = [Path(p) for p in source]
    if not files:
        raise ValueError(f"{field_name}: the file list is empty; expected at least one PNG/TIFF slice")
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{field_name}: {p} does not exist or is not a file; expected a PNG/TIFF slice")
    return _check_suffixes(files, field_name)


def read_stack(files: Sequence[Path], field_name: str = "images") -> np.ndarray:
    """Read slices into one z-y-x array (files concatenated along z; all slices the same shape and dtype)."""
    planes: list[np.ndarray] = []
    where: list[str] = []
    for p in files:
        arr = _read_file(p, field_name)
        for i, plane in enumerate(arr):
            if planes and (plane.shape != planes[0].shape or plane.dtype != planes[0].dtype):
                raise ValueError(f"{field_name}: {p.name}{f' page {i}' if len(arr) > 1 else ''} has shape "
                                 f"{plane.shape} {plane.dtype}; expected {planes[0].shape} {planes[0].dtype} "
                                 f"like {where[0]}")
            planes.append(plane)
            where.append(p.name)
    return np.stack(planes)


def _read_file(path: Path, field_name: str) -> np.ndarray:
    """One file as [pages, y, x]; RGB(A) is accepted only when it is grey (all colour channels equal)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                if len(tf.series) != 1:
                    raise ValueError(f"{field_name}: {path.name} holds {len(tf.series)} image series; expected one "
                                     f"stack of equally shaped greyscale pages")
                series = tf.series[0]
                arr, axes = series.asarray(), series.axes
            if axes.endswith("S"):
                arr = _grey(np.moveaxis(arr, -1, 0), path, field_name)
                axes = axes[:-1]
            if "C" in axes:
                raise ValueError(f"{field_name}: {path.name} has channel axis C (axes {axes}); expected greyscale")
            arr = arr.reshape(-1, *arr.shape[-2:])
        else:
            from PIL import Image

            with Image.open(path) as im:
                mode = im.mode
                arr = np.array(im)
                n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise ValueError(f"{field_name}: {path.name} is an animated image with {n_frames} frames; expected "
                                 f"one slice per PNG")
            if arr.ndim == 3:  # RGB, RGBA, LA
                channels = arr[..., :1] if mode == "LA" else arr[..., :3]
                arr = _grey(np.moveaxis(channels, -1, 0), path, field_name)
            arr = arr[None]
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{field_name}: {path} could not be read as an image ({e}); expected PNG or TIFF") from None
    if arr.dtype == bool:  # 1-bit images (PNG mode "1"): 0 / 255, as Pillow's convert("L") gives
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise ValueError(f"{field_name}: {path.name} has shape {arr.shape}; expected 2D slices")
    return arr


def _grey(channels: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    if not (channels == channels[:1]).all():
        raise ValueError(f"{field_name}: {path.name} is a colour image; expected greyscale (or RGB with equal "
                         f"channels)")
    return channels[0]


def _check_suffixes(files: Sequence[Path], field_name: str) -> list[Path]:
    bad = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if bad:
        raise ValueError(f"{field_name}: {bad[0]} is not a PNG or TIFF file; expected *.png, *.tif or *.tiff")
    return list(files)


# --- conversions ---------------------------------------------------------------------------------------------
def to_uint8(stack: np.ndarray, rescale: Rescale = "minmax") -> tuple[np.ndarray, dict[str, Any] | None]:
    """Raw slices to uint8 with one window for the whole stack (see the module docstring); uint8 is kept."""
    if stack.dtype == np.uint8:
        return stack, None
    if stack.dtype == bool or not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype,
                                                                                          np.floating)):
        raise ValueError(f"images: dtype {stack.dtype} is not supported; expected uint8, uint16, int16 or float")
    if rescale == "shift":
        if stack.dtype != np.uint16:
            raise ValueError(f"rescale: 'shift' needs uint16 images, got {stack.dtype}; expected 'minmax' or "
                             f"'percentile' for this dtype")
        return (stack >> 8).astype(np.uint8), {"method": "shift", "formula": "v >> 8"}
    if rescale == "minmax":
        lo, hi = float(stack.min()), float(stack.max())
    elif rescale == "percentile":
        lo, hi = (float(v) for v in np.percentile(stack, PERCENTILE_WINDOW))
    else:
        raise ValueError(f"rescale: {rescale!r} is not a method; expected 'minmax', 'percentile' or 'shift'")
    unit = (stack.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(stack.shape)
    out = np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8)
    return out, {"method": rescale, "lo": lo, "hi": hi, "formula": "round(clip((v - lo) / (hi - lo), 0, 1) * 255)"}


def binarize(stack: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float | None]:
    """Bool mask (value > threshold) and the threshold used (None for bool input); see the module docstring."""
    if stack.dtype == bool:
        return stack, None
    if threshold is None:
        if np.issubdtype(stack.dtype, np.integer):
            threshold = 0.0 if stack.max() <= 1 else float(np.iinfo(stack.dtype).max // 2)
        else:
            threshold = 0.5 if stack.max() <= 1 else 127.0
    return stack > threshold, float(threshold)


# --- the importer --------------------------------------------------------------------------------------------
def import_stack(
    images: Files,
    out: PathLike,
    voxel_size: str | Sequence[float],
    *,
    masks: Mapping[str, Files] | None = None,
    index_maps: Files | None = None,
    value_map: Mapping[int, str] | None = None,
    invert: Iterable[str] = (),
    threshold: float | None = None,
    unmapped: Unmapped = "absent",
    labelled_slices: str | slice | Sequence[int] | Sequence[slice] | None = None,
    holdout: int = 0,
    rescale: Rescale = "minmax",
    levels: int = 2,
    overwrite: bool = False,
    dataset: str | None = None,
    command: str | Sequence[str] | None = None,
) -> ImportSummary:
    """Import a PNG/TIFF stack (and its labels) as a CellMap-layout store at `out`.

    images: a folder, glob, multi-page TIFF or ordered list of slice files (see `discover`).
    voxel_size: z, y, x in nm ("50,4.6,4.6" or a sequence).
    masks: class name -> mask files (folder / glob / TIFF / list), one mask slice per labelled slice, or one per
        image slice (the labelled ones are then picked out). Mutually exclusive with index_maps.
    index_maps + value_map: index-map files and {pixel value: class name or "unknown"}.
    invert: mask classes whose masks mark the class with low values (ISBI 2012 membrane = 0).
    threshold: mask binarisation threshold (present where value > threshold); None = automatic.
    unmapped: what index-map values missing from value_map mean: "absent", "unknown", or "error".
    labelled_slices: which image slices the labels cover ("A:B", list of indices, slices); default all when
        the label files cover every image, else required.
    holdout: the last `holdout` labelled slices go into separate crops with attrs {"split": "test"}; the
        others are "train". Each contiguous run of labelled slices of one split is one crop (crop1, crop2, ...
        in z order).
    rescale: uint16/other -> uint8 method ("minmax", "percentile", "shift").
    levels, overwrite: passed to write_store.
    dataset, command: recorded in the provenance (command = the CLI argv).
    """
    voxel = parse_voxel_size(voxel_size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output: {out} already exists; choose another path or pass overwrite=True "
                              f"(--overwrite)")
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels: {levels!r} is not a positive integer; expected 1 or more pyramid levels")
    if unmapped not in ("absent", "unknown", "error"):
        raise ValueError(f"unmapped: {unmapped!r} is not allowed; expected 'absent', 'unknown' or 'error'")
    if rescale not in ("minmax", "percentile", "shift"):
        raise ValueError(f"rescale: {rescale!r} is not a method; expected 'minmax', 'percentile' or 'shift'")
    masks = dict(masks or {})
    invert = list(invert)
    if masks and index_maps is not None:
        raise ValueError("labels: both masks and index_maps were given; expected one of them (--mask or --index-map)")
    if index_maps is not None and not value_map:
        raise ValueError("map: index_maps were given without a value map; expected VALUE=CLASS pairs (--map)")
    if value_map and index_maps is None:
        raise ValueError("index_maps: a value map was given without index-map files; expected --index-map PATH")
    for cls in masks:
        _check_class(cls, "mask")
    bad_invert = [c for c in invert if c not in masks]
    if bad_invert:
        raise ValueError(f"invert: class {bad_invert[0]!r} has no mask; expected one of {sorted(masks) or 'none'} "
                         f"(invert applies to --mask classes only)")
    if value_map is not None:
        value_map = _check_value_map(value_map)

    image_files = discover(images, "images")
    stack = read_stack(image_files, "images")
    raw, rescale_info = to_uint8(stack, rescale)
    del stack
    n = raw.shape[0]
    has_labels = bool(masks) or index_maps is not None
    if not has_labels and (labelled_slices is not None or holdout):
        raise ValueError("labelled_slices: slices or a holdout were given without labels; expected --mask or "
                         "--index-map as well")

    label_files: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    label_info: dict[str, Any] = {}
    labelled: list[int] = []
    if has_labels:
        sources = ({f"mask[{c}]": f for c, f in masks.items()} if masks else {"index_maps": index_maps})
        stacks = {}
        for key, src in sources.items():
            label_files[key] = discover(src, key)
            stacks[key] = read_stack(label_files[key], key)
        counts = {k: s.shape[0] for k, s in stacks.items()}
        labelled = _resolve_labelled(labelled_slices, n, counts)
        for key, s in stacks.items():
            if s.shape[0] == n and len(labelled) != n:
                stacks[key] = s[labelled]
            if stacks[key].shape[1:] != raw.shape[1:]:
                raise ValueError(f"{key}: slices have shape {stacks[key].shape[1:]}; expected the images' shape "
                                 f"{raw.shape[1:]}")
        if masks:
            labels, label_info = _labels_from_masks(stacks, invert, threshold)
        else:
            labels, label_info = _labels_from_index_map(stacks["index_maps"], value_map, unmapped)
    if not isinstance(holdout, int) or not 0 <= holdout <= len(labelled):
        raise ValueError(f"holdout: {holdout!r} is out of range; expected an integer from 0 to the number of "
                         f"labelled slices ({len(labelled)})")

    crops, crop_info = _make_crops(labelled, holdout, labels)
    classes = tuple(labels)
    fractions = {c: float((a == PRESENT).mean()) for c, a in labels.items()} if labels else {}
    attrs = provenance(
        importer="emserve.data.stacks.import_stack",
        dataset=dataset or out.name.removesuffix(".zarr"),
        command=list(command) if command is not None and not isinstance(command, str) else command,
        arguments={
            "voxel_size_nm_zyx": list(voxel), "rescale": rescale, "threshold": threshold, "unmapped": unmapped,
            "invert": invert, "holdout": holdout, "labelled_slices": labelled, "levels": levels,
        },
        source={
            "images": _describe_files(image_files),
            **{k: _describe_files(v) for k, v in label_files.items()},
        },
        value_map={str(k): v for k, v in sorted(value_map.items())} if value_map else None,
        masks={c: str(m) if isinstance(m, str | os.PathLike) else "list" for c, m in masks.items()} or None,
        raw_rescale=rescale_info,
        labels=label_info or None,
        crops=crop_info,
        class_fractions=fractions,
    )
    read = [*image_files, *(f for files in label_files.values() for f in files)]
    write_store(out, raw, voxel, crops, levels=levels, attrs=attrs, overwrite=overwrite, inputs=read)
    return ImportSummary(out, tuple(raw.shape), voxel, classes, crop_info, fractions, rescale_info)


def _resolve_labelled(spec: Any, n: int, counts: Mapping[str, int]) -> list[int]:
    """Indices of the labelled image slices, checked against the label files' slice counts."""
    if spec is None:
        bad = {k: c for k, c in counts.items() if c != n}
        if bad:
            key, c = next(iter(bad.items()))
            raise ValueError(f"{key}: {c} label slices for {n} image slices; expected {n}, or give labelled_slices "
                             f"(--labelled-slices) naming the {c} slices they label")
        return list(range(n))
    if isinstance(spec, str):
        spec = parse_slices(spec)
    if isinstance(spec, slice | range):
        spec = [spec]
    idx: list[int] = []
    for item in spec:
        if isinstance(item, slice):
            idx.extend(range(*item.indices(n)))
        elif isinstance(item, range):
            idx.extend(item)
        else:
            try:
                i = int(item)
            except (TypeError, ValueError):
                raise ValueError(f"labelled_slices: {item!r} is not a slice index; expected integers or A:B "
                                 f"ranges") from None
            idx.append(i + n if i < 0 else i)
    if not idx:
        raise ValueError(f"labelled_slices: {spec!r} selects no slice of the {n} images; expected at least one")
    out_of_range = [i for i in idx if not 0 <= i < n]
    if out_of_range:
        raise ValueError(f"labelled_slices: slice {out_of_range[0]} is out of range; expected 0..{n - 1} "
                         f"({n} image slices)")
    if len(set(idx)) != len(idx) or idx != sorted(idx):
        raise ValueError(f"labelled_slices: {spec!r} repeats or reorders slices; expected increasing indices")
    for key, c in counts.items():
        if c not in (n, len(idx)):
            raise ValueError(f"{key}: {c} label slices; expected {len(idx)} (one per labelled slice) or {n} "
                             f"(one per image slice)")
    return idx


def _labels_from_masks(stacks: Mapping[str, np.ndarray], invert: Sequence[str], threshold: float | None
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    labels, info = {}, {}
    for key, s in stacks.items():
        cls = key[len("mask["):-1]
        present, used = binarize(s, threshold)
        if cls in invert:
            present = ~present
        labels[cls] = np.full(present.shape, ABSENT, dtype=np.uint8)
        labels[cls][present] = PRESENT
        info[cls] = {"source": "mask", "threshold": used, "inverted": cls in invert,
                     "rule": f"present where value {'<=' if cls in invert else '>'} threshold"}
    return labels, info


def _labels_from_index_map(index: np.ndarray, value_map: Mapping[int, str], unmapped: Unmapped
                           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"index_maps: dtype {index.dtype} is not an integer type; expected integer index maps")
    values, counts = np.unique(index, return_counts=True)
    present_values = set(values.tolist())
    missing = sorted(v for v in value_map if v not in present_values)
    if missing:
        raise ValueError(f"map: pixel value {missing[0]} (-> {value_map[missing[0]]!r}) does not occur in the index "
                         f"maps; values present: {sorted(present_values)[:20]}")
    not_mapped = sorted(v for v in present_values if v not in value_map)
    if not_mapped and unmapped == "error":
        raise ValueError(f"index_maps: pixel value {not_mapped[0]} has no class in the map; expected every value in "
                         f"{sorted(present_values)[:20]} to be mapped (or unmapped='absent')")
    classes = sorted({c for c in value_map.values() if c != UNKNOWN_NAME},
                     key=lambda c: min(v for v, k in value_map.items() if k == c))
    if not classes:
        raise ValueError("map: every value is mapped to 'unknown'; expected at least one class name")
    unknown = np.isin(index, [v for v, c in value_map.items() if c == UNKNOWN_NAME])
    if unmapped == "unknown":
        unknown |= ~np.isin(index, list(value_map))
    labels = {}
    for cls in classes:
        arr = np.full(index.shape, ABSENT, dtype=np.uint8)
        arr[np.isin(index, [v for v, c in value_map.items() if c == cls])] = PRESENT
        arr[unknown] = UNKNOWN
        labels[cls] = arr
    info = {"source": "index_map", "unmapped": unmapped,
            "value_counts": {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}}
    return labels, info


def _make_crops(labelled: Sequence[int], holdout: int, labels: Mapping[str, np.ndarray]
                ) -> tuple[list[CropToWrite], dict[str, dict[str, Any]]]:
    """One crop per contiguous run of labelled slices within a split (train first in z, then the held-out tail)."""
    if not labels:
        return [], {}
    split_of = ["train"] * (len(labelled) - holdout) + ["test"] * holdout
    runs: list[tuple[str, int, int]] = []  # split, first index into `labelled`, end index
    for j, z in enumerate(labelled):
        if runs and runs[-1][0] == split_of[j] and labelled[j - 1] == z - 1:
            runs[-1] = (runs[-1][0], runs[-1][1], j + 1)
        else:
            runs.append((split_of[j], j, j + 1))
    crops, info = [], {}
    for k, (split, a, b) in enumerate(runs, start=1):
        name = f"crop{k}"
        z0, z1 = labelled[a], labelled[b - 1] + 1
        crop_labels = {c: arr[a:b] for c, arr in labels.items()}
        attrs = {"split": split, "slices": [z0, z1]}
        crops.append(CropToWrite(name, (z0, 0, 0), crop_labels, attrs=attrs))
        info[name] = attrs
    return crops, info


def _check_value_map(value_map: Mapping[Any, str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for k, cls in value_map.items():
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"map: key {k!r} is not an integer pixel value; expected {{VALUE: CLASS}}, e.g. "
                             f"{{191: 'mito'}}")
        if not isinstance(cls, str):
            raise ValueError(f"map: value {k} maps to {cls!r}; expected a class name or 'unknown'")
        if cls != UNKNOWN_NAME:
            _check_class(cls, "map")
        out[int(k)] = cls
    return out


def _check_class(name: str, field_name: str) -> None:
    try:
        get_class(name)
    except ValueError as e:
        raise ValueError(f"{field_name}: {str(e).removeprefix('class: ')}") from None


def _describe_files(files: Sequence[Path]) -> dict[str, Any]:
    folders = sorted({str(p.resolve().parent) for p in files})
    return {"folder": folders[0] if len(folders) == 1 else folders, "count": len(files),
            "files": [p.name for p in files]}

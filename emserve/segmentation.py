"""Segment images and volumes of any size with a 2D segmentation network, tile by tile.

The network was trained on patches, so a large image is cut into overlapping tiles of about that size. Each
tile's probabilities are weighted by a window that falls towards the tile's border (where the network saw the
least context) and the weighted sum is divided by the summed weights: no seams, and every voxel gets the
opinion of the tiles that saw it best. Volumes are segmented slice by slice along an axis; `segment_slices`
yields one slice at a time, so memory is bounded by a slice's tiles and a store is written as it goes.

Raw EM goes in as uint8 (0..255, as the CellMap `fibsem-uint8` arrays) or as float already in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emserve.card import ModelCard
from emserve.data.patches import check_axis
from emserve.data.stacks import discover, parse_voxel_size, read_stack
from emserve.data.store import EMStore, is_store
from emserve.data.writer import INFERENCE_GROUP, atomic_directory, create_class_arrays, provenance
from emserve.runtime.base import Runtime

OUT_CHUNK = 256  # in-plane chunk size of prediction stores
Tick = Callable[[], None]  # called before each network call; it raises to stop the work
MIN_WEIGHT = 1e-3  # the window's floor, so voxels seen only by tile borders (image corners) still get a value


def raw_to_network(raw: np.ndarray) -> np.ndarray:
    """uint8 EM (0..255) -> float32 in [-1, 1]; float input must already be in [-1, 1]."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(raw.dtype, np.floating):
        raise ValueError(f"raw: dtype {raw.dtype} is not allowed; give uint8 (0..255) or float32 in [-1, 1]")
    if not np.isfinite(raw).all():
        raise ValueError("raw: contains NaN or infinite values")
    if raw.size and (raw.min() < -1.001 or raw.max() > 1.001):
        raise ValueError(f"raw: float values in [{raw.min():.3g}, {raw.max():.3g}]; float EM must be in [-1, 1] "
                         f"(or give uint8 0..255)")
    return raw.astype(np.float32, copy=False)


def blend_window(tile: int) -> np.ndarray:
    """[tile, tile] weights: a tent peaking in the middle, floored at MIN_WEIGHT."""
    ramp = np.minimum(np.arange(1, tile + 1), np.arange(tile, 0, -1)).astype(np.float32)
    ramp = np.maximum(ramp / ramp.max(), MIN_WEIGHT)
    return np.outer(ramp, ramp)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride`, the last flush with the end (size >= tile)."""
    return sorted({*range(0, size - tile, stride), size - tile})


def tile_count(shape: Sequence[int], tile: int, overlap: int, axis: str = "z") -> int:
    """The tiles segment_array runs through the network for an image [Y, X] or a volume [Z, Y, X] (slice by slice
    along `axis`), from the shape alone: a service refuses too much work before doing any of it. Counted as
    tile_starts places them (an axis shorter than the tile is padded to one tile), by arithmetic, since a long
    axis at stride 1 would make a list of millions of starts."""
    sides = list(shape)
    slices = sides.pop(check_axis(axis)) if len(sides) == 3 else 1
    stride = tile - overlap
    return slices * math.prod(1 + max(0, -(-(size - tile) // stride)) for size in sides)


def tiling(card: ModelCard, tile: int | None, overlap: int | None) -> tuple[int, int]:
    """(tile, overlap) checked against the network: tiles a multiple of its size factor, overlap < tile."""
    factor = 2 ** (len(card.unet["multipliers"]) - 1)
    tile = card.patch_size if tile is None else int(tile)
    if tile < factor or tile % factor:
        raise ValueError(f"tile: {tile} must be a positive multiple of {factor} (this network halves the size "
                         f"{len(card.unet['multipliers']) - 1} times)")
    overlap = tile // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap: {overlap} must be in [0, {tile}) for tile {tile}")
    return tile, overlap


def probabilities(card: ModelCard, logits: np.ndarray) -> np.ndarray:
    """Logits [B, C, H, W] -> class probabilities [B, K, H, W]: a sigmoid per class (multi-label), or for
    exclusive networks a softmax over background + classes with the background channel dropped."""
    if not card.exclusive:
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid; 1 / (1 + e^-x) overflows for x < -88 in fp32
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True))[:, 1:]


def check_threshold(threshold: float) -> float:
    """The probability threshold of multi-label masks, refused outside (0, 1) before any work is done."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: {threshold} must be in (0, 1)")
    return threshold


def masks_from_probabilities(card: ModelCard, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Bool masks [K, ...] from class probabilities [K, ...]: above `threshold` per class (multi-label), or the
    most probable of background + classes (exclusive; `threshold` does not apply)."""
    if not card.exclusive:
        return probs > check_threshold(threshold)
    background = 1.0 - probs.sum(axis=0)
    best = probs.argmax(axis=0)
    return (np.arange(len(probs)).reshape(-1, *[1] * best.ndim) == best) & (probs.max(axis=0) > background)


def segment_image(runtime: Runtime, image: np.ndarray, tile: int | None = None, overlap: int | None = None,
                  batch_size: int = 8, tick: Tick | None = None) -> np.ndarray:
    """Class probabilities [K, Y, X] of one 2D image (uint8, or float in [-1, 1]) of any size. `tick` is called
    before each batch of tiles goes through the network: raising there stops the work (a service's deadline)."""
    card = runtime.card
    tile, overlap = tiling(card, tile, overlap)
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1")
    image = raw_to_network(image)
    if image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"raw: shape {image.shape}; segment_image takes one non-empty 2D image [Y, X]")
    height, width = image.shape
    padded = np.pad(image, ((0, max(tile - height, 0)), (0, max(tile - width, 0))), mode="reflect"
                    if min(height, width) > 1 else "edge")
    window = blend_window(tile)
    total = np.zeros((len(card.classes), *padded.shape), np.float32)
    weight = np.zeros(padded.shape, np.float32)
    corners = [(a, b) for a in tile_starts(padded.shape[0], tile, tile - overlap)
               for b in tile_starts(padded.shape[1], tile, tile - overlap)]
    for i in range(0, len(corners), batch_size):
        if tick is not None:
            tick()
        chunk = corners[i:i + batch_size]
        x = np.stack([padded[a:a + tile, b:b + tile] for a, b in chunk])[:, None]
        probs = probabilities(card, runtime.segment(x))
        for (a, b), p in zip(chunk, probs, strict=True):
            total[:, a:a + tile, b:b + tile] += p * window
            weight[a:a + tile, b:b + tile] += window
    return (total / weight)[:, :height, :width]


def segment_slices(runtime: Runtime, volume: Any, axis: str = "z", tile: int | None = None,
                   overlap: int | None = None, batch_size: int = 8,
                   normalize: Callable[[np.ndarray], np.ndarray] = raw_to_network,
                   tick: Tick | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(slice index, probabilities [K, a, b]) for each slice of a 3D volume along `axis`, one at a time.

    `volume` is anything that reads a numpy block when sliced (numpy, zarr), so only one slice is in memory;
    `normalize` maps a slice of it to [-1, 1] (a store's contrast window, say).
    """
    along = check_axis(axis)
    if len(volume.shape) != 3:
        raise ValueError(f"raw: shape {tuple(volume.shape)}; a volume is 3D [Z, Y, X]")
    for index in range(volume.shape[along]):
        key: list[Any] = [slice(None)] * 3
        key[along] = index
        yield index, segment_image(runtime, normalize(np.asarray(volume[tuple(key)])), tile, overlap, batch_size,
                                   tick)


def segment_array(runtime: Runtime, raw: np.ndarray, *, axis: str = "z", tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 8, tick: Tick | None = None) -> np.ndarray:
    """Class probabilities [K, *raw.shape] float32 of an image [Y, X] or a volume [Z, Y, X] held in memory."""
    raw = np.asarray(raw)
    if raw.ndim == 2:
        return segment_image(runtime, raw, tile, overlap, batch_size, tick)
    if raw.ndim != 3:
        raise ValueError(f"raw: shape {raw.shape}; give an image [Y, X] or a volume [Z, Y, X]")
    along = check_axis(axis)
    out = np.empty((len(runtime.card.classes), *raw.shape), np.float32)
    for index, probs in segment_slices(runtime, raw, axis, tile, overlap, batch_size, tick=tick):
        key: list[Any] = [slice(None)] * 4
        key[1 + along] = index
        out[tuple(key)] = probs
    return out


def segment_store(runtime: Runtime, volume: Any, out: str | Path, *,
                  normalize: Callable[[np.ndarray], np.ndarray] = raw_to_network,
                  voxel_size: Sequence[float] = (1.0, 1.0, 1.0), translation: Sequence[float] = (0.0, 0.0, 0.0),
                  axis: str = "z", tile: int | None = None, overlap: int | None = None, batch_size: int = 8,
                  threshold: float = 0.5, keep_probabilities: bool = False, overwrite: bool = False,
                  source: str = "", progress: Callable[[int, int], None] | None = None,
                  tick: Tick | None = None) -> Path:
    """Segment a 3D volume slice by slice into a new store at `out`, written atomically.

    Per-class masks go to `recon-1/labels/inference/segmentation/<class>/s0` (0 absent, 1 present, with the
    CellMap annotation attributes), probabilities (x255, uint8) on request to `.../probabilities/<class>/s0`,
    with the input's voxel size and translation, so the predictions overlay the EM they came from.
    """
    card = runtime.card
    along = check_axis(axis)
    tile, overlap = tiling(card, tile, overlap)
    check_threshold(threshold)
    chunks = [OUT_CHUNK] * 3
    chunks[along] = 1  # one slice per chunk: each slice is written once, never read back
    settings = {"source": source, "axis": axis, "tile": tile, "overlap": overlap, "threshold": threshold,
                "model": {"mode": card.mode, "classes": card.classes, "sha256": card.weights,
                          "files": card.files, "exclusive": card.exclusive, "backend": runtime.backend,
                          "precision": runtime.precision}}
    with atomic_directory(out, overwrite, inputs=[source] if source else []) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        root.attrs.update(provenance(segmented=settings))
        geometry = (volume.shape, voxel_size, translation, chunks)
        masks = create_class_arrays(root, f"{INFERENCE_GROUP}/segmentation", card.classes, *geometry)
        probs_out = (create_class_arrays(root, f"{INFERENCE_GROUP}/probabilities", card.classes, *geometry,
                                         annotation=False) if keep_probabilities else {})
        for index, probs in segment_slices(runtime, volume, axis, tile, overlap, batch_size, normalize, tick):
            key: list[Any] = [slice(None)] * 3
            key[along] = index
            slice_masks = masks_from_probabilities(card, probs, threshold)
            for k, name in enumerate(card.classes):
                masks[name][tuple(key)] = slice_masks[k].astype(np.uint8)
                if keep_probabilities:
                    probs_out[name][tuple(key)] = np.round(probs[k] * 255).astype(np.uint8)
            if progress is not None:
                progress(index + 1, volume.shape[along])
    return Path(out)


def segmentation_source(source: str, voxel_size: str = "") -> dict:
    """volume, normalize, voxel_size and translation (the keywords of segment_store) of what `emserve segment`
    reads: a store's EM at the scale level of `voxel_size` ('Z,Y,X' in nm; empty: the finest), or an image stack
    as it is (images have one scale, so `voxel_size` is not read)."""
    if not is_store(source):
        return {"volume": read_stack(discover(source, "source"), "source")}
    store = EMStore(source)
    level = store.em_level(parse_voxel_size(voxel_size) if voxel_size else None)
    return {"volume": store.em_volume(level), "normalize": store.normalize, "voxel_size": level.voxel_size,
            "translation": level.translation}

"""Segment images and volumes of any size with a 2D segmentation network, tile by tile.

The network was trained on patches, so a large image is cut into overlapping tiles of about that size. Each
tile's probabilities are weighted by a window that falls towards the tile's border (where the network saw the
least context) and the weighted sum is divided by the summed weights: no seams, and every voxel gets the
opinion of the tiles that saw it best. Volumes are segmented slice by slice along an axis, a box of them at a
time (`segment_block`); a network with depth context reads each slice's neighbours too, mirrored at the volume's
ends as in training (`emserve.data.patches.neighbour_sections`). What segments the tiles is a segmentation
network or, drawing label maps, a pairs DDPM (`TilePredictor`). Volumes too large for memory go block by block
into a store: `emserve.volumes`.

Raw EM goes in as uint8 (0..255, as the CellMap `fibsem-uint8` arrays) or as float already in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emserve.card import ModelCard
from emserve.data.patches import check_axis, check_sections, neighbour_sections
from emserve.pipelines import LabelSampling, sample_labels
from emserve.runtime.base import Runtime

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


class TilePredictor:
    """What segments tiles: a segmentation network's class probabilities, or a pairs DDPM's label maps drawn for
    each tile's EM (`sampling`, `emserve.pipelines.sample_labels`): their mean, then their spread, per class."""

    def __init__(self, runtime: Runtime, sampling: LabelSampling | None = None):
        card = runtime.card
        if card.mode not in ("segmentation", "pairs"):
            raise ValueError(f"model: a {card.mode!r} model does not segment; give a segmentation network or a "
                             f"pairs DDPM (which segments by sampling label maps)")
        if sampling is not None and card.mode != "pairs":
            raise ValueError("sampling: only a pairs DDPM segments by sampling label maps; this is a segmentation "
                             "network")
        self.runtime, self.card = runtime, card
        self.sampling = (sampling or LabelSampling()) if card.mode == "pairs" else None
        self.outputs = len(card.classes) * (2 if self.sampling else 1)

    def __call__(self, tiles: np.ndarray, origins: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """Values [B, outputs, t, t] of tiles [B, depth, t, t] (in [-1, 1]) lying at `origins` (slice, y, x)."""
        if self.sampling is None:
            return probabilities(self.card, self.runtime.segment(tiles))
        return np.concatenate(sample_labels(self.card, self.runtime, tiles, origins, self.sampling), axis=1)


def segment_image(runtime: Runtime, image: np.ndarray, tile: int | None = None, overlap: int | None = None,
                  batch_size: int = 8, tick: Tick | None = None, sampling: LabelSampling | None = None) -> np.ndarray:
    """Class probabilities [K, Y, X] of one 2D image (uint8, or float in [-1, 1]) of any size; for a pairs DDPM
    then also their uncertainties [K, Y, X] (`TilePredictor`). `tick` is called before each batch of tiles goes
    through the network: raising there stops the work (a service's deadline)."""
    tile, overlap = tiling(runtime.card, tile, overlap)
    check_sections(runtime.card.depth, 1)
    image = raw_to_network(image)
    if image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"raw: shape {image.shape}; segment_image takes one non-empty 2D image [Y, X]")
    return segment_region(TilePredictor(runtime, sampling), lambda rows, cols: image[None, rows, cols], image.shape,
                          (0, image.shape[0]), (0, image.shape[1]), tile, overlap, batch_size, tick)


def covering_tiles(size: int, tile: int, stride: int, start: int, stop: int) -> list[int]:
    """The origins of the tiles of a whole axis's tiling (`tile_starts`; an axis shorter than the tile is padded
    to one tile) that overlap [start, stop)."""
    return [a for a in tile_starts(max(size, tile), tile, stride) if a < stop and a + tile > start]


def segment_region(predict: TilePredictor, read: Callable[[slice, slice], np.ndarray], plane: Sequence[int],
                   rows: tuple[int, int], cols: tuple[int, int], tile: int, overlap: int, batch_size: int = 8,
                   tick: Tick | None = None, index: int = 0) -> np.ndarray:
    """Blended tile values [predict.outputs, rows, cols] of a region of plane `index` (of shape `plane`), exactly
    as the whole plane's segmentation has them: the same tiles (those of the whole plane's tiling that overlap the
    region) blended in the same order, read with the halo they need (`read(rows, cols)` gives network input,
    [depth, rows, cols] in [-1, 1]). So a volume cut into blocks is segmented as it would be whole."""
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1")
    stride = tile - overlap
    ys, xs = (covering_tiles(size, tile, stride, *span) for size, span in zip(plane, (rows, cols), strict=True))
    (y0, y1), (x0, x1) = ((t[0], min(t[-1] + tile, size)) for t, size in zip((ys, xs), plane, strict=True))
    image = read(slice(y0, y1), slice(x0, x1))
    padded = np.pad(image, ((0, 0), (0, max(tile - image.shape[1], 0)), (0, max(tile - image.shape[2], 0))),
                    mode="reflect" if min(plane) > 1 else "edge")  # only an axis shorter than the tile is padded
    window = blend_window(tile)
    total = np.zeros((predict.outputs, *padded.shape[1:]), np.float32)
    weight = np.zeros(padded.shape[1:], np.float32)
    corners = [(a - y0, b - x0) for a in ys for b in xs]
    for i in range(0, len(corners), batch_size):
        if tick is not None:
            tick()
        chunk = corners[i:i + batch_size]
        x = np.stack([padded[:, a:a + tile, b:b + tile] for a, b in chunk])
        values = predict(x, [(index, y0 + a, x0 + b) for a, b in chunk])
        for (a, b), p in zip(chunk, values, strict=True):
            total[:, a:a + tile, b:b + tile] += p * window
            weight[a:a + tile, b:b + tile] += window
    return (total / weight)[:, rows[0] - y0:rows[1] - y0, cols[0] - x0:cols[1] - x0]


def segment_block(runtime: Runtime, volume: Any, box: Sequence[slice], *, axis: str = "z", tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 8,
                  normalize: Callable[[np.ndarray], np.ndarray] = raw_to_network, tick: Tick | None = None,
                  sampling: LabelSampling | None = None) -> np.ndarray:
    """Class probabilities [K, *box's shape] of a box (three slices with bounds) of a volume [Z, Y, X], for a pairs
    DDPM then uncertainties: slice by slice along `axis`, each slice's part exactly as the whole slice's
    segmentation has it (`segment_region`), reading only the box and the halo its tiles need. `volume` is anything
    that reads a numpy block when sliced (numpy, zarr); `normalize` maps such a block to [-1, 1] (a store's
    contrast window, say)."""
    along = check_axis(axis)
    if len(volume.shape) != 3 or 0 in volume.shape:
        raise ValueError(f"raw: shape {tuple(volume.shape)}; a volume is 3D [Z, Y, X] and not empty")
    check_sections(runtime.card.depth, volume.shape[along])
    predict = TilePredictor(runtime, sampling)
    tile, overlap = tiling(runtime.card, tile, overlap)
    plane = [size for i, size in enumerate(volume.shape) if i != along]
    rows, cols = ((b.start, b.stop) for i, b in enumerate(box) if i != along)
    out = np.empty((predict.outputs, *(b.stop - b.start for b in box)), np.float32)
    for offset, index in enumerate(range(box[along].start, box[along].stop)):
        def read(r: slice, c: slice, index: int = index) -> np.ndarray:
            sections = []
            for section in neighbour_sections(index, runtime.card.depth, volume.shape[along]):
                key: list[Any] = [r, c]
                key.insert(along, section)
                sections.append(normalize(np.asarray(volume[tuple(key)])))
            return np.stack(sections)

        key: list[Any] = [slice(None)] * 3
        key[along] = offset
        out[(slice(None), *key)] = segment_region(predict, read, plane, rows, cols, tile, overlap, batch_size, tick,
                                                  index)
    return out


def segment_array(runtime: Runtime, raw: np.ndarray, *, axis: str = "z", tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 8, tick: Tick | None = None,
                  sampling: LabelSampling | None = None) -> np.ndarray:
    """Class probabilities [K, *raw.shape] float32 of an image [Y, X] or a volume [Z, Y, X] held in memory; for a
    pairs DDPM [2K, ...], the uncertainties after the probabilities (`TilePredictor`)."""
    raw = np.asarray(raw)
    if raw.ndim == 2:
        return segment_image(runtime, raw, tile, overlap, batch_size, tick, sampling)
    if raw.ndim != 3:
        raise ValueError(f"raw: shape {raw.shape}; give an image [Y, X] or a volume [Z, Y, X]")
    return segment_block(runtime, raw, tuple(slice(0, n) for n in raw.shape), axis=axis, tile=tile, overlap=overlap,
                         batch_size=batch_size, tick=tick, sampling=sampling)

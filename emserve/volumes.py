"""Segment a volume block by block into a prediction store, in this process or on a Dask cluster.

The store has the CellMap layout: per-class masks, and on request probabilities, under
`recon-1/labels/inference/`, a multiscale pyramid with the source's voxel size and offset at every level. Blocks are
whole output chunks, each segmented exactly as its whole slices would be (`emserve.segmentation.segment_region`),
written with a done-record (`emserve.blockwise`); the store is built in a hidden work folder that a rerun continues
and that becomes the store when complete.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emserve.blockwise import (
    DONE_FOLDER,
    Block,
    DoneRecords,
    block_grid,
    build_pyramid,
    level_shape,
    pyramid_count,
    run_blocks,
)
from emserve.data.ngff import pyramid_factors
from emserve.data.patches import check_axis, check_sections
from emserve.data.stacks import discover, parse_voxel_size, read_stack
from emserve.data.store import EMStore, is_store
from emserve.data.writer import INFERENCE_GROUP, create_class_arrays, provenance, resumable_directory
from emserve.pipelines import LabelSampling
from emserve.runtime.base import Runtime
from emserve.runtime.load import RuntimeSpec
from emserve.segmentation import (
    Tick,
    TilePredictor,
    check_threshold,
    masks_from_probabilities,
    raw_to_network,
    segment_block,
    tiling,
)

OUT_CHUNK = 256  # in-plane chunk size of prediction stores
BLOCK_SIZE = 2048  # in-plane size of the blocks: whole chunks, and few tiles computed twice
MASKS, PROBABILITIES = f"{INFERENCE_GROUP}/segmentation", f"{INFERENCE_GROUP}/probabilities"
UNCERTAINTY = f"{INFERENCE_GROUP}/uncertainty"  # a pairs DDPM's: the spread of the label maps it drew


@dataclass(frozen=True)
class EMSource:
    """A volume to segment and where it lies: what `emserve segment` reads (see `segmentation_source`)."""

    volume: Any  # [Z, Y, X], read a block at a time when sliced (numpy, zarr)
    normalize: Callable[[np.ndarray], np.ndarray] = raw_to_network  # a block of it -> [-1, 1]
    voxel_size: tuple[float, ...] = (1.0, 1.0, 1.0)
    translation: tuple[float, ...] = (0.0, 0.0, 0.0)


Inputs = Callable[[], tuple[Runtime, EMSource]]  # the network and the volume, as a block task finds them


@dataclass(frozen=True)
class SegmentBlock:
    """The task that segments one block of a `segment_store` run and writes it with its done-record. Picklable
    (for Dask workers) when `inputs` is, e.g. `OpenedOnWorker`."""

    inputs: Inputs
    store: str
    axis: str
    tile: int
    overlap: int
    batch_size: int
    threshold: float
    keep_probabilities: bool
    sampling: LabelSampling | None = None
    tick: Tick | None = None

    def __call__(self, block: Block) -> None:
        runtime, source = self.inputs()
        values = segment_block(runtime, source.volume, block.slices, axis=self.axis, tile=self.tile,
                               overlap=self.overlap, batch_size=self.batch_size, normalize=source.normalize,
                               tick=self.tick, sampling=self.sampling)
        classes = runtime.card.classes
        probs, spread = values[:len(classes)], values[len(classes):]
        masks = masks_from_probabilities(runtime.card, probs, self.threshold)
        root = zarr.open_group(self.store, mode="r+")
        written = []
        for k, name in enumerate(classes):
            arrays = [(MASKS, masks[k].astype(np.uint8))]
            if self.keep_probabilities:
                arrays.append((PROBABILITIES, to_uint8(probs[k])))
            if len(spread):  # sampled label maps: their standard deviation, at most 0.5, x 2 x 255
                arrays.append((UNCERTAINTY, to_uint8(2 * spread[k])))
            for group, data in arrays:
                written.append(root[f"{group}/{name}/s0"])
                written[-1][block.slices] = data
        DoneRecords(Path(self.store), "s0").mark(block, written)


def to_uint8(share: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as 0..255, as prediction stores keep probabilities."""
    return np.round(share * 255).astype(np.uint8)


def segment_store(runtime: Runtime, source: EMSource, out: str | Path, *, axis: str = "z",
                  tile: int | None = None, overlap: int | None = None, batch_size: int = 8, threshold: float = 0.5,
                  keep_probabilities: bool = False, overwrite: bool = False, source_name: str = "",
                  block_size: int | None = None, client: Any = None, on_workers: Inputs | None = None,
                  progress: Callable[[int, int], None] | None = None, tick: Tick | None = None,
                  sampling: LabelSampling | None = None) -> Path:
    """Segment a 3D volume block by block into a new store at `out`, with a multiscale pyramid.

    Per-class masks go to `recon-1/labels/inference/segmentation/<class>/s0..` (0 absent, 1 present, with the
    CellMap annotation attributes), probabilities (x255, uint8) on request to `.../probabilities/<class>/s0..`,
    with the input's voxel size and translation at every level, so the predictions overlay the EM they came from.
    A pairs DDPM segments by drawing label maps (`TilePredictor`, `sampling`) and also writes their spread to
    `.../uncertainty/<class>/s0..` (standard deviation x 2 x 255: 255 where the draws split evenly).

    Blocks are `block_size` in-plane (whole output chunks; None: BLOCK_SIZE) and one slice deep; they run here, or
    on the cluster of a Dask `client`, whose workers open the network and the volume with `on_workers` (picklable, see
    `OpenedOnWorker`). The store is built in a hidden work folder that becomes `out` when complete; a run that
    stopped is continued by the same call (`emserve.blockwise`): the result equals an uninterrupted run's.
    """
    card = runtime.card
    along = check_axis(axis)
    tile, overlap = tiling(card, tile, overlap)
    check_threshold(threshold)
    sampling = TilePredictor(runtime, sampling).sampling  # checks the model, and gives a pairs DDPM the default
    block_size = BLOCK_SIZE if block_size is None else block_size
    if block_size < tile or block_size % OUT_CHUNK:
        raise ValueError(f"block_size: {block_size} must be a multiple of {OUT_CHUNK} (the output chunk) and at "
                         f"least the tile ({tile})")
    if client is not None and on_workers is None:
        raise ValueError("on_workers: a Dask client needs the inputs as its workers open them (OpenedOnWorker)")
    shape = tuple(source.volume.shape)
    if len(shape) != 3 or 0 in shape:
        raise ValueError(f"raw: shape {shape}; a volume is 3D [Z, Y, X] and not empty")
    check_sections(card.depth, shape[along])
    chunks, blocks_of = [OUT_CHUNK] * 3, [block_size] * 3
    chunks[along] = blocks_of[along] = 1  # one slice per chunk and per block: slices are segmented one at a time
    factors = pyramid_factors(source.voxel_size, pyramid_count(shape, source.voxel_size, OUT_CHUNK))
    settings = {"source": source_name, "axis": axis, "tile": tile, "overlap": overlap, "threshold": threshold,
                "probabilities": keep_probabilities, "shape": list(shape), "voxel_size": list(source.voxel_size),
                "translation": list(source.translation), "block": blocks_of, "levels": len(factors),
                **({"sampling": asdict(sampling)} if sampling else {}),
                "model": {"mode": card.mode, "classes": card.classes, "sha256": card.weights,
                          "files": card.files, "exclusive": card.exclusive, "backend": runtime.backend,
                          "precision": runtime.precision}}
    settings = json.loads(json.dumps(settings))  # as it reads back from the attributes

    def differs(work: Path) -> str:
        before = recorded(work)
        return "" if before is None else ", ".join(f"{key}: {before.get(key)} -> {value}"
                                                   for key, value in settings.items() if before.get(key) != value)

    groups = [MASKS, *([PROBABILITIES] if keep_probabilities else []), *([UNCERTAINTY] if sampling else [])]
    with resumable_directory(out, differs, overwrite, inputs=[source_name] if source_name else []) as work:
        if recorded(work) is None:  # new, or killed while its arrays were being made: make them (again)
            root = zarr.open_group(str(work), mode="a", zarr_format=2)
            for group in groups:
                if group in root:
                    del root[group]
                create_class_arrays(root, group, card.classes, [level_shape(shape, f) for f in factors],
                                    source.voxel_size, source.translation, chunks, annotation=group == MASKS)
            root.attrs.update(provenance(segmented=settings))  # last: a folder with it has all its arrays
        inputs = on_workers if client is not None else (lambda: (runtime, source))
        task = SegmentBlock(inputs, str(work), axis, tile, overlap, batch_size, threshold,
                            keep_probabilities, sampling, tick)
        run_blocks(task, block_grid(shape, blocks_of), DoneRecords(work, "s0"), client, progress, "segment")
        arrays = [(f"{group}/{name}", "vote" if group == MASKS else "mean") for group in groups
                  for name in card.classes]
        build_pyramid(work, arrays, factors, blocks_of, client)
        shutil.rmtree(work / DONE_FOLDER)
    return Path(out)


@dataclass(frozen=True)
class OpenedOnWorker:
    """The network and the volume of a `segment_store` run as a Dask worker opens them: by model and source
    path, once per worker process (every block after the first finds them open)."""

    model: RuntimeSpec
    source: str
    voxel_size: str = ""

    def __call__(self) -> tuple[Runtime, EMSource]:
        return self.model.open(), _source(self.source, self.voxel_size)


@functools.cache
def _source(source: str, voxel_size: str) -> EMSource:
    return segmentation_source(source, voxel_size)


def recorded(store: Path) -> dict | None:
    """The settings a segmentation store (or its work folder) was made with; None before they were recorded."""
    if not (store / ".zgroup").exists():
        return None
    return zarr.open_group(str(store), mode="r").attrs.get("emserve", {}).get("segmented")


def segmentation_source(source: str, voxel_size: str = "") -> EMSource:
    """What `emserve segment` reads: a store's EM at the scale level of `voxel_size` ('Z,Y,X' in nm; empty: the
    finest) with its contrast window and geometry, or an image stack as it is (images have one scale, so
    `voxel_size` is not read)."""
    if not is_store(source):
        return EMSource(read_stack(discover(source, "source"), "source"))
    store = EMStore(source)
    level = store.em_level(parse_voxel_size(voxel_size) if voxel_size else None)
    return EMSource(store.em_volume(level), store.normalize, tuple(level.voxel_size), tuple(level.translation))

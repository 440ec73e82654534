"""Process a volume block by block into a store that a rerun resumes, in this process or on a Dask cluster.

A block is a box of whole output chunks, so no two blocks write the same chunk file: blocks run in any order, on
any machine and any number of times (a block run twice writes the same bytes). A block is done when its
done-record exists, an empty file under `<store>/.blocks/<level>/` renamed into place after the block's chunks
are on disk; a run skips the blocks that have one. This is daisy's scheme with Dask as the scheduler: a worker
lost mid-block only means the block runs again elsewhere.

The coarser levels of the output's multiscale pyramid are made the same way, level after level, each block
reducing the block of the level below it (`pyramid_count` says how many levels a volume gets).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emserve.data.ngff import pyramid_factors
from emserve.data.writer import block_mean, block_vote, fsync_tree
from emserve.distributed import run_tasks

DONE_FOLDER = ".blocks"
MAX_LEVELS = 8


@dataclass(frozen=True)
class Block:
    """A box of voxels [start, stop) in z, y, x."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def name(self) -> str:
        return "-".join(map(str, self.start))


def block_grid(shape: Sequence[int], block_shape: Sequence[int]) -> list[Block]:
    """The blocks that tile `shape`, `block_shape` each (smaller at the far edges), in z-y-x order."""
    ranges = [range(0, size, step) for size, step in zip(shape, block_shape, strict=True)]
    return [Block(start, tuple(min(a + step, size) for a, step, size in zip(start, block_shape, shape, strict=True)))
            for start in itertools.product(*ranges)]


def pyramid_count(shape: Sequence[int], voxel_size: Sequence[float], chunk: int) -> int:
    """How many levels (s0 included) a volume's pyramid gets: until every axis fits one `chunk`, as long as each
    level keeps at least one voxel per axis (`pyramid_factors` decides which axes halve), at most MAX_LEVELS."""
    count = 1
    while count < MAX_LEVELS and max(level_shape(shape, pyramid_factors(voxel_size, count)[-1])) > chunk:
        factors = pyramid_factors(voxel_size, count + 1)[-1]
        if min(s // f for s, f in zip(shape, factors, strict=True) if s > 1) < 1:
            break
        count += 1
    return count


def level_shape(shape: Sequence[int], factor: Sequence[int]) -> tuple[int, ...]:
    """A level's shape: each axis divided by its factor, odd edges dropped, a single plane kept single (as the
    stores' own pyramids, `emserve.data.writer`)."""
    return tuple(s // f if s > 1 else 1 for s, f in zip(shape, factor, strict=True))


class DoneRecords:
    """The done-records of one store's blocks, per level: `<store>/.blocks/<level>/<block name>`."""

    def __init__(self, store: Path, level: str):
        self.folder = Path(store) / DONE_FOLDER / level
        self.folder.mkdir(parents=True, exist_ok=True)

    def done(self, block: Block) -> bool:
        return (self.folder / block.name).exists()

    def mark(self, block: Block, arrays: Sequence[zarr.Array]) -> None:
        """Record `block` done once its chunks of `arrays` are on disk (a power cut never leaves a record of data
        that is not there), by a rename, so a record is never half-written."""
        for array in arrays:
            sync_chunks(array, block)
        tmp = self.folder / f".{block.name}.{os.getpid()}"
        tmp.touch()
        tmp.rename(self.folder / block.name)


def sync_chunks(array: zarr.Array, block: Block) -> None:
    """fsync the chunk files of a local zarr v2 array ("/" separated keys) that `block` wrote."""
    root = Path(str(array.store.root)) / array.path
    ranges = [range(a // c, -(-b // c)) for a, b, c in zip(block.start, block.stop, array.chunks, strict=True)]
    for index in itertools.product(*ranges):
        chunk = root.joinpath(*map(str, index))
        if chunk.exists():  # a chunk equal to the fill value has no file
            fsync_tree(chunk)


Task = Callable[[Block], None]
Progress = Callable[[int, int], None]


def run_blocks(task: Task, blocks: Sequence[Block], records: DoneRecords, client: Any = None,
               progress: Progress | None = None, name: str = "block") -> None:
    """Run `task` on every block without a done-record, here or, given a Dask client, on its cluster
    (`emserve.distributed`). The task writes its block and its record; a block that fails stops the run, and
    what is done stays done."""
    pending = [b for b in blocks if not records.done(b)]
    done = len(blocks) - len(pending)
    if progress is not None:
        progress(done, len(blocks))
    for _ in run_tasks(task, pending, client, name):
        done += 1
        if progress is not None:
            progress(done, len(blocks))


@dataclass(frozen=True)
class Downsample:
    """The task that makes one block of level `level` from the level below (picklable: it names only paths)."""

    store: str
    arrays: tuple[tuple[str, str], ...]  # (array group path, reduction: "vote" for 0/1 masks, "mean" otherwise)
    level: int
    step: tuple[int, ...]  # factor from the level below

    def __call__(self, block: Block) -> None:
        root = zarr.open_group(self.store, mode="r+")
        written = []
        for group, reduction in self.arrays:
            below, array = root[f"{group}/s{self.level - 1}"], root[f"{group}/s{self.level}"]
            source = tuple(slice(a * s, b * s) for a, b, s in zip(block.start, block.stop, self.step, strict=True))
            reduce = block_vote if reduction == "vote" else block_mean
            array[block.slices] = reduce(np.asarray(below[source]), self.step)
            written.append(array)
        DoneRecords(Path(self.store), f"s{self.level}").mark(block, written)


def build_pyramid(store: Path, arrays: Sequence[tuple[str, str]], factors: Sequence[Sequence[int]],
                  block_shape: Sequence[int], client: Any = None, progress: Progress | None = None) -> None:
    """Fill levels s1.. of `arrays` (group paths, each with s0 written) from the level below, blockwise, in
    blocks of `block_shape` (whole chunks of every level: the levels share one chunk shape)."""
    root = zarr.open_group(str(store), mode="r")
    for level in range(1, len(factors)):
        step = tuple(a // b for a, b in zip(factors[level], factors[level - 1], strict=True))
        blocks = block_grid(root[f"{arrays[0][0]}/s{level}"].shape, block_shape)
        task = Downsample(str(store), tuple(arrays), level, step)
        run_blocks(task, blocks, DoneRecords(store, f"s{level}"), client, progress, name=f"downsample-s{level}")

"""Training batches, drawn ahead in worker processes while the network trains.

Each step's batch is a function of (seed, rank, step) alone: it is drawn with a random stream seeded by those
three numbers (numpy's SeedSequence mixes them), not by a stream that runs through the whole training. So any
process can draw any step's batch, workers can draw steps ahead of the one training, the batches are the same
whatever the number of workers, and a resumed run draws exactly the batches the stopped one would have drawn next
with no random state to save. Cutting patches, normalising, augmenting and (for a DDPM) noising are numpy work
that an accelerator waits for when it is done between steps; `data_workers` > 0 moves it to that many processes
(torch's DataLoader, which keeps PREFETCH batches per worker ready). A batch is a dict or tuple of numpy arrays;
from a worker it arrives as torch tensors, whose memory the worker shared instead of sending it through a pipe
(pinned, for a fast copy to the GPU, when training on one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Draw = Callable[[np.random.Generator], Any]  # one batch from a random stream: a dict or tuple of numpy arrays
PREFETCH = 2  # batches each worker keeps ready


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The random stream of one step's batch on one rank."""
    return np.random.default_rng([seed, rank, step])


def default_workers(device: torch.device) -> int:
    """Worker processes when none are asked for: none on a CPU, whose cores compute the network (a worker would
    take one from it); on an accelerator every core but one, at most 8, since the host has nothing else to do."""
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class StepBatches(Dataset):
    """Batch number `step` of a run: `draw(step_rng(seed, rank, step))`."""

    def __init__(self, draw: Draw, seed: int, rank: int):
        self.draw, self.seed, self.rank = draw, seed, rank

    def __getitem__(self, step: int) -> Any:
        return self.draw(step_rng(self.seed, self.rank, step))


def step_batches(draw: Draw, seed: int, rank: int, start: int, stop: int, workers: int,
                 pin_memory: bool = False) -> Iterator[Any]:
    """The batches of steps start, start + 1, ..., stop - 1 in order: drawn here (`workers` 0, numpy arrays) or
    ahead of time by `workers` processes (the same values as tensors; in pinned memory with `pin_memory`)."""
    steps = StepBatches(draw, seed, rank)
    if workers == 0:
        return (steps[step] for step in range(start, stop))
    return iter(DataLoader(steps, batch_size=None, sampler=range(start, stop), num_workers=workers,
                           prefetch_factor=PREFETCH, pin_memory=pin_memory))

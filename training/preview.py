"""PNG grids of samples during training, so a run can be judged by eye while it goes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emserve.card import RAW, ModelCard
from emserve.diffusion import make_schedule, sample
from emserve.pictures import grid, pair_tile, save_png
from emserve.runtime.eager import module_denoiser

PREVIEW_SAMPLES, PREVIEW_STEPS = 8, 20


def render_samples(samples: np.ndarray, card: ModelCard) -> list[np.ndarray]:
    """One RGB tile per sample: raw beside labels (label channels thresholded at 0)."""
    has_raw = card.channels[0] == RAW
    tiles = []
    for s in samples:
        raw = s[0] if has_raw else None
        masks = s[1:] > 0 if has_raw else s > 0
        tiles.append(pair_tile(raw, masks if card.classes and len(masks) else None, card.classes))
    return tiles


def save_preview(model: torch.nn.Module, card: ModelCard, path: Path, device: torch.device) -> Path:
    """Sample a few patches (DPM-Solver++, few steps) with every condition null except the dataset, which cycles."""
    was_training = model.training
    model.eval()
    size = card.patch_size
    cond = card.null_conditions(PREVIEW_SAMPLES, size, size)
    if card.datasets:
        cond["dataset"] = np.arange(PREVIEW_SAMPLES, dtype=np.int64) % len(card.datasets)
    samples = sample(module_denoiser(model, device), make_schedule(card.schedule, card.timesteps), card.objective,
                     (len(card.channels), size, size), seeds=list(range(PREVIEW_SAMPLES)), cond=cond,
                     sampler="dpmpp_2m", steps=PREVIEW_STEPS)
    model.train(was_training)
    return save_png(grid(render_samples(samples, card), columns=4), path)

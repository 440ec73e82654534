"""Sample from a torch module with the numpy sampling loop (previews during training)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from emserve.card import ModelCard
from emserve.diffusion import Denoise


def module_denoiser(module: torch.nn.Module, device: torch.device) -> Denoise:
    """Wrap a UNet as the numpy denoise callable the samplers take."""

    @torch.no_grad()
    def denoise(x: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in cond.items()}
        out = module(torch.from_numpy(x).to(device), torch.from_numpy(t.astype(np.float32)).to(device),
                     inputs.get("classes"), inputs.get("dataset"), inputs.get("label_map"))
        return out.float().cpu().numpy()

    return denoise


def null_conditions(card: ModelCard, batch: int, size: int) -> dict[str, np.ndarray]:
    """Every conditioning input of the card at its null value."""
    k = len(card.classes)
    cond: dict[str, np.ndarray] = {}
    if card.class_condition:
        cond["classes"] = np.zeros((batch, k), np.float32)
    if card.datasets:
        cond["dataset"] = np.full(batch, -1, np.int64)
    if card.label_map_condition:
        cond["label_map"] = np.zeros((batch, k, size, size), np.float32)
    return cond


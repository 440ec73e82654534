"""Sample from a torch module with the numpy sampling loop (previews during training)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from emserve.card import ModelCard
from emserve.diffusion import Denoise


def module_denoiser(module: torch.nn.Module, device: torch.device) -> Denoise:
    """Wrap a UNet as the numpy callable the samplers take: (x, t or None, cond) -> output."""

    @torch.inference_mode()
    def denoise(x: np.ndarray, t: np.ndarray | None, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        inputs = {"x": x, **({} if t is None else {"t": t.astype(np.float32)}), **cond}
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
        return module(**tensors).float().cpu().numpy()

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


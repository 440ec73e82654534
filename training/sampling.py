"""Sample from a torch module with the numpy sampling loop: previews during training, and checkpoints that
have not been exported yet."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from emserve.card import ModelCard, sha256_file
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


def load_denoiser(checkpoint: str | Path, device: torch.device) -> tuple[ModelCard, Denoise]:
    """The EMA weights of a training checkpoint as a denoise callable (checked against the card's sha256)."""
    from training.checkpoint import EMA_FILE
    from training.unet import UNet

    path = Path(checkpoint)
    card = ModelCard.load(path)
    weights = path / EMA_FILE
    if not weights.exists() or sha256_file(weights) != card.weights.get(EMA_FILE):
        raise ValueError(f"model: {weights} is missing or does not match the sha256 in {path}/card.json")
    model = UNet.from_config(card.unet)
    model.load_state_dict(load_file(str(weights)))
    return card, module_denoiser(model.to(device).eval(), device)

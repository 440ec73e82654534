"""Eager torch backend: the UNet of a training checkpoint (`step-N/`), for previews and checkpoints not yet exported.

A checkpoint folder holds a model card and safetensors weights (the EMA weights sample; the raw ones resume
training); the UNet is rebuilt from the card's `unet` config (emserve.unet) and loaded with the weights, each file
checked against the card's sha256 first. Training writes these folders (training.checkpoint); this module only
reads them, so serving a checkpoint needs torch but none of the training code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from emserve.card import CARD_NAME, ModelCard, sha256_file
from emserve.checks import check_choice
from emserve.diffusion import Denoise
from emserve.runtime.base import Runtime, check_precision, graph_inputs, torch_device
from emserve.unet import UNet

MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"
WEIGHTS = {"ema": EMA_FILE, "model": MODEL_FILE}


def load_module(checkpoint: str | Path, weights: str = "ema") -> tuple[ModelCard, UNet, str]:
    """(card, UNet in eval mode, weights file name) of a checkpoint folder, the weights checked by sha256."""
    checkpoint = Path(checkpoint)
    check_choice("weights", weights, WEIGHTS)
    card = ModelCard.load(checkpoint)
    file = WEIGHTS[weights]
    if file not in card.weights:
        raise ValueError(f"checkpoint: {checkpoint}/{CARD_NAME} lists no {file}; is this a training checkpoint?")
    path = checkpoint / file
    if not path.is_file() or sha256_file(path) != card.weights[file]:
        raise ValueError(f"checkpoint: {path} is missing or does not match the sha256 in {checkpoint}/{CARD_NAME}")
    if (card.mode == "segmentation") == bool(card.unet["timestep"]):
        raise ValueError(f"checkpoint: a {card.mode!r} card with a UNet of timestep={card.unet['timestep']}; "
                         f"segmentation networks have no timestep, denoisers have one")
    model = UNet.from_config(card.unet)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    takes = list(model.example_inputs(1))
    if takes != list(graph_inputs(card)):
        raise ValueError(f"checkpoint: the card describes inputs {list(graph_inputs(card))} but the UNet takes "
                         f"{takes}; the card and the weights disagree")
    return card, model, file


def module_denoiser(module: torch.nn.Module, device: torch.device) -> Denoise:
    """Wrap a UNet as the numpy callable the samplers take: (x, t or None, cond) -> output."""

    @torch.inference_mode()
    def denoise(x: np.ndarray, t: np.ndarray | None, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        inputs = {"x": x, **({} if t is None else {"t": t.astype(np.float32)}), **cond}
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
        return module(**tensors).float().cpu().numpy()

    return denoise


class EagerRuntime(Runtime):
    """A training checkpoint run by eager torch. device: "auto" | "cuda" | "cpu"; precision: "fp32" or "bf16"
    (under autocast); weights: "ema" (what sampling uses) or "model" (the raw weights)."""

    backend = "torch"

    def __init__(self, model: str | Path, *, device: str = "auto", precision: str = "fp32",
                 max_batch: int | None = None, memory_budget: int | None = None, weights: str = "ema") -> None:
        self.precision = check_precision(precision, self.backend)
        self._torch_device = torch_device(device)
        card, module, _ = load_module(model, weights)
        super().__init__(card, max_batch, memory_budget)
        self._denoise = module_denoiser(module.to(self._torch_device), self._torch_device)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        cond = {k: v for k, v in inputs.items() if k not in ("x", "t")}
        with torch.autocast(self._torch_device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            return self._denoise(inputs["x"], inputs.get("t"), cond)

"""TorchScript backend: the exported `1/model.pt` (traced and frozen) of a model folder, on CUDA or CPU.

Needs torch but no training code: the graph carries its weights. `torch.jit.load` reads TorchScript's own
archive format (it does not run arbitrary pickled Python), and the file is checked against the card's sha256
before it is read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from emserve.card import ModelCard
from emserve.runtime.base import Runtime, check_precision, torch_device, verified_file

TORCHSCRIPT_FILE = "1/model.pt"


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("torchscript backend: torch is not installed; pip install torch (or use the onnx "
                          "backend)") from None
    return torch


class TorchScriptRuntime(Runtime):
    """An exported model folder run by TorchScript. device: "auto" (CUDA if available, else CPU), "cuda", "cpu";
    precision: "fp32" (the graph as exported) or "bf16" (under autocast, emserve.runtime.base.PRECISIONS)."""

    backend = "torchscript"

    def __init__(self, model: str | Path, *, device: str = "auto", precision: str = "fp32",
                 max_batch: int | None = None, memory_budget: int | None = None, verify: bool = True) -> None:
        self.precision = check_precision(precision, self.backend)
        torch = _torch()
        self._torch_device = torch_device(device)
        self.device = self._torch_device.type
        folder = Path(model)
        card = ModelCard.load(folder)
        super().__init__(card, max_batch, memory_budget)
        path = verified_file(folder, TORCHSCRIPT_FILE, card) if verify else folder / TORCHSCRIPT_FILE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+ deprecates TorchScript; still works
            self.module = torch.jit.load(str(path), map_location=self._torch_device).eval()
        self.path = path
        names = [a.name for a in self.module.forward.schema.arguments][1:]  # [0] is self
        if names != list(self.inputs):
            raise ValueError(f"model: {path} does not match its card: graph inputs {names}, the card's "
                             f"{list(self.inputs)}")

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = _torch()
        with torch.inference_mode(), torch.autocast(self.device, torch.bfloat16, enabled=self.precision == "bf16"):
            tensors = {k: torch.from_numpy(v).to(self._torch_device) for k, v in inputs.items()}
            return self.module(**tensors).float().cpu().numpy()

    def close(self) -> None:
        self.module = None

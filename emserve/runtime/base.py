"""What every backend shares: inputs checked against the model card, and the Runtime interface.

A Runtime is a model card plus something that runs the UNet graph. Calling it, `runtime(x, t, cond)`, checks
the arrays against the card (shapes, channels, conditions, dataset ids), casts them to the graph's dtypes, splits
the batch into calls of at most `max_batch` samples that fit `memory_budget` bytes (emserve.runtime.memory) and
returns the output as float32 numpy. `runtime.denoise` is the `Denoise` callable of emserve.diffusion and
emserve.pipelines.generate (the runtime itself is one too); `runtime.segment(x)` is the same call for
segmentation networks (no timestep). Backends implement `_run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emserve.card import ModelCard, sha256_file
from emserve.checks import check_choice
from emserve.runtime.memory import samples_within

if TYPE_CHECKING:
    import torch

INPUT_NAMES = ("x", "t", "classes", "dataset", "label_map")  # the exported graph's input names, in order
OUTPUT_NAME = "out"
DEVICES = ("auto", "cuda", "cpu")  # auto: CUDA where present
# What the runtimes compute in: fp32 is the graph as exported and parity-checked; bf16 runs it under torch
# autocast (convolutions and matmuls in bf16: faster where the CPU (avx512_bf16 / AMX) or GPU has bf16; outputs
# within ~2 % of fp32, not parity-checked; speed and sample quality: docs/BENCHMARKS.md).
PRECISIONS = ("fp32", "bf16")
BF16_BACKENDS = ("torchscript", "torch")


def check_device(device: str) -> str:
    check_choice("device", device, DEVICES)
    return device


def torch_device(device: str) -> torch.device:
    """The torch device for `device` (DEVICES): "auto" is CUDA where present, else the CPU; "cuda" fails by name
    where there is none; "cpu" keeps a GPU machine's work on the CPU. CUDA is `cuda:LOCAL_RANK`, one GPU per
    torchrun process (0 outside torchrun). Imports torch: only for the torch-based backends and training."""
    import torch

    check_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda asked for, but torch sees no CUDA device")
    if device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_precision(precision: str, backend: str) -> str:
    """`precision` if `backend` can compute in it; checked before loading, so a bad pair fails fast and by name."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "fp32" and backend not in BF16_BACKENDS:
        raise ValueError(f"precision: {precision!r} needs backend {' or '.join(BF16_BACKENDS)}; the {backend} "
                         f"backend runs the exported fp32 graph")
    return precision


def check_inputs(card: ModelCard, x: np.ndarray, t: np.ndarray | None, cond: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming the input, what came and what the card allows."""
    batch = x.shape[0]
    in_channels = card.unet["in_channels"]
    if x.ndim != 4 or x.shape[1] != in_channels:
        channels = ", ".join(card.channels) if card.mode != "segmentation" else f"raw EM of {card.depth} section(s)"
        raise ValueError(f"x: shape {x.shape}; this model takes [B, {in_channels}, H, W] (channels {channels})")
    factor = 2 ** (len(card.unet["multipliers"]) - 1)
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"x: spatial size {x.shape[2]}x{x.shape[3]} must be a multiple of {factor}")
    if card.unet["timestep"] and (t is None or t.shape != (batch,)):
        raise ValueError(f"t: expected one timestep per sample, shape ({batch},); got {None if t is None else t.shape}")
    if not card.unet["timestep"] and t is not None:
        raise ValueError("t: this model has no timestep input (a segmentation network); pass None")
    expected = card.conditions
    unknown = sorted(set(cond) - set(expected))
    if unknown:
        raise ValueError(f"conditions: {unknown} are not inputs of this model; it takes {sorted(expected) or 'none'}")
    for name, spec in expected.items():
        if name not in cond:
            raise ValueError(f"{name}: missing; this model needs it (use {spec['null']} for 'no condition')")
        shape = tuple(batch if d == "B" else x.shape[2] if d == "H" else x.shape[3] if d == "W" else d
                      for d in spec["shape"])
        if cond[name].shape != shape:
            raise ValueError(f"{name}: shape {cond[name].shape}; this model wants {shape}")
    if "dataset" in cond and cond["dataset"].size:
        ids = cond["dataset"]
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"dataset: expected integer ids (int64), got {ids.dtype}")
        if ids.min() < -1 or ids.max() >= len(card.datasets):
            raise ValueError(f"dataset: ids must be in [-1, {len(card.datasets)}) (-1 = no condition; "
                             f"{', '.join(f'{i} = {n}' for i, n in enumerate(card.datasets))}); got {ids.tolist()}")


def graph_inputs(card: ModelCard) -> dict[str, str]:
    """The exported graph's inputs for this card, in graph order, with their numpy dtypes."""
    spec = {"x": "float32"}
    if card.unet["timestep"]:
        spec["t"] = "float32"
    conditions = card.conditions
    spec.update({name: conditions[name]["dtype"] for name in INPUT_NAMES if name in conditions})
    return spec


def verified_file(folder: str | Path, relative: str, card: ModelCard) -> Path:
    """`folder/relative`, after checking it against the sha256 the card lists for it."""
    path = Path(folder) / relative
    expected = card.files.get(relative)
    if expected is None:
        listed = ", ".join(sorted(card.files)) or "none (not an exported model: run `emserve export` first)"
        raise ValueError(f"model: {Path(folder) / 'card.json'} lists no sha256 for {relative}; files listed: {listed}")
    if not path.is_file():
        raise FileNotFoundError(f"model: {path} is missing (the card lists it); re-export the model")
    if sha256_file(path) != expected:
        raise ValueError(f"model: {path} does not match the sha256 in {Path(folder) / 'card.json'} (corrupt, "
                         f"truncated or replaced); re-export the model or restore the file")
    return path


class Runtime:
    """A model card and a backend that runs its graph; see the module docstring.

    `max_batch` caps the samples per backend call (None: no cap); `memory_budget` (bytes, None: no limit) caps
    them further to what fits by the estimate of emserve.runtime.memory for the call's spatial size. Guided
    sampling doubles the batch (the conditional and unconditional halves go in one call), so a request of B
    samples asks for 2B; with a cap, the call is split and the outputs concatenated, which gives the same samples
    because every sample is computed independently of the others in its batch (GroupNorm, no BatchNorm).
    """

    backend = "base"
    precision = "fp32"  # what the graph computes in (PRECISIONS); bf16 only on the torch backends

    def __init__(self, card: ModelCard, max_batch: int | None = None, memory_budget: int | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("memory_budget", memory_budget)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name}: {value} must be at least 1 (or None for no limit)")
        self.card = card
        self.max_batch = None if max_batch is None else int(max_batch)
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self.inputs = graph_inputs(card)

    def samples_per_call(self, height: int, width: int) -> int | None:
        """The most samples of this spatial size one backend call gets (None: no limit)."""
        limits = [self.max_batch] if self.max_batch else []
        if self.memory_budget:
            limits.append(samples_within(self.memory_budget, self.card.unet, height, width))
        return min(limits) if limits else None

    def __call__(self, x: np.ndarray, t: np.ndarray | None = None,
                 cond: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        x = np.asarray(x)
        t = None if t is None else np.asarray(t)
        cond = {name: np.asarray(value) for name, value in (cond or {}).items()}
        check_inputs(self.card, x, t, cond)
        arrays = {"x": x, "t": t, **cond}
        inputs = {name: _cast(name, arrays[name], dtype) for name, dtype in self.inputs.items()}
        batch = x.shape[0]
        step = self.samples_per_call(x.shape[2], x.shape[3]) or max(batch, 1)
        if batch <= step:
            out = self._checked(self._run(inputs), x.shape)
        else:
            out = np.concatenate([self._checked(self._run({k: v[i:i + step] for k, v in inputs.items()}),
                                                (min(step, batch - i), *x.shape[1:]))
                                  for i in range(0, batch, step)])
        return out

    def denoise(self, x: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        """The denoise callable of the samplers (x_t, t, cond) -> the model's prediction."""
        if self.card.mode == "segmentation":
            raise ValueError("model: a segmentation network does not denoise; use segment(x)")
        return self(x, t, cond)

    def segment(self, x: np.ndarray, cond: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Per-class logits [B, K, H, W] of a segmentation network for raw EM x [B, 1, H, W] in [-1, 1]."""
        if self.card.mode != "segmentation":
            raise ValueError(f"model: a {self.card.mode!r} model is a denoiser, not a segmentation network")
        return self(x, None, cond)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the graph on checked inputs (graph names -> arrays in the graph's dtypes); return the output."""
        raise NotImplementedError

    def _checked(self, out: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
        want = (x_shape[0], self.card.unet["out_channels"], *x_shape[2:])
        out = np.asarray(out)
        if out.shape != want:
            raise RuntimeError(f"{self.backend}: the graph returned shape {out.shape}, the card promises {want}; "
                               f"the exported files do not belong to this card")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        """Release the backend's resources (sessions, connections)."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mode={self.card.mode!r}, backend={self.backend!r}, "
                f"max_batch={self.max_batch}, memory_budget={self.memory_budget})")


class CallableRuntime(Runtime):
    """Any denoise-style callable `fn(x, t, cond) -> array` behind the Runtime interface (checks, max_batch):
    eager torch during training, or a client of a remote server."""

    def __init__(self, card: ModelCard, fn: Callable[..., np.ndarray], backend: str = "callable",
                 max_batch: int | None = None, close: Callable[[], None] | None = None,
                 memory_budget: int | None = None, precision: str = "fp32") -> None:
        super().__init__(card, max_batch, memory_budget)
        self.fn, self.backend, self._close, self.precision = fn, backend, close, precision

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        cond = {k: v for k, v in inputs.items() if k not in ("x", "t")}
        return self.fn(inputs["x"], inputs.get("t"), cond)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def _cast(name: str, value: np.ndarray, dtype: str) -> np.ndarray:
    """`value` as `dtype` (float32 / int64), refusing casts that could change values (float ids -> int)."""
    if value.dtype == dtype:
        return np.ascontiguousarray(value)
    if not np.can_cast(value.dtype, dtype, casting="same_kind"):
        raise ValueError(f"{name}: dtype {value.dtype}; this model takes {dtype}")
    return np.ascontiguousarray(value, dtype=dtype)

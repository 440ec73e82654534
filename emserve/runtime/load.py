"""Pick a runtime by backend name or by URL: `load_runtime("models/pairs")`, `load_runtime(path, "torchscript")`.

Built-in backends:

- "onnx": ONNX Runtime on an exported model folder (`1/model.onnx`), CUDA where present, else CPU.
- "torchscript": TorchScript on an exported model folder (`1/model.pt`).
- "torch": eager torch on a training checkpoint folder (its EMA weights), for previews and checkpoints not yet
  exported.

- "triton": a Triton Inference Server over HTTP or gRPC; the model is a URL ("grpc://host:8001/name") and the
  `card` option names the exported folder (or card) it serves.

With backend "auto" a local folder gets the first of onnx, torchscript, torch that its card lists files for
and whose library is installed.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emserve.card import ModelCard
from emserve.runtime.base import BF16_BACKENDS, Runtime, check_precision

#: loader(model: str, **options) -> Runtime; options are the backend's keyword arguments (device, max_batch,
#: memory_budget, ...).
Loader = Callable[..., Runtime]


def pick_backend(model: str | Path) -> str:
    """The backend "auto" means for `model`: by URL scheme, else by what the folder holds and what is installed."""
    text = str(model)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in _SCHEMES:
            known = ", ".join(f"{s}:// ({b})" for s, b in sorted(_SCHEMES.items()))
            raise ValueError(f"model: no backend serves {scheme}:// URLs; known: {known}")
        return _SCHEMES[scheme]
    from emserve.runtime.onnx import ONNX_FILE
    from emserve.runtime.torchscript import TORCHSCRIPT_FILE

    card = ModelCard.load(model)
    if ONNX_FILE in card.files and _installed("onnxruntime"):
        return "onnx"
    if TORCHSCRIPT_FILE in card.files and _installed("torch"):
        return "torchscript"
    if card.weights and not card.files and _installed("torch"):
        return "torch"
    what = (f"exported files {sorted(card.files)}" if card.files else
            f"a training checkpoint ({', '.join(sorted(card.weights))})" if card.weights else "no weights")
    raise ValueError(f"model: {model} holds {what}, and no installed backend runs that; install onnxruntime "
                     f"(pip install 'emserve[cpu]') or torch")


def load_runtime(model: str | Path, backend: str = "auto", **options: Any) -> Runtime:
    """A Runtime for `model` (a model folder, checkpoint folder or URL) on `backend` ("auto": pick_backend).

    Options go to the backend: device ("auto" | "cuda" | "cpu"), precision ("fp32" | "bf16"; bf16 for torchscript
    and torch only), max_batch (samples per call), memory_budget (bytes per call, emserve.runtime.memory), verify
    (sha256 check), threads (onnx only).
    """
    name = pick_backend(model) if backend == "auto" else backend
    if name not in _LOADERS:
        raise ValueError(f"backend: {name!r} is not known; choose one of auto, {', '.join(sorted(_LOADERS))}")
    precision = check_precision(options.pop("precision", "fp32"), name)  # onnx and triton run fp32 only
    if name in BF16_BACKENDS:
        options["precision"] = precision
    return _LOADERS[name](str(model), **options)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _load_onnx(model: str, **options: Any) -> Runtime:
    from emserve.runtime.onnx import OnnxRuntime

    return OnnxRuntime(model, **options)


def _load_torchscript(model: str, **options: Any) -> Runtime:
    from emserve.runtime.torchscript import TorchScriptRuntime

    return TorchScriptRuntime(model, **options)


def _load_torch(model: str, **options: Any) -> Runtime:
    try:
        from emserve.runtime.eager import EagerRuntime
    except ImportError as error:
        raise ImportError(f"torch backend: needs torch ({error}); pip install torch, or export the model and use "
                          f"the onnx backend") from None
    return EagerRuntime(model, **options)


def _load_triton(model: str, **options: Any) -> Runtime:
    from emserve.runtime.triton import from_url

    return from_url(model, **options)


_LOADERS: dict[str, Loader] = {"onnx": _load_onnx, "torchscript": _load_torchscript, "torch": _load_torch,
                               "triton": _load_triton}
_SCHEMES = {"http": "triton", "grpc": "triton"}  # URL scheme -> backend
BACKENDS = ("auto", *_LOADERS)


@dataclass(frozen=True)
class RuntimeSpec:
    """load_runtime's arguments, for a runtime opened where it runs: a Dask worker opens it once per process and
    every later task finds it open (`open`). Options are (name, value) pairs, so a spec is hashable."""

    model: str
    backend: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()

    def open(self) -> Runtime:
        return _opened(self)


@functools.cache
def _opened(spec: RuntimeSpec) -> Runtime:
    return load_runtime(spec.model, spec.backend, **dict(spec.options))

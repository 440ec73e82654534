"""Export a trained UNet (denoiser or segmentation network) to a served model folder, checked against eager torch.

    export_model("runs/pairs/step-00006000", "models", name="pairs")

writes, atomically (a temporary folder renamed into place at the end; an existing model is replaced only
with overwrite=True):

    models/pairs/card.json      the model card: classes, channels, conditions and their nulls, schedule,
                                objective, patch size, `files` (sha256 of every file below), `export` (graph
                                inputs and output, exporter, measured parity errors, source checkpoint)
    models/pairs/1/model.onnx   ONNX, one file, dynamic batch and spatial size (multiples of 2**(levels-1))
    models/pairs/1/model.pt     TorchScript (traced, frozen)
    models/pairs/config.pbtxt   Triton onnxruntime backend: `models/` is a Triton model repository

The graph inputs are x, t (denoisers only) and the conditions the model has, named as in
emserve.runtime.base.INPUT_NAMES; the output is "out". The weights exported are the EMA weights (what sampling
uses) unless weights="model".

Parity: before the folder is committed, both exported graphs are loaded through the same runtimes that serve
them (emserve.runtime, CPU) and compared with eager torch on random inputs: batch sizes 1, 3 and 2, at the patch
size and at a smaller non-square size, with the first sample of each batch at the null conditions. The error is
max |exported - eager| / max(1, max |eager|) per graph; the export fails (ParityError, nothing written) if it
exceeds `tolerance` (default 1e-4; typical: ~1e-6 for ONNX, 0 for TorchScript).

Exporters: "dynamo" (torch.onnx.export(dynamo=True), the default and the future of torch's ONNX export; ~10-20 s
for a small UNet on a CPU) or "legacy" (TorchScript-based, deprecated by torch but ~30x faster).
"""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emserve.card import CARD_NAME, ModelCard, sha256_file
from emserve.data.writer import atomic_directory
from emserve.runtime.base import OUTPUT_NAME, graph_inputs
from emserve.runtime.eager import load_module
from emserve.runtime.onnx import ONNX_FILE, OnnxRuntime
from emserve.runtime.torchscript import TORCHSCRIPT_FILE, TorchScriptRuntime
from emserve.runtime.triton_config import CONFIG_NAME, triton_config, write_triton_config
from emserve.unet import UNet

DEFAULT_TOLERANCE = 1e-4
EXPORTERS = ("dynamo", "legacy")
OPSET = 18  # ONNX opset: ONNX Runtime >= 1.14 (Triton 23.02 and later) runs it
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STEP = re.compile(r"^step-\d+$")


class ParityError(ValueError):
    """An exported graph disagrees with eager torch beyond the tolerance."""


def export_model(checkpoint: str | Path, out: str | Path, *, name: str | None = None, overwrite: bool = False,
                 tolerance: float = DEFAULT_TOLERANCE, weights: str = "ema", exporter: str = "dynamo",
                 max_batch_size: int = 32, instance_kind: str = "auto") -> Path:
    """Export `checkpoint` to `out/<name>/` (see the module docstring) and return that folder.

    name: the model's name (folder and Triton model name); default: the run folder's name for a `step-N`
    checkpoint, else the checkpoint folder's name. max_batch_size, instance_kind: Triton config.pbtxt.
    """
    checkpoint = Path(checkpoint)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter: {exporter!r} is not allowed; choose one of {', '.join(EXPORTERS)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: {tolerance} must be >= 0")
    name = name or default_name(checkpoint)
    if not NAME.match(name):
        raise ValueError(f"name: {name!r} is not a valid model name (letters, digits, '_', '.', '-'; it is a "
                         f"folder and the Triton model name)")
    card, model, weights_file = load_module(checkpoint, weights)
    triton_config(card, name, max_batch_size=max_batch_size, instance_kind=instance_kind)  # bad settings fail now
    final = Path(out) / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"output: {final} already exists; choose another --name or pass --overwrite")

    with atomic_directory(final, overwrite=overwrite, inputs=[checkpoint]) as tmp:
        (tmp / "1").mkdir(parents=True)
        export_onnx(model, tmp / ONNX_FILE, exporter)
        export_torchscript(model, tmp / TORCHSCRIPT_FILE)
        card.weights = {weights_file: card.weights[weights_file]}  # the identity of the weights exported
        card.files = {f: sha256_file(tmp / f) for f in (ONNX_FILE, TORCHSCRIPT_FILE)}
        card.export = {"name": name, "source": str(checkpoint), "weights": weights_file, "exporter": exporter,
                       "opset": OPSET, "torch": torch.__version__, "inputs": graph_inputs(card),
                       "output": OUTPUT_NAME, "tolerance": tolerance,
                       "created": datetime.now(UTC).isoformat(timespec="seconds")}
        (tmp / CARD_NAME).write_text(card.to_json())
        errors = check_parity(model, tmp, tolerance)
        card.export["parity"] = errors
        write_triton_config(tmp, card, name, max_batch_size=max_batch_size, instance_kind=instance_kind)
        card.export["triton"] = {"max_batch_size": max_batch_size, "instance_kind": instance_kind}
        card.files[CONFIG_NAME] = sha256_file(tmp / CONFIG_NAME)
        (tmp / CARD_NAME).write_text(card.to_json())
    return final


def default_name(checkpoint: Path) -> str:
    """runs/pairs/step-00006000 -> "pairs"; any other folder -> its own name."""
    checkpoint = checkpoint.resolve()
    return checkpoint.parent.name if STEP.match(checkpoint.name) else checkpoint.name


def export_onnx(model: UNet, path: Path, exporter: str = "dynamo") -> None:
    """One-file ONNX with dynamic batch and spatial size; inputs named as the UNet's arguments, output "out"."""
    inputs = model.example_inputs(2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, dim renames) is not the user's concern
        if exporter == "dynamo":
            torch.onnx.export(model, (), str(path), kwargs=inputs, dynamic_shapes=model.dynamic_shapes(inputs),
                              dynamo=True, external_data=False, output_names=[OUTPUT_NAME], opset_version=OPSET,
                              verbose=False)
        else:
            spatial = {0: "batch", 2: "height", 3: "width"}
            axes = {n: spatial if n in ("x", "label_map") else {0: "batch"} for n in inputs}
            torch.onnx.export(model, (), str(path), kwargs=inputs, input_names=list(inputs),
                              output_names=[OUTPUT_NAME], dynamic_axes={**axes, OUTPUT_NAME: spatial},
                              dynamo=False, opset_version=OPSET, verbose=False)


def export_torchscript(model: UNet, path: Path) -> None:
    """Trace with keyword inputs (so the graph's argument names are the UNet's), freeze, save."""
    inputs = model.example_inputs(2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+ deprecates TorchScript; still works
        traced = torch.jit.trace(model, example_kwarg_inputs=inputs, check_trace=False)
        torch.jit.save(torch.jit.freeze(traced.eval()), str(path))


def parity_cases(card: ModelCard) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the parity check: the patch size and a smaller non-square size."""
    f = 2 ** (len(card.unet["multipliers"]) - 1)
    p = card.patch_size
    half = max(f, p // 2 // f * f)
    return [(1, p, p), (3, p, p), (2, half, p + 2 * f)]


def parity_inputs(model: UNet, card: ModelCard, batch: int, height: int, width: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """Random inputs with the first sample at the card's null conditions (so the learned nulls are compared too)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inputs = model.example_inputs(batch, height, width)
    for name, null in card.null_conditions(1, height, width).items():
        inputs[name][0] = torch.as_tensor(null[0])
    return inputs


def check_parity(model: UNet, folder: str | Path, tolerance: float = DEFAULT_TOLERANCE,
                 cases: list[tuple[int, int, int]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Compare the exported graphs in `folder` with eager `model`; raise ParityError beyond `tolerance`.

    Returns {"onnx": worst error, "torchscript": worst error, "cases": cases}.
    """
    folder = Path(folder)
    card = ModelCard.load(folder)
    cases = cases or parity_cases(card)
    runtimes = {"onnx": OnnxRuntime(folder, device="cpu"), "torchscript": TorchScriptRuntime(folder, device="cpu")}
    worst = dict.fromkeys(runtimes, 0.0)
    rows = []
    for i, (batch, height, width) in enumerate(cases):
        inputs = parity_inputs(model, card, batch, height, width, seed + i)
        with torch.no_grad():
            expected = model(**inputs).numpy()
        arrays = {k: v.numpy() for k, v in inputs.items()}
        x, t = arrays.pop("x"), arrays.pop("t", None)
        scale = max(1.0, float(np.abs(expected).max()))
        for backend, runtime in runtimes.items():
            error = float(np.abs(runtime(x, t, arrays) - expected).max()) / scale
            worst[backend] = max(worst[backend], error)
            rows.append(f"{backend} batch {batch} {height}x{width}: {error:.2e}")
    failed = [b for b, e in worst.items() if not e <= tolerance]
    if failed:
        raise ParityError(f"export: {', '.join(failed)} differ(s) from eager torch beyond the tolerance {tolerance:g} "
                          f"(max |exported - eager| / max(1, max |eager|)): " + "; ".join(rows))
    return {**worst, "cases": [list(c) for c in cases]}

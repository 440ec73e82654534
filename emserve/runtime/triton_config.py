"""Triton Inference Server: the `config.pbtxt` that makes an exported model folder a Triton model repository entry.

An exported model folder is laid out as Triton expects (`emserve export` writes it):

    <repository>/<name>/config.pbtxt      this file: backend onnxruntime, named inputs and output
    <repository>/<name>/1/model.onnx      version 1 of the graph (1/model.pt beside it is for TorchScript)
    <repository>/<name>/card.json         the model card (Triton ignores it)

so `tritonserver --model-repository <repository>` serves it. The text is generated from the model card alone
(no torch, no tritonclient), so it can be rewritten on the serving machine with other batching settings.

Batching: with `max_batch_size` > 0 (the default) Triton's dynamic batcher may merge concurrent requests into
one batch of up to that many samples; `dims` then leave out the batch dimension, and the per-sample scalar
inputs (t, dataset) are declared `dims: [1]` with `reshape: { shape: [] }`, Triton's convention for a graph
input of shape [batch]: clients send them as [B, 1] (the served metadata says [-1, 1]). Merging is safe
because every sample is computed independently of the rest of its batch. With `max_batch_size` 0 the config
mirrors the graph exactly ([-1, C, -1, -1], t [-1], ...) and requests are never merged.

Instances: `instance_kind` "auto" (KIND_AUTO) puts `instances` instances on every GPU Triton sees and falls
back to CPU where there is none; "gpu" or "cpu" force one or the other.
"""

from __future__ import annotations

from pathlib import Path

from emserve.card import ModelCard
from emserve.checks import check_choice
from emserve.runtime.base import OUTPUT_NAME, graph_inputs

CONFIG_NAME = "config.pbtxt"
ONNX_FILE = "model.onnx"
VERSION = "1"
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
DATATYPES = {"float32": "FP32", "int64": "INT64"}  # KServe / Triton protocol names; config enums add TYPE_


def served_io(card: ModelCard, max_batch_size: int = 32
              ) -> tuple[dict[str, tuple[str, list[int]]], tuple[str, list[int]], dict[str, list[int]]]:
    """What Triton serves for this card: ({input: (datatype, shape)}, (output datatype, shape), reshapes).

    Shapes are as the server's model metadata reports them, batch first, -1 for dynamic sizes; `reshapes`
    maps inputs that Triton reshapes before the graph sees them to the graph's per-sample shape.
    """
    channels_in, channels_out = card.unet["in_channels"], card.unet["out_channels"]
    conditions = card.conditions
    inputs: dict[str, tuple[str, list[int]]] = {}
    reshapes: dict[str, list[int]] = {}
    for name, dtype in graph_inputs(card).items():
        if name == "x":
            shape = [-1, channels_in, -1, -1]
        elif name == "t":
            shape = [-1]
        else:
            shape = [-1 if d in ("B", "H", "W") else int(d) for d in conditions[name]["shape"]]
        if max_batch_size > 0 and len(shape) == 1:  # [batch] -> dims [1], reshaped to [] per sample
            shape, reshapes[name] = [-1, 1], []
        inputs[name] = (DATATYPES[dtype], shape)
    return inputs, ("FP32", [-1, channels_out, -1, -1]), reshapes


def triton_config(card: ModelCard, name: str, *, max_batch_size: int = 32, instance_kind: str = "auto",
                  instances: int = 1, max_queue_delay_us: int = 500) -> str:
    """The config.pbtxt text for serving this card's ONNX graph with Triton's onnxruntime backend."""
    check_choice("instance_kind", instance_kind, INSTANCE_KINDS)
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size: {max_batch_size} must be >= 0 (0: no batching by Triton)")
    if instances < 1:
        raise ValueError(f"instances: {instances} must be at least 1")
    inputs, (out_type, out_shape), reshapes = served_io(card, max_batch_size)
    batched = max_batch_size > 0

    def dims(shape: list[int]) -> str:
        return "[ " + ", ".join(str(d) for d in (shape[1:] if batched else shape)) + " ]"

    blocks = []
    for input_name, (datatype, shape) in inputs.items():
        lines = [f'    name: "{input_name}"', f"    data_type: TYPE_{datatype}", f"    dims: {dims(shape)}"]
        if input_name in reshapes:
            lines.append("    reshape: { shape: [ ] }")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    text = [
        f"# {card.mode} model, written by emserve from card.json: change batching or instances freely,",
        "# but inputs and outputs must stay as the graph has them.",
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f'default_model_filename: "{ONNX_FILE}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(blocks) + "\n]",
        "output [\n  {\n" + f'    name: "{OUTPUT_NAME}"\n    data_type: TYPE_{out_type}\n    dims: {dims(out_shape)}'
        + "\n  }\n]",
    ]
    if batched:
        text.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    text.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {INSTANCE_KINDS[instance_kind]}\n  }}\n]")
    return "\n".join(text) + "\n"


def write_triton_config(folder: str | Path, card: ModelCard, name: str | None = None, **options: int | str) -> Path:
    """Write `folder/config.pbtxt` (model name: the folder's name unless given); options as triton_config."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    path.write_text(triton_config(card, name or folder.name, **options))
    return path

"""Export: checkpoint -> model folder (ONNX + TorchScript + card + Triton config), parity with eager torch.

Tiny UNets (width 8, multipliers 1,2, one block per level, patch 16) with random weights, saved as real
training checkpoints. The pairs model goes through the default (dynamo) ONNX exporter; the others use the
legacy exporter, ~20x faster, so that this file stays well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import CLASSES, make_checkpoint

from emserve.card import ModelCard, sha256_file
from emserve.runtime.eager import EMA_FILE, MODEL_FILE, load_module
from emserve.runtime.load import load_runtime
from emserve.runtime.onnx import ONNX_FILE, OnnxRuntime
from emserve.runtime.torchscript import TORCHSCRIPT_FILE, TorchScriptRuntime
from emserve.runtime.triton_config import triton_config
from training.export import ParityError, check_parity, export_model

onnx = pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64"}  # onnx.TensorProto.FLOAT, INT64


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Checkpoints and their exports in one model repository."""
    root = tmp_path_factory.mktemp("export")
    ckpt = {"pairs": make_checkpoint(root / "runs" / "pairs", "pairs", num_classes=2, num_datasets=2),
            "em-from-labels": make_checkpoint(root / "runs" / "fl", "em-from-labels", seed=1, label_channels=2,
                                              num_datasets=2),
            "segmentation": make_checkpoint(root / "runs" / "seg", "segmentation", seed=2)}
    repo = root / "models"
    models = {"pairs": export_model(ckpt["pairs"], repo),  # default exporter (dynamo), name from the run folder
              "em-from-labels": export_model(ckpt["em-from-labels"], repo, name="from-labels", exporter="legacy"),
              "segmentation": export_model(ckpt["segmentation"], repo, name="seg", exporter="legacy")}
    return ckpt, models, repo


def test_export_writes_a_triton_model_folder_whose_card_lists_every_file(exported):
    ckpt, models, repo = exported
    folder = models["pairs"]
    assert folder == repo / "pairs"  # runs/pairs/step-00000001 -> "pairs"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx", "1/model.pt", "card.json", "config.pbtxt"]
    assert sorted(os.listdir(repo)) == ["from-labels", "pairs", "seg"]  # no temporary folders left behind
    card = ModelCard.load(folder)
    source = ModelCard.load(ckpt["pairs"])
    assert card.files == {name: sha256_file(folder / name) for name in ("1/model.onnx", "1/model.pt", "config.pbtxt")}
    assert card.weights == {EMA_FILE: source.weights[EMA_FILE]}  # the identity of the weights, as in the checkpoint
    for field in ("mode", "classes", "channels", "conditions", "unet", "schedule", "objective", "patch_size"):
        assert getattr(card, field) == getattr(source, field), field
    assert card.conditions["dataset"]["null"] == -1 and card.conditions["classes"]["null"] == 0.0
    assert card.export["inputs"] == {"x": "float32", "t": "float32", "classes": "float32", "dataset": "int64"}
    assert card.export["output"] == "out" and card.export["exporter"] == "dynamo"
    parity = card.export["parity"]
    assert parity["cases"] == [[1, 16, 16], [3, 16, 16], [2, 8, 20]]
    assert 0 <= parity["onnx"] < 1e-5 and 0 <= parity["torchscript"] < 1e-5
    assert json.loads((folder / "card.json").read_text())["export"]["tolerance"] == 1e-4
    assert card.export["triton"] == {"max_batch_size": 32, "instance_kind": "auto"}


@pytest.mark.parametrize("mode", ["pairs", "em-from-labels", "segmentation"])
def test_triton_config_parses_with_tritons_schema_and_matches_the_onnx_graph(exported, mode):
    _, models, _ = exported
    folder = models[mode]
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder.name and config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx" and (folder / "1" / "model.onnx").is_file()
    assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_AUTO]

    graph = onnx.load(str(folder / ONNX_FILE)).graph

    def onnx_shape(value):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in config.input}
    assert list(inputs) == [i.name for i in graph.input]
    for value in graph.input:
        served = inputs[value.name]
        assert model_config_pb2.DataType.Name(served.data_type) == ONNX_TYPES[value.type.tensor_type.elem_type]
        shape = onnx_shape(value)
        assert shape[0] == -1  # dynamic batch
        per_sample = list(served.reshape.shape) if served.HasField("reshape") else list(served.dims)
        assert per_sample == shape[1:], value.name
    (out,) = graph.output
    assert [o.name for o in config.output] == [out.name] == ["out"]
    assert list(config.output[0].dims) == onnx_shape(out)[1:]
    x = next(i for i in graph.input if i.name == "x")
    assert onnx_shape(x)[2:] == [-1, -1]  # dynamic height and width

    # Without Triton batching the config mirrors the graph exactly, batch dimension included.
    card = ModelCard.load(folder)
    plain = text_format.Parse(triton_config(card, folder.name, max_batch_size=0, instance_kind="gpu"),
                              model_config_pb2.ModelConfig())
    assert not plain.HasField("dynamic_batching")
    assert [g.kind for g in plain.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert {i.name: list(i.dims) for i in plain.input} == {v.name: onnx_shape(v) for v in graph.input}


def test_triton_config_refuses_settings_triton_would_reject(exported):
    card = ModelCard.load(exported[1]["pairs"])
    with pytest.raises(ValueError, match="instance_kind: 'tpu' is not allowed; choose one of auto, gpu, cpu"):
        triton_config(card, "pairs", instance_kind="tpu")
    with pytest.raises(ValueError, match="max_batch_size: -1 must be >= 0"):
        triton_config(card, "pairs", max_batch_size=-1)


def test_parity_check_fails_when_a_graph_differs_from_eager_torch(exported):
    ckpt, models, _ = exported
    _, model, _ = load_module(ckpt["pairs"])
    errors = check_parity(model, models["pairs"], tolerance=1e-4)
    assert errors["onnx"] > 0  # ONNX Runtime's kernels round differently: a tolerance of 0 must fail
    with pytest.raises(ParityError, match=r"onnx differ\(s\) from eager torch beyond the tolerance 0 .*onnx batch 3 "
                                          r"16x16: \d\.\d\de-\d\d"):
        check_parity(model, models["pairs"], tolerance=0.0)
    with torch.no_grad():  # weights nudged after export: both graphs are now wrong
        model.head[-1].bias.add_(1e-2)
    with pytest.raises(ParityError, match=r"onnx, torchscript differ\(s\)"):
        check_parity(model, models["pairs"])


def test_failed_export_leaves_nothing_and_existing_models_are_kept_unless_overwrite(exported):
    ckpt, models, repo = exported
    before = sha256_file(models["segmentation"] / ONNX_FILE)
    with pytest.raises(ParityError, match="beyond the tolerance 0"):
        export_model(ckpt["em-from-labels"], repo, name="strict", tolerance=0.0, exporter="legacy")
    assert sorted(os.listdir(repo)) == ["from-labels", "pairs", "seg"]
    with pytest.raises(FileExistsError, match="seg already exists; choose another --name or pass --overwrite"):
        export_model(ckpt["segmentation"], repo, name="seg", exporter="legacy")
    # --overwrite replaces it with the export of another checkpoint (the pairs model under the same name)
    export_model(ckpt["pairs"], repo, name="seg", overwrite=True, exporter="legacy")
    assert ModelCard.load(repo / "seg").mode == "pairs" and sha256_file(repo / "seg" / ONNX_FILE) != before
    assert sorted(os.listdir(repo)) == ["from-labels", "pairs", "seg"]
    export_model(ckpt["segmentation"], repo, name="seg", overwrite=True, exporter="legacy")  # put it back


def test_export_refuses_checkpoints_and_names_it_cannot_trust(exported, tmp_path):
    ckpt, _, repo = exported
    with pytest.raises(ValueError, match="name: 'my model' is not a valid model name"):
        export_model(ckpt["pairs"], repo, name="my model")
    with pytest.raises(ValueError, match="exporter: 'tvm' is not allowed"):
        export_model(ckpt["pairs"], repo, name="x", exporter="tvm")
    with pytest.raises(ValueError, match="instance_kind: 'tpu' is not allowed"):  # before any slow work
        export_model(ckpt["pairs"], repo, name="x", instance_kind="tpu")
    assert not (repo / "x").exists()
    bad = make_checkpoint(tmp_path / "run", "pairs", num_classes=2, num_datasets=2)
    weights = bad / EMA_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # damaged after the card was written
    with pytest.raises(ValueError, match=r"ema\.safetensors is missing or does not match the sha256"):
        export_model(bad, tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_exported_segmentation_network_segments_like_eager_torch(exported):
    ckpt, models, _ = exported
    _, model, _ = load_module(ckpt["segmentation"])
    card = ModelCard.load(models["segmentation"])
    assert card.mode == "segmentation" and card.channels == CLASSES and card.export["inputs"] == {"x": "float32"}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 24, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for runtime in (OnnxRuntime(models["segmentation"], threads=1, device="cpu"),
                    TorchScriptRuntime(models["segmentation"], device="cpu"),
                    load_runtime(ckpt["segmentation"], device="cpu")):  # eager torch on the checkpoint
        logits = runtime.segment(x)
        assert logits.shape == (2, 2, 24, 16) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, expected, atol=1e-5)
        with pytest.raises(ValueError, match="a segmentation network does not denoise; use segment"):
            runtime.denoise(x, np.zeros(2, np.float32), {})
        with pytest.raises(ValueError, match="t: this model has no timestep input"):
            runtime(x, np.zeros(2, np.float32), {})
    assert (models["segmentation"] / TORCHSCRIPT_FILE).is_file()


def test_export_cli_picks_the_weights_and_fails_cleanly_on_parity(exported, tmp_path):
    ckpt, _, _ = exported
    cli = [sys.executable, "-m", "emserve.cli", "export", str(ckpt["segmentation"]), str(tmp_path), "--exporter",
           "legacy"]
    done = subprocess.run([*cli, "--name", "raw-weights", "--weights", "model"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    card = ModelCard.load(tmp_path / "raw-weights")
    assert card.weights == {MODEL_FILE: ModelCard.load(ckpt["segmentation"]).weights[MODEL_FILE]}
    strict = subprocess.run([*cli, "--name", "strict", "--tolerance", "0"], capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode == 2 and "beyond the tolerance 0" in strict.stderr
    assert "Traceback" not in strict.stderr and sorted(os.listdir(tmp_path)) == ["raw-weights"]

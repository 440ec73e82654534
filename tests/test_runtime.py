"""Runtimes: one sampling loop over eager torch, ONNX Runtime and TorchScript; card checks; splitting calls by
max_batch and memory budget.

Tiny UNets (width 8, multipliers 1,2, one block per level, patch 16) with random weights, saved as training
checkpoints and exported; the em-from-labels model with the default (dynamo) exporter, the pairs model with
the legacy one (faster; test_export.py covers the pairs model through dynamo).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from checkpoints import make_checkpoint

from emserve.pipelines import GenerationRequest, generate
from emserve.runtime.base import CallableRuntime, Runtime, torch_device
from emserve.runtime.load import BACKENDS, load_runtime, pick_backend
from emserve.runtime.memory import activation_bytes
from emserve.runtime.onnx import ONNX_FILE, OnnxRuntime, providers
from emserve.runtime.torchscript import TORCHSCRIPT_FILE, TorchScriptRuntime
from training.export import export_model

LABEL_MAPS = np.where(np.random.default_rng(5).random((5, 2, 16, 16)) < 0.3, 1.0, -1.0).astype(np.float32)
REQUESTS = {
    "pairs": GenerationRequest(samples=3, seed=11, steps=4, guidance=2.5, present=("mito_mem",), absent=("ld_lum",),
                               dataset="b", batch_size=2),
    "em-from-labels": GenerationRequest(samples=3, seed=3, steps=4, guidance=3.0, rescale=0.7, dataset="a",
                                        sampler="ddim", batch_size=2),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{mode: (checkpoint folder, exported model folder)}."""
    root = tmp_path_factory.mktemp("runtime")
    pairs = make_checkpoint(root / "runs" / "pairs", "pairs", num_classes=2, num_datasets=2)
    labels = make_checkpoint(root / "runs" / "fl", "em-from-labels", seed=1, label_channels=2, num_datasets=2)
    return {"pairs": (pairs, export_model(pairs, root / "models", exporter="legacy")),
            "em-from-labels": (labels, export_model(labels, root / "models", name="from-labels"))}


def labels(start, stop):
    return LABEL_MAPS[start:stop]


def samples(runtime, request, mode):
    source = labels if mode == "em-from-labels" else None
    return np.concatenate([b.samples for b in generate(runtime.card, runtime, request, source)])


@pytest.mark.parametrize("mode", ["pairs", "em-from-labels"])
@pytest.mark.slow
def test_same_seed_and_request_give_the_same_samples_on_every_backend(models, mode):
    checkpoint, folder = models[mode]
    runtimes = [load_runtime(checkpoint, "torch", device="cpu"), OnnxRuntime(folder, threads=1, device="cpu"),
                TorchScriptRuntime(folder, device="cpu")]
    assert [r.backend for r in runtimes] == ["torch", "onnx", "torchscript"]
    results = [samples(r, REQUESTS[mode], mode) for r in runtimes]
    assert results[0].shape == (3, len(runtimes[0].card.channels), 16, 16)
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], atol=1e-4, rtol=0)
    other = samples(runtimes[1], GenerationRequest(**{**REQUESTS[mode].__dict__, "seed": 99}), mode)
    assert np.abs(other - results[1]).max() > 0.1  # the comparison above is not between constants


@pytest.mark.parametrize("backend", ["torchscript", "torch"])
def test_bf16_runs_the_same_model_in_bf16_and_only_on_the_torch_backends(models, backend):
    """precision="bf16" computes under autocast: the samples stay close to fp32's but are not fp32's (so the
    autocast really runs); the backends that run the exported fp32 graph refuse it by name."""
    checkpoint, folder = models["pairs"]
    model = checkpoint if backend == "torch" else folder
    exact, bf16 = (load_runtime(model, backend, device="cpu", precision=p) for p in ("fp32", "bf16"))
    assert (exact.precision, bf16.precision) == ("fp32", "bf16")
    ours, theirs = samples(exact, REQUESTS["pairs"], "pairs"), samples(bf16, REQUESTS["pairs"], "pairs")
    difference = np.abs(theirs - ours)
    assert 0 < difference.mean() < 0.05 * np.abs(ours).mean()  # measured: 1.3e-2 against 0.70 (random weights)
    with pytest.raises(ValueError, match="precision: 'bf16' needs backend torchscript or torch; the onnx backend"):
        load_runtime(folder, "onnx", precision="bf16")
    with pytest.raises(ValueError, match="precision: 'fp16' is not allowed; choose one of fp32, bf16"):
        load_runtime(folder, backend, precision="fp16")


def test_runtimes_refuse_requests_the_card_does_not_allow_and_say_what_it_takes(models):
    runtime = OnnxRuntime(models["pairs"][1], threads=1, device="cpu")
    x, t = np.zeros((2, 3, 16, 16), np.float32), np.full(2, 10.0, np.float32)
    cond = {"classes": np.zeros((2, 2), np.float32), "dataset": np.array([0, -1])}
    assert runtime(x, t, cond).shape == (2, 3, 16, 16)
    cases = [
        ((np.zeros((2, 1, 16, 16)), t, cond), r"x: shape \(2, 1, 16, 16\); this model takes \[B, 3, H, W\] "
                                             r"\(channels raw, mito_mem, ld_lum\)"),
        ((np.zeros((2, 3, 16, 15)), t, cond), "x: spatial size 16x15 must be a multiple of 2"),
        ((x, None, cond), r"t: expected one timestep per sample, shape \(2,\); got None"),
        ((x, t, {"classes": cond["classes"]}), "dataset: missing; this model needs it \\(use -1 for 'no condition'\\)"),
        ((x, t, {**cond, "label_map": np.zeros((2, 2, 16, 16))}),
         r"conditions: \['label_map'\] are not inputs of this model; it takes \['classes', 'dataset'\]"),
        ((x, t, {**cond, "classes": np.zeros((2, 3))}), r"classes: shape \(2, 3\); this model wants \(2, 2\)"),
        ((x, t, {**cond, "dataset": np.array([0, 2])}),
         r"dataset: ids must be in \[-1, 2\) \(-1 = no condition; 0 = a, 1 = b\); got \[0, 2\]"),
        ((x, t, {**cond, "dataset": np.array([0.0, 1.0])}), "dataset: expected integer ids \\(int64\\), got float64"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            runtime(*args)
    with pytest.raises(ValueError, match="is a denoiser, not a segmentation network"):
        runtime.segment(x)


def test_graphs_that_do_not_match_the_card_are_refused(models, tmp_path):
    checkpoint, folder = models["pairs"]
    tampered = shutil.copytree(folder, tmp_path / "tampered")
    data = bytearray((tampered / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"1/model.onnx does not match the sha256 in .*card.json \(corrupt"):
        OnnxRuntime(tampered)
    (tampered / TORCHSCRIPT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"1/model\.pt is missing"):
        TorchScriptRuntime(tampered)

    # A card edited to promise other inputs: the files are intact, but the graph does not take what it says.
    edited = shutil.copytree(folder, tmp_path / "edited")
    card = json.loads((edited / "card.json").read_text())
    card["datasets"] = []
    (edited / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"does not match its card: graph inputs .*'dataset': 'int64'"):
        OnnxRuntime(edited)
    with pytest.raises(ValueError, match=r"does not match its card: graph inputs \['x', 't', 'classes', 'dataset'\]"):
        TorchScriptRuntime(edited)

    with pytest.raises(ValueError, match=r"lists no sha256 for 1/model\.onnx; files listed: none \(not an exported"):
        OnnxRuntime(checkpoint)


def test_max_batch_splits_calls_and_gives_the_same_samples(models):
    folder = models["pairs"][1]
    onnx = OnnxRuntime(folder, threads=1)
    calls = []

    def recording(x, t, cond):
        calls.append(len(x))
        return onnx(x, t, cond)

    split = CallableRuntime(onnx.card, recording, max_batch=3)
    request = GenerationRequest(**{**REQUESTS["pairs"].__dict__, "samples": 4, "batch_size": 4})
    whole = samples(onnx, request, "pairs")
    assert np.array_equal(samples(split, request, "pairs"), whole)
    assert calls == [3, 3, 2] * request.steps  # guidance: 2 x 4 samples per step, in calls of at most 3
    np.testing.assert_allclose(samples(OnnxRuntime(folder, threads=1, max_batch=1), request, "pairs"), whole,
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="max_batch: 0 must be at least 1"):
        OnnxRuntime(folder, max_batch=0)


def test_a_memory_budget_splits_calls_to_what_fits_and_gives_the_same_samples(models):
    folder = models["pairs"][1]
    onnx = OnnxRuntime(folder, threads=1)
    size = onnx.card.patch_size
    per_sample = activation_bytes(onnx.card.unet, size, size)
    calls = []

    def recording(x, t, cond):
        calls.append(len(x))
        return onnx(x, t, cond)

    budget = 3 * per_sample + per_sample // 2  # room for 3 samples, not 4
    split = CallableRuntime(onnx.card, recording, memory_budget=budget)
    assert split.samples_per_call(size, size) == 3 and split.samples_per_call(2 * size, 2 * size) == 1
    request = GenerationRequest(**{**REQUESTS["pairs"].__dict__, "samples": 4, "batch_size": 4})
    assert np.array_equal(samples(split, request, "pairs"), samples(onnx, request, "pairs"))
    assert calls == [3, 3, 2] * request.steps
    both = OnnxRuntime(folder, threads=1, max_batch=2, memory_budget=budget)
    assert both.samples_per_call(size, size) == 2  # the tighter of the two caps
    assert load_runtime(folder, "torchscript", memory_budget=budget).samples_per_call(size, size) == 3
    with pytest.raises(ValueError, match="memory_budget: 0 must be at least 1"):
        OnnxRuntime(folder, memory_budget=0)


def test_load_runtime_picks_the_backend_by_name_url_or_what_the_folder_holds(models):
    checkpoint, folder = models["pairs"]
    assert set(BACKENDS) == {"auto", "onnx", "torchscript", "torch", "triton"}
    assert pick_backend("grpc://127.0.0.1:1/pairs") == pick_backend("http://127.0.0.1:1/pairs") == "triton"
    assert pick_backend(folder) == "onnx" and pick_backend(checkpoint) == "torch"
    assert isinstance(load_runtime(folder), OnnxRuntime)
    assert isinstance(load_runtime(folder, "torchscript", max_batch=4), TorchScriptRuntime)
    eager = load_runtime(checkpoint, device="cpu")
    assert isinstance(eager, Runtime) and eager.backend == "torch"
    with pytest.raises(ValueError, match="backend: 'tensorrt' is not known; choose one of auto, "):
        load_runtime(folder, "tensorrt")
    with pytest.raises(ValueError, match="model: no backend serves test-remote:// URLs"):
        load_runtime("test-remote://127.0.0.1:1/pairs")


def test_onnx_providers_prefer_cuda_only_where_onnxruntime_has_it():
    import onnxruntime

    available = onnxruntime.get_available_providers()
    assert providers("cpu") == ["CPUExecutionProvider"]
    assert providers("auto")[-1] == "CPUExecutionProvider"
    assert (providers("auto")[0] == "CUDAExecutionProvider") == ("CUDAExecutionProvider" in available)
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(RuntimeError, match="device: cuda asked for, but this onnxruntime offers only"):
            providers("cuda")
    with pytest.raises(ValueError, match="device: 'tpu' is not allowed"):
        providers("tpu")


def test_torch_device_is_cuda_per_torchrun_rank_where_present_and_cpu_when_asked(monkeypatch):
    """The torch backends and training place work the same way; what CUDA machines get is checked here by making
    torch report a GPU (this machine may have none)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of a torchrun launch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto") == torch_device("cuda") == torch.device("cuda", 1)
    assert torch_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device: cuda asked for, but torch sees no CUDA device"):
        torch_device("cuda")
    with pytest.raises(ValueError, match=r"device: 'cuda:1' is not allowed; choose one of auto, cuda, cpu"):
        torch_device("cuda:1")

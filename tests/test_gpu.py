"""On CUDA: every backend runs on the GPU and agrees with the CPU, bf16 stays close to fp32, a seed draws the same
sample on either, and data-parallel training runs over the GPUs present (NCCL). Skipped without CUDA;
benchmarks/gpu_check.sh runs them on a lent GPU machine."""

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from checkpoints import CLASSES, make_checkpoint

from emserve.pipelines import GenerationRequest, generate
from emserve.runtime.load import load_runtime
from emserve.runtime.onnx import CUDA
from training.export import export_model

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh)")]


@pytest.fixture(scope="module")
def pairs_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    checkpoint = make_checkpoint(root / "runs" / "pairs", "pairs", num_classes=2, num_datasets=2)
    return export_model(checkpoint, root / "models", name="pairs", exporter="legacy")


def inputs(runtime, batch=4, size=32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, len(runtime.card.channels), size, size)).astype(np.float32)
    t = rng.uniform(0, 999, batch).astype(np.float32)
    cond = runtime.card.null_conditions(batch, size, size)
    cond["classes"][:] = rng.integers(-1, 2, cond["classes"].shape)
    cond["dataset"][:] = rng.integers(0, 2, batch)
    return x, t, cond


@pytest.mark.parametrize("backend", ["onnx", "torchscript", "torch"])
def test_each_backend_runs_on_the_gpu_and_agrees_with_the_cpu(pairs_model, backend):
    if backend == "onnx" and CUDA not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider: install emserve[gpu] (onnxruntime-gpu)")
    with load_runtime(pairs_model, backend, device="cpu") as cpu, load_runtime(pairs_model, backend,
                                                                              device="cuda") as gpu:
        if backend == "onnx":
            assert gpu.device == "cuda"  # the CUDA provider, not a silent fall-back to the CPU
        x, t, cond = inputs(cpu)
        np.testing.assert_allclose(gpu.denoise(x, t, cond), cpu.denoise(x, t, cond), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["torchscript", "torch"])
def test_bf16_on_the_gpu_stays_within_two_percent_of_fp32(pairs_model, backend):
    with load_runtime(pairs_model, backend, device="cuda") as fp32, load_runtime(
            pairs_model, backend, device="cuda", precision="bf16") as bf16:
        x, t, cond = inputs(fp32)
        reference, half = fp32.denoise(x, t, cond), bf16.denoise(x, t, cond)
    assert np.sqrt(np.mean((half - reference) ** 2)) < 0.02 * np.sqrt(np.mean(reference**2))


def test_a_seed_draws_the_same_sample_on_the_gpu_as_on_the_cpu(pairs_model):
    request = GenerationRequest(samples=2, seed=3, steps=5)
    drawn = {}
    for device in ("cpu", "cuda"):
        with load_runtime(pairs_model, "torchscript", device=device) as runtime:
            drawn[device] = np.concatenate([b.samples for b in generate(runtime.card, runtime, request)])
    np.testing.assert_allclose(drawn["cuda"], drawn["cpu"], atol=1e-2)


def test_data_parallel_training_on_every_gpu(toy_store, tmp_path):
    gpus = torch.cuda.device_count()  # one process per GPU: NCCL from two GPUs on, one process on one
    run = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
         "-m", "emserve.cli", "train", "ddpm", *map(str, toy_store), "--out", str(run), "--classes", ",".join(CLASSES),
         "--patch-size", "32", "--width", "8", "--multipliers", "1,2", "--blocks-per-level", "1", "--batch-size",
         str(4 * gpus), "--steps", "4", "--checkpoint-every", "4", "--preview-every", "100", "--device", "cuda"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads(next(run.glob("step-*/card.json")).read_text())
    assert card["training"]["world_size"] == gpus and card["training"]["precision"] == "bf16"

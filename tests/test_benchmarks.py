"""The benchmark scripts, run as a user runs them (subprocess, tiny model, one thread, one or two repeats).

What is checked is the report, not the speed: one row per backend and batch (or sampler setting), positive
finite numbers, and a FLOP count that agrees with an independent count from the layer shapes.
"""

import math
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_unet
from torch import nn

from emserve.card import ModelCard
from emserve.unet import Attention

pytestmark = pytest.mark.slow  # real servers, exports or training runs: `make test` runs it, `make check` not

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--threads", "1", "--exporter", "legacy"]  # legacy: a faster export, same graph inputs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared by both scripts, so the second reuses the tiny model the first exported."""
    return tmp_path_factory.mktemp("bench")


def run(module: str, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table(report: str) -> list[dict[str, str]]:
    """The Markdown table of a report as one dict per row."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(headers, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def fact(report: str, name: str) -> str:
    return next(line.split(": ", 1)[1] for line in report.splitlines() if line.startswith(f"- {name}: "))


def counted_flops(model: nn.Module, inputs: dict) -> int:
    """FLOPs from the layer shapes (a multiply-add counts 2): convs, linears and the two attention matmuls."""
    total = 0

    def conv(module, _, out):
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * out.numel() * module.in_channels // module.groups * kh * kw

    def linear(module, _, out):
        nonlocal total
        total += 2 * out.numel() * module.in_features

    def attention(_, args, __):
        nonlocal total
        b, c, h, w = args[0].shape
        total += 2 * 2 * b * (h * w) ** 2 * c  # scores q k^T and the weighted sum of v, over all heads

    hooks = {nn.Conv2d: conv, nn.Linear: linear, Attention: attention}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return total


def positive(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


def test_denoiser_report(workdir):
    out = workdir / "report.md"
    report = run("benchmarks.denoiser", *TINY, "--workdir", str(workdir), "--batches", "1,2", "--warmup", "1",
                 "--repeats", "2", "--peak-size", "64", "--out", str(out))
    assert out.read_text().strip() == report.strip()
    rows = table(report)
    assert [(r["backend"], int(r["batch"])) for r in rows] == [
        (b, n) for b in ("onnx", "torchscript", "torchscript-bf16", "torch", "torch-bf16") for n in (1, 2)]
    flops = int(fact(report, "FLOPs per sample").split()[0])
    torch.manual_seed(0)
    tiny = tiny_unet(3, 3, num_classes=2, num_datasets=2).eval()
    assert flops == counted_flops(tiny, tiny.example_inputs(1, 16))
    for row in rows:
        per_call, per_sample = positive(row["ms per call"]), positive(row["ms per sample"])
        gflops = positive(row["GFLOP/s"])
        positive(row["% of peak"])
        assert per_sample == pytest.approx(per_call / int(row["batch"]), rel=0.02)
        assert gflops == pytest.approx(flops * int(row["batch"]) / (per_call * 1e6), rel=0.02)
    assert fact(report, "threads") == "1"
    assert fact(report, "command").startswith("`python -m benchmarks.denoiser --model tiny")
    started, finished = (datetime.fromisoformat(fact(report, k)) for k in ("started", "finished"))
    assert started <= finished <= datetime.now(UTC)  # a table says when it was measured, not only when printed


def test_sampling_report(workdir):
    report = run("benchmarks.sampling", *TINY, "--workdir", str(workdir), "--backends", "onnx,torch",
                 "--samplers", "ddim:250,dpmpp_2m:3", "--estimate", "10", "--estimate-steps", "2", "--batch", "1")
    rows = table(report)
    assert [(r["backend"], r["sampler"], int(r["steps"]), r["guided"]) for r in rows] == [
        (b, s, n, g) for b in ("onnx", "torch") for s, n in (("ddim", 250), ("dpmpp_2m", 3)) for g in ("yes", "no")]
    for row in rows:
        positive(row["s per sample"])
        positive(row["GFLOP/s"])
        positive(row["speed-up vs study"])
        assert int(row["evaluations per sample"]) == int(row["steps"]) * (2 if row["guided"] == "yes" else 1)
        assert row["how"] == ("estimated from 2 steps" if int(row["steps"]) > 10 else "measured")
    reference = next(r for r in rows if (r["backend"], r["sampler"], r["steps"], r["guided"]) ==
                     ("torch", "ddim", "250", "yes"))
    assert float(reference["speed-up vs study"]) == 1


@pytest.fixture(scope="module")
def exported(workdir) -> Path:
    """The tiny model's export folder, the one the other reports share."""
    export = ("import sys; from benchmarks.common import prepare_model; "
              "print(prepare_model('tiny', __import__('pathlib').Path(sys.argv[1]), 'legacy').exported)")
    done = subprocess.run([sys.executable, "-c", export, str(workdir)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_reexport_times_graphs_exported_now_instead_of_the_folders(exported, tmp_path):
    """--reexport times what re-exporting a model folder with this code would serve (after a change to the
    UNet's graph, say), not the folder's own graphs: here the folder's TorchScript file is corrupt, which the
    plain run refuses (sha256 against the card) and the re-export never reads."""
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    graph = folder / "1" / "model.pt"
    graph.write_bytes(graph.read_bytes()[:-10])
    args = ["benchmarks.denoiser", "--model", str(folder), "--threads", "1", "--exporter", "legacy", "--backends",
            "torchscript,torch", "--batches", "1", "--warmup", "1", "--repeats", "1", "--peak-size", "64"]
    own = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert own.returncode != 0 and "model.pt" in own.stderr
    again = run(*args, "--workdir", str(tmp_path / "again"), "--reexport")
    assert "--reexport" in fact(again, "exported graphs")
    assert "random weights" in fact(again, "eager torch")
    reexported = tmp_path / "again" / folder.name / "model"
    assert ModelCard.load(reexported).unet == ModelCard.load(exported).unet
    assert [r["backend"] for r in table(again)] == ["torchscript", "torch"]


def test_sampler_quality_report(exported):
    report = run("benchmarks.sampler_quality", "--model", str(exported), "--threads", "1", "--reference", "ddim:8",
                 "--samplers", "ddim:8,ddim:2,dpmpp_2m:3", "--samples", "24", "--batch", "12")
    rows = table(report)
    assert [(r["sampler"], int(r["steps"]), r["precision"]) for r in rows] == [
        ("ddim", 8, "fp32"), ("ddim", 2, "fp32"), ("dpmpp_2m", 3, "fp32")]
    floor = check_quality_rows(rows)
    assert "request seed 0" in fact(report, "reference")

    # bf16 rows are set against the fp32 reference and floor: the floor's fp32 row comes first, then the
    # reference's setting again in bf16 (that bf16 changes the samples: test_runtime.py)
    bf16 = table(run("benchmarks.sampler_quality", "--model", str(exported), "--threads", "1", "--reference", "ddim:8",
                     "--samplers", "dpmpp_2m:3", "--samples", "24", "--batch", "12", "--backend", "torchscript",
                     "--precision", "bf16"))
    assert [(r["sampler"], int(r["steps"]), r["precision"]) for r in bf16] == [
        ("ddim", 8, "fp32"), ("ddim", 8, "bf16"), ("dpmpp_2m", 3, "bf16")]
    # the same fp32 draws on another backend, equal within float tolerance
    assert float(bf16[0]["FD to reference"]) == pytest.approx(float(floor["FD to reference"]), rel=0.01)
    check_quality_rows(bf16)
    refused = subprocess.run([sys.executable, "-m", "benchmarks.sampler_quality", "--model", str(exported),
                              "--precision", "bf16"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "--precision: 'bf16' needs backend torchscript or torch; the onnx backend" in refused.stderr


def check_quality_rows(rows: list[dict[str, str]]) -> dict[str, str]:
    """Each row's ratio is its distance over the floor's (the first row); returns the floor row."""
    floor = rows[0]
    assert floor["FD / floor"] == "1" and float(floor["FD to reference"]) > 0  # two draws differ by chance
    for row in rows:
        positive(row["s per sample"])
        assert float(row["samples/s"]) == pytest.approx(1 / float(row["s per sample"]), rel=0.02)
        ratio = float(row["FD to reference"]) / float(floor["FD to reference"])
        assert float(row["FD / floor"]) == pytest.approx(ratio, rel=0.02)
    return floor


def test_segmentation_report():
    report = run("benchmarks.segmentation", "--model", str(REPO / "models" / "phantom-seg"), "--volume", "2,96,80",
                 "--backends", "onnx", "--repeats", "1", "--threads", "1", "--tiles", "32,64")
    rows = table(report)
    assert [(r["path"], r["tile"], r["overlap"]) for r in rows] == [
        ("plain torch loop", "32", "0"), ("emserve segment", "32", "8"), ("emserve segment", "32", "0"),
        ("plain torch loop", "64", "0"), ("emserve segment", "64", "16"), ("emserve segment", "64", "0")]
    for row in rows:
        positive(row["Mvoxel/s"])
        seconds = float(row["s per volume"])
        assert float(row["Mvoxel/s"]) == pytest.approx(2 * 96 * 80 / seconds / 1e6, rel=0.02)
    # 96 = 3 tiles of 32; 80 = 3 tiles of 32 (the last flush with the edge, overlapping by 16): 9 tiles of 1024
    assert float(rows[0]["tile pixels per voxel"]) == pytest.approx(9 * 32 * 32 / (96 * 80), rel=0.01)
    assert float(rows[1]["tile pixels per voxel"]) > float(rows[2]["tile pixels per voxel"])  # overlap costs


def test_blockwise_report(tmp_path):
    report = run("benchmarks.blockwise", "--shape", "8,300,300", "--repeat", "2", "--workers", "2", "--workdir",
                 str(tmp_path))
    alone, dask = table(report)
    assert (alone["path"], dask["path"], dask["processes"]) == ("one process", "local:2", "2")
    for row in (alone, dask):
        assert float(row["Mvoxel/s"]) == pytest.approx(16 * 300 * 300 / positive(row["s per volume"]) / 1e6, rel=0.02)
    ratio = float(alone["s per volume"]) / float(dask["s per volume"])
    assert float(dask["vs one process"]) == pytest.approx(ratio, rel=0.02)
    assert "(16, 300, 300) uint8" in report and "the masks of both runs are equal" in report
    assert (tmp_path / "phantom-8x300x300-x2.zarr").is_dir()  # kept for the next run


def test_input_pipeline_report(toy_store):
    report = run("benchmarks.input_pipeline", "--store", str(toy_store[0]), "--patch-size", "32", "--batch-size",
                 "4", "--steps", "12", "--workers", "0,2")
    here, workers = table(report)
    assert (here["workers"], here["batches timed"]) == ("0", "11")  # the first batch is not timed
    assert (workers["workers"], workers["batches timed"]) == ("2", "8")  # nor the 2 x 2 the workers drew at start
    for row, timed in ((here, 11), (workers, 8)):
        assert float(row["patches/s"]) == pytest.approx(timed * 4 / positive(row["s"]), rel=0.02)
    assert float(workers["patches/s per drawing process"]) == pytest.approx(float(workers["patches/s"]) / 2, rel=0.02)
    assert "3 channels (EM + 2 classes of" in report


def test_the_gpu_check_runs_every_step_and_writes_one_report(toy_store, tmp_path):
    """On a CPU with tiny sizes (GPU_CHECK_DEVICE=cpu): what the script does on a GPU machine, but for CUDA."""
    report = tmp_path / "check" / "gpu-check.md"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "EMSERVE_PYTHON": sys.executable,
           "GPU_CHECK_STORE": str(toy_store[0]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), str(report)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    steps = table(text.split("GPU-marked tests:")[0])
    assert [(r["step"], r["result"]) for r in steps] == [
        (name, "passed") for name in ("GPU-marked tests", "denoiser benchmark", "sampling benchmark",
                                      "input-pipeline benchmark", "service-load benchmark")]
    assert "skipped" in text.split("GPU-marked tests:")[1].split("##")[0]  # no CUDA here: said, not hidden
    for title in ("## Denoiser speed: tiny", "## Sampling speed: tiny", "## Training input pipeline",
                  "## Service load"):
        assert title in text
    assert (tmp_path / "check" / "gpu-check.log").is_file()


@pytest.mark.parametrize("module", ["benchmarks.denoiser", "benchmarks.sampling"])
def test_triton_without_a_server_url_or_with_reexport_is_refused_before_any_export(module, tmp_path):
    refusals = [((), "--backends: triton needs --triton-url"),
                (("--triton-url", "grpc://127.0.0.1:1/m", "--reexport"),
                 "--reexport: the triton backend times the server's own graphs")]
    for extra, message in refusals:
        done = subprocess.run([sys.executable, "-m", module, *TINY, "--backends", "onnx,triton", "--workdir",
                               str(tmp_path), *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr
        assert not any(tmp_path.iterdir())  # nothing exported

"""Triton for real: a Triton Inference Server on 127.0.0.1 serves a model repository written by `emserve export`,
and the sampling loop drives it through tritonclient over HTTP and gRPC; the samples are those of local ONNX
Runtime and of eager torch on the same weights.

The server is PyTriton's bundled tritonserver, with tests/triton_server.py in the onnxruntime backend's place.
PyTriton needs numpy<2, so it lives in its own virtualenv, built by the fixture below with pip (40-90 s on a
clean machine, while the model is exported) and kept under ~/.cache/emserve-test-triton-venv/ keyed by the
Python and package versions (EMSERVE_TRITON_VENV_CACHE moves it). Tests that need the server are skipped,
saying why, only where that virtualenv cannot be installed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from service_server import free_ports  # beside this file

from emserve.card import ModelCard
from emserve.pipelines import GenerationRequest, generate
from emserve.runtime.triton_config import write_triton_config

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed: pip install 'tritonclient[grpc,http]'")
pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed: pip install 'tritonclient[grpc,http]'")

from checkpoints import tiny_unet

from emserve.runtime.triton import TritonRuntime, from_url

pytestmark = pytest.mark.slow  # real servers, exports or training runs: `make test` runs it, `make check` not

SERVER_SCRIPT = Path(__file__).with_name("triton_server.py")
SERVER_PACKAGES = ("nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0")
CLASSES = ["mito_mem", "ld_lum"]
BATCHED, UNBATCHED = "denoiser", "denoiser-unbatched"  # config.pbtxt max_batch_size 32 (emserve's default) and 0
REQUEST = GenerationRequest(samples=3, seed=11, steps=4, guidance=2.5, present=("mito_mem",), absent=("ld_lum",),
                            dataset="b", batch_size=2)


# ---- fixtures: a tiny exported denoiser, a virtualenv with PyTriton, a running server -------------------------

def make_checkpoint(run_dir: Path) -> Path:
    """A real training checkpoint of a tiny conditional pairs denoiser with random weights."""
    import torch

    from training.checkpoint import TrainingState, save_checkpoint

    torch.manual_seed(0)
    model = tiny_unet(1 + len(CLASSES), 1 + len(CLASSES), timestep=True, num_classes=len(CLASSES), num_datasets=2)
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)  # the head starts at zero: make the output depend on x
    card = tiny_card(model.config.to_dict())
    state = TrainingState(step=1, ranks=[], losses=[])
    return save_checkpoint(run_dir, card, model, model, torch.optim.AdamW(model.parameters()), state)


def tiny_card(unet_config: dict) -> ModelCard:
    return ModelCard(mode="pairs", classes=CLASSES, patch_size=16, unet=unet_config, datasets=["a", "b"],
                     class_condition=True)


def export_repository(root: Path) -> tuple[Path, Path]:
    """(checkpoint, model repository): the checkpoint exported as BATCHED, and a copy configured as UNBATCHED."""
    from training.export import export_model

    checkpoint = make_checkpoint(root / "runs" / BATCHED)
    repository = root / "models"
    folder = export_model(checkpoint, repository, name=BATCHED, exporter="legacy")  # dynamo: test_export.py
    other = repository / UNBATCHED
    (other / "1").mkdir(parents=True)
    for file in ("card.json", "1/model.onnx"):
        shutil.copy(folder / file, other / file)
    write_triton_config(other, ModelCard.load(folder), UNBATCHED, max_batch_size=0)
    return checkpoint, repository


def report(config, line: str) -> None:
    """A line in pytest's own output (not captured), so timings and skips are visible in CI logs."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"test_triton: {line}")


def start_server_venv(log: Path) -> tuple[Path, subprocess.Popen | None]:
    """The cached virtualenv, or a process building it in a temporary folder beside the cache (runs meanwhile)."""
    key = hashlib.sha256(repr((sys.version, SERVER_PACKAGES)).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("EMSERVE_TRITON_VENV_CACHE", "~/.cache/emserve-test-triton-venv")).expanduser()
    venv = cache / f"py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    if (venv / "complete").exists():
        return venv, None
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{venv.name}.building-", dir=cache))
    python, packages = shlex.quote(str(building / "bin" / "python")), " ".join(map(shlex.quote, SERVER_PACKAGES))
    script = (f"{shlex.quote(sys.executable)} -m venv --clear {shlex.quote(str(building))} && "
              f"{python} -m pip install -q --disable-pip-version-check {packages} && "
              f"{python} -c 'import pytriton.triton, onnxruntime'")
    with open(log, "w") as out:
        return building, subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)


def finish_server_venv(building: Path, process: subprocess.Popen, log: Path) -> Path:
    """Wait for the build; move it into the cache atomically (a concurrent build may have won), or skip."""
    venv = building.parent / building.name.split(".building-")[0]
    try:
        code = process.wait(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "timeout after 900 s"
    if code != 0:
        shutil.rmtree(building, ignore_errors=True)
        tail = " | ".join(line for line in log.read_text().splitlines()[-6:] if line.strip())
        pytest.skip(f"the PyTriton server cannot be installed here: `pip install {' '.join(SERVER_PACKAGES)}` "
                    f"in a new virtualenv failed ({code}): {tail}")
    (building / "complete").touch()
    try:
        building.rename(venv)
    except OSError:  # another run finished first: use its copy
        shutil.rmtree(building, ignore_errors=True)
    return venv


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """A Triton server (HTTP and gRPC on 127.0.0.1) hosting a tiny exported denoiser; SIGTERM at teardown."""
    tmp = tmp_path_factory.mktemp("triton")
    start = time.perf_counter()
    building, build = start_server_venv(tmp / "venv.log")
    try:
        checkpoint, repository = export_repository(tmp)
    except BaseException:
        if build is not None:
            build.kill()
            build.wait()
            shutil.rmtree(building, ignore_errors=True)
        raise
    exported = time.perf_counter() - start
    venv = finish_server_venv(building, build, tmp / "venv.log") if build is not None else building
    installed = time.perf_counter() - start
    how = f"built with pip, ready {installed:.1f} s after the start" if build is not None else "reused from the cache"
    report(request.config, f"export {exported:.1f} s; PyTriton virtualenv {how}: {venv}")

    python = venv / "bin" / "python"
    libdir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "PYTRITON_HOME": str(tmp / "pytriton-home"),  # nothing piles up in ~/.cache/pytriton
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))}
    http, grpc = free_ports(2)
    log, ready = tmp / "server.log", tmp / "ready"
    command = [python, SERVER_SCRIPT, repository, "--http-port", http, "--grpc-port", grpc, "--workspace",
               tmp / "workspace", "--ready-file", ready]
    with open(log, "w") as out:
        server = subprocess.Popen(list(map(str, command)), stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # its own process group: tritonserver goes with it
    try:
        started, deadline = time.perf_counter(), time.perf_counter() + 120
        while not ready.exists():  # not the printed "ready": tritonserver's own output can splice into that line
            if server.poll() is not None or time.perf_counter() > deadline:
                pytest.fail(f"the Triton server did not start (exit {server.poll()}); its log {log} ends:\n"
                            + "\n".join(log.read_text().splitlines()[-20:]))
            time.sleep(0.2)
        report(request.config, f"Triton server ready in {time.perf_counter() - started:.1f} s "
                               f"(HTTP 127.0.0.1:{http}, gRPC 127.0.0.1:{grpc})")
        yield SimpleNamespace(card=ModelCard.load(repository / BATCHED), checkpoint=checkpoint, repository=repository,
                              urls={"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def references(served):
    """The request's samples from local ONNX Runtime (the exported folder) and from eager torch (the checkpoint)."""
    from emserve.runtime.load import load_runtime
    from emserve.runtime.onnx import OnnxRuntime

    with OnnxRuntime(served.repository / BATCHED, device="cpu") as runtime:
        onnx = samples(served.card, runtime)
    eager = load_runtime(served.checkpoint, "torch", device="cpu")
    return {"onnxruntime": onnx, "torch": samples(served.card, eager)}


def samples(card: ModelCard, denoise) -> np.ndarray:
    return np.concatenate([batch.samples for batch in generate(card, denoise, REQUEST)])


# ---- tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [BATCHED, UNBATCHED])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sampling_through_triton_gives_the_samples_of_local_onnxruntime_and_torch(served, references, protocol,
                                                                                  model):
    with TritonRuntime(served.urls[protocol], model, served.card, protocol=protocol) as runtime:
        assert runtime.max_batch == (32 if model == BATCHED else None)  # the server's max_batch_size
        got = samples(served.card, runtime)
    assert got.shape == (REQUEST.samples, 3, 16, 16)
    np.testing.assert_allclose(got, references["onnxruntime"], atol=1e-5)
    np.testing.assert_allclose(got, references["torch"], atol=1e-4)
    assert not np.allclose(got, samples(served.card, lambda x, t, cond: np.zeros_like(x)), atol=1e-2)


def test_a_model_url_gives_the_same_runtime_and_calls_are_split_to_max_batch(served, references):
    url = f"grpc://{served.urls['grpc']}/{BATCHED}/1"
    with from_url(url, card=served.repository / BATCHED, max_batch=3) as runtime:
        assert (runtime.model_name, runtime.model_version, runtime.max_batch) == (BATCHED, "1", 3)
        np.testing.assert_allclose(samples(served.card, runtime), references["onnxruntime"], atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inputs_that_disagree_with_the_card_are_refused_before_any_request(served, protocol, monkeypatch):
    runtime = TritonRuntime(served.urls[protocol], BATCHED, served.card, protocol=protocol)

    def no_request(*args, **kwargs):
        raise AssertionError("a request was sent")

    monkeypatch.setattr(runtime._client, "infer", no_request)
    x, t = np.zeros((2, 3, 16, 16), np.float32), np.zeros(2, np.float32)
    cond = {"classes": np.zeros((2, 2), np.float32), "dataset": np.zeros(2, np.int64)}
    with pytest.raises(ValueError, match=r"x: shape \(2, 1, 16, 16\); this model takes \[B, 3, H, W\]"):
        runtime(x[:, :1], t, cond)
    with pytest.raises(ValueError, match="dataset: missing; this model needs it"):
        runtime(x, t, {"classes": cond["classes"]})
    with pytest.raises(ValueError, match=r"classes: shape \(2, 3\); this model wants \(2, 2\)"):
        runtime(x, t, {**cond, "classes": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"dataset: ids must be in \[-1, 2\)"):
        runtime(x, t, {**cond, "dataset": np.array([0, 5])})
    runtime.close()


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_the_service_runs_its_models_on_the_triton_server_of_its_url(served, tmp_path, scheme):
    import io

    import httpx
    from service_server import serve

    from emserve.pictures import raw_to_uint8
    from emserve.pipelines import split_channels
    from emserve.runtime.onnx import OnnxRuntime

    body = {"samples": REQUEST.samples, "seed": REQUEST.seed, "steps": REQUEST.steps, "guidance": REQUEST.guidance,
            "present": list(REQUEST.present), "absent": list(REQUEST.absent), "dataset": REQUEST.dataset,
            "model": BATCHED}
    env = {"EMSERVE_TRITON_URL": f"{scheme}://{served.urls[scheme]}"}
    with serve(served.repository, tmp_path, env) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        described = {m["name"]: m for m in client.post("/models", json={}).json()}
        response = client.post("/generate_pairs", json=body)
    assert {n: m["backend"] for n, m in described.items()} == {BATCHED: "triton", UNBATCHED: "triton"}
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as data:
        em, labels = data["em"], data["labels"]

    with OnnxRuntime(served.repository / BATCHED, device="cpu") as runtime:  # the same graph, in-process
        raw, masks = zip(*(split_channels(served.card, batch, REQUEST)
                           for batch in generate(served.card, runtime, REQUEST)), strict=True)
    local_em = raw_to_uint8(np.concatenate(raw))
    assert em.shape == local_em.shape == (REQUEST.samples, 16, 16)
    assert np.abs(em.astype(int) - local_em).max() <= 1  # float32 on two runtimes, rounded to uint8
    assert (labels == np.concatenate(masks)).mean() > 0.999


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_denoiser_benchmark_times_the_model_on_the_triton_server_beside_local_onnxruntime(served, protocol):
    from test_benchmarks import fact, positive, run, table

    url = f"{protocol}://{served.urls[protocol]}/{BATCHED}"
    report = run("benchmarks.denoiser", "--model", str(served.repository / BATCHED), "--backends", "onnx,triton",
                 "--triton-url", url, "--batches", "1,4", "--warmup", "1", "--repeats", "2", "--peak-size", "64",
                 "--threads", "1")
    rows = table(report)
    assert [(r["backend"], r["device"], int(r["batch"])) for r in rows] == [
        ("onnx", "cpu", 1), ("onnx", "cpu", 4), ("triton", "triton server", 1), ("triton", "triton server", 4)]
    for row in rows:
        assert positive(row["ms per sample"]) == pytest.approx(positive(row["ms per call"]) / int(row["batch"]),
                                                               rel=0.02)
        assert (row["% of peak"] == "-") == (row["backend"] == "triton")  # the server's peak is not measured
    assert fact(report, "triton").startswith(url)
    assert "on triton server" not in fact(report, "peak")


def test_a_served_model_that_disagrees_with_the_card_is_refused_at_connection(served):
    unet = {**served.card.unet, "in_channels": 4, "out_channels": 4, "num_classes": 3}
    other = ModelCard(mode="pairs", classes=[*CLASSES, "er_lum"], patch_size=16, unet=unet, class_condition=True)
    for model in (BATCHED, UNBATCHED):
        with pytest.raises(ValueError, match=rf"model '{model}' on the Triton server at .* does not match the model "
                                             rf"card: inputs are \['classes', 'dataset', 't', 'x'\]; the card's are "
                                             rf"\['classes', 't', 'x'\]; input 'x' is FP32 \[-1, 3, -1, -1\]; the "
                                             rf"card says FP32 \[-1, 4, -1, -1\]; input 'classes'"):
            TritonRuntime(served.urls["grpc"], model, other, protocol="grpc")
    with pytest.raises(RuntimeError, match=r"model 'elsewhere' on the Triton server at .* is not ready"):
        TritonRuntime(served.urls["http"], "elsewhere", served.card)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unreachable_server_gives_a_clear_error_and_no_hang(protocol):
    (port,) = free_ports()  # nothing listens there
    card = tiny_card({"in_channels": 3, "out_channels": 3, "multipliers": [1, 2], "timestep": True})
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=rf"cannot reach the server at 127.0.0.1:{port} over {protocol} "
                                              rf"\(waited at most 3 s\)"):
        from_url(f"{protocol}://127.0.0.1:{port}/{BATCHED}", card=card, connect_timeout=3)
    assert time.perf_counter() - start < 60  # a guard against hanging, not a speed test


def test_bad_protocols_and_urls_are_refused():
    card = tiny_card({"in_channels": 3, "out_channels": 3, "multipliers": [1, 2], "timestep": True})
    with pytest.raises(ValueError, match="protocol: 'tcp' is not allowed; choose one of http, grpc"):
        TritonRuntime("127.0.0.1:1", BATCHED, card, protocol="tcp")
    for url in ("tcp://127.0.0.1:1/m", "http://127.0.0.1:1", "grpc:///m", "http://h:1/m/1/x"):
        with pytest.raises(ValueError, match="is not a Triton model URL; expected http://host:port/model"):
            from_url(url, card=card)

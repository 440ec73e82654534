"""A real `bentoml serve` of emserve.serving.service on 127.0.0.1, over a models folder of tiny exported models.

Used by tests/test_service.py and benchmarks/service_load.py. The server runs in its own process group with a
temporary BENTOML_HOME, no tracking, one ONNX Runtime thread, and is stopped with SIGTERM (SIGKILL after 20 s).
On Linux it also gets SIGTERM when the process that started it dies, even by SIGKILL, so no server outlives its
test run or benchmark.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BENTOML = Path(sys.executable).with_name("bentoml")


def make_models(root: Path) -> Path:
    """root/models with tiny random-weight models of the three served modes (patch 16, classes mito_mem, ld_lum):
    tiny-pairs (class presence + datasets a, b), tiny-from-labels (label maps + datasets), tiny-seg and
    tiny-seg-depth3 (reads 3 sections)."""
    from checkpoints import make_checkpoint  # beside this file (tests/ is on sys.path for pytest and the benchmark)

    from training.export import export_model

    models = root / "models"
    specs = {"tiny-pairs": ("pairs", {"num_classes": 2, "num_datasets": 2}),
             "tiny-from-labels": ("em-from-labels", {"label_channels": 2, "num_datasets": 2}),
             "tiny-seg": ("segmentation", {}), "tiny-seg-depth3": ("segmentation", {"depth": 3})}
    for seed, (name, (mode, unet)) in enumerate(specs.items()):
        checkpoint = make_checkpoint(root / "runs" / name, mode, seed=seed, **unet)
        export_model(checkpoint, models, name=name, exporter="legacy")
    return models


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports that were free a moment ago (all held open together, so none repeats). Another
    process may still take one before the server binds it: `serve` retries on a new port when that happens."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    verify: str | bool = True  # what httpx checks the server's certificate against (https)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def serve(models: Path, home: Path, env: Mapping[str, str] | None = None, timeout: float = 90.0,
          bentoml: Path = BENTOML, cwd: Path = REPO, tls: tuple[Path, Path] | None = None) -> Iterator[Server]:
    """`bentoml serve emserve.serving.service:EMServe` until the block ends; ready when /readyz answers 200. `bentoml`
    and `cwd` choose another installation (a virtualenv laid out like the container's) and working folder; `tls`
    (certificate, key) serves https, configured as docs/SERVICE.md says (BENTOML_CONFIG_OPTIONS).

    The port is picked free and then bound by the server, and bentoml reserves ports of its own in between, so
    one may be taken in that gap: a server that exits with "Address already in use" is started again on
    another port (at most three tries)."""
    environment = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                   "EMSERVE_MODELS": str(models), "EMSERVE_ORT_THREADS": "1", "OMP_NUM_THREADS": "1",
                   **(env or {})}
    if tls:
        environment["BENTOML_CONFIG_OPTIONS"] = tls_options(*tls)
    for attempt in range(3):
        (port,) = free_ports()
        log = home / f"server-{port}.log"
        command = [str(bentoml), "serve", "emserve.serving.service:EMServe", "--host", "127.0.0.1", "--port", str(port)]
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=_die_with_parent)
        server = Server(f"{'https' if tls else 'http'}://127.0.0.1:{port}", process, log, str(tls[0]) if tls else True)
        try:
            wait_ready(server, timeout)
        except RuntimeError:
            stop(process)
            if attempt < 2 and "Address already in use" in log.read_text(errors="replace"):
                continue
            raise
        break
    try:
        yield server
    finally:
        stop(process)


def tls_options(certificate: Path, key: Path) -> str:
    """BentoML's own TLS, switched on for the emserve service by configuration overrides."""
    return (f"services.emserve.ssl.enabled=true services.emserve.ssl.certfile={certificate} "
            f"services.emserve.ssl.keyfile={key}")


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {server.process.returncode}:\n{server.tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2, verify=server.verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"bentoml serve was not ready within {timeout:.0f} s:\n{server.tail()}")


def peak_memory(server: Server) -> int:
    """Bytes of peak resident memory (VmHWM of /proc/<pid>/status) of the server's processes, summed."""
    import psutil

    leader = psutil.Process(server.process.pid)
    return sum(int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{process.pid}/status").read_text())[1]) << 10
               for process in [leader, *leader.children(recursive=True)])


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

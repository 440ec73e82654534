"""Load test of the BentoML service: N concurrent clients calling one endpoint for a while, against the same
call in-process, to see what serving costs.

    python benchmarks/service_load.py                                   # models/, 16 clients, 60 s
    python benchmarks/service_load.py --clients 4 --duration 10 --steps 5 --json out/load.json
    python benchmarks/service_load.py --url http://127.0.0.1:3000       # a server already running
    python benchmarks/service_load.py --clients 64 --duration 60        # overload: past the queue, 503 at once

Without --url it starts `bentoml serve emserve.serving.service:EMServe` on 127.0.0.1 over --models (the helper of
the tests, tests/service_server.py) and stops it afterwards. Reported: requests and samples per second, latency
p50/p95/p99 (one client alone, then all clients at once), every answer by status (refusals by admission control,
503/429, with their own latency; clients wait the Retry-After they are told), the slowest answer, errors, the
server's resident memory (its process tree) before, every second under load, and after, and the same
generate_pairs request run in this process with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np

from emserve.card import ModelCard
from emserve.diffusion import DEFAULT_STEPS
from emserve.pipelines import GenerationRequest, generate
from emserve.runtime.onnx import OnnxRuntime

REPO = Path(__file__).resolve().parent.parent


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    p50, p95, p99 = np.percentile(np.array(seconds) * 1000, [50, 95, 99])
    return {"p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1)}


def server_rss(pid: int | None) -> int | None:
    """Resident bytes of a process and its children (BentoML runs the service in a worker process)."""
    if pid is None:
        return None
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def run_clients(url: str, body: dict, clients: int, duration: float, headers: dict[str, str]) -> dict:
    """`clients` threads, each posting `body` in a loop until `duration` has passed. Every answer is tallied by
    status with its latency: served (200), refused by admission (503 / 429, after which the client waits the
    Retry-After it was told, as a well-behaved client does) and anything else (a 5xx is a failure of the server,
    a client error one of this script)."""
    answers: dict[str, list[float]] = {}
    others: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + duration

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max(60.0, duration * 2), headers=headers) as session:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                response = session.post("/generate_pairs", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    answers.setdefault(str(response.status_code), []).append(elapsed)
                    if response.status_code not in (200, 429, 503):
                        others.append(f"{response.status_code} {response.text[:120]}")
                if response.status_code in (429, 503):
                    wait = float(response.headers.get("retry-after", 1))
                    time.sleep(max(0.0, min(wait, stop - time.perf_counter())))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    served = answers.get("200", [])
    refused = answers.get("503", []) + answers.get("429", [])
    every = [s for seconds in answers.values() for s in seconds]
    return {"clients": clients, "wall_s": round(wall, 2), "answers": {k: len(v) for k, v in sorted(answers.items())},
            "requests": len(served), "errors": len(others), "first_errors": others[:3],
            "server_errors": sum(len(v) for k, v in answers.items() if k.startswith("5") and k != "503"),
            "requests_per_s": round(len(served) / wall, 3),
            "samples_per_s": round(len(served) * body["samples"] / wall, 2),
            **percentiles(served), "refused": {"count": len(refused), **percentiles(refused)},
            "slowest_answer_s": round(max(every), 2) if every else None}


def in_process(model: Path, body: dict, repeats: int, threads: int | None) -> dict:
    """The same request through emserve.pipelines.generate on ONNX Runtime in this process."""
    card = ModelCard.load(model)
    request = GenerationRequest(**{k: v for k, v in body.items() if k != "model"}, batch_size=8)
    seconds = []
    with OnnxRuntime(model, threads=threads) as runtime:
        list(generate(card, runtime, request))  # warm-up, as solo() does on the server
        for _ in range(repeats):
            start = time.perf_counter()
            list(generate(card, runtime, request))
            seconds.append(time.perf_counter() - start)
    return {"repeats": repeats, "median_ms": round(statistics.median(seconds) * 1000, 1), **percentiles(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start one over --models)")
    parser.add_argument("--models", type=Path, default=REPO / "models", help="models folder to serve")
    parser.add_argument("--model", default="phantom-pairs", help="the pairs model to call (folder name)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of concurrent load")
    parser.add_argument("--solo", type=int, default=5, help="requests of one client alone (and in-process repeats)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps (the service's default)")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="EMSERVE_THREADS of a started server")
    parser.add_argument("--queue", type=int, help="EMSERVE_MAX_QUEUE of a started server (default: the service's)")
    parser.add_argument("--ort-threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads of each session, on the server and in-process")
    parser.add_argument("--api-key", help="sent as X-API-Key")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    body = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance, "seed": 0, "model": args.model}
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    env = {"EMSERVE_THREADS": str(args.threads), "EMSERVE_MAX_SAMPLES": str(max(32, args.samples)),
           "EMSERVE_ORT_THREADS": str(args.ort_threads)}
    if args.queue:
        env["EMSERVE_MAX_QUEUE"] = str(args.queue)
    sys.path.insert(0, str(REPO / "tests"))
    from service_server import serve  # the tests' helper: `bentoml serve` on a free port, stopped at the end

    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the started server is stopped; SIGKILL: see service_server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    report: dict = {"request": body, "in_process": in_process(args.models / args.model, body, max(args.solo, 1),
                                                              args.ort_threads)}
    with ExitStack() as stack:
        url, pid = args.url, None
        if url is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emserve-load-")))
            server = stack.enter_context(serve(args.models.resolve(), home, env))
            url, pid = server.url, server.process.pid
        report.update(url=url, server_rss_before_mb=mb(server_rss(pid)))
        report["one_client"] = solo(url, body, max(args.solo, 1), headers)
        with sample_rss(pid) as series:
            report["concurrent"] = run_clients(url, body, args.clients, args.duration, headers)
        report["server_rss_during_mb"] = series
        report["server_rss_after_mb"] = mb(server_rss(pid))
    report["overhead_p50_ms"] = round(report["one_client"].get("p50_ms", float("nan"))
                                      - report["in_process"]["p50_ms"], 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def solo(url: str, body: dict, requests: int, headers: dict[str, str]) -> dict:
    """One client, `requests` calls in a row: the latency without queueing."""
    seconds = []
    with httpx.Client(base_url=url, timeout=300, headers=headers) as session:
        session.post("/generate_pairs", json=body).raise_for_status()  # warm-up: first-call costs are not serving's
        for _ in range(requests):
            start = time.perf_counter()
            response = session.post("/generate_pairs", json=body)
            response.raise_for_status()
            seconds.append(time.perf_counter() - start)
    return {"requests": requests, **percentiles(seconds)}


@contextmanager
def sample_rss(pid: int | None, every: float = 1.0) -> Iterator[list[float]]:
    """The server's resident memory in MB once per `every` seconds while the block runs (empty without a pid):
    memory that keeps growing under steady load shows as a rising series, not only as before != after."""
    series: list[float] = []
    if pid is None:
        yield series
        return
    import psutil

    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            try:
                series.append(mb(server_rss(pid)))
            except psutil.NoSuchProcess:  # a worker exited between listing and reading: skip this reading
                continue

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield series
    finally:
        done.set()
        thread.join()


def mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


if __name__ == "__main__":
    main()

"""Fuzz a real `bentoml serve`: schemathesis cases over every endpoint of its OpenAPI schema, then the hand-written
corpus of hostile files (tests/test_uploads.py's HOSTILE: bombs of every format the service decodes, malformed
archives, codecs that are not allowed) to `segment`, then a good request.

    python benchmarks/fuzz_service.py                         # 100 cases per operation: >= 1,000 in all
    python benchmarks/fuzz_service.py --examples 5 --json runs/fuzz.json

The server runs over tiny random-weight models (the tests' helper, tests/service_server.py: three served modes,
patch 16), so what is exercised is the request handling, not the network. Passes when no answer is a server error
(5xx, except 503 with Retry-After: admission control, e.g. a task already running), every hostile file is refused
with its 4xx and message, the server's peak memory grew less than --memory-growth MiB over the run, and a good
request is served at the end. Exits 1 otherwise, after printing the report.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def fuzz(url: str, examples: int, seed: int) -> dict:
    """`examples` schemathesis cases per operation of the server's schema; every answer tallied by status."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    statuses: collections.Counter[str] = collections.Counter()
    per_operation: collections.Counter[str] = collections.Counter()
    failures: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data, strategy):
        case = data.draw(strategy)
        response = case.call(base_url=url, timeout=120)
        statuses[str(response.status_code)] += 1
        per_operation[case.operation.label] += 1
        admitted_later = response.status_code == 503 and "retry-after" in response.headers
        if response.status_code >= 500 and not admitted_later:
            failures.append(f"{case.operation.label}: {response.status_code} {response.text[:200]}")

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        check(strategy=operation.as_strategy())
    return {"operations": len(operations), "cases": sum(per_operation.values()),
            "statuses": dict(sorted(statuses.items())), "per_operation": dict(sorted(per_operation.items())),
            "server_errors": failures}


def hostile(url: str) -> dict:
    """The corpus, each file to `segment`: its status and message against the expected ones."""
    from test_uploads import HOSTILE

    wrong = []
    with httpx.Client(base_url=url, timeout=120) as session:
        for what, make, status, message in HOSTILE:
            response = session.post("/segment", files={"image": ("upload.bin", make())})
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            text = (body[0] if isinstance(body, list) else body).get("error", "") if body else response.text[:200]
            if response.status_code != status or message not in text:
                wrong.append(f"{what}: {response.status_code} {text[:200]} (expected {status} {message!r})")
    return {"files": len(HOSTILE), "wrong": wrong}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="schemathesis cases per operation")
    parser.add_argument("--seed", type=int, default=0, help="0: hypothesis' derandomized cases (a rerun repeats them)")
    parser.add_argument("--memory-growth", type=float, default=256, help="MiB the server's peak memory may grow")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from service_server import make_models, peak_memory, serve

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` stops the started server too
    with tempfile.TemporaryDirectory(prefix="emserve-fuzz-") as folder:
        root = Path(folder)
        with serve(make_models(root), root, {"EMSERVE_MAX_SAMPLES": "8", "EMSERVE_MAX_TASK_SAMPLES": "64",
                                             "EMSERVE_MAX_STEPS": "50", "EMSERVE_MAX_VOXELS": "40000",
                                             "EMSERVE_MAX_UPLOAD_BYTES": "200000"}) as server:
            with httpx.Client(base_url=server.url, timeout=120) as session:  # warm: first-call costs are not growth
                session.post("/generate_pairs", json={"samples": 1, "steps": 2}).raise_for_status()
            before = peak_memory(server)
            report = {"schemathesis": fuzz(server.url, args.examples, args.seed), "hostile": hostile(server.url)}
            grown = (peak_memory(server) - before) / 2**20
            after = httpx.post(f"{server.url}/generate_pairs", json={"samples": 2, "steps": 2}, timeout=120)
    report.update(peak_memory_growth_mib=round(grown, 1), served_after=after.status_code)
    passed = (not report["schemathesis"]["server_errors"] and not report["hostile"]["wrong"]
              and grown < args.memory_growth and after.status_code == 200)
    report["passed"] = passed
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

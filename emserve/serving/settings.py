"""The service's settings, read from the environment when the service module is imported, i.e. when the server
starts (a bad value stops it, naming the variable):

    EMSERVE_MODELS          folder of exported models (default: models/ beside the emserve package, else ./models)
    EMSERVE_TRITON_URL      http://host:port or grpc://host:port: run the graphs on that Triton server instead
    EMSERVE_API_KEY         when set, every request but the probes and metrics needs `Authorization: Bearer <key>`
                            or `X-API-Key: <key>`; set but empty, it stops the server
    EMSERVE_THREADS         requests computed at once per worker (default 2); EMSERVE_ORT_THREADS: intra-op
                            threads per ONNX Runtime session (default: one per core)
    EMSERVE_MEMORY_BUDGET   most memory one model call may take, e.g. 4GiB (the default): bigger batches are split
                            into calls that fit, with the same results (emserve.runtime.memory)
    EMSERVE_TIMEOUT         seconds a synchronous request may take from its arrival (default 600): past them it
                            stops at its next sampler step or tile and answers 504
    EMSERVE_TASK_TTL        seconds a task's result is kept after the task ends (default 86400)
    EMSERVE_MAX_*           request limits, the queue and tasks, see Limits
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from emserve.runtime.memory import DEFAULT_MEMORY_BUDGET, parse_bytes
from emserve.serving.uploads import UploadLimits

MODELS_ENV, TRITON_ENV, API_KEY_ENV = "EMSERVE_MODELS", "EMSERVE_TRITON_URL", "EMSERVE_API_KEY"
MEMORY_ENV = "EMSERVE_MEMORY_BUDGET"


def env_int(name: str, default: int) -> int:
    """A positive integer setting from the environment; a bad value stops the server with the variable named."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}: {value} must be at least 1")
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many requests the server holds; each field is overridden by
    EMSERVE_MAX_<FIELD> (e.g. EMSERVE_MAX_SAMPLES). Work is bounded as well as input: tiles and samples x steps
    count what a request will run, so a small upload cannot ask for minutes of computing."""

    samples: int = 32  # samples per synchronous request
    task_samples: int = 1024  # samples per generate_pairs_task
    steps: int = 250  # sampler steps
    guidance: int = 20  # guidance scale in [0, guidance]
    upload_bytes: int = 64 << 20  # bytes of one uploaded file
    json_bytes: int = 64 << 10  # bytes of a JSON (or urlencoded) body: all 48 class names as present and absent
    #                             take under 1 KiB
    voxels: int = 1 << 24  # voxels of one uploaded array (and of a zipped upload's arrays, unzipped)
    tile: int = 1024  # segmentation tile edge
    tiles: int = 1 << 16  # network tiles per segment request (per-call overhead: tiny tiles at stride 1)
    tile_voxels: int = 1 << 26  # tiles x tile^2 per segment request (compute: large tiles overlapping much); the
    #                             largest upload at the default overlap (a quarter tile) takes less than 2x its voxels
    sample_steps: int = 2048  # samples x sampler steps per synchronous generation request (tasks take more)
    queue: int = 32  # requests in the server at once, computing or waiting for a thread; more are answered 503
    tasks: int = 1  # submitted tasks running at once (each holds one of EMSERVE_THREADS until it ends)
    task_results: int = 64  # task results stored (until EMSERVE_TASK_TTL after their task ended) or being made

    @classmethod
    def from_env(cls) -> Limits:
        return cls(**{f.name: env_int(f"EMSERVE_MAX_{f.name.upper()}", f.default) for f in fields(cls)})

    @property
    def upload(self) -> UploadLimits:
        return UploadLimits(self.upload_bytes, self.voxels)


LIMITS = Limits.from_env()
TIMEOUT = env_int("EMSERVE_TIMEOUT", 600)
TASK_TTL = env_int("EMSERVE_TASK_TTL", 24 * 3600)
MEMORY_BUDGET = parse_bytes(os.environ.get(MEMORY_ENV, DEFAULT_MEMORY_BUDGET), MEMORY_ENV)  # bad: no server
# Concurrent requests' denoiser calls merged into one backend call (emserve.runtime.batching), waiting at most
# EMSERVE_BATCH_WAIT_MS for company, up to EMSERVE_BATCH_SAMPLES samples per call: for GPUs, where a call of 32
# costs little more than one of 4. Unset: every request calls the backend on its own (CPU serving).
BATCH_WAIT_MS = env_int("EMSERVE_BATCH_WAIT_MS", 0)
BATCH_SAMPLES = env_int("EMSERVE_BATCH_SAMPLES", 64)


def api_key() -> str | None:
    """EMSERVE_API_KEY, or None when it is unset. Set but empty or blank, it stops the server rather than turning
    authentication off; surrounding whitespace too, since HTTP strips it from the header that would carry it."""
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"{API_KEY_ENV}: set but empty; set a key, or unset the variable to serve without "
                         f"authentication")
    if key is not None and key != key.strip():
        raise ValueError(f"{API_KEY_ENV}: the key begins or ends with whitespace, which no HTTP header carries; "
                         f"remove it")
    return key

"""Concurrent requests' denoiser calls merged into one backend call, as Triton's dynamic batching does for its own
models: an accelerator runs one call of 32 samples in about the time of one of 4, so a service whose requests
each sample a few images at a time gains throughput by stacking them.

A `MicroBatcher` wraps a Runtime and is itself a `Denoise` callable: each caller's arrays are checked against the
card, queued, and a worker thread gathers what arrives within `max_wait_s` (up to `max_samples`), concatenates the
calls that fit together (same spatial size and conditions), runs them as one and hands each caller its rows. A
sample stays a function of its seed: every sample in a batch is computed independently of the others (GroupNorm,
no BatchNorm; `Runtime`), so merging changes which calls run, not what comes out (within float rounding of the
backend's kernels at another batch size).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from emserve.runtime.base import Runtime, check_inputs


@dataclass
class _Call:
    x: np.ndarray
    t: np.ndarray | None
    cond: dict[str, np.ndarray]
    done: threading.Event = field(default_factory=threading.Event)
    out: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def key(self) -> tuple:
        """What calls must share to be stacked: the sample shape and each condition's per-sample shape."""
        return (self.x.shape[1:], self.t is None, tuple(sorted((k, v.shape[1:]) for k, v in self.cond.items())))


class MicroBatcher:
    """See the module docstring. `calls` counts the backend calls made (for tests and benchmarks)."""

    def __init__(self, runtime: Runtime, max_samples: int = 64, max_wait_s: float = 0.002) -> None:
        if max_samples < 1 or max_wait_s < 0:
            raise ValueError(f"batching: max_samples {max_samples} must be >= 1 and max_wait_s {max_wait_s} >= 0")
        self.runtime, self.card = runtime, runtime.card
        self.max_samples, self.max_wait_s = max_samples, max_wait_s
        self.calls = 0
        self._queue: queue.Queue[_Call | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="emserve-batcher", daemon=True)
        self._worker.start()

    def __call__(self, x: np.ndarray, t: np.ndarray | None = None,
                 cond: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        call = _Call(np.asarray(x), None if t is None else np.asarray(t),
                     {k: np.asarray(v) for k, v in (cond or {}).items()})
        check_inputs(self.card, call.x, call.t, call.cond)  # a bad request fails alone, never a merged batch
        self._queue.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.out

    def close(self) -> None:
        """Stop the worker (calls still queued are served first)."""
        self._queue.put(None)
        self._worker.join()

    def _serve(self) -> None:
        pending: list[_Call] = []
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending.append(first)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while sum(len(c.x) for c in pending) < self.max_samples:
                try:
                    more = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                pending.append(more)
            while pending:
                group = [c for c in pending if c.key == pending[0].key]
                pending = [c for c in pending if c.key != pending[0].key]
                self._run(group)
            if stop:
                return

    def _run(self, group: list[_Call]) -> None:
        try:
            cond = {k: np.concatenate([c.cond[k] for c in group]) for k in group[0].cond}
            t = None if group[0].t is None else np.concatenate([c.t for c in group])
            out = self.runtime(np.concatenate([c.x for c in group]), t, cond)
            self.calls += 1
        except BaseException as error:  # handed to every caller of the group
            for call in group:
                call.error = error
                call.done.set()
            return
        start = 0
        for call in group:
            call.out, start = out[start:start + len(call.x)], start + len(call.x)
            call.done.set()

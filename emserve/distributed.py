"""Dask as the engine of blockwise jobs: an embedded LocalCluster on this machine, or a lab's running cluster.

`--scheduler local:N` starts N worker processes here (one thread each, everything on 127.0.0.1, the dashboard on
a free local port); `--scheduler tcp://HOST:PORT` (or tls://) joins a running scheduler, wherever it came from:
dask-jobqueue on LSF or SLURM, dask-kubernetes, dask-cuda with one worker per GPU. Tasks name their inputs and
outputs by path (or s3:// URL), so every worker must see the same file system. emserve schedules nothing itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

SCHEMES = ("tcp://", "tls://")
RETRIES = 2  # a block whose task raised runs again this often (a flaky read); a lost worker's blocks always do


def check_scheduler(value: str) -> str:
    """"" (this process), "local:N" or a scheduler address; anything else is refused naming what is allowed."""
    if not value or value.startswith(SCHEMES):
        return value
    kind, _, count = value.partition(":")
    if kind == "local" and count.isdigit() and int(count) >= 1:
        return value
    raise ValueError(f"scheduler: {value!r} is not allowed; give local:N (N >= 1 worker processes on this machine) "
                     f"or a running scheduler's address tcp://HOST:PORT (or tls://)")


def local_workers(scheduler: str) -> int | None:
    """N of "local:N", else None (this process, or a cluster whose size is not ours to know)."""
    return int(scheduler.partition(":")[2]) if scheduler.startswith("local:") else None


@contextmanager
def dask_client(scheduler: str) -> Iterator[Any]:
    """A `distributed.Client` of `scheduler` (see check_scheduler), closed (and a local cluster stopped) after."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("scheduler: needs dask.distributed; pip install 'emserve[distributed]'") from None
    workers = local_workers(check_scheduler(scheduler))
    if workers is None:
        with Client(scheduler) as client:
            yield client
        return
    import dask

    # Dask sets MALLOC_TRIM_THRESHOLD_ in the workers it spawns, which also turns off glibc's adaptive mmap
    # threshold: every large array of every block is then mapped and zeroed anew, in system time that made the
    # Dask path the slower one (docs/BENCHMARKS.md, blockwise). Our blocks bound a worker's memory, so local
    # workers allocate as this process does; a running cluster keeps its own settings.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


def run_tasks(task: Callable[[Any], Any], items: Sequence[Any], client: Any = None,
              name: str = "task") -> Iterator[tuple[Any, Any]]:
    """(item, task(item)) for each item as its task finishes: here, one after the other, or given a client on its
    cluster. The first task that fails for good cancels the rest and raises its error here."""
    if client is None:
        for item in items:
            yield item, task(item)
        return
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]  # keys unique on a cluster that other jobs share
    futures = client.map(task, items, key=[f"{name}-{run}-{i}" for i in range(len(items))], retries=RETRIES)
    index = {future.key: item for future, item in zip(futures, items, strict=True)}
    try:
        for future in as_completed(futures):
            yield index[future.key], future.result()
    finally:
        client.cancel(futures)

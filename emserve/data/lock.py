"""One writer per store, and the leftovers of killed writers cleared by the next one.

Stores are written by long jobs that can be killed at any moment. A store being extended in place (a resumed
`emserve generate`) holds `<store>/.emserve.lock`, created exclusively and naming its holder (host and pid); a
second writer is refused with that name. A lock whose holder ran on this host and is gone is stale and taken
over; one from another host cannot be judged from here, so the message says which file to remove.

Temporary folders carry their writer's tag (host~pid) in their names, so the next writer deletes those of dead
writers, and only those: a folder another live process is still filling is left alone.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".emserve.lock"


def writer_tag() -> str:
    """This process as a lock holder and in temporary names: host~pid."""
    return f"{socket.gethostname()}~{os.getpid()}"


def is_dead(tag: str) -> bool:
    """Whether the writer `tag` ran on this host and is no longer running (unknown tags count as alive)."""
    host, _, pid = tag.rpartition("~")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold the store's lock for the block; FileExistsError naming the holder if a live writer has it."""
    lock = store / LOCK_NAME
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = lock.read_text().strip()
            except FileNotFoundError:  # released between our two looks: try again
                continue
            if not is_dead(holder):
                raise FileExistsError(f"out: {store} is being written by {holder} (host~pid); wait for it, or "
                                      f"remove {lock} if that process is gone") from None
            lock.unlink(missing_ok=True)  # stale: its holder died on this host
    with os.fdopen(descriptor, "w") as f:
        f.write(writer_tag())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def temporary_name(prefix: str, suffix: str) -> str:
    """`<prefix><writer tag>-<suffix>`: a temporary folder name that says whose it is."""
    return f"{prefix}{writer_tag()}-{suffix}"


def clear_leftovers(folder: Path, prefix: str) -> None:
    """Delete the folders `<prefix><tag>-*` in `folder` (see `temporary_name`) whose writer is dead."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(prefix) and is_dead(path.name.removeprefix(prefix).rpartition("-")[0]):
            shutil.rmtree(path, ignore_errors=True)

"""Shared fixtures: small stores written by our own writer, so tests need no downloads."""

import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from emserve.data.writer import CropToWrite, write_store


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory):
    """Two datasets of EM-like volumes whose intensity follows the labels (mito bright, lipid droplets dark,
    noise on top), each with one labelled crop. Small enough to train tiny models on in seconds."""
    out = tmp_path_factory.mktemp("toy")
    paths = []
    for i, name in enumerate(("toy_a", "toy_b")):
        rng = np.random.default_rng(i)
        shape = (8, 64, 64)
        mito = np.zeros(shape, np.uint8)
        ld = np.zeros(shape, np.uint8)
        yy, xx = np.mgrid[: shape[1], : shape[2]]
        for _ in range(4):
            cy, cx, r = rng.integers(8, 56), rng.integers(8, 56), rng.integers(4, 9)
            mito[:, (yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 1
        ld[:, (yy - 50) ** 2 + (xx - 12) ** 2 < 9] = 1
        mito[ld == 1] = 0
        raw = np.full(shape, 120 + 20 * i, np.float32)
        raw[mito == 1] = 220
        raw[ld == 1] = 30
        raw = (raw + rng.normal(0, 8 + 8 * i, shape)).clip(0, 255).astype(np.uint8)
        crop = CropToWrite("crop1", (0, 0, 0), {"mito_mem": mito, "ld_lum": ld})
        paths.append(write_store(out / f"{name}.zarr", raw, (8, 8, 8), [crop]))
    return paths


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is as fast, and does not fight a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dead_writer():
    """The writer tag (host~pid) of a process of this host that has exited, as a killed writer leaves it."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return f"{socket.gethostname()}~{done.stdout.strip()}"

"""kill -9 at random points: `emserve train` and `emserve generate` killed five times each, then resumed, end with
exactly what an uninterrupted run writes. The points come from a seeded generator (so a failure replays): after
a random number of checkpoints or batches, plus a random delay that may land in the middle of writing one."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import CLASSES, make_checkpoint
from safetensors.numpy import load_file

from emserve.data.lock import LOCK_NAME
from emserve.data.store import EMStore
from training import checkpoint as ckpt

pytestmark = pytest.mark.slow  # eleven CLI processes per test: `make test` runs it, `make check` not

KILLS = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same floating-point order in every process


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "emserve.cli", *args]


def kill_when(args: list[str], progress, target: int, delay: float, timeout: float = 120) -> bool:
    """Start `args`, SIGKILL it once `progress()` reaches `target` and `delay` seconds more have passed; False if
    it finished first."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + timeout
        while progress() < target and proc.poll() is None:
            assert time.monotonic() < deadline, f"no progress to {target} in {timeout} s: {args}"
            time.sleep(0.01)
        time.sleep(delay)
        finished = proc.poll() is not None
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    return not finished


def test_training_killed_five_times_resumes_to_the_weights_of_an_uninterrupted_run(toy_store, tmp_path):
    def train(out: Path, *extra: str) -> list[str]:
        return cli("train", "ddpm", *map(str, toy_store), "--out", str(out), "--classes", ",".join(CLASSES),
                   "--patch-size", "16", "--width", "8", "--multipliers", "1,2", "--blocks-per-level", "1",
                   "--batch-size", "2", "--steps", "24", "--checkpoint-every", "2", "--preview-every", "1000",
                   "--device", "cpu", *extra)

    subprocess.run(train(tmp_path / "whole"), check=True, env=ENV, capture_output=True, timeout=300)
    cut = tmp_path / "cut"
    rng = np.random.default_rng(0)

    def step() -> int:
        found = ckpt.checkpoints(cut)
        return int(found[-1].name.removeprefix("step-")) if found else 0

    killed = 0
    for _ in range(KILLS):
        target = min(step() + 2 * int(rng.integers(1, 3)), 22)
        killed += kill_when(train(cut, "--resume"), step, target, float(rng.uniform(0, 0.3)))
    assert killed >= 3, "most kills must land before the run ends"
    subprocess.run(train(cut, "--resume"), check=True, env=ENV, capture_output=True, timeout=300)
    whole, resumed = ckpt.checkpoints(tmp_path / "whole")[-1], ckpt.checkpoints(cut)[-1]
    assert whole.name == resumed.name == "step-00000024"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    losses = [json.loads((p / ckpt.STATE_FILE).read_text())["losses"] for p in (whole, resumed)]
    assert losses[0] == losses[1]


def test_generation_killed_five_times_resumes_to_the_store_of_an_uninterrupted_run(tmp_path):
    model = make_checkpoint(tmp_path / "run", "pairs", num_classes=2, num_datasets=2)

    def generate(out: Path, *extra: str) -> list[str]:
        return cli("generate", "pairs", str(model), str(out), "--samples", "24", "--batch-size", "2", "--steps",
                   "12", "--seed", "5", "--no-screen", "--device", "cpu", *extra)

    subprocess.run(generate(tmp_path / "whole.zarr"), check=True, env=ENV, capture_output=True, timeout=300)
    cut = tmp_path / "cut.zarr"
    rng = np.random.default_rng(1)

    def batches() -> int:
        try:
            return len(EMStore(cut).crops)
        except (FileNotFoundError, ValueError, KeyError):  # not yet there, or between its first writes
            return 0

    killed = 0
    for _ in range(KILLS):
        target = min(batches() + int(rng.integers(1, 3)), 11)
        killed += kill_when(generate(cut, "--resume"), batches, target, float(rng.uniform(0, 0.05)))
    assert killed >= 3, "most kills must land before the run ends"
    subprocess.run(generate(cut, "--resume"), check=True, env=ENV, capture_output=True, timeout=300)
    whole, resumed = EMStore(tmp_path / "whole.zarr"), EMStore(cut)
    assert whole.crops == resumed.crops and len(whole.crops) == 12
    np.testing.assert_array_equal(whole.em_volume(whole.em_level())[...], resumed.em_volume(resumed.em_level())[...])
    for crop in whole.crops:
        a, b = whole.read_crop(crop, CLASSES), resumed.read_crop(crop, CLASSES)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert whole.crop_group(crop).attrs.asdict()["seeds"] == resumed.crop_group(crop).attrs.asdict()["seeds"]
    left = [p.name for p in [*tmp_path.iterdir(), *cut.iterdir()] if ".tmp-" in p.name or ".old-" in p.name
            or p.name in (".staging", LOCK_NAME)]
    assert not left  # what the killed writers left, the next one cleared

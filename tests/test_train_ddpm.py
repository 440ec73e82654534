"""`emserve train ddpm`: the loss falls, resume is exact, checkpoints survive SIGKILL, torchrun works."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from checkpoints import CLASSES, TINY_UNET

from training import checkpoint as ckpt
from training.ddpm import DDPMConfig, train_ddpm

pytestmark = pytest.mark.slow  # real servers, exports or training runs: `make test` runs it, `make check` not

# device cpu: resume is compared loss for loss, which CUDA's non-deterministic kernels would not reproduce
TINY = {**TINY_UNET, "width": 16, "patch_size": 32, "batch_size": 8, "preview_every": 10_000, "device": "cpu"}


def config(toy_store, out, **kw):
    return DDPMConfig(stores=[str(p) for p in toy_store], out=str(out), classes=CLASSES, **{**TINY, **kw})


def losses(run_dir):
    return json.loads((ckpt.checkpoints(run_dir)[-1] / ckpt.STATE_FILE).read_text())["losses"]


def test_pairs_loss_falls_and_the_log_records_speed_and_data_share(toy_store, tmp_path):
    train_ddpm(config(toy_store, tmp_path / "run", steps=60, lr=1e-3, checkpoint_every=60))
    curve = losses(tmp_path / "run")
    assert np.mean(curve[-15:]) < 0.8 * np.mean(curve[:15])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(10, 61, 10))
    for row in log:  # what the benchmarks and models/README.md quote: steps/s and the share spent waiting for data
        assert row["steps_per_s"] > 0 and 0 < row["data_share"] < 1 and np.isfinite(row["loss"])
    assert log[-1]["eta_s"] == 0


@pytest.mark.parametrize("mode", ["em", "labels", "em-from-labels"])
def test_every_mode_trains_and_records_its_conditions(toy_store, tmp_path, mode):
    last = train_ddpm(config(toy_store, tmp_path / mode, mode=mode, steps=3, checkpoint_every=3, preview_every=3))
    card = json.loads((last / "card.json").read_text())
    assert card["mode"] == mode and card["datasets"] == ["toy_a", "toy_b"]
    assert ("label_map" in card["conditions"]) == (mode == "em-from-labels")
    assert ("classes" in card["conditions"]) == (mode != "em")
    assert card["channels"] == {"em": ["raw"], "labels": ["mito_mem", "ld_lum"], "em-from-labels": ["raw"]}[mode]
    assert (tmp_path / mode / "samples" / "step-00000003.png").exists()
    assert np.isfinite(losses(tmp_path / mode)).all()


def test_resume_continues_the_same_loss_curve(toy_store, tmp_path):
    train_ddpm(config(toy_store, tmp_path / "straight", steps=8, checkpoint_every=4))
    train_ddpm(config(toy_store, tmp_path / "split", steps=4, checkpoint_every=4))
    with pytest.raises(FileExistsError, match="--resume"):
        train_ddpm(config(toy_store, tmp_path / "split", steps=8, checkpoint_every=4))
    train_ddpm(config(toy_store, tmp_path / "split", steps=8, checkpoint_every=4), resume=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_batches_drawn_by_worker_processes_are_the_batches_drawn_in_process(toy_store, tmp_path):
    mode = "em-from-labels"  # both samplers: labelled crops and raw-only EM
    train_ddpm(config(toy_store, tmp_path / "here", steps=4, checkpoint_every=4, mode=mode, data_workers=0))
    train_ddpm(config(toy_store, tmp_path / "workers", steps=4, checkpoint_every=4, mode=mode, data_workers=2))
    assert losses(tmp_path / "workers") == losses(tmp_path / "here")
    with pytest.raises(ValueError, match=r"data_workers: -1 is not allowed; allowed: 0 \(draw batches in the "):
        config(toy_store, tmp_path / "bad", data_workers=-1)


def test_the_device_is_checked_with_the_config_naming_what_is_allowed(toy_store, tmp_path):
    with pytest.raises(ValueError, match=r"device: 'gpu' is not allowed; choose one of auto, cuda, cpu"):
        config(toy_store, tmp_path / "run", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device: cuda asked for, but torch sees no CUDA device"):
            config(toy_store, tmp_path / "run", device="cuda")


def test_resume_refuses_a_different_model(toy_store, tmp_path):
    train_ddpm(config(toy_store, tmp_path / "run", steps=2, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"resume: .* unet="):
        train_ddpm(config(toy_store, tmp_path / "run", steps=4, width=8), resume=True)


def test_resume_passes_over_a_corrupt_checkpoint_naming_it_and_continues_the_same_curve(toy_store, tmp_path,
                                                                                         capfd):
    train_ddpm(config(toy_store, tmp_path / "straight", steps=6, checkpoint_every=2))
    last = train_ddpm(config(toy_store, tmp_path / "run", steps=4, checkpoint_every=2))
    weights = last / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    capfd.readouterr()
    train_ddpm(config(toy_store, tmp_path / "run", steps=6, checkpoint_every=2), resume=True)
    assert f"checkpoint: {weights} is missing or corrupt" in capfd.readouterr().err
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    for path in ckpt.checkpoints(tmp_path / "run"):
        (path / ckpt.EMA_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint: none of step-00000004, step-00000006 in .* verifies"):
        train_ddpm(config(toy_store, tmp_path / "run", steps=8, checkpoint_every=2), resume=True)


def test_sigkill_loses_at_most_one_checkpoint_interval(toy_store, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "emserve.cli", "train", "ddpm", *map(str, toy_store), "--out", str(run),
            "--classes", "mito_mem,ld_lum", "--patch-size", "32", "--width", "8", "--multipliers", "1,2",
            "--blocks-per-level", "1", "--batch-size", "2", "--steps", "100000", "--checkpoint-every", "3",
            "--preview-every", "100000", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(ckpt.checkpoints(run)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ckpt.checkpoints(run)) >= 2, "training wrote no checkpoints in 120 s"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for path in ckpt.checkpoints(run):  # every checkpoint left behind is whole
        ckpt.load_checkpoint(path)
    step = json.loads((ckpt.checkpoints(run)[-1] / ckpt.STATE_FILE).read_text())["step"]
    last = train_ddpm(config(toy_store, run, steps=step + 2, width=8, batch_size=2, checkpoint_every=3), resume=True)
    assert json.loads((last / ckpt.STATE_FILE).read_text())["step"] == step + 2


def test_torchrun_data_parallel_with_two_processes(toy_store, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(  # --standalone: torchrun's rendezvous takes a free port itself (no pick-then-bind race)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "emserve.cli", "train", "ddpm", *map(str, toy_store), "--out", str(run),
         "--classes", "mito_mem,ld_lum", "--patch-size", "32", "--width", "8", "--multipliers", "1,2",
         "--blocks-per-level", "1", "--batch-size", "4", "--steps", "4", "--checkpoint-every", "4",
         "--preview-every", "100", "--device", "cpu"],  # two CPU ranks on any machine (a one-GPU machine has no cuda:1)
        capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((ckpt.checkpoints(run)[-1] / "card.json").read_text())
    assert card["training"]["world_size"] == 2 and card["training"]["config"]["device"] == "cpu"
    assert len(losses(run)) == 4
    ranks = json.loads((ckpt.checkpoints(run)[-1] / ckpt.STATE_FILE).read_text())["ranks"]
    assert len(ranks) == 2 and ranks[0]["drop"] != ranks[1]["drop"]  # each rank its own condition dropout
    with pytest.raises(ValueError, match="written by 2 data-parallel process"):
        train_ddpm(config(toy_store, run, steps=6, width=8, batch_size=4), resume=True)

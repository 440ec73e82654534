"""What diffusion and segmentation training share: options, the run folder, resume, EMA, checkpoints and logs.

A trainer builds its batches and its loss; `Run` does the rest the same way for both, so both write the same
checkpoints (safetensors + card, every rank's random state), resume exactly, and report the same progress.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from emserve.card import ModelCard
from emserve.data.patches import load_crops
from emserve.data.store import EMStore, LabelledCrop
from emserve.runtime.base import torch_device
from emserve.unet import UNet
from training import checkpoint as ckpt
from training.batches import Draw, default_workers, step_batches
from training.device import init_distributed, resolve_precision
from training.progress import Progress
from training.transfer import segmenter_weights

# Card fields that are facts about the run, not about the model: they may differ when resuming.
RUN_FIELDS = ("training", "weights", "files", "export")


@dataclass
class TrainConfig:
    """Options every training shares (the defaults are the study's where it gave one)."""

    stores: list[str]
    out: str
    classes: list[str] = field(default_factory=list)
    patch_size: int = 64
    batch_size: int = 16
    steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.995
    width: int = 32
    multipliers: tuple[int, ...] = (1, 2, 4)
    blocks_per_level: int = 2
    class_groups: list[list[str]] = field(default_factory=list)
    balance: float = 0.5
    axis: str = "z"
    voxel_size: tuple[float, float, float] | None = None
    crops: dict[str, list[str]] | None = None  # only these crops per dataset (the rest held out); None: all
    labelled_slices: int = 0  # keep labels on this many evenly spaced slices per crop (low-label regime); 0: all
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    data_workers: int | None = None  # processes drawing batches ahead; None: training.batches.default_workers
    checkpoint_every: int = 500
    preview_every: int = 500
    log_every: int = 10
    command: str = ""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "patch_size", "checkpoint_every", "preview_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        self.check_fractions("balance")
        torch_device(self.device)  # a device this machine lacks fails here, before any store is read
        if self.labelled_slices < 0:
            raise ValueError(f"labelled_slices: must be >= 0 (0 = all), got {self.labelled_slices}")
        if self.data_workers is not None and self.data_workers < 0:
            raise ValueError(f"data_workers: {self.data_workers} is not allowed; allowed: 0 (draw batches in the "
                             "training process) or more")

    def check_fractions(self, *names: str) -> None:
        for name in names:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")

    def labelled_crops(self, stores: Sequence[EMStore]) -> list[LabelledCrop]:
        """The training crops of `stores` as configured (which crops, how many labelled slices)."""
        return load_crops(stores, self.classes, self.voxel_size, self.crops, self.labelled_slices, self.axis)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=list))


class Run:
    """One rank's training state: model, EMA copy, optimizer, random streams, step and losses.

    `batches` draws each step's batch from a stream seeded by (seed, rank, step) (`training.batches`); `drop_gen`
    draws the condition dropout, and it and torch's own stream (dropout layers) are saved per rank in every
    checkpoint, so a resumed run continues exactly where the killed one was.
    """

    def __init__(self, cfg: TrainConfig, card: ModelCard, build: Callable[[], UNet], resume: bool = False):
        self.cfg, self.card = cfg, card
        self.device = torch_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.dir = Path(cfg.out)
        card.training.update({"config": cfg.to_json(), "stores": list(cfg.stores), "command": cfg.command,
                              "precision": self.precision, "world_size": self.world})
        torch.manual_seed(cfg.seed)
        self.model = build().to(self.device)
        self.ema = build().to(self.device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.drop_gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.step, self.losses = 0, []
        found = ckpt.checkpoints(self.dir)
        if resume and found:
            found = found[: found.index(ckpt.newest_verified(found)) + 1]
            self._resume(found[-1])
        elif found:
            raise FileExistsError(f"out: {self.dir} already holds checkpoints; pass --resume to continue or choose "
                                  f"another folder")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.net = DistributedDataParallel(self.model, device_ids=device_ids) if self.world > 1 else self.model
        self.dir.mkdir(parents=True, exist_ok=True)
        self.last = found[-1] if found and self.step >= cfg.steps else self.dir
        self.progress = Progress(cfg.steps, start=self.step, enabled=self.rank == 0)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    def batches(self, draw: Draw) -> Iterator:
        """The batches of the steps still to train, in order (`training.batches.step_batches`)."""
        workers = default_workers(self.device) if self.cfg.data_workers is None else self.cfg.data_workers
        return step_batches(draw, self.cfg.seed, self.rank, self.step, self.cfg.steps, workers,
                            pin_memory=self.device.type == "cuda")

    def tensor(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """An array of a batch on the training device (from a worker it is a tensor already, maybe pinned)."""
        if isinstance(array, torch.Tensor):
            return array.to(self.device, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def optimize(self, loss: torch.Tensor, data_time: float, preview: Callable[[torch.nn.Module, Path], None]) -> None:
        """One optimizer step on `loss`, then EMA, progress, and the checkpoint / preview / log when due.

        `preview(ema, path)` writes a PNG of what the EMA model does now.
        """
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        _update_ema(self.ema, self.model, cfg.ema)
        self.step += 1
        self.losses.append(float(loss.detach()))
        self.progress.update(self.step, self.losses[-1], data_time)
        if self.step % cfg.checkpoint_every == 0 or self.done:
            ranks = self._rng_states()  # every rank takes part in the gather
            if self.rank == 0:
                self.last = ckpt.save_checkpoint(self.dir, self.card, self.model, self.ema, self.optimizer,
                                                 ckpt.TrainingState(self.step, ranks, self.losses))
        if self.rank == 0 and (self.step % cfg.preview_every == 0 or self.done):
            preview(self.ema, self.dir / "samples" / f"step-{self.step:08d}.png")
        if self.rank == 0 and self.step % cfg.log_every == 0:
            record = {"step": self.step, "loss": float(np.mean(self.losses[-cfg.log_every:])),
                      **self.progress.rates()}
            with open(self.dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> Path | None:
        """The folder of the last checkpoint (None on ranks other than 0)."""
        self.progress.close()
        return self.last if self.rank == 0 else None

    def start_from(self, path: Path) -> None:
        """Fine-tuning: start model and EMA from the EMA weights of another run's checkpoint of the same network
        (mode, classes, UNet), or a segmenter from a denoiser's (`training.transfer`); the optimizer starts
        afresh."""
        old, _, ema_weights, _, _ = ckpt.load_checkpoint(path)
        if self.card.mode == "segmentation" and old.mode != "segmentation":
            denoiser = UNet.from_config(old.unet)
            denoiser.load_state_dict(ema_weights)
            ema_weights = segmenter_weights(denoiser, self.model, old.timesteps)
        else:
            for key in ("mode", "classes", "depth", "unet", "exclusive"):
                if getattr(old, key) != getattr(self.card, key):
                    raise ValueError(f"init: {path} has {key}={getattr(old, key)!r}; this run needs "
                                     f"{getattr(self.card, key)!r}")
        self.model.load_state_dict(ema_weights)
        self.ema.load_state_dict(ema_weights)

    def _resume(self, path: Path) -> None:
        """Load a checkpoint into model, EMA and optimizer; refuse one made for a different model."""
        old, weights, ema_weights, opt_state, state = ckpt.load_checkpoint(path)
        mine, theirs = asdict(self.card), asdict(old)
        for key in sorted(mine, key=lambda k: k == "unet"):  # the UNet last: it follows from depth, classes...
            if key not in RUN_FIELDS and mine[key] != theirs[key]:
                raise ValueError(f"resume: {path} was trained with {key}={theirs[key]!r}, this run asks for "
                                 f"{mine[key]!r}")
        if len(state.ranks) != self.world:
            raise ValueError(f"resume: {path} was written by {len(state.ranks)} data-parallel process(es); resume "
                             f"with the same number (now {self.world}) so every rank continues its own data order")
        self.model.load_state_dict(weights)
        self.ema.load_state_dict(ema_weights)
        self.optimizer.load_state_dict(opt_state)
        own = state.ranks[self.rank]
        ckpt.restore_torch_rng(own["torch"])
        self.drop_gen.set_state(torch.tensor(own["drop"], dtype=torch.uint8))
        self.step, self.losses = state.step, list(state.losses)

    def _rng_states(self) -> list[dict]:
        """Every rank's random state (gathered to all ranks), so a resumed run continues each rank's data order."""
        mine = {"torch": ckpt.torch_rng_state(),
                "drop": self.drop_gen.get_state().tolist()}
        if self.world == 1:
            return [mine]
        gathered: list[dict] = [{} for _ in range(self.world)]
        torch.distributed.all_gather_object(gathered, mine)
        return gathered


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)

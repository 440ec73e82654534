"""Train a diffusion model on vEM stores: `emserve train ddpm`.

One readable loop (nanoGPT-style): build a batch of 2D patches, noise it at random timesteps, predict the
objective (v by default, as the study), weight the squared error per channel, step AdamW with gradient clipping,
update the EMA copy, and now and then write a checkpoint and a PNG grid of samples.

Modes, i.e. which channels are denoised and what conditions them:
  em              raw EM                        (dataset id)
  labels          one channel per class         (class presence, dataset id)
  pairs           raw EM + one channel per class (class presence, dataset id); raw weighted like all labels
  em-from-labels  raw EM                        (label map, class presence, dataset id); raw-only patches from
                                                 unlabelled regions train the label-free branch
Each condition is dropped to its null independently (classifier-free guidance). Unannotated label voxels are
left out of the loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from emserve.card import ModelCard
from emserve.data.patches import PatchSampler, RawPatchSampler, class_presence, label_channels, load_crops
from emserve.data.store import EMStore
from emserve.diffusion import make_schedule, training_target
from training import checkpoint as ckpt
from training.device import autocast, init_distributed, pick_device, resolve_precision
from training.preview import save_preview
from training.progress import Progress
from training.unet import UNet, UNetConfig, dropout_conditions

DDPM_MODES = ("em", "labels", "pairs", "em-from-labels")


@dataclass
class DDPMConfig:
    """Options of `emserve train ddpm` (the defaults are the study's where it gave one)."""

    stores: list[str]
    out: str
    mode: str = "pairs"
    classes: list[str] = field(default_factory=list)
    patch_size: int = 64
    batch_size: int = 16
    steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.995
    schedule: str = "sigmoid"
    timesteps: int = 1000
    objective: str = "v"
    width: int = 32
    multipliers: tuple[int, ...] = (1, 2, 4)
    blocks_per_level: int = 2
    class_condition: bool = True
    dataset_condition: bool = True
    p_drop: float = 0.5  # per condition, independently (the study: 0.5)
    p_drop_class_entry: float = 0.1  # single classes set to "unknown", so partial class requests work
    raw_fraction: float = 0.25  # em-from-labels: share of each batch from raw-only patches
    raw_weight: float = 1.0  # pairs: weight of the raw channel relative to all label channels together
    class_groups: list[list[str]] = field(default_factory=list)
    balance: float = 0.5
    axis: str = "z"
    voxel_size: tuple[float, float, float] | None = None
    precision: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    preview_every: int = 500
    log_every: int = 10
    command: str = ""

    def __post_init__(self) -> None:
        if self.mode not in DDPM_MODES:
            raise ValueError(f"mode: {self.mode!r} is not a diffusion mode; allowed: {', '.join(DDPM_MODES)}")
        if self.mode != "em" and not self.classes:
            raise ValueError(f"classes: mode {self.mode!r} needs a class list (e.g. --classes mito_mem,mito_lum)")
        for name in ("steps", "batch_size", "patch_size", "checkpoint_every", "preview_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        for name in ("p_drop", "p_drop_class_entry", "raw_fraction", "balance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")


class BatchSource:
    """Makes numpy training batches for a mode: clean channels x0, loss weights and conditions."""

    def __init__(self, cfg: DDPMConfig, stores: Sequence[EMStore], dataset_ids: dict[str, int]):
        self.cfg = cfg
        self.labelled = None
        self.raw = None
        if cfg.mode != "em":
            crops = load_crops(stores, cfg.classes, cfg.voxel_size)
            if not crops:
                paths = [s.path for s in stores]
                raise ValueError(f"stores: mode {cfg.mode!r} needs labelled crops; {paths} have none")
            self.labelled = PatchSampler(crops, cfg.patch_size, axis=cfg.axis, class_groups=cfg.class_groups,
                                         balance=cfg.balance, dataset_ids=dataset_ids)
        if cfg.mode in ("em", "em-from-labels"):
            self.raw = RawPatchSampler(stores, cfg.patch_size, voxel_size=cfg.voxel_size, axis=cfg.axis,
                                       dataset_ids=dataset_ids)
        # Loss weights per channel sum to 1 at a fully annotated pixel, so losses of all modes compare.
        # pairs: raw counts as much as all label channels together (the study's weighting).
        k = len(cfg.classes)
        self.channel_weight = np.full(k + 1, 1.0 / max(k, 1), np.float32)
        self.channel_weight[0] = cfg.raw_weight
        self.channel_weight /= self.channel_weight.sum()

    def sample(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        mode, k = self.cfg.mode, len(self.cfg.classes)
        if mode == "em":
            raw, dataset = self.raw.sample(rng, batch)
            return {"x0": raw, "weight": np.ones_like(raw), "dataset": dataset}
        n_raw = round(batch * self.cfg.raw_fraction) if mode == "em-from-labels" else 0
        patches = self.labelled.sample(rng, batch - n_raw)
        channels = label_channels(patches.labels)
        annotated = patches.annotated.astype(np.float32)
        presence = class_presence(patches.labels)
        if mode == "labels":
            return {"x0": channels, "weight": annotated / k, "classes": presence, "dataset": patches.dataset}
        if mode == "pairs":
            x0 = np.concatenate([patches.raw, channels], axis=1)
            weight = np.concatenate([np.ones_like(patches.raw), annotated], axis=1) * self.channel_weight[:, None, None]
            return {"x0": x0, "weight": weight, "classes": presence, "dataset": patches.dataset}
        raw, dataset = self.raw.sample(rng, n_raw)  # em-from-labels: raw-only patches carry null conditions
        size = self.cfg.patch_size
        return {
            "x0": np.concatenate([patches.raw, raw]),
            "weight": np.ones((batch, 1, size, size), np.float32),
            "label_map": np.concatenate([channels, np.zeros((n_raw, k, size, size), np.float32)]),
            "classes": np.concatenate([presence, np.zeros((n_raw, k), np.float32)]),
            "dataset": np.concatenate([patches.dataset, dataset]),
        }


def build_model(cfg: DDPMConfig, datasets: Sequence[str]) -> UNet:
    k = len(cfg.classes)
    channels = {"em": 1, "labels": k, "pairs": k + 1, "em-from-labels": 1}[cfg.mode]
    unet = UNetConfig(
        in_channels=channels, out_channels=channels, width=cfg.width, multipliers=tuple(cfg.multipliers),
        blocks_per_level=cfg.blocks_per_level, timestep=True,
        num_classes=k if cfg.class_condition and cfg.mode != "em" else 0,
        num_datasets=len(datasets) if cfg.dataset_condition else 0,
        label_channels=k if cfg.mode == "em-from-labels" else 0,
    )
    if cfg.patch_size % unet.size_factor:
        raise ValueError(f"patch_size: {cfg.patch_size} must be a multiple of {unet.size_factor} for multipliers "
                         f"{tuple(cfg.multipliers)}")
    return UNet(**unet.to_dict())


def train_ddpm(cfg: DDPMConfig, resume: bool = False) -> Path | None:
    """Train (or resume) and return the folder of the last checkpoint (None on ranks other than 0)."""
    device = pick_device()
    rank, world = init_distributed(device)
    precision = resolve_precision(cfg.precision, device)
    run_dir = Path(cfg.out)
    stores = [EMStore(p) for p in cfg.stores]
    datasets = sorted({s.name for s in stores})
    dataset_ids = {name: i for i, name in enumerate(datasets)}
    source = BatchSource(cfg, stores, dataset_ids)
    schedule = make_schedule(cfg.schedule, cfg.timesteps)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, datasets).to(device)
    ema = build_model(cfg, datasets).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    card = ModelCard(mode=cfg.mode, classes=list(cfg.classes), patch_size=cfg.patch_size,
                     unet=model.config.to_dict(), schedule=cfg.schedule, timesteps=cfg.timesteps,
                     objective=cfg.objective, datasets=datasets if cfg.dataset_condition else [],
                     class_condition=model.config.num_classes > 0,
                     training={"config": _json_config(cfg), "stores": list(cfg.stores), "command": cfg.command,
                               "precision": precision, "world_size": world})
    rng = np.random.default_rng([cfg.seed, rank])
    drop_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    step, losses = 0, []
    if resume and (found := ckpt.checkpoints(run_dir)):
        step, losses, rng = _resume(found[-1], card, model, ema, optimizer, drop_gen, rank, world)
    elif ckpt.checkpoints(run_dir):
        raise FileExistsError(f"out: {run_dir} already holds checkpoints; pass --resume to continue or choose "
                              f"another folder")
    device_ids = [device.index] if device.type == "cuda" else None
    net = DistributedDataParallel(model, device_ids=device_ids) if world > 1 else model
    run_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt.checkpoints(run_dir)[-1] if step >= cfg.steps else run_dir

    progress = Progress(cfg.steps, start=step, enabled=rank == 0)
    alphas = schedule.alphas_cumprod
    data_time = 0.0
    while step < cfg.steps:
        t0 = time.perf_counter()
        batch = source.sample(rng, cfg.batch_size // world)
        t = rng.integers(0, cfg.timesteps, size=len(batch["x0"]))
        eps = rng.standard_normal(batch["x0"].shape, dtype=np.float32)
        ab = alphas[t]
        sab = np.sqrt(ab)[:, None, None, None].astype(np.float32)
        x_t = sab * batch["x0"] + np.sqrt(1 - ab)[:, None, None, None].astype(np.float32) * eps
        target = training_target(cfg.objective, batch["x0"], eps, ab).astype(np.float32)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
        classes, dataset, label_map = dropout_conditions(
            tensors.get("classes") if model.config.num_classes else None,
            tensors.get("dataset") if model.config.num_datasets else None,
            tensors.get("label_map"), cfg.p_drop, cfg.p_drop, cfg.p_drop, drop_gen,
            p_class_entry=cfg.p_drop_class_entry)
        data_time += time.perf_counter() - t0

        with autocast(precision, device):
            pred = net(torch.from_numpy(x_t).to(device), torch.from_numpy(t.astype(np.float32)).to(device),
                       classes, dataset, label_map)
        weight = tensors["weight"]
        loss = (weight * (pred.float() - torch.from_numpy(target).to(device)) ** 2).sum() / weight[:, :1].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        _update_ema(ema, model, cfg.ema)
        step += 1
        losses.append(float(loss.detach()))
        progress.update(step, losses[-1], data_time)

        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ranks = _rng_states(rng, drop_gen, world)  # every rank takes part in the gather
            if rank == 0:
                last = ckpt.save_checkpoint(run_dir, card, model, ema, optimizer,
                                            ckpt.TrainingState(step, ranks, losses))
        if rank == 0 and (step % cfg.preview_every == 0 or step == cfg.steps):
            save_preview(ema, card, run_dir / "samples" / f"step-{step:08d}.png", device)
        if rank == 0 and step % cfg.log_every == 0:
            _log(run_dir, step, losses[-cfg.log_every:], progress)
    progress.close()
    return last if rank == 0 else None


def _resume(path: Path, card: ModelCard, model: UNet, ema: UNet, optimizer: torch.optim.Optimizer,
            drop_gen: torch.Generator, rank: int, world: int) -> tuple[int, list[float], np.random.Generator]:
    """Load a checkpoint into model, EMA and optimizer; refuse one made with a different model or mode."""
    old, weights, ema_weights, opt_state, state = ckpt.load_checkpoint(path)
    for key in ("mode", "classes", "unet", "schedule", "timesteps", "objective", "datasets"):
        if getattr(old, key) != getattr(card, key):
            raise ValueError(f"resume: {path} was trained with {key}={getattr(old, key)!r}, this run asks for "
                             f"{getattr(card, key)!r}")
    if len(state.ranks) != world:
        raise ValueError(f"resume: {path} was written by {len(state.ranks)} data-parallel process(es); resume with "
                         f"the same number (now {world}) so every rank continues its own data order")
    model.load_state_dict(weights)
    ema.load_state_dict(ema_weights)
    optimizer.load_state_dict(opt_state)
    mine = state.ranks[rank]
    ckpt.restore_torch_rng(mine["torch"])
    drop_gen.set_state(torch.tensor(mine["drop"], dtype=torch.uint8))
    return state.step, list(state.losses), ckpt.restore_numpy_rng(mine["numpy"])


def _rng_states(rng: np.random.Generator, drop_gen: torch.Generator, world: int) -> list[dict]:
    """Every rank's random state (gathered to all ranks), so a resumed run continues each rank's data order."""
    mine = {"numpy": rng.bit_generator.state, "torch": ckpt.torch_rng_state(), "drop": drop_gen.get_state().tolist()}
    if world == 1:
        return [mine]
    gathered: list[dict] = [{} for _ in range(world)]
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _log(run_dir: Path, step: int, losses: list[float], progress: Progress) -> None:
    record = {"step": step, "loss": float(np.mean(losses)), **progress.rates()}
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _json_config(cfg: DDPMConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=list))

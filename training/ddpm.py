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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from emserve.card import ModelCard
from emserve.data.patches import PatchSampler, RawPatchSampler, class_presence, label_channels
from emserve.data.store import EMStore
from emserve.diffusion import make_schedule, training_target
from emserve.unet import UNet, UNetConfig, dropout_conditions
from training.device import autocast
from training.loop import Run, TrainConfig
from training.preview import save_preview

DDPM_MODES = ("em", "labels", "pairs", "em-from-labels")


@dataclass
class DDPMConfig(TrainConfig):
    """Options of `emserve train ddpm` (the defaults are the study's where it gave one)."""

    mode: str = "pairs"
    schedule: str = "sigmoid"
    timesteps: int = 1000
    objective: str = "v"
    class_condition: bool = True
    dataset_condition: bool = True
    p_drop: float = 0.5  # per condition, independently (the study: 0.5)
    p_drop_class_entry: float = 0.1  # single classes set to "unknown", so partial class requests work
    raw_fraction: float = 0.25  # em-from-labels: share of each batch from raw-only patches
    raw_weight: float = 1.0  # pairs: weight of the raw channel relative to all label channels together

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in DDPM_MODES:
            raise ValueError(f"mode: {self.mode!r} is not a diffusion mode; allowed: {', '.join(DDPM_MODES)}")
        if self.mode != "em" and not self.classes:
            raise ValueError(f"classes: mode {self.mode!r} needs a class list (e.g. --classes mito_mem,mito_lum)")
        self.check_fractions("p_drop", "p_drop_class_entry", "raw_fraction")


class BatchSource:
    """Makes numpy training batches for a mode: clean channels x0, loss weights and conditions."""

    def __init__(self, cfg: DDPMConfig, stores: Sequence[EMStore], dataset_ids: dict[str, int]):
        self.cfg = cfg
        self.labelled = None
        self.raw = None
        if cfg.mode != "em":
            crops = cfg.labelled_crops(stores)
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


    def noised(self, rng: np.random.Generator, batch: int, alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
        """A batch (`sample`) noised at random time steps: the network's input x_t and t, and its training target
        for the configured objective."""
        out = self.sample(rng, batch)
        t = rng.integers(0, len(alphas_cumprod), size=len(out["x0"]))
        eps = rng.standard_normal(out["x0"].shape, dtype=np.float32)
        ab = alphas_cumprod[t].astype(np.float32)  # float32 throughout: the network's precision, half the work
        x_t = np.sqrt(ab)[:, None, None, None] * out["x0"] + np.sqrt(1 - ab)[:, None, None, None] * eps
        target = training_target(self.cfg.objective, out.pop("x0"), eps, ab)
        return {**out, "x_t": x_t, "t": t.astype(np.float32), "target": target}


def unet_config(cfg: DDPMConfig, datasets: Sequence[str]) -> UNetConfig:
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
    return unet


def train_ddpm(cfg: DDPMConfig, resume: bool = False) -> Path | None:
    """Train (or resume) and return the folder of the last checkpoint (None on ranks other than 0)."""
    stores = [EMStore(p) for p in cfg.stores]
    datasets = sorted({s.name for s in stores})
    source = BatchSource(cfg, stores, {name: i for i, name in enumerate(datasets)})
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    unet = unet_config(cfg, datasets)
    card = ModelCard(mode=cfg.mode, classes=list(cfg.classes), patch_size=cfg.patch_size, unet=unet.to_dict(),
                     schedule=cfg.schedule, timesteps=cfg.timesteps, objective=cfg.objective,
                     datasets=datasets if cfg.dataset_condition else [], class_condition=unet.num_classes > 0,
                     voxel_sizes={s.name: list(s.em_level(cfg.voxel_size).voxel_size) for s in stores})
    run = Run(cfg, card, lambda: UNet(**unet.to_dict()), resume)

    def preview(ema: torch.nn.Module, path: Path) -> None:
        save_preview(ema, card, path, run.device)

    data_time = 0.0
    batches = run.batches(partial(source.noised, batch=cfg.batch_size // run.world,
                                  alphas_cumprod=schedule.alphas_cumprod))
    while not run.done:
        t0 = time.perf_counter()
        batch = next(batches)
        tensors = {k: run.tensor(v) for k, v in batch.items()}
        classes, dataset, label_map = dropout_conditions(
            tensors.get("classes") if unet.num_classes else None,
            tensors.get("dataset") if unet.num_datasets else None,
            tensors.get("label_map"), cfg.p_drop, cfg.p_drop, cfg.p_drop, run.drop_gen,
            p_class_entry=cfg.p_drop_class_entry)
        data_time += time.perf_counter() - t0

        with autocast(run.precision, run.device):
            pred = run.net(tensors["x_t"], tensors["t"], classes, dataset, label_map)
        weight = tensors["weight"]
        loss = (weight * (pred.float() - tensors["target"]) ** 2).sum() / weight[:, :1].numel()
        run.optimize(loss, data_time, preview)
    return run.close()

"""Train a segmentation network on vEM stores: `emserve train seg`.

The study's point is "same architecture": this is the denoiser's UNet without a timestep, raw EM in and one
output per class. Multi-label networks put a sigmoid on each class (classes may overlap, like groups); exclusive
networks put a softmax over background + classes (CellMap's atomic classes partition the volume). The loss is
cross-entropy plus soft Dice, both over annotated voxels only: a class nobody annotated in a crop teaches
nothing there, neither present nor absent.

Training data are real stores, generated stores (from `emserve generate`, whose rejected samples are marked
unannotated and so drop out of the loss), or both, with a chosen share of generated patches in every batch and,
optionally, a lower loss weight for them (they are not as right as real annotations). `init` starts from another
segmentation checkpoint's weights (pretrain on generated pairs, then fine-tune on real ones) or from a DDPM's
denoiser, which has learned the EM of unlabelled sections too (`training.transfer`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emserve.card import ModelCard
from emserve.checks import check_depth
from emserve.classes import PRESENT, UNKNOWN
from emserve.data.patches import PatchBatch, PatchSampler, check_axis, load_crops
from emserve.data.store import EMStore, LabelledCrop
from emserve.pictures import grid, pair_tile, save_png
from emserve.segmentation import masks_from_probabilities, probabilities
from emserve.unet import UNet, UNetConfig
from training.device import autocast
from training.loop import Run, TrainConfig

IGNORE = -100  # exclusive targets: voxels whose class cannot be told (some class unannotated, none present)
PREVIEW_PATCHES = 6


@dataclass
class SegConfig(TrainConfig):
    """Options of `emserve train seg`. `stores` are real data, `generated` generated stores (either may be
    empty, not both); with both, `generated_fraction` of every batch comes from the generated ones, each weighted
    `generated_weight` in the loss (a real patch weighs 1). `init`: a segmentation checkpoint to start from, or a DDPM
    checkpoint whose denoiser becomes the starting network (`training.transfer`). `depth` > 1: the network reads that
    many adjacent sections (2.5D) and labels the middle one. `elastic`: the share of every batch made of elastically
    deformed copies of annotated real patches (new shapes from the same annotations, in the place generated
    pairs would take)."""

    generated: list[str] = field(default_factory=list)
    generated_fraction: float = 0.5
    generated_weight: float = 1.0
    exclusive: bool = False
    dice_weight: float = 1.0
    init: str = ""
    depth: int = 1
    elastic: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_depth(self.depth)
        if self.depth > 1 and self.generated:
            raise ValueError(f"depth: {self.depth} needs adjacent sections of one volume, and generated stores "
                             "hold independent 2D samples; allowed with --generated: depth 1")
        if not self.classes:
            raise ValueError("classes: segmentation needs a class list (e.g. --classes mito_mem,mito_lum)")
        if not self.stores and not self.generated:
            raise ValueError("stores: give real stores, --generated stores, or both")
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight: must be >= 0, got {self.dice_weight}")
        if not 0 < self.generated_weight <= 1:
            raise ValueError(f"generated_weight: must be in (0, 1] (a real patch weighs 1), got "
                             f"{self.generated_weight}")
        self.check_fractions("generated_fraction", "elastic")
        if self.elastic and (self.generated or not self.stores or self.depth > 1):
            raise ValueError(f"elastic: {self.elastic} deforms annotated sections of real stores in the place "
                             "generated pairs would take; allowed with real stores, without --generated and at "
                             "depth 1 only")


class SegBatchSource:
    """Batches of raw patches and their labels (0/1/255), mixing real patches with generated ones or with
    deformed copies of annotated real ones as configured."""

    def __init__(self, cfg: SegConfig):
        def sampler(paths: Sequence[str], crops: list[LabelledCrop], labelled_planes: str = "",
                    elastic: bool = False) -> PatchSampler | None:
            """A sampler of the crops, of only their planes along axis `labelled_planes` that carry labels if
            given (`labelled_samples`)."""
            if not paths:
                return None
            if not crops:
                raise ValueError(f"stores: {list(paths)} hold no labelled crops to train segmentation on")
            if all((crop.labels == UNKNOWN).all() for crop in crops):  # the loss would be zero at every step
                raise ValueError(f"stores: {list(paths)} annotate none of the classes {', '.join(cfg.classes)} "
                                 "anywhere (a generated store whose samples screening all rejected, say: generate "
                                 "with --despeckle N)")
            if labelled_planes:
                crops = labelled_samples(crops, labelled_planes)
            return PatchSampler(crops, cfg.patch_size, axis=cfg.axis, class_groups=cfg.class_groups,
                                balance=cfg.balance, depth=cfg.depth, elastic=elastic)

        real = cfg.labelled_crops([EMStore(p) for p in cfg.stores])
        self.real = sampler(cfg.stores, real)
        self.deformed = sampler(cfg.stores, real, cfg.axis, elastic=True) if cfg.elastic else None
        # generated stores: every crop, all labels as generated, at their one (nominal) voxel size
        generated = load_crops([EMStore(p) for p in cfg.generated], cfg.classes)
        self.generated = sampler(cfg.generated, generated, "z")  # a generated sample is a z-slice
        both = self.real is not None and self.generated is not None
        self.fraction = cfg.generated_fraction if both else float(self.generated is not None)
        self.generated_weight = cfg.generated_weight if both else 1.0  # alone, generated patches weigh like real
        self.elastic = cfg.elastic

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[PatchBatch, np.ndarray]:
        """A batch and the loss weight of each of its patches [B] (real first, then deformed or generated)."""
        n_generated, n_deformed = round(batch * self.fraction), round(batch * self.elastic)
        sources = ((self.real, batch - n_generated - n_deformed), (self.deformed, n_deformed),
                   (self.generated, n_generated))
        parts = [s.sample(rng, n) for s, n in sources if n > 0]
        weight = np.r_[np.ones(batch - n_generated), np.full(n_generated, self.generated_weight)].astype(np.float32)
        return PatchBatch(np.concatenate([p.raw for p in parts]), np.concatenate([p.labels for p in parts]),
                          np.concatenate([p.dataset for p in parts])), weight

    def arrays(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        """`sample` as the arrays training reads (raw, labels, weight): what a worker process sends."""
        patches, weight = self.sample(rng, batch)
        return {"raw": patches.raw, "labels": patches.labels, "weight": weight}

    def fixed(self, count: int) -> PatchBatch:
        """The same few patches every time (for previews): the first tiles of the real (else generated) data."""
        source = self.real if self.real is not None else self.generated
        return source.cut(source.tiles()[:count])


def labelled_samples(crops: Sequence[LabelledCrop], axis: str) -> list[LabelledCrop]:
    """The planes along `axis` of crops that carry labels: of generated crops, the samples screening or filtering
    did not reject, which, left in, would take batch slots without adding to the loss; of real crops with few
    labelled sections, those sections."""
    plane = check_axis(axis)
    kept = []
    for crop in crops:
        labelled = (crop.labels != UNKNOWN).any(axis=tuple(i for i in range(4) if i != plane + 1))
        if labelled.any():
            kept.append(replace(crop, raw=np.compress(labelled, crop.raw, axis=plane),
                                labels=np.compress(labelled, crop.labels, axis=plane + 1)))
    return kept


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, exclusive: bool, dice_weight: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy + `dice_weight` x (1 - soft Dice), over annotated voxels only, each patch's voxels counted
    `weight` [B] times (default once). labels: uint8 0/1/255."""
    annotated = labels != UNKNOWN
    present = labels == PRESENT
    per_patch = (torch.ones(len(labels), device=labels.device) if weight is None else weight)[:, None, None, None]
    if exclusive:
        # background where every class is known absent; class k where it is present; else unknown
        target = torch.where(present.any(1), present.float().argmax(1) + 1,
                             torch.where(annotated.all(1), 0, IGNORE))
        ce_map = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")[:, None]
        counted = (target != IGNORE)[:, None] * per_patch
        probs = logits.softmax(1)[:, 1:]
        mask = counted.expand_as(probs)
    else:
        ce_map = F.binary_cross_entropy_with_logits(logits, present.float(), reduction="none")
        counted = annotated * per_patch
        probs = logits.sigmoid()
        mask = counted
    ce = (ce_map * counted).sum() / counted.sum().clamp(min=1e-6)
    return ce + dice_weight * (1 - soft_dice(probs, present.float(), mask))


def soft_dice(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean Dice over classes with any voxel in `mask` (summed over the batch, so small objects count); `mask`
    may weigh voxels (0 leaves one out)."""
    mask = mask.float()
    dims = (0, 2, 3)
    inter = (probs * target * mask).sum(dims)
    denom = (probs * mask).sum(dims) + (target * mask).sum(dims)
    counted = mask.sum(dims) > 0
    dice = (2 * inter + 1) / (denom + 1)
    return dice[counted].mean() if counted.any() else probs.sum() * 0 + 1


def unet_config(cfg: SegConfig) -> UNetConfig:
    unet = UNetConfig(in_channels=cfg.depth, out_channels=len(cfg.classes) + cfg.exclusive, width=cfg.width,
                      multipliers=tuple(cfg.multipliers), blocks_per_level=cfg.blocks_per_level, timestep=False)
    if cfg.patch_size % unet.size_factor:
        raise ValueError(f"patch_size: {cfg.patch_size} must be a multiple of {unet.size_factor} for multipliers "
                         f"{tuple(cfg.multipliers)}")
    return unet


def train_seg(cfg: SegConfig, resume: bool = False) -> Path | None:
    """Train (or resume) and return the folder of the last checkpoint (None on ranks other than 0)."""
    source = SegBatchSource(cfg)
    unet = unet_config(cfg)
    card = ModelCard(mode="segmentation", classes=list(cfg.classes), patch_size=cfg.patch_size,
                     unet=unet.to_dict(), exclusive=cfg.exclusive, depth=cfg.depth)
    card.training["generated"] = list(cfg.generated)
    if cfg.init:  # recorded in every checkpoint, resumed ones too
        card.training["init"] = {"checkpoint": cfg.init, "weights": ModelCard.load(Path(cfg.init)).weights}
    run = Run(cfg, card, lambda: UNet(**unet.to_dict()), resume)
    if cfg.init and run.step == 0:  # a resumed run continues its own weights
        run.start_from(Path(cfg.init))
    shown = source.fixed(PREVIEW_PATCHES)

    def preview(ema: torch.nn.Module, path: Path) -> None:
        save_seg_preview(ema, card, shown, path, run.device)

    data_time = 0.0
    batches = run.batches(partial(source.arrays, batch=cfg.batch_size // run.world))
    while not run.done:
        t0 = time.perf_counter()
        batch = next(batches)
        raw, labels, weight = (run.tensor(batch[key]) for key in ("raw", "labels", "weight"))
        data_time += time.perf_counter() - t0
        with autocast(run.precision, run.device):
            logits = run.net(raw)
        loss = seg_loss(logits.float(), labels, cfg.exclusive, cfg.dice_weight, weight)
        run.optimize(loss, data_time, preview)
    return run.close()


@torch.no_grad()
def save_seg_preview(model: torch.nn.Module, card: ModelCard, batch: PatchBatch, path: Path,
                     device: torch.device) -> Path:
    """A PNG with a row per patch: EM with its true labels, then EM with the predicted labels."""
    was_training = model.training
    model.eval()
    logits = model(torch.from_numpy(batch.raw).to(device)).float().cpu().numpy()
    model.train(was_training)
    tiles = []
    centre = batch.raw[:, card.depth // 2]
    for raw, labels, probs in zip(centre, batch.labels, probabilities(card, logits), strict=True):
        tiles += [pair_tile(raw, labels == PRESENT, card.classes),
                  pair_tile(raw, masks_from_probabilities(card, probs), card.classes)]
    return save_png(grid(tiles, columns=2), path)

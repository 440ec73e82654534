"""`emserve evaluate`: a segmentation network against held-out annotations, generated EM against real EM, and how
often generated pairs hold each class against how often real patches do.

Stores in, JSON-ready reports out; the numbers come from emserve.evaluation.metrics, the predictions from the same tiled
inference as `emserve segment`, so what is evaluated is what users run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emserve.classes import UNKNOWN
from emserve.data.patches import PatchSampler, RawPatchSampler
from emserve.data.store import EMStore, LabelledCrop
from emserve.diffusion import DEFAULT_LABEL_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS
from emserve.evaluation.metrics import (
    Calibration,
    Counts,
    ErrorDetection,
    plane_object_sizes,
    presence_share,
    presence_threshold,
    realism,
    segmentation_report,
    tile_counts,
)
from emserve.pictures import grid, raw_to_rgb, save_png
from emserve.pipelines import (
    GenerationRequest,
    GuidanceScales,
    LabelSampling,
    generate,
    label_codes,
    store_label_maps,
)
from emserve.runtime.base import Runtime
from emserve.segmentation import masks_from_probabilities, probabilities, segment_array


def held_out_crops(paths: Sequence[str], classes: Sequence[str], crops: Sequence[str] = (),
                   voxel_size: Sequence[float] | None = None) -> list[LabelledCrop]:
    """The crops to evaluate on: every crop of the stores, or those named ("crop3" in any store, or
    "<dataset>/crop3"), read in the model's classes (a class a crop lacks is unannotated there) at
    `voxel_size` (default: the finest)."""
    stores = [EMStore(p) for p in paths]
    wanted = set(crops)
    found = []
    for store in stores:
        for name in store.crops:
            if not wanted or name in wanted or f"{store.name}/{name}" in wanted:
                found.append(store.read_crop(name, classes, voxel_size))
    missing = wanted - {c.name for c in found} - {f"{c.dataset}/{c.name}" for c in found}
    if missing:
        available = ", ".join(f"{s.name}/{c}" for s in stores for c in s.crops) or "none"
        raise ValueError(f"crops: {sorted(missing)} not found; available: {available}")
    if not found:
        raise ValueError(f"stores: {list(paths)} hold no labelled crops to evaluate on")
    return found


def evaluate_segmentation(runtime: Runtime, crops: Sequence[LabelledCrop], *, axis: str = "z",
                          tile: int | None = None, overlap: int | None = None, threshold: float = 0.5,
                          count_tile: int | None = None, sampling: LabelSampling | None = None) -> dict:
    """Per-class and mean Dice / IoU / precision / recall of the model's masks on the crops, the calibration of its
    probabilities (expected calibration error, per class and pooled), whether its uncertainty finds its errors
    (AUROC), and its time per megavoxel. The uncertainty of a pairs DDPM is the spread of its label maps
    (`sampling`); a segmentation network has none of its own, so its margin 1 - |2p - 1| stands in. With
    `count_tile`, also "tile_counts": (tp, fp, fn) per class of every column (`count_tile` pixels square, through
    every z-plane) [tiles][classes][3], crop after crop, for intervals (emserve.evaluation.statistics)."""
    card = runtime.card
    k = len(card.classes)
    counts = [Counts() for _ in card.classes]
    calibration = [Calibration() for _ in card.classes]
    detection = ErrorDetection()
    tiles, seconds, voxels = [], 0.0, 0
    for crop in crops:
        start = time.perf_counter()
        values = segment_array(runtime, crop.raw, axis=axis, tile=tile, overlap=overlap, sampling=sampling)
        seconds, voxels = seconds + time.perf_counter() - start, voxels + crop.raw.size
        probs = values[:k]
        uncertainty = 2 * values[k:] if len(values) > k else 1 - np.abs(2 * probs - 1)
        masks = masks_from_probabilities(card, probs, threshold)
        for c in range(k):
            counts[c].add(masks[c], crop.labels[c])
            calibration[c].add(probs[c], crop.labels[c])
            detection.add(uncertainty[c], masks[c], crop.labels[c])
        if count_tile:
            tiles.append(tile_counts(masks, crop.labels, count_tile))
    report = segmentation_report(card.classes, counts)
    report["calibration_error"] = {"pooled": Calibration.pooled(calibration).error(),
                                   "classes": {n: c.error() for n, c in zip(card.classes, calibration, strict=True)}}
    report["error_auroc"] = detection.auroc()
    report["uncertainty"] = "spread of sampled label maps" if len(values) > k else "margin 1 - |2p - 1|"
    report["seconds_per_mvoxel"] = seconds / voxels * 1e6 if voxels else None
    report["crops"] = [f"{c.dataset}/{c.name}" for c in crops]
    if count_tile:
        report["tile_counts"] = np.concatenate(tiles).tolist()
    return report


def evaluate_label_transfer(denoiser: Runtime, segmenter: Runtime, label_store: str, *, dataset: str | None,
                            samples: int = 64, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
                            steps: int = DEFAULT_STEPS, spacing: str = DEFAULT_SPACING,
                            guidance: GuidanceScales = DEFAULT_LABEL_GUIDANCE) -> dict:
    """Render label maps from one store's crops as EM (optionally of another dataset), segment that EM, and score
    the segmentation against the label maps it was made from: do generated images carry their labels?"""
    card = denoiser.card
    if card.mode != "em-from-labels":
        raise ValueError(f"model: a {card.mode!r} model does not render label maps; use an em-from-labels model")
    missing = [c for c in card.classes if c not in segmenter.card.classes]
    if missing:
        raise ValueError(f"segmenter: has no output for classes {missing} of the em-from-labels model")
    if segmenter.card.depth > 1:
        raise ValueError(f"segmenter: reads {segmenter.card.depth} adjacent sections (depth {segmenter.card.depth}); "
                         "rendered samples are single sections: use a depth-1 segmenter")
    maps = store_label_maps(card, label_store, seed)(0, samples)
    request = GenerationRequest(samples=len(maps), seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                                guidance=guidance, dataset=dataset)
    counts = [Counts() for _ in card.classes]
    for batch in generate(card, denoiser, request, lambda start, stop: maps[start:stop]):
        probs = probabilities(segmenter.card, segmenter.segment(batch.samples[:, :1]))
        for probs_one, codes in zip(probs, label_codes(card, batch.label_map, None), strict=True):
            masks = masks_from_probabilities(segmenter.card, probs_one)
            for k, name in enumerate(card.classes):
                counts[k].add(masks[segmenter.card.classes.index(name)], codes[k])
    report = segmentation_report(card.classes, counts)
    report.update({"label_store": label_store, "dataset": dataset, "samples": len(maps), "seed": seed,
                   "sampler": sampler, "steps": steps, "spacing": spacing, "guidance": guidance})
    return report


def evaluate_presence(generated: str, real: Sequence[str], classes: Sequence[str], *, crops: Sequence[str] = (),
                      voxel_size: Sequence[float] | None = None) -> dict:
    """Per class, the share of generated samples that hold an object of real size, beside the share of real
    patches of the samples' size that do: does the model draw a class as often as the data holds it, and does
    class-presence guidance raise that share? ("Of real size": emserve.evaluation.metrics, presence.)

    Real patches are the real crops' z-planes cut into tiles of the samples' size as training cuts them (a grid
    whose last row and column sit flush with the border), at `voxel_size` (default: the finest); only samples and
    tiles where the class is annotated count (a sample that screening rejected has no labels).
    """
    store = EMStore(generated)
    drawn = [store.read_crop(crop, classes).labels for crop in store.crops]  # [K, N, P, P] each
    if not drawn:
        raise ValueError(f"generated: {generated} holds no label maps; generate pairs (`emserve generate pairs`)")
    size = drawn[0].shape[-1]
    real_crops = held_out_crops(real, classes, crops, voxel_size)
    patches = PatchSampler(real_crops, size, augment=False)
    tiles = patches.cut(patches.tiles()).labels  # [N, K, P, P]
    rows = []
    for k, name in enumerate(classes):
        min_pixels = presence_threshold(np.concatenate([plane_object_sizes(c.labels[k]) for c in real_crops]))
        samples = [plane for labels in drawn for plane in labels[k]]
        rows.append({"name": name, "min_object_pixels": min_pixels, "generated": presence_share(samples, min_pixels),
                     "real": presence_share(tiles[:, k], min_pixels)})
    return {"generated_store": generated, "real_stores": list(real), "crops": [f"{c.dataset}/{c.name}" for c in
            real_crops], "samples": sum(int((d != UNKNOWN).any(axis=(0, 2, 3)).sum()) for d in drawn),
            "patch_size": size, "classes": rows}


def generated_patches(path: str, count: int) -> np.ndarray:
    """Up to `count` generated EM samples [N, H, W] in [-1, 1] (each z-slice of a generated store is one)."""
    store = EMStore(path)
    volume = store.em_volume(store.em_level())
    return store.normalize(np.asarray(volume[:count]))


def real_patches(paths: Sequence[str], count: int, size: int, seed: int,
                 voxel_size: Sequence[float] | None = None) -> np.ndarray:
    """`count` random real EM patches [N, size, size] in [-1, 1] from the stores' whole volumes."""
    sampler = RawPatchSampler([EMStore(p) for p in paths], size, voxel_size=voxel_size, augment=False)
    raw, _ = sampler.sample(np.random.default_rng(seed), count)
    return raw[:, 0]


def evaluate_realism(generated: str, real: Sequence[str], *, samples: int = 256, seed: int = 0,
                     picture: Path | None = None, voxel_size: Sequence[float] | None = None) -> dict:
    """FD / KID of the generated store's EM against real patches of the same size, with the real-vs-real floor
    from a second, independent draw (real EM at `voxel_size`, default the finest). With `picture`, also a
    "which one is fake?" grid (answers in the report)."""
    fake = generated_patches(generated, samples)
    if len(fake) < 2:
        raise ValueError(f"generated: {generated} holds {len(fake)} sample(s); realism needs at least 2")
    both = real_patches(real, 2 * len(fake), fake.shape[-1], seed, voxel_size)
    report = {"generated_store": generated, "real_stores": list(real), "seed": seed,
              **realism(fake, both[: len(fake)], both[len(fake):])}
    if picture is not None:
        report["quiz"] = fake_or_real_grid(fake, both, picture, seed)
    return report


def fake_or_real_grid(fake: np.ndarray, real: np.ndarray, path: Path, seed: int, count: int = 16) -> dict:
    """A shuffled grid of real and generated patches, half each; returns the PNG path and the answers."""
    half = min(count // 2, len(fake), len(real))
    tiles = [("generated", p) for p in fake[:half]] + [("real", p) for p in real[:half]]
    order = np.random.default_rng(seed).permutation(len(tiles))
    shuffled = [tiles[i] for i in order]
    save_png(grid([raw_to_rgb(p) for _, p in shuffled], columns=4), path)
    return {"picture": str(path), "answers": [kind for kind, _ in shuffled], "reading_order": "rows, left to right"}

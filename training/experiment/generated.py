"""The generated data of an experiment: pairs from a pairs DDPM, those pairs filtered by agreement with a
network trained on real data, and real label maps (as they are, or deformed) drawn as new EM.

Filtering by agreement: a generated pair is only useful if its EM shows what its labels say. A segmentation
network trained on real pairs reads the generated EM; its Dice against the generated labels is the pair's
agreement. The threshold is set on real data the network trained on, never on held-out crops: a pair is kept if
the network agrees with it at least as well as with the lower `quantile` of real training patches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from emserve.classes import UNKNOWN
from emserve.data.patches import (
    PatchBatch,
    PatchSampler,
    elastic_coordinates,
    label_channels,
    load_crops,
    warp,
)
from emserve.data.sources import GROUNDTRUTH_GROUP
from emserve.data.store import EMStore
from emserve.data.writer import atomic_directory
from emserve.diffusion import DEFAULT_LABEL_GUIDANCE
from emserve.evaluation.metrics import confusion
from emserve.evaluation.statistics import mean_dice
from emserve.pipelines import GenerationRequest, LabelSource, generate_store, sample_seed
from emserve.postprocess import Screening
from emserve.runtime.base import Runtime
from emserve.runtime.load import load_runtime
from emserve.segmentation import masks_from_probabilities, probabilities
from training.experiment.config import ExperimentConfig


def generate_pairs(cfg: ExperimentConfig, checkpoint: Path, store: Path, seed: int, present: tuple[str, ...] = (),
                   screen: bool = True) -> Path:
    """Generate `cfg.samples` pairs (screened, for training) from a DDPM checkpoint into `store` (resuming)."""
    request = GenerationRequest(samples=cfg.samples, seed=seed, sampler=cfg.sampler, steps=cfg.sample_steps,
                                spacing=cfg.spacing, present=present, despeckle=cfg.despeckle,
                                label_method=cfg.label_method)
    with load_runtime(checkpoint, "torch") as runtime:
        generate_store(runtime.card, runtime, request, store, screening=Screening() if screen else None,
                       resume=store.exists())
    return store


def agreement(segmenter: Runtime, raw: np.ndarray, labels: np.ndarray, batch: int = 32) -> np.ndarray:
    """Per patch, the mean Dice over classes of the network's masks for raw [N, H, W] (in [-1, 1]) against
    labels [N, K, H, W] (0/1/255); 1 where neither holds any class (they agree that nothing is there)."""
    scores = []
    for start in range(0, len(raw), batch):
        logits = segmenter.segment(raw[start:start + batch, None].astype(np.float32))
        masks = np.stack([masks_from_probabilities(segmenter.card, p) for p in probabilities(segmenter.card, logits)])
        counts = confusion(masks, labels[start:start + batch]).sum(axis=(2, 3))  # [N, K, 3]
        scores.append(np.nan_to_num(mean_dice(counts), nan=1.0))
    return np.concatenate(scores) if scores else np.zeros(0)


def annotated_tiles(cfg: ExperimentConfig, crops: dict[str, list[str]], labelled_slices: int) -> PatchBatch:
    """The patch-sized z-plane tiles of the real training crops that hold an annotated voxel, as the arms with
    `labelled_slices` (0: all) see them, so only annotations those arms may use."""
    loaded = load_crops([EMStore(p) for p in cfg.stores], cfg.classes, cfg.voxel_size, crops, labelled_slices)
    sampler = PatchSampler(loaded, cfg.patch_size, augment=False, dataset_ids=dataset_ids(cfg))  # z planes
    tiles = sampler.cut(sampler.tiles())
    annotated = (tiles.labels != UNKNOWN).any(axis=(1, 2, 3))
    return PatchBatch(tiles.raw[annotated], tiles.labels[annotated], tiles.dataset[annotated])


def dataset_ids(cfg: ExperimentConfig) -> dict[str, int]:
    """Dataset name -> the id its tiles carry: the stores' names in sorted order."""
    return {name: i for i, name in enumerate(sorted(EMStore(p).name for p in cfg.stores))}


def real_agreement(cfg: ExperimentConfig, segmenter: Runtime, crops: dict[str, list[str]],
                   labelled_slices: int) -> np.ndarray:
    """Agreement of the network with the annotated tiles of the real training crops that it was trained on."""
    tiles = annotated_tiles(cfg, crops, labelled_slices)
    return agreement(segmenter, tiles.raw[:, 0], tiles.labels)


def filter_record(store: Path) -> dict:
    """What `filter_store` kept, as recorded in the filtered store."""
    return EMStore(store).root.attrs["emserve"]["filtered"]


def filter_store(source: Path, out: Path, segmenter_path: Path, threshold_from: np.ndarray, quantile: float,
                 classes: list[str]) -> None:
    """Copy the generated store `source` to `out` with the labels of the pairs the segmenter disagrees with
    marked unannotated (so training leaves them out, as screening does), recording what was kept (filter_record).

    `threshold_from`: the segmenter's agreement with real training patches; the threshold is its `quantile`.
    """
    threshold = float(np.quantile(threshold_from, quantile))
    store = EMStore(source)
    with load_runtime(segmenter_path, "torch") as segmenter, atomic_directory(out) as tmp:
        shutil.copytree(source, tmp)
        root = zarr.open_group(str(tmp), mode="r+")
        kept = total = 0
        for crop in store.crops:
            pairs = store.read_crop(crop, classes)
            labelled = (pairs.labels != UNKNOWN).any(axis=(0, 2, 3))  # screening's rejects have no labels
            score = agreement(segmenter, pairs.raw, pairs.labels.transpose(1, 0, 2, 3))
            dropped = labelled & (score < threshold)
            for name in classes:
                array = root[f"{GROUNDTRUTH_GROUP}/{crop}/{name}/s0"]
                for z in np.flatnonzero(dropped):
                    array[int(z)] = UNKNOWN
            kept += int((labelled & ~dropped).sum())
            total += int(labelled.sum())
        record = {"source": str(source), "segmenter": str(segmenter_path), "quantile": quantile,
                  "threshold": threshold, "real_patches": len(threshold_from), "kept": kept, "screened_pairs": total}
        root.attrs.update({"emserve": {**root.attrs["emserve"], "filtered": record}})


def few_label_maps(cfg: ExperimentConfig, crops: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """{dataset: label maps [N, K, P, P] in the store encoding}: the annotated tiles of the few-label training
    crops, by dataset."""
    tiles = annotated_tiles(cfg, crops, cfg.few_slices)
    return {name: tiles.labels[tiles.dataset == i] for name, i in dataset_ids(cfg).items()
            if (tiles.dataset == i).any()}


def deform(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label map [K, P, P] (0/1/255) elastically deformed (`elastic_coordinates`, nearest-neighbour so the
    codes stay codes), then flipped and rotated at random."""
    out = warp(labels, elastic_coordinates(labels.shape[-1], rng), order=0)
    out = np.rot90(out, int(rng.integers(4)), axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if rng.integers(2) else out)


def label_source(labels: np.ndarray, seed: int, deformed: bool) -> LabelSource:
    """Sample i -> label map i of an order shuffled by `seed` (repeating once every map was drawn), deformed with
    its own random stream (seed, i) if asked, so a sample does not depend on the batch it is drawn in."""
    order = np.random.default_rng(seed).permutation(len(labels))

    def maps(start: int, stop: int) -> np.ndarray:
        chosen = [labels[order[i % len(labels)]] for i in range(start, stop)]
        if deformed:
            chosen = [deform(m, np.random.default_rng([seed, i])) for m, i in zip(chosen, range(start, stop),
                                                                                  strict=True)]
        return label_channels(np.stack(chosen))

    return maps


def render(cfg: ExperimentConfig, checkpoint: Path, maps: dict[str, np.ndarray], out: Path, seed: int,
           deformed: bool) -> list[Path]:
    """Draw `cfg.samples` EM images for the label maps (deformed or not) into `<rendered|augmented>-<dataset>.zarr`
    stores: shared among the datasets by their number of maps, each in its own dataset's style, with its own
    seed (a stream of `seed` split off by the dataset's index) for the noise, the order and the deformations."""
    counts = split_in_proportion(cfg.samples, [len(m) for m in maps.values()])
    stores = []
    with load_runtime(checkpoint, "torch") as runtime:
        for index, ((dataset, labels), count) in enumerate(zip(maps.items(), counts, strict=True)):
            if not count:
                continue
            own = sample_seed(seed, index)
            request = GenerationRequest(samples=count, seed=own, sampler=cfg.sampler, steps=cfg.sample_steps,
                                        spacing=cfg.spacing, guidance=DEFAULT_LABEL_GUIDANCE, dataset=dataset)
            store = out / f"{'augmented' if deformed else 'rendered'}-{dataset}.zarr"
            generate_store(runtime.card, runtime, request, store, label_source(labels, own, deformed),
                           resume=store.exists())
            stores.append(store)
    return stores


def split_in_proportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, rounded so the parts add up to `total` (largest remainders)."""
    exact = np.asarray(weights, float) * total / sum(weights)
    parts = np.floor(exact).astype(int)
    parts[np.argsort(parts - exact)[: total - parts.sum()]] += 1
    return parts.tolist()

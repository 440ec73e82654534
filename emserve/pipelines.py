"""Generation pipelines: model card + denoise callable + request -> batches of samples -> CellMap stores.

Used by the CLI, the service and the experiment; they see only a card and a denoise callable, so the same pipeline runs
over any backend. A sample is a function of (model, per-sample seed, request): sample i of a request with seed s
always gets the seed `sample_seed(s, i)`, whatever the batch size, and batches are written as they finish, so
memory stays bounded and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emserve.card import RAW, ModelCard
from emserve.checks import check_choice, check_range, show
from emserve.classes import ABSENT, PRESENT, UNKNOWN, masks_from_ids
from emserve.data.lock import store_lock
from emserve.data.ngff import multiscales_attrs, pyramid_levels
from emserve.data.patches import PatchSampler, label_channels, load_crops
from emserve.data.sources import EM_GROUP
from emserve.data.stacks import discover, read_stack
from emserve.data.store import EMStore, is_store
from emserve.data.writer import EM_NAME, CropToWrite, add_crop, atomic_directory, fsync_tree, provenance
from emserve.diffusion import (
    DEFAULT_LABEL_DRAWS,
    DEFAULT_LABEL_SAMPLER,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    SAMPLERS,
    SPACINGS,
    Denoise,
    Guidance,
    make_schedule,
    sample,
)
from emserve.distributed import run_tasks
from emserve.pictures import grid, pair_tile, raw_to_uint8, save_png
from emserve.postprocess import DEFAULT_LABEL_METHOD, LABEL_METHODS, Screening, labels_from_channels
from emserve.runtime.load import RuntimeSpec

LabelSource = Callable[[int, int], np.ndarray]  # (start, stop) -> label-map channels [stop-start, K, H, W]
NOMINAL_VOXEL_SIZE = (1.0, 1.0, 1.0)  # generated samples whose model does not say what scale they stand for
# What a stored request without these fields was made with (they were added later): a resume compares like with like.
FIELDS_ADDED_LATER = {"despeckle": 0, "spacing": "trailing"}
GuidanceScales = float | dict[str, float]  # one scale, or a weight per condition (the conditions not named weigh 1)
MAX_SEED = 2**63 - 1  # seeds are recorded as int64 (store attributes, npz metadata)
MAX_LABEL_SAMPLES = 256  # label maps drawn per tile when a pairs model segments: each costs a whole sampling run


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. `present`/`absent` steer class presence; `dataset` steers the domain."""

    samples: int
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    spacing: str = DEFAULT_SPACING
    guidance: GuidanceScales = 1.0
    rescale: float = 0.0
    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    dataset: str | None = None
    batch_size: int = 8
    label_method: str = DEFAULT_LABEL_METHOD
    despeckle: int = 0  # label objects smaller than this many pixels are dropped (before screening)

    def __post_init__(self) -> None:
        """The checks that need no model (`check_request` adds the model's); the one validator of a request, which
        the CLI, the service and the experiment all go through."""
        check_range("samples", self.samples, 1, math.inf)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_range("batch_size", self.batch_size, 1, math.inf)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("spacing", self.spacing, SPACINGS)
        check_choice("label_method", self.label_method, LABEL_METHODS)
        for field, scale in guidance_weights(self.guidance).items():
            check_range(field, scale, -math.inf, math.inf)  # finite: NaN and the infinities fail
        check_range("rescale", self.rescale, 0, 1)
        both = set(self.present) & set(self.absent)
        if both:
            raise ValueError(f"present/absent: {sorted(both)} cannot be both present and absent")


@dataclass
class GeneratedBatch:
    index: int
    start: int
    seeds: list[int]
    samples: np.ndarray  # [B, C, H, W] in [-1, 1], the card's channels
    label_map: np.ndarray | None  # em-from-labels: the conditioning channels [B, K, H, W]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request: independent streams, no overlap between nearby request seeds."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class LabelSampling:
    """Segmentation by a pairs DDPM (the study's outlook): `samples` label maps drawn for each tile with its EM held
    as a known channel (`sample(known=...)`); their mean is the probability, their spread (standard deviation)
    the uncertainty. The SDE sampler by default (DEFAULT_LABEL_SAMPLER says why)."""

    samples: int = DEFAULT_LABEL_DRAWS
    sampler: str = DEFAULT_LABEL_SAMPLER
    steps: int = DEFAULT_STEPS
    seed: int = 0
    dataset: str | None = None  # the dataset condition (None: its null)

    def __post_init__(self) -> None:
        check_range("samples", self.samples, 1, MAX_LABEL_SAMPLES)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_choice("sampler", self.sampler, SAMPLERS)


def tile_seed(seed: int, origin: tuple[int, ...], index: int) -> int:
    """The seed of label sample `index` of the tile at `origin` (slice, y, x): a tile's samples depend on where it
    lies, not on which batch or block computed it."""
    return int(np.random.SeedSequence(seed, spawn_key=(*origin, index)).generate_state(1, np.uint32)[0])


def sample_labels(card: ModelCard, denoise: Denoise, tiles: np.ndarray, origins: Sequence[tuple[int, ...]],
                  sampling: LabelSampling) -> tuple[np.ndarray, np.ndarray]:
    """(probability, uncertainty) [B, K, H, W] of a pairs model's classes for EM tiles [B, 1, H, W] in [-1, 1]: the
    mean and standard deviation of `sampling.samples` label maps drawn per tile given its EM."""
    if card.mode != "pairs":
        raise ValueError(f"model: a {card.mode!r} model cannot draw labels for given EM; give a pairs model")
    count, (height, width) = sampling.samples, tiles.shape[2:]
    batch = len(tiles) * count
    seeds = [tile_seed(sampling.seed, origin, k) for origin in origins for k in range(count)]
    cond, _ = conditions(card, GenerationRequest(samples=batch, dataset=sampling.dataset), batch, None)
    known = np.zeros((batch, len(card.channels), height, width))
    known[:, 0] = np.repeat(tiles[:, 0], count, axis=0)
    em_only = np.arange(len(card.channels))[:, None, None] == 0
    x = sample(denoise, make_schedule(card.schedule, card.timesteps), card.objective, known.shape[1:], seeds, cond,
               sampler=sampling.sampler, steps=sampling.steps, known=(known, em_only))
    labels = (x[:, 1:] > 0).reshape(len(tiles), count, len(card.classes), height, width).astype(np.float32)
    return labels.mean(axis=1), labels.std(axis=1)


# The order in which a weight per condition chains the conditions (emserve.diffusion.guidance): what the sample
# shows (its label map, which classes are in it), then how it looks (the dataset), so that the last weight steers
# the domain's look of content the earlier ones fixed: label fidelity and realism get a knob each.
GUIDANCE_ORDER = ("label_map", "classes", "dataset")


def guidance_weights(guidance: GuidanceScales) -> dict[str, float]:
    """{field name: scale} of a request's guidance, for checks and messages."""
    if isinstance(guidance, Mapping):
        return {f"guidance[{show(name)}]": scale for name, scale in guidance.items()}
    return {"guidance": guidance}


def chained_scale(card: ModelCard, guidance: GuidanceScales) -> float | list[tuple[tuple[str], float]]:
    """The `Guidance.scale` of a request's guidance: one scale as it is; a weight per condition as the chain of
    the card's conditions in GUIDANCE_ORDER, each condition not named weighing 1 (conditioned, not extrapolated)."""
    if not isinstance(guidance, Mapping):
        return guidance
    return [((name,), float(guidance.get(name, 1.0))) for name in GUIDANCE_ORDER if name in card.conditions]


def conditions(card: ModelCard, request: GenerationRequest, batch: int,
               label_map: np.ndarray | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Condition inputs for a batch and their nulls, checked against what the card accepts."""
    k, size = len(card.classes), card.patch_size
    cond: dict[str, np.ndarray] = {}
    null = card.null_conditions(batch, size, size)
    if request.present or request.absent:
        if not card.class_condition:
            raise ValueError("present/absent: this model has no class-presence condition")
        vector = np.zeros(k, np.float32)
        for field, names, value in (("present", request.present, 1.0), ("absent", request.absent, -1.0)):
            for name in names:
                if name not in card.classes:
                    raise ValueError(f"{field}: {show(name)} is not one of the model's classes; allowed: "
                                     f"{', '.join(card.classes)}")
                vector[card.classes.index(name)] = value
    if card.class_condition:
        cond["classes"] = np.tile(vector if request.present or request.absent else np.zeros(k, np.float32),
                                  (batch, 1))
    if card.datasets:
        cond["dataset"] = np.full(batch, card.dataset_id(request.dataset), np.int64)
    elif request.dataset is not None:
        card.dataset_id(request.dataset)  # raises: this model has no dataset condition
    if card.label_map_condition:
        if label_map is None:
            raise ValueError("label maps: this model generates EM from label maps; give some (--labels)")
        if label_map.shape != (batch, k, size, size):
            raise ValueError(f"label maps: shape {label_map.shape[1:]} per sample; the model wants {(k, size, size)} "
                             f"(classes {', '.join(card.classes)})")
        cond["label_map"] = label_map.astype(np.float32)
    elif label_map is not None:
        raise ValueError(f"label maps: a {card.mode!r} model takes no label maps")
    return cond, null


def label_maps_from_ids(card: ModelCard, ids: np.ndarray) -> np.ndarray:
    """Index maps [N, H, W] of CellMap class ids (0 = none of them) -> label-map channels [N, K, H, W] of an
    em-from-labels model: +1 where the model's class (or any member of a group class) is, -1 elsewhere."""
    ids = np.asarray(ids)
    size = card.patch_size
    if ids.ndim != 3 or ids.shape[1:] != (size, size):
        raise ValueError(f"label maps: shape {ids.shape}; this model takes [N, {size}, {size}] index maps (class ids "
                         f"of {', '.join(card.classes)})")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"label maps: dtype {ids.dtype}; index maps hold integer CellMap class ids")
    masks = masks_from_ids(ids, card.classes)
    return np.where(masks, 1.0, -1.0).astype(np.float32).transpose(1, 0, 2, 3)


def store_label_maps(card: ModelCard, store: str, seed: int) -> LabelSource:
    """Label maps from a store's crops, in the model's classes: patch-sized tiles in an order shuffled by `seed`,
    sample i -> tile i (repeating when the request asks for more samples than there are tiles)."""
    sampler = PatchSampler(load_crops([EMStore(store)], card.classes), card.patch_size, augment=False)
    tiles = sampler.tiles()
    order = np.random.default_rng(seed).permutation(len(tiles))
    return lambda start, stop: label_channels(sampler.cut([tiles[order[i % len(tiles)]]
                                                          for i in range(start, stop)]).labels)


def check_request(card: ModelCard, request: GenerationRequest) -> None:
    """Refuse a request the model cannot serve before anything is computed or written."""
    if card.mode == "segmentation":
        raise ValueError("model: a segmentation model does not generate; use `emserve segment`")
    check_range("despeckle", request.despeckle, 0, card.patch_size**2)
    if isinstance(request.guidance, Mapping):
        unknown = sorted(set(request.guidance) - set(card.conditions))
        if unknown:
            names = ", ".join(show(name) for name in unknown[:5]) + (f" and {len(unknown) - 5} more"
                                                                      if len(unknown) > 5 else "")
            raise ValueError(f"guidance: {names}: not a condition of this model; allowed: "
                             f"{', '.join(card.conditions) or 'none (it has no conditions)'}")
    check_range("steps", request.steps, 1, card.timesteps)
    k, size = len(card.classes), card.patch_size
    example = np.zeros((1, k, size, size), np.float32) if card.label_map_condition else None
    conditions(card, request, 1, example)


def generate(card: ModelCard, denoise: Denoise, request: GenerationRequest, labels: LabelSource | None = None,
             skip: set[int] = frozenset(), progress: Callable[[int, int], None] | None = None,
             tick: Callable[[], None] | None = None) -> Iterator[GeneratedBatch]:
    """Sample the request batch by batch (batches in `skip` are not computed). `tick` is called before every
    denoiser call, i.e. at each sampler step: raising there stops the request (a service's deadline), where
    `progress` is only called between batches."""
    check_request(card, request)
    if tick is not None:
        denoise = ticking(denoise, tick)
    schedule = make_schedule(card.schedule, card.timesteps)
    shape = (len(card.channels), card.patch_size, card.patch_size)
    starts = range(0, request.samples, request.batch_size)
    for index, start in enumerate(starts):
        if index in skip:
            continue
        stop = min(start + request.batch_size, request.samples)
        seeds = [sample_seed(request.seed, i) for i in range(start, stop)]
        label_map = labels(start, stop) if labels is not None else None
        cond, null = conditions(card, request, stop - start, label_map)
        guidance = Guidance(null, chained_scale(card, request.guidance), request.rescale) \
            if request.guidance != 1.0 else None
        samples = sample(denoise, schedule, card.objective, shape, seeds, cond, sampler=request.sampler,
                         steps=request.steps, spacing=request.spacing, guidance=guidance)
        yield GeneratedBatch(index, start, seeds, samples, label_map)
        if progress is not None:
            progress(stop, request.samples)


def ticking(denoise: Denoise, tick: Callable[[], None]) -> Denoise:
    """`denoise`, calling `tick` first."""
    def call(x: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        tick()
        return denoise(x, t, cond)

    return call


def split_channels(card: ModelCard, batch: GeneratedBatch, request: GenerationRequest,
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """(raw [B,H,W] or None, labels [B,K,H,W]) of a generated batch: bool masks made from generated channels,
    or for em-from-labels the conditioning channels as given (+1 present, -1 absent, 0 unannotated)."""
    has_raw = card.channels[0] == RAW
    raw = batch.samples[:, 0] if has_raw else None
    if batch.label_map is not None:
        return raw, batch.label_map
    channels = batch.samples[:, 1:] if has_raw else batch.samples
    return raw, labels_from_channels(channels, request.label_method, despeckle=request.despeckle,
                                     classes=card.label_classes)


def label_codes(card: ModelCard, masks: np.ndarray, screening: Screening | None) -> np.ndarray:
    """Labels [B,K,H,W] (bool masks, or +1/-1/0 channels) -> store codes (1 present, 0 absent, 255 unannotated).

    A sample the screening rejects keeps its EM but its labels become 255 throughout, so segmentation training
    leaves them out.
    """
    if masks.dtype != bool:
        return np.where(masks > 0, PRESENT, np.where(masks < 0, ABSENT, UNKNOWN)).astype(np.uint8)
    codes = np.where(masks, PRESENT, ABSENT).astype(np.uint8)
    if screening is not None and card.mode in ("pairs", "labels"):
        for i, sample_masks in enumerate(masks):
            if screening.check(sample_masks, card.classes):
                codes[i] = UNKNOWN
    return codes


def generated_voxel_size(card: ModelCard, request: GenerationRequest) -> tuple[float, ...]:
    """The voxel size a generated store carries: that of the dataset its samples stand for (the one requested, or
    the only scale the model learnt), so generated and real data mix at the right scale; NOMINAL_VOXEL_SIZE where
    the card cannot say (models trained before cards recorded it, or datasets of several scales and none asked)."""
    sizes = card.voxel_sizes
    if request.dataset in sizes:
        return tuple(float(v) for v in sizes[request.dataset])
    scales = {tuple(float(v) for v in size) for size in sizes.values()}
    return scales.pop() if len(scales) == 1 else NOMINAL_VOXEL_SIZE


class GeneratedStore:
    """A CellMap-layout store of generated samples: sample i is z-slice i of the EM; batch b is crop<b+1>
    with per-sample seeds and the model's sha256 in its attributes. Crops are added atomically, so the crops
    present are the batches finished, and a rerun with `resume` skips them."""

    def __init__(self, path: str | Path, card: ModelCard, request: GenerationRequest, resume: bool = False,
                 precision: str = "fp32"):
        self.path, self.card, self.request = Path(path), card, request
        self.voxel_size = generated_voxel_size(card, request)
        record = {"request": asdict(request), "model": {"sha256": card.weights, "mode": card.mode,
                                                        "classes": card.classes}}
        if precision != "fp32":  # recorded only when not the exported graph's own, so older stores still resume
            record["model"]["precision"] = precision
        self.record = json.loads(json.dumps(record))  # as it reads back from the attributes
        if self.path.exists():
            if not resume:
                raise FileExistsError(f"out: {self.path} exists; pass --resume to continue it or choose another path")
            self._check_same_run()
            self.root = zarr.open_group(str(self.path), mode="r+")
            self.voxel_size = EMStore(self.path).em_level().voxel_size  # as made (stores made before it was known)
        else:
            self._create()

    def _create(self) -> None:
        """The empty store, made under a temporary name and renamed: a crash leaves no store a resume would trust."""
        size = self.card.patch_size
        with atomic_directory(self.path) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            root.attrs.update(provenance(generated=self.record, complete=False))
            em = root.require_group(EM_GROUP).create_group(EM_NAME)
            em.attrs.update({**multiscales_attrs(EM_NAME, pyramid_levels(self.voxel_size, (0, 0, 0), 1)),
                             # the exact inverse of raw_to_uint8 when read back (not a percentile stretch)
                             "omero": {"channels": [{"window": {"start": 0, "end": 255}}]}})
            em.create_array("s0", shape=(self.request.samples, size, size), dtype=np.uint8,
                            chunks=(1, size, size), fill_value=0)
        self.root = zarr.open_group(str(self.path), mode="r+")

    def _check_same_run(self) -> None:
        attrs = zarr.open_group(str(self.path), mode="r").attrs.asdict()
        before = attrs.get("emserve", {}).get("generated") or {}
        if "request" in before:
            before["request"] = {**FIELDS_ADDED_LATER, **before["request"]}
        if before != self.record:
            raise ValueError(f"resume: {self.path} was generated with a different model or request; "
                             f"choose another output path")

    def done(self) -> set[int]:
        return {int(name.removeprefix("crop")) - 1 for name in EMStore(self.path).crops}

    def write(self, batch: GeneratedBatch, raw: np.ndarray | None, codes: np.ndarray) -> None:
        """Write one batch: EM slices, then its crop (label codes [B,K,H,W] from `label_codes`) atomically."""
        if raw is not None:
            self.root[f"{EM_GROUP}/{EM_NAME}/s0"][batch.start: batch.start + len(raw)] = raw_to_uint8(raw)
            for i in range(batch.start, batch.start + len(raw)):  # on disk before the crop marks the batch done
                chunk = self.path / EM_GROUP / EM_NAME / "s0" / f"{i}.0.0"  # one sample per chunk (see _create)
                if chunk.exists():  # an all-zero sample equals the fill value and has no file
                    fsync_tree(chunk)
        labels = {name: codes[:, k] for k, name in enumerate(self.card.label_classes)}
        attrs = {"seeds": batch.seeds, "samples": [batch.start, batch.start + len(batch.seeds)]}
        add_crop(self.path, CropToWrite(f"crop{batch.index + 1}", (batch.start, 0, 0), labels, attrs=attrs),
                 self.voxel_size)

    def finish(self) -> None:
        self.root.attrs.update({"emserve": {**self.root.attrs["emserve"], "complete": True}})


@dataclass(frozen=True)
class GenerateBatch:
    """The task that generates batch `index` of a request into its store, returning the samples of it that the
    preview shows (the request's first `shown`). Picklable, a Dask worker's task, when `inputs` is
    (`OpenedForGeneration`); every batch has its own seeds, so where it runs does not change it."""

    inputs: Callable[[], tuple[Denoise, LabelSource | None]]
    card: ModelCard
    store: str
    request: GenerationRequest
    screening: Screening | None
    precision: str
    shown: int

    def __call__(self, index: int) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        denoise, labels = self.inputs()
        store = GeneratedStore(self.store, self.card, self.request, resume=True, precision=self.precision)
        others = set(range(batch_count(self.request))) - {index}
        for batch in generate(self.card, denoise, self.request, labels, skip=others):
            raw, labelled = split_channels(self.card, batch, self.request)
            store.write(batch, raw, label_codes(self.card, labelled, self.screening))
            room = max(0, self.shown - batch.start)
            return (list(raw[:room]) if raw is not None else [None] * min(room, len(labelled)),
                    [m > 0 for m in labelled[:room]])
        raise ValueError(f"batch: {index} is not a batch of this request ({batch_count(self.request)} batches)")


def batch_count(request: GenerationRequest) -> int:
    return -(-request.samples // request.batch_size)


def batch_samples(request: GenerationRequest, index: int) -> int:
    """How many samples batch `index` holds (the last may hold fewer)."""
    return min(request.batch_size, request.samples - index * request.batch_size)


def generate_store(card: ModelCard, denoise: Denoise, request: GenerationRequest, out: Path,
                   labels: LabelSource | None = None, screening: Screening | None = None, *, resume: bool = False,
                   progress: Callable[[int, int], None] | None = None, shown: int = 16,
                   precision: str = "fp32", client: Any = None,
                   on_workers: Callable[[], tuple[Denoise, LabelSource | None]] | None = None) -> Path:
    """Generate the request into the store `out` batch by batch (resuming finished batches when asked), here or on
    the cluster of a Dask `client`, whose workers open the model and label maps with `on_workers` (picklable,
    `OpenedForGeneration`); return the PNG grid beside the store (of the first `shown` samples generated in this
    run, if any). `precision` is what `denoise` computes in (a Runtime's precision), recorded with the model."""
    check_request(card, request)
    if client is not None and on_workers is None:
        raise ValueError("on_workers: a Dask client needs the inputs as its workers open them (OpenedForGeneration)")
    store = GeneratedStore(out, card, request, resume=resume, precision=precision)
    pending = sorted(set(range(batch_count(request))) - store.done())
    task = GenerateBatch(on_workers if client is not None else (lambda: (denoise, labels)), card, str(out), request,
                         screening, precision, shown)
    previews: dict[int, tuple[list, list]] = {}
    done = request.samples - sum(batch_samples(request, i) for i in pending)
    with store_lock(Path(out)):  # a second `--resume` of the same store is refused, not interleaved
        for index, shown_samples in run_tasks(task, pending, client, "generate"):
            previews[index] = shown_samples
            done += batch_samples(request, index)
            if progress is not None:
                progress(done, request.samples)
        store.finish()
    raws = [r for index in sorted(previews) for r in previews[index][0]]
    masks = [m for index in sorted(previews) for m in previews[index][1]]
    picture = Path(out).with_suffix(".png")
    return preview(card, raws, masks, picture) if masks else picture  # resumed a finished store: keep its grid


@dataclass(frozen=True)
class OpenedForGeneration:
    """The model and the label maps of an `emserve generate` run as a Dask worker opens them: by path, once per
    worker process (every batch after the first finds them open)."""

    model: RuntimeSpec
    labels_from: str = ""  # from-labels: the label maps' source (`label_source`)
    seed: int = 0

    def __call__(self) -> tuple[Denoise, LabelSource | None]:
        runtime = self.model.open()
        return runtime, _labels(self.model, self.labels_from, self.seed) if self.labels_from else None


@functools.cache
def _labels(model: RuntimeSpec, labels_from: str, seed: int) -> LabelSource:
    return label_source(model.open().card, labels_from, seed)


def preview(card: ModelCard, raws: Sequence[np.ndarray | None], masks: Sequence[np.ndarray], path: Path,
            columns: int = 4) -> Path:
    """A PNG grid: each sample's EM beside its coloured labels."""
    classes = card.label_classes
    tiles = [pair_tile(r, m if len(classes) else None, classes) for r, m in zip(raws, masks, strict=True)]
    return save_png(grid(tiles, columns=min(columns, len(tiles))), path)


def label_source(card: ModelCard, source: str, seed: int) -> LabelSource:
    """Label maps for from-labels, sample i -> map: random patches of a store's crops (in the model's classes),
    or PNG / TIFF index maps of CellMap class ids (a file, folder or glob), used in order and repeated."""
    if not source:
        raise ValueError("labels_from: from-labels needs label maps; give a store or index-map images with "
                         "--labels-from")
    if not is_store(source):
        maps = label_maps_from_ids(card, read_stack(discover(source, "labels_from"), "labels_from"))
        return lambda start, stop: maps[np.arange(start, stop) % len(maps)]
    return store_label_maps(card, source, seed)

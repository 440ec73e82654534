"""The BentoML service: check a request, run it through emserve.pipelines / segmentation / volumes, return a file.

    bentoml serve emserve.serving.service:EMServe --host 127.0.0.1 --port 3000      # models from ./models

Thin on purpose (BentoDiffusion style): the models load once in `__init__`; each endpoint is a typed method
that checks its fields, calls the functions the CLI calls and encodes the result (emserve.serving.encoding). Every
exported model folder under the models directory is served under its folder name; an endpoint takes the first
model of its mode unless the request names one. Every result records the model (name, mode, backend, sha256 of
its weights and files), the per-sample seeds and all parameters.

Settings come from the environment (emserve.serving.settings); Guard (emserve.serving.guard) admits requests
before BentoML reads them; emserve.serving.bentoml_compat holds what leans on BentoML's internals.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument, NotFound
from bentoml.validators import ContentType

from emserve import __version__
from emserve.card import CARD_NAME, ModelCard
from emserve.checks import check_choice, check_range, show
from emserve.data.patches import check_axis
from emserve.diffusion import (
    DEFAULT_LABEL_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
)
from emserve.pictures import grid, pair_tile, raw_to_uint8
from emserve.pipelines import (
    GeneratedBatch,
    GeneratedStore,
    GenerationRequest,
    GuidanceScales,
    check_request,
    generate,
    guidance_weights,
    label_codes,
    split_channels,
)
from emserve.postprocess import DEFAULT_LABEL_METHOD, Screening
from emserve.runtime.base import Runtime
from emserve.runtime.batching import MicroBatcher
from emserve.runtime.load import load_runtime
from emserve.segmentation import (
    check_threshold,
    masks_from_probabilities,
    raw_to_network,
    segment_array,
    tile_count,
    tiling,
)
from emserve.serving.bentoml_compat import cancel_check, submitted
from emserve.serving.checks import client_errors
from emserve.serving.encoding import npz_bytes, png_bytes, zip_folder
from emserve.serving.guard import Guard, answers_timeout, deadline
from emserve.serving.label_maps import label_maps
from emserve.serving.settings import (
    BATCH_SAMPLES,
    BATCH_WAIT_MS,
    LIMITS,
    MEMORY_BUDGET,
    MODELS_ENV,
    TASK_TTL,
    TIMEOUT,
    TRITON_ENV,
    api_key,
    env_int,
)
from emserve.serving.uploads import decode, read_upload
from emserve.volumes import EMSource, segment_store

FORMATS = ("npz", "zarr.zip", "png")
SUFFIX = {"npz": ".npz", "zarr.zip": ".zarr.zip", "png": ".png"}
SHOWN = 16  # samples or slices in a PNG preview
BATCH_SIZE = 8  # samples per backend call; a request's samples do not depend on it
TIMEOUT_GRACE = 10  # seconds BentoML's own timeout waits past EMSERVE_TIMEOUT (see EMServe)
Result = Annotated[Path, ContentType("application/octet-stream")]
TaskResult = Annotated[bytes, ContentType("application/octet-stream")]


# ---- the models ----------------------------------------------------------------------------------------------

def models_dir() -> Path:
    """EMSERVE_MODELS, else models/ of the source tree (an editable install, a bento), else ./models."""
    if MODELS_ENV in os.environ:
        return Path(os.environ[MODELS_ENV])
    beside = Path(__file__).resolve().parents[2] / "models"
    return beside if beside.is_dir() else Path("models")


def load_models(root: Path, triton_url: str | None, ort_threads: int | None,
                memory_budget: int | None = None) -> dict[str, Runtime]:
    """Every model folder (one holding card.json) under `root`, by folder name, as a Runtime: ONNX Runtime on
    the folder, or the same-named model on a Triton server; each splits calls to fit `memory_budget` bytes.
    A folder that does not load stops the server."""
    if not root.is_dir():
        raise FileNotFoundError(f"{MODELS_ENV}: {root} is not a folder; point it at a folder of exported models "
                                f"(`emserve export ... models`)")
    runtimes: dict[str, Runtime] = {}
    for folder in sorted(p for p in root.iterdir() if (p / CARD_NAME).is_file()):
        if triton_url:
            runtimes[folder.name] = load_runtime(f"{triton_url.rstrip('/')}/{folder.name}", "triton", card=folder,
                                                 memory_budget=memory_budget)
        else:
            runtimes[folder.name] = load_runtime(folder, "onnx", threads=ort_threads, memory_budget=memory_budget)
    if not runtimes:
        raise FileNotFoundError(f"{MODELS_ENV}: {root} holds no model folder (<name>/{CARD_NAME}); export one "
                                f"with `emserve export CHECKPOINT {root}`")
    return runtimes


def describe(name: str, runtime: Runtime) -> dict[str, Any]:
    """What a client needs to know of a served model, and what identifies its weights."""
    card = runtime.card
    return {"name": name, "mode": card.mode, "backend": runtime.backend, "classes": card.classes,
            "datasets": card.datasets, "patch_size": card.patch_size, "class_condition": card.class_condition,
            "depth": card.depth, "weights": card.weights, "files": card.files}


# ---- the service ---------------------------------------------------------------------------------------------

@bentoml.service(name="emserve", workers=1, threads=env_int("EMSERVE_THREADS", 2),
                 traffic={"timeout": TIMEOUT + TIMEOUT_GRACE})
class EMServe:
    """generate_pairs, generate_pairs_task, generate_from_labels and segment over the exported models.

    BentoML's traffic timeout is a backstop for work outside the sampler and tiling loops (decoding, encoding):
    it waits TIMEOUT_GRACE seconds longer, so that a request stopped by its deadline answers with its own message.
    """

    def __init__(self) -> None:
        self.limits = LIMITS
        self.root = models_dir()
        self.runtimes = load_models(self.root, os.environ.get(TRITON_ENV) or None,
                                    env_int("EMSERVE_ORT_THREADS", 0) or None, MEMORY_BUDGET)
        # what generation calls: the runtime, or with EMSERVE_BATCH_WAIT_MS a batcher merging concurrent requests
        self.denoisers = {name: MicroBatcher(runtime, BATCH_SAMPLES, BATCH_WAIT_MS / 1000) if BATCH_WAIT_MS
                          else runtime
                          for name, runtime in self.runtimes.items() if runtime.card.mode != "segmentation"}

    @bentoml.api
    def models(self) -> list[dict[str, Any]]:
        """The served models: name, mode, classes, datasets, patch size, depth (sections a segmentation network
        reads: 3 wants volumes), sha256 of weights and files."""
        return [describe(name, runtime) for name, runtime in self.runtimes.items()]

    @bentoml.api
    @answers_timeout
    def generate_pairs(self, ctx: bentoml.Context, samples: int = 4, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
                       steps: int = DEFAULT_STEPS, spacing: str = DEFAULT_SPACING, guidance: GuidanceScales = 1.0,
                       rescale: float = 0.0, present: list[str] | None = None, absent: list[str] | None = None,
                       dataset: str | None = None, model: str | None = None, label_method: str = DEFAULT_LABEL_METHOD,
                       despeckle: int = 0, screen: bool = False, output: str = "npz") -> Result:
        """EM + label pairs from a "pairs" model. `present` / `absent` steer class presence and `dataset` the
        domain (both need guidance > 1 to matter); `despeckle` drops label objects smaller than that many pixels
        (before screening, with `screen`); `output` is npz (em uint8 [N,H,W], labels uint8 [N,K,H,W]
        1/0/255, classes, seeds, metadata), zarr.zip (a CellMap-layout store) or png (a preview)."""
        settings = {k: v for k, v in locals().items() if k not in ("self", "ctx")}
        return self._pairs(ctx, settings, self.limits.samples, "EMSERVE_MAX_SAMPLES", None)

    @bentoml.task
    @answers_timeout
    def generate_pairs_task(self, ctx: bentoml.Context, samples: int = 64, seed: int = 0,
                            sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                            spacing: str = DEFAULT_SPACING, guidance: GuidanceScales = 1.0, rescale: float = 0.0,
                            present: list[str] | None = None, absent: list[str] | None = None,
                            dataset: str | None = None, model: str | None = None,
                            label_method: str = DEFAULT_LABEL_METHOD, despeckle: int = 0, screen: bool = False,
                            output: str = "npz") -> TaskResult:
        """generate_pairs for big batches, as a task: submit, poll the status, get the result; a cancelled task
        stops at its next batch. Returns bytes, not a file: BentoML stores a task's response by replaying it,
        which fails for file responses with current starlette (KeyError 'method')."""
        settings = {k: v for k, v in locals().items() if k not in ("self", "ctx")}
        path = self._pairs(ctx, settings, self.limits.task_samples, "EMSERVE_MAX_TASK_SAMPLES", cancel_check(ctx))
        return path.read_bytes()

    @bentoml.api
    @answers_timeout
    def generate_from_labels(self, ctx: bentoml.Context, labels: Path, classes: list[str] | None = None,
                             seed: int = 0, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                             spacing: str = DEFAULT_SPACING, guidance: GuidanceScales = DEFAULT_LABEL_GUIDANCE,
                             rescale: float = 0.0, dataset: str | None = None, model: str | None = None,
                             output: str = "npz") -> Result:
        """EM for uploaded label maps, one sample per map, from an "em-from-labels" model (guided by default,
        DEFAULT_LABEL_GUIDANCE: the EM follows its label maps more closely than unguided). `labels`: .npy, .npz,
        zipped zarr or PNG holding index maps [N,H,W] (CellMap ids, or values 1..C naming `classes`) or masks
        [N,C,H,W] (0/1/255, or float +1/-1/0) whose channels `classes` names; H = W = the model's patch size."""
        name, runtime = self.pick_model("em-from-labels", model)
        with client_errors():
            check_choice("output", output, FORMATS)
        decoded = self.decode_upload(labels, "labels", ("npy", "npz", "zarr", "png"), "labels")
        with client_errors("labels"):
            maps = label_maps(runtime.card, decoded, classes, "labels", self.limits.samples)
        request = self.checked_request(runtime.card, samples=len(maps), seed=seed, sampler=sampler, steps=steps,
                               spacing=spacing, guidance=guidance, rescale=rescale, dataset=dataset)
        upload = decoded.array
        record = {"labels_upload": {"kind": decoded.kind, "shape": list(upload.shape), "dtype": str(upload.dtype),
                                    "classes": list(classes or decoded.classes or [])}}
        return self.generate_and_encode(ctx, name, runtime, request, maps, output, None, "generate_from_labels", record)

    @bentoml.api
    @answers_timeout
    def segment(self, ctx: bentoml.Context, image: Path, axis: str = "z", tile: int | None = None,
                overlap: int | None = None, threshold: float = 0.5, probabilities: bool = False,
                model: str | None = None, output: str = "npz") -> Result:
        """Per-class masks of an uploaded EM image [Y,X] or volume [Z,Y,X] (.npy, TIFF, zipped zarr, PNG; uint8, or
        float in [-1, 1]) from a "segmentation" model, tile by tile (slice by slice along `axis`). npz: masks
        uint8 [K,...], classes, metadata, and with `probabilities` float16 [K,...]."""
        name, runtime = self.pick_model("segmentation", model)
        card = runtime.card
        with client_errors():
            check_choice("output", output, FORMATS)
        raw = self.decode_upload(image, "image", ("npy", "tiff", "zarr", "png"), "em").array
        if raw.ndim not in (2, 3) or 0 in raw.shape:
            raise InvalidArgument(f"image: shape {raw.shape}; give an image [Y, X] or a volume [Z, Y, X]")
        with client_errors():
            if tile is not None:
                check_range("tile", tile, 1, self.limits.tile, "EMSERVE_MAX_TILE")
            if overlap is not None:  # a loose bound here: tiling's exact one (below the tile) echoes the value whole
                check_range("overlap", overlap, 0, self.limits.tile, "EMSERVE_MAX_TILE")
            tile, overlap = tiling(card, tile, overlap)
            check_threshold(threshold)
            check_axis(axis)
        axis = axis if raw.ndim == 3 else "z"  # an image is segmented as it is
        self.check_tiles(raw.shape, axis, tile, overlap)
        settings = {"axis": axis, "tile": tile, "overlap": overlap, "threshold": threshold,
                    "probabilities": probabilities, "output": output, "image": {"shape": list(raw.shape),
                                                                                  "dtype": str(raw.dtype)}}
        record = self.provenance(name, runtime, "segment", settings, [])
        if output == "zarr.zip":
            folder = Path(ctx.temp_dir) / "segmentation.zarr"
            with client_errors("image"):
                segment_store(runtime, EMSource(raw if raw.ndim == 3 else raw[None]), folder, axis=axis,
                              tile=tile, overlap=overlap, threshold=threshold, keep_probabilities=probabilities,
                              source_name="upload", tick=deadline(ctx))
            return self.write_result(ctx, "segmentation", output, self.zip_with_record(folder, record))
        with client_errors("image"):
            probs = segment_array(runtime, raw, axis=axis, tile=tile, overlap=overlap, tick=deadline(ctx))
        masks = masks_from_probabilities(card, probs, threshold)
        if output == "png":
            picture = png_bytes(segmentation_picture(card, raw, masks), record)
            return self.write_result(ctx, "segmentation", output, picture)
        arrays = {"masks": masks.astype(np.uint8), "classes": np.array(card.classes), "metadata": metadata(record)}
        if probabilities:
            arrays["probabilities"] = probs.astype(np.float16)
        return self.write_result(ctx, "segmentation", output, npz_bytes(arrays))

    # ---- the steps the endpoints share ------------------------------------------------------------------------

    def pick_model(self, mode: str, name: str | None) -> tuple[str, Runtime]:
        """The model the request names (a served folder name, nothing else), or the first served of `mode`."""
        of_mode = [n for n, runtime in self.runtimes.items() if runtime.card.mode == mode]
        if name is None:
            if not of_mode:
                raise NotFound(f"model: no {mode!r} model is served; export one into {self.root} ({MODELS_ENV}); "
                               f"served: {', '.join(f'{n} ({r.card.mode})' for n, r in self.runtimes.items())}")
            return of_mode[0], self.runtimes[of_mode[0]]
        if name not in of_mode:
            what = f"a {self.runtimes[name].card.mode!r} model" if name in self.runtimes else "not a served model"
            raise InvalidArgument(f"model: {show(name)} is {what}; this endpoint takes {mode!r} models: "
                                  f"{', '.join(of_mode) or 'none served'}")
        return name, self.runtimes[name]

    def decode_upload(self, path: Path, field: str, kinds: Sequence[str], purpose: str) -> Any:
        """Decode a file BentoML stored for this request (in its own temporary folder) from memory."""
        with client_errors():
            return decode(read_upload(path, field, self.limits.upload), field, self.limits.upload, kinds, purpose)

    def checked_request(self, card: ModelCard, *, samples: int, seed: int, sampler: str, steps: int, spacing: str,
                        guidance: GuidanceScales, rescale: float, dataset: str | None, present: Sequence[str] = (),
                        absent: Sequence[str] = (), label_method: str = DEFAULT_LABEL_METHOD,
                        despeckle: int = 0) -> GenerationRequest:
        """A GenerationRequest within the service's limits and accepted by the model (checked before anything
        runs): the limits here, everything else by the pipelines' one validator."""
        with client_errors():
            check_range("steps", steps, 1, self.limits.steps, "EMSERVE_MAX_STEPS")
            for field, scale in guidance_weights(guidance).items():
                check_range(field, scale, 0, self.limits.guidance, "EMSERVE_MAX_GUIDANCE")
            request = GenerationRequest(samples=samples, seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                                        guidance=guidance, rescale=rescale, present=tuple(present),
                                        absent=tuple(absent), dataset=dataset, batch_size=BATCH_SIZE,
                                        label_method=label_method, despeckle=despeckle)
            check_request(card, request)
        return request

    def check_work(self, request: GenerationRequest, field: str) -> None:
        """Samples x steps within EMSERVE_MAX_SAMPLE_STEPS: each is bounded alone, but both at their maxima would
        hold a thread for many minutes. Submitted tasks are exempt: they run in the background until cancelled."""
        work = request.samples * request.steps
        if work > self.limits.sample_steps:
            raise InvalidArgument(f"{field} x steps: {request.samples} x {request.steps} = {work}; at most "
                                  f"{self.limits.sample_steps} per request (EMSERVE_MAX_SAMPLE_STEPS): ask for fewer "
                                  f"{field} or steps{', or submit a task' if field == 'samples' else ''}")

    def check_tiles(self, shape: Sequence[int], axis: str, tile: int, overlap: int) -> None:
        """The tiles a segment request would run, counted from the image's shape before any runs: a small tile at
        a large overlap, or a volume of many tiny slices, asks for far more work than its upload's size says."""
        tiles = tile_count(shape, tile, overlap, axis)
        voxels = tiles * tile * tile
        if tiles > self.limits.tiles or voxels > self.limits.tile_voxels:
            raise InvalidArgument(
                f"tile/overlap: an image of shape {tuple(shape)} in tiles of {tile} overlapping by {overlap} takes "
                f"{tiles} tiles, {voxels} voxels through the network; at most {self.limits.tiles} tiles "
                f"(EMSERVE_MAX_TILES) and {self.limits.tile_voxels} voxels (EMSERVE_MAX_TILE_VOXELS) are allowed: "
                f"use a smaller overlap, another tile size or a smaller image")

    def _pairs(self, ctx: bentoml.Context, settings: dict[str, Any], limit: int, setting: str,
               progress: Callable[[int, int], None] | None) -> Path:
        name, runtime = self.pick_model("pairs", settings["model"])
        with client_errors():
            check_choice("output", settings["output"], FORMATS)
            check_range("samples", settings["samples"], 1, limit, setting)
        request = self.checked_request(runtime.card, samples=settings["samples"], seed=settings["seed"],
                               sampler=settings["sampler"], steps=settings["steps"], spacing=settings["spacing"],
                               guidance=settings["guidance"], rescale=settings["rescale"], dataset=settings["dataset"],
                               present=settings["present"] or (), absent=settings["absent"] or (),
                               label_method=settings["label_method"], despeckle=settings["despeckle"])
        screening = Screening() if settings["screen"] else None
        return self.generate_and_encode(ctx, name, runtime, request, None, settings["output"], screening,
                                        "generate_pairs", {"screen": settings["screen"]}, progress)

    def generate_and_encode(self, ctx: bentoml.Context, name: str, runtime: Runtime, request: GenerationRequest,
                            maps: np.ndarray | None, output: str, screening: Screening | None, endpoint: str,
                            extra: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> Path:
        """Generate the request and encode it as `output`, with the model, seeds and parameters recorded."""
        card = runtime.card
        if not submitted(ctx):
            self.check_work(request, "samples" if maps is None else "labels")
        source = None if maps is None else (lambda start, stop: maps[start:stop])
        with client_errors():
            batches = list(generate(card, self.denoisers[name], request, source, progress=progress,
                                    tick=deadline(ctx)))
        parts = [split_channels(card, batch, request) for batch in batches]
        codes = [label_codes(card, labels, screening) for _, labels in parts]
        seeds = [seed for batch in batches for seed in batch.seeds]
        settings = {**asdict(request), "output": output, **extra}
        record = self.provenance(name, runtime, endpoint, settings, seeds)
        if screening is not None:
            record["screening"] = screening.summary()
        if output == "zarr.zip":
            zipped = self.zip_generated_store(ctx, card, request, batches, parts, codes, record)
            return self.write_result(ctx, endpoint, output, zipped)
        raw = raw_to_uint8(np.concatenate([r for r, _ in parts]))
        if output == "png":
            tiles = [pair_tile(r, m > 0, card.classes) for (rs, ms) in parts for r, m in zip(rs, ms, strict=True)]
            return self.write_result(ctx, endpoint, output, png_bytes(grid(tiles[:SHOWN], min(4, len(tiles))), record))
        arrays = {"em": raw, "labels": np.concatenate(codes), "classes": np.array(card.classes),
                  "seeds": np.array(seeds, np.int64), "metadata": metadata(record)}
        return self.write_result(ctx, endpoint, output, npz_bytes(arrays))

    def zip_generated_store(self, ctx: bentoml.Context, card: ModelCard, request: GenerationRequest,
                            batches: list[GeneratedBatch], parts: list[tuple[np.ndarray | None, np.ndarray]],
                            codes: list[np.ndarray], record: dict[str, Any]) -> bytes:
        """The batches as the CLI writes them (a CellMap-layout store, one crop per batch), zipped."""
        folder = Path(ctx.temp_dir) / "generated.zarr"
        store = GeneratedStore(folder, card, request)
        for batch, (raw, _), code in zip(batches, parts, codes, strict=True):
            store.write(batch, raw, code)
        store.finish()
        return self.zip_with_record(folder, record)

    @staticmethod
    def zip_with_record(folder: Path, record: dict[str, Any]) -> bytes:
        import zarr

        zarr.open_group(str(folder), mode="r+").attrs.update({"service": json.loads(json.dumps(record))})
        return zip_folder(folder)

    @staticmethod
    def provenance(name: str, runtime: Runtime, endpoint: str, settings: dict[str, Any], seeds: list[int]
                   ) -> dict[str, Any]:
        return {"endpoint": endpoint, "emserve": __version__, "model": describe(name, runtime),
                "parameters": settings, "seeds": seeds}

    @staticmethod
    def write_result(ctx: bentoml.Context, stem: str, output: str, data: bytes) -> Path:
        """The result as a file in the request's own temporary folder, which BentoML sends and then deletes."""
        path = Path(ctx.temp_dir) / f"{stem}{SUFFIX[output]}"
        path.write_bytes(data)
        return path


def metadata(record: dict[str, Any]) -> np.ndarray:
    """The record as a 0-d string array: np.load(..., allow_pickle=False)["metadata"].item() gives the JSON."""
    return np.array(json.dumps(record, sort_keys=True))


def segmentation_picture(card: ModelCard, raw: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """EM beside coloured masks, for an image or up to SHOWN evenly spaced slices of a volume (along z)."""
    network = raw_to_network(raw)
    if raw.ndim == 2:
        return grid([pair_tile(network, masks, card.classes)], 1)
    picked = np.unique(np.linspace(0, raw.shape[0] - 1, min(SHOWN, raw.shape[0])).astype(int))
    tiles = [pair_tile(network[z], masks[:, z], card.classes) for z in picked]
    return grid(tiles, min(4, len(tiles)))


EMServe.add_asgi_middleware(Guard, api_key=api_key(), limits=LIMITS, task_ttl=TASK_TTL,
                            task_routes=[f"{api.route}/" for api in EMServe.apis.values() if api.is_task],
                            task_inputs={f"{api.route}/submit": api.input_spec for api in EMServe.apis.values()
                                         if api.is_task})

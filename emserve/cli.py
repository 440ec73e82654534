"""The `emserve` command. Each sub-command is a thin layer over a library function; errors in the user's input
come back as one line naming what is wrong, with exit status 2."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from emserve import cli_options as opt
from emserve.checks import check_choice
from emserve.data.ngff import format_nm
from emserve.diffusion import (
    DEFAULT_LABEL_DRAWS,
    DEFAULT_LABEL_GUIDANCE,
    DEFAULT_LABEL_SAMPLER,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
)
from emserve.postprocess import DEFAULT_LABEL_METHOD
from emserve.reports import SCORE_COLUMNS, scores_csv, write_json, write_text
from emserve.runtime.memory import DEFAULT_MEMORY_BUDGET, parse_bytes

app = typer.Typer(
    help="Diffusion-generated training data for organelle segmentation in volume EM.\n\n"
    "Stores are OME-NGFF zarr in the CellMap layout (<name>.zarr/recon-1/em/fibsem-uint8, "
    "recon-1/labels/groundtruth/crop<N>/<class>); sizes are in nanometres, axes z, y, x.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make, import and inspect vEM stores.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train diffusion and segmentation models (needs the 'train' extra: torch).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
evaluate_app = typer.Typer(help="Score segmentation networks on held-out annotations, and generated EM against "
                                "real EM.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")

console = Console()
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def main() -> None:
    """Entry point: run the app, turning input errors into a one-line message and exit status 2."""
    try:
        app()
    except USER_ERRORS as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write <dataset>.zarr stores and montage PNGs into.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes identical stores.")] = 0,
    datasets: Annotated[int, typer.Option(min=1, help="How many datasets (imaging conditions) to make.")] = 3,
    crops: Annotated[int, typer.Option(min=1, help="Labelled 3D crops per dataset.")] = 3,
    shape: Annotated[str, typer.Option(help="EM shape Z,Y,X of each dataset (default: the embedded data's); "
                                            "larger volumes make benchmark inputs.")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace stores that already exist.")] = False,
) -> None:
    """Write the embedded default data: procedural EM-like volumes with exact organelle labels.

    Datasets differ like real ones do (contrast, noise, blur, voxel size, organelle density), so domain
    conditioning has something to learn. Open the stores in napari or neuroglancer, or look at the PNGs.
    """
    from emserve.data.phantom import DEFAULT_CROP_SHAPE, write_phantoms

    sizes = {}
    if shape:  # crops as large as the embedded data's, or the whole volume where it is smaller
        sizes["shape"] = opt.parse_ints("shape", shape)
        sizes["crop_shape"] = tuple(min(c, s) for c, s in zip(DEFAULT_CROP_SHAPE, sizes["shape"], strict=False))
    paths = write_phantoms(out, seed=seed, datasets=datasets, crops_per_dataset=crops, overwrite=overwrite, **sizes)
    for path in paths:
        console.print(f"wrote {path}")


@data_app.command("import")
def data_import(
    images: Annotated[str, typer.Argument(help="EM slices: a folder of PNG/TIFF files (natural order), a glob, "
                                               "or one multi-page TIFF.")],
    out: Annotated[Path, typer.Argument(help="The store to write, e.g. out/vnc.zarr.")],
    voxel_size: Annotated[str, typer.Option(help="'Z,Y,X' in nm, e.g. 50,4.6,4.6 for ssTEM.")],
    mask: Annotated[list[str] | None, typer.Option(help="CLASS=PATH: a mask stack per class (repeatable).")] = None,
    index_map: Annotated[str, typer.Option(help="A stack of index maps (one value per class) instead of masks.")] = "",
    map: Annotated[list[str] | None, typer.Option(help="VALUES=CLASS for --index-map, e.g. '191=mito', "
                                                "'0,32=pm', '159=unknown' (repeatable).")] = None,
    unmapped: Annotated[str, typer.Option(help="Index-map values with no --map: absent | unknown | error.")] = "absent",
    invert: Annotated[list[str] | None, typer.Option(help="CLASS whose masks mark it with 0 (ISBI membranes).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Mask binarisation threshold (default: mid-range).")] = None,
    labelled_slices: Annotated[str, typer.Option(help="Slices with labels, e.g. '0:16,20:24' (default: all).")] = "",
    holdout: Annotated[int, typer.Option(help="Last N labelled slices become a separate held-out crop.")] = 0,
    rescale: Annotated[str, typer.Option(help="uint16 -> uint8: minmax | percentile | shift.")] = "minmax",
    overwrite: Annotated[bool, typer.Option(help="Replace the store if it exists.")] = False,
) -> None:
    """Import a PNG/TIFF EM stack with per-class masks or index maps into the CellMap layout.

    Each run of labelled slices becomes a crop; --holdout splits the last slices off as a test crop, so
    evaluation reads a named crop. Images without labels give a raw-only store for unlabelled training.
    """
    from emserve.data.stacks import import_stack, parse_masks, parse_value_map

    summary = import_stack(
        images, out, voxel_size, masks=parse_masks(mask or []) or None, index_maps=index_map or None,
        value_map=parse_value_map(map) if map else None, invert=invert or [], threshold=threshold, unmapped=unmapped,
        labelled_slices=labelled_slices or None, holdout=holdout, rescale=rescale, overwrite=overwrite,
        command=command_line(),
    )
    console.print(f"wrote {summary.path}: {summary.shape} voxels of {format_nm(summary.voxel_size, ' x ')} nm")
    for crop, info in summary.crops.items():
        console.print(f"  {crop} ({info['split']}): slices {info['slices']}")
    for name, fraction in summary.class_fractions.items():
        console.print(f"  {name}: {100 * fraction:.2f}% of labelled voxels")


@data_app.command("info")
def data_info(
    store: Annotated[str, typer.Argument(help="A <dataset>.zarr or .n5 path, or an s3:// URL.")],
) -> None:
    """Show a store's EM scale levels (voxel size and offset in nm) and its crops with their classes."""
    from emserve.data.store import EMStore

    em = EMStore(store)
    table = Table(title=f"{em.name}: EM {em.em_group_path}")
    for col in ("level", "shape (z,y,x)", "voxel size nm", "offset nm"):
        table.add_column(col)
    for level in em.em_levels:
        table.add_row(level.path, str(tuple(em.em_volume(level).shape)), format_nm(level.voxel_size, " x "),
                      format_nm(level.translation, " x "))
    console.print(table)
    if not em.crops:
        console.print("no ground-truth crops (raw only)")
    for crop in em.crops:
        console.print(f"{crop}: {', '.join(em.crop_classes(crop))}")


@train_app.command("ddpm")
@opt.option_groups
def train_ddpm(
    stores: Annotated[list[str], typer.Argument(help="Training stores (<dataset>.zarr paths or s3:// URLs).")],
    out: opt.RunFolder,
    mode: Annotated[str, typer.Option(help="em | labels | pairs | em-from-labels")] = "pairs",
    classes: opt.ClassList = "",
    net: opt.NetOptions = opt.NetOptions(),
    schedule: Annotated[str, typer.Option(help="Noise schedule: linear | cosine | sigmoid.")] = "sigmoid",
    objective: Annotated[str, typer.Option(help="What the UNet predicts: eps | x0 | v.")] = "v",
    timesteps: Annotated[int, typer.Option(help="Diffusion steps of the training noise process.")] = 1000,
    class_condition: Annotated[bool, typer.Option(help="Condition on which classes are present.")] = True,
    dataset_condition: Annotated[bool, typer.Option(help="Condition on the dataset (domain).")] = True,
    p_drop: Annotated[float, typer.Option(help="Probability of dropping each condition (CFG training).")] = 0.5,
    raw_weight: Annotated[float, typer.Option(help="pairs: raw loss weight relative to all labels.")] = 1.0,
    run: opt.RunOptions = opt.RunOptions(),
) -> None:
    """Train a diffusion model (DDPM) on 2D patches of vEM stores, with classifier-free guidance conditions.

    Runs data-parallel when launched with torchrun. Checkpoints are safetensors + a JSON model card.
    """
    from emserve.data.store import annotated_classes
    from training.ddpm import DDPMConfig
    from training.ddpm import train_ddpm as train

    names = opt.parse_csv(classes) or (annotated_classes(stores) if mode != "em" else [])
    cfg = DDPMConfig(
        stores=stores, out=str(out), mode=mode, classes=names, schedule=schedule, objective=objective,
        timesteps=timesteps, class_condition=class_condition, dataset_condition=dataset_condition, p_drop=p_drop,
        raw_weight=raw_weight, **net.config(), **run.config(), command=command_line(),
    )
    _report_checkpoint(train(cfg, resume=run.resume))


@train_app.command("seg")
@opt.option_groups
def train_seg(
    stores: Annotated[list[str] | None, typer.Argument(help="Real training stores (<dataset>.zarr paths or s3:// "
                                                            "URLs); may be left out with --generated.")] = None,
    out: opt.RunFolder = Path("runs/seg"),
    generated: Annotated[list[str] | None, typer.Option(help="A generated store (from `emserve generate`); "
                                                             "repeatable.")] = None,
    generated_fraction: Annotated[float, typer.Option(help="With real and generated stores: share of every "
                                                           "batch from the generated ones.")] = 0.5,
    generated_weight: Annotated[float, typer.Option(help="With real and generated stores: loss weight of a "
                                                         "generated patch, in (0, 1] (a real one weighs 1).")] = 1.0,
    init: Annotated[Path | None, typer.Option(help="Start from this checkpoint's (EMA) weights: a segmentation "
                                                   "one (e.g. pretrained on generated pairs; same classes and "
                                                   "UNet) or a DDPM's denoiser of the same UNet shape (denoising "
                                                   "pretraining).")] = None,
    classes: opt.ClassList = "",
    exclusive: Annotated[bool, typer.Option(help="One class per voxel (softmax over background + classes) "
                                                 "instead of a sigmoid per class.")] = False,
    dice_weight: Annotated[float, typer.Option(help="Weight of the Dice loss beside cross-entropy.")] = 1.0,
    depth: Annotated[int, typer.Option(help="Sections the network reads, an odd number: 3 = each section with its "
                                            "two neighbours as input channels (2.5D, real stores only); 1 = "
                                            "2D.")] = 1,
    elastic: Annotated[float, typer.Option(help="Share of every batch made of elastically deformed copies of "
                                              "annotated real patches (EM and labels bent alike: new shapes from "
                                              "the same annotations), in [0, 1]; not with --generated.")] = 0.0,
    net: opt.NetOptions = opt.NetOptions(),
    run: opt.RunOptions = opt.RunOptions(),
) -> None:
    """Train a 2D segmentation network (the denoiser's UNet, no timestep) on real, generated or mixed pairs.

    With --depth 3 it reads each section's neighbours along --axis too (mirrored at a crop's ends) and labels the
    middle one. Unannotated classes are left out of the loss. Same checkpoints, model card, resume and progress as
    `train ddpm`; previews show true labels beside predictions on fixed patches.
    """
    from emserve.data.store import annotated_classes
    from training.seg import SegConfig
    from training.seg import train_seg as train

    stores, generated = list(stores or []), list(generated or [])
    cfg = SegConfig(
        stores=stores, out=str(out), generated=generated, generated_fraction=generated_fraction,
        generated_weight=generated_weight, init=str(init or ""),
        classes=opt.parse_csv(classes) or annotated_classes(stores + generated), exclusive=exclusive,
        dice_weight=dice_weight, depth=depth, elastic=elastic, **net.config(), **run.config(),
        command=command_line(),
    )
    _report_checkpoint(train(cfg, resume=run.resume))


@app.command("experiment")
def experiment(
    stores: Annotated[list[str], typer.Argument(help="Stores with labelled crops (real data).")],
    out: Annotated[Path, typer.Option(help="Experiment folder: runs, generated stores, report.md / .json.")],
    holdout: Annotated[str, typer.Option(help="Crops to score on and never train on, comma-separated: 'crop3' "
                                              "or '<dataset>/crop3'.")],
    classes: opt.ClassList = "",
    patch_size: opt.PatchSize = 64,
    width: opt.Width = 32,
    multipliers: opt.Multipliers = "1,2,4",
    blocks_per_level: opt.BlocksPerLevel = 1,
    batch_size: opt.BatchSize = 8,
    lr: opt.LearningRate = 4e-4,
    seg_steps: Annotated[int, typer.Option(help="Training steps of each segmentation arm.")] = 1000,
    ddpm_steps: Annotated[int, typer.Option(help="Training steps of each pairs DDPM.")] = 4000,
    from_labels_steps: Annotated[int, typer.Option(
        help="Training steps of an EM-from-labels DDPM that draws the few labelled slices' label maps as new EM "
             "for a few+rendered arm (0: no such arm).")] = 0,
    samples: Annotated[int, typer.Option(help="Generated pairs per DDPM.")] = 256,
    sampler: opt.Sampler = DEFAULT_SAMPLER,
    sample_steps: Annotated[int, typer.Option(help="Denoising steps per sample.")] = DEFAULT_STEPS,
    spacing: opt.Spacing = DEFAULT_SPACING,
    despeckle: opt.Despeckle = 0,
    label_method: opt.LabelMethod = DEFAULT_LABEL_METHOD,
    mix: Annotated[float, typer.Option(help="Mixed arms: share of generated (elastic arms: deformed) patches per "
                                            "batch.")] = 0.5,
    generated_weight: Annotated[float, typer.Option(help="Weighted arms: loss weight of a generated patch "
                                                         "(a real one weighs 1).")] = 0.25,
    filter_quantile: Annotated[float, typer.Option(
        help="Filtered arms: keep a generated pair if the baseline network agrees with it at least as well as "
             "with this quantile of real training patches.")] = 0.25,
    few_slices: Annotated[int, typer.Option(help="Low-label arms: labelled slices kept per crop.")] = 2,
    depth: Annotated[int, typer.Option(help="Depth arms (real+depth, few+depth): adjacent sections the "
                                            "network reads, an odd number.")] = 3,
    class_groups: opt.ClassGroups = "",
    voxel_size: opt.VoxelSize = "",
    arms: Annotated[str, typer.Option(help="Arms to run, comma-separated (their baselines are added); default: "
                                           "every arm the budgets allow. See `training/experiment/config.py`.")] = "",
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated; each trains every network anew. Intervals "
                                            "need 3 or more.")] = "0,1,2",
    results_from: Annotated[Path | None, typer.Option(
        help="An earlier report.json of the same experiment (e.g. a committed one): the arms it scored for each "
             "seed are taken from it, not trained again; only the arms it lacks train.")] = None,
) -> None:
    """Does generated data help? Train segmentation on real, generated, mixed, pretrained, filtered, weighted
    and few-label data, from the DDPM's denoiser (denoising pretraining), with depth context (2.5D) and with
    elastically deformed real pairs, over several seeds; score all with 95 % intervals and paired differences.

    Also trains the pairs DDPMs it generates with (and, with --from-labels-steps, an EM-from-labels DDPM for the
    few+rendered and few+augmented arms), and reports realism (FD / KID) and class-presence guidance.
    Rerun the same command to resume an interrupted experiment; add seeds or arms to extend it (on another
    machine, with --results-from the report that holds the earlier ones).
    """
    from emserve.data.store import annotated_classes
    from training.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(
        stores=stores, out=str(out), holdout=opt.parse_csv(holdout),
        classes=opt.parse_csv(classes) or annotated_classes(stores), patch_size=patch_size, width=width,
        multipliers=opt.parse_ints("multipliers", multipliers), blocks_per_level=blocks_per_level,
        batch_size=batch_size, lr=lr, seg_steps=seg_steps, ddpm_steps=ddpm_steps,
        from_labels_steps=from_labels_steps, samples=samples, sampler=sampler, sample_steps=sample_steps,
        spacing=spacing, despeckle=despeckle, label_method=label_method, mix=mix, generated_weight=generated_weight,
        filter_quantile=filter_quantile, few_slices=few_slices, depth=depth,
        class_groups=opt.parse_groups(class_groups), voxel_size=opt.parse_voxel_size(voxel_size),
        arms=opt.parse_csv(arms), seeds=list(opt.parse_ints("seeds", seeds)), results_from=str(results_from or ""),
        command=command_line(),
    )
    console.print(f"report: {run_experiment(cfg)}")


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint folder (runs/<run>/step-N).")],
    out: Annotated[Path, typer.Argument(help="Model repository folder; the model goes to OUT/<name>/.")] = Path(
        "models"),
    name: Annotated[str | None, typer.Option(help="Model (and Triton) name; default: the run folder's name.")] = None,
    tolerance: Annotated[float, typer.Option(help="Largest error of ONNX / TorchScript against eager torch, "
                                                  "relative to the output's magnitude.")] = 1e-4,
    weights: Annotated[str, typer.Option(help="ema | model: which weights of the checkpoint.")] = "ema",
    exporter: Annotated[str, typer.Option(help="dynamo | legacy (torch.onnx exporters).")] = "dynamo",
    max_batch_size: Annotated[int, typer.Option(help="Triton config.pbtxt max_batch_size.")] = 32,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export of the same name.")] = False,
) -> None:
    """Export a checkpoint's UNet to ONNX and TorchScript, with its model card and a Triton config.pbtxt.

    A parity check against eager torch on several batch sizes and shapes runs first; the export fails (and
    writes nothing) if either graph is off by more than --tolerance.
    """
    from training.export import export_model

    folder = export_model(checkpoint, out, name=name, overwrite=overwrite, tolerance=tolerance, weights=weights,
                          exporter=exporter, max_batch_size=max_batch_size)
    console.print(f"exported {folder}")


GENERATE_MODES = {"pairs": "pairs", "em": "em", "labels": "labels", "from-labels": "em-from-labels"}


@app.command("generate")
def generate(
    what: Annotated[str, typer.Argument(help="pairs | em | labels | from-labels (must match the model).")],
    model: Annotated[str, typer.Argument(help="An exported model folder (models/<name>), a training checkpoint "
                                              "folder, or a Triton URL grpc://host:port/<name>.")],
    out: Annotated[Path, typer.Argument(help="The store to write, e.g. out/generated.zarr (+ a .png grid).")],
    samples: Annotated[int, typer.Option(help="How many 2D samples.")] = 16,
    seed: Annotated[int, typer.Option(help="Request seed; sample i always gets the same per-sample seed.")] = 0,
    sampler: opt.Sampler = DEFAULT_SAMPLER,
    steps: Annotated[int, typer.Option(help="Denoising steps (the study: DDIM 250).")] = DEFAULT_STEPS,
    spacing: opt.Spacing = DEFAULT_SPACING,
    guidance: Annotated[str | None, typer.Option(
        help="Classifier-free guidance scale (1 = none; the study: 6), or a weight per condition, e.g. "
             "label_map=3,dataset=1.5 (chained in the order label_map, classes, dataset; conditions not named "
             f"weigh 1). Default: 1, and for from-labels {DEFAULT_LABEL_GUIDANCE:g} (the label maps are followed "
             "most closely near it).")] = None,
    rescale: Annotated[float, typer.Option(help="Guidance rescale in [0, 1] (the study: 0.7).")] = 0.0,
    present: Annotated[str, typer.Option(help="Classes the samples should contain, comma-separated.")] = "",
    absent: Annotated[str, typer.Option(help="Classes the samples should not contain.")] = "",
    dataset: Annotated[str | None, typer.Option(help="Dataset (domain) to imitate, by name.")] = None,
    labels_from: Annotated[str, typer.Option(help="from-labels: a store whose crops give the label maps, or PNG/"
                                                  "TIFF index maps of CellMap class ids (file, folder or glob).")] = "",
    label_method: opt.LabelMethod = DEFAULT_LABEL_METHOD,
    screen: Annotated[bool, typer.Option(help="Mark implausible label maps unannotated (lumen without or "
                                              "outside its membrane, specks).")] = True,
    min_size: Annotated[int, typer.Option(help="Screening: smallest object in pixels (0: any).")] = 0,
    despeckle: opt.Despeckle = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per model batch (memory is bounded by it).")] = 8,
    memory_budget: opt.MemoryBudget = DEFAULT_MEMORY_BUDGET,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same --out.")] = False,
    backend: Annotated[str, typer.Option(help="auto | onnx | torchscript | torch | triton (auto: by what the "
                                              "model folder holds).")] = "auto",
    served_card: opt.ServedCard = "",
    device: opt.Device = "auto",
    precision: opt.RuntimePrecision = "fp32",
    scheduler: opt.Scheduler = "",
) -> None:
    """Generate EM, label maps or EM + label pairs with a diffusion model, into the CellMap layout.

    Batch b becomes crop<b+1> (per-sample seeds and the model's sha256 in its attributes); sample i is z-slice
    i of the EM. Screening never drops a sample: a rejected one keeps its EM and gets its labels marked
    unannotated (255), so segmentation training leaves them out.
    """
    from emserve.distributed import check_scheduler
    from emserve.pipelines import GenerationRequest, OpenedForGeneration, generate_store, label_source
    from emserve.postprocess import Screening
    from emserve.runtime.load import load_runtime

    check_choice("what", what, GENERATE_MODES)
    check_scheduler(scheduler)
    options = {"device": device, "precision": precision, "memory_budget": parse_bytes(memory_budget),
               **({"card": served_card} if served_card else {})}
    denoise = load_runtime(model, backend, **options)
    try:
        card = denoise.card
        if card.mode != GENERATE_MODES[what]:
            raise ValueError(f"model: {model} is a {card.mode!r} model; it cannot generate {what!r}")
        default = DEFAULT_LABEL_GUIDANCE if what == "from-labels" else 1.0
        request = GenerationRequest(samples=samples, seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                                    guidance=default if guidance is None else opt.parse_guidance(guidance),
                                    rescale=rescale, present=tuple(opt.parse_csv(present)),
                                    absent=tuple(opt.parse_csv(absent)), dataset=dataset, batch_size=batch_size,
                                    label_method=label_method, despeckle=despeckle)
        labels = label_source(card, labels_from, seed) if what == "from-labels" else None
        screening = Screening(min_size=min_size) if screen and card.mode in ("pairs", "labels") else None
        on_workers = OpenedForGeneration(worker_spec(model, denoise, options, scheduler),
                                         labels_from if what == "from-labels" else "", seed)
        with dask_cluster(scheduler) as client:
            picture = generate_store(card, denoise, request, out, labels, screening, resume=resume,
                                     progress=terminal_progress("samples"), precision=denoise.precision,
                                     client=client, on_workers=on_workers)
        console.print(f"wrote {out} and {picture}")
        if screening is not None:
            console.print(screening.summary())
    finally:
        denoise.close()


@contextlib.contextmanager
def dask_cluster(scheduler: str) -> Iterator[Any]:
    """The Dask client of `--scheduler` (None: this process), its dashboard's address printed."""
    if not scheduler:
        yield None
        return
    from emserve.distributed import dask_client

    with dask_client(scheduler) as client:
        console.print(f"Dask dashboard: {client.dashboard_link}")
        yield client


def worker_spec(model: str, runtime: Any, options: dict[str, Any], scheduler: str) -> Any:
    """How Dask workers open the model this command opened (`RuntimeSpec`): the same backend and options, and on
    a local cluster a share of the cores each (ONNX Runtime takes them all in every process unless told)."""
    from emserve.distributed import local_workers
    from emserve.runtime.load import RuntimeSpec

    workers = local_workers(scheduler)
    if workers and runtime.backend == "onnx":
        options = {**options, "threads": max(1, len(os.sched_getaffinity(0)) // workers)}
    return RuntimeSpec(str(model), runtime.backend, tuple(options.items()))


def label_sampling(mode: str, samples: int, sampler: str, steps: int, seed: int, dataset: str | None) -> Any:
    """How a pairs DDPM draws label maps when it segments (`LabelSampling`); None for a segmentation network, and
    anything else is refused (by `TilePredictor`)."""
    from emserve.pipelines import LabelSampling

    return LabelSampling(samples, sampler, steps, seed, dataset) if mode == "pairs" else None


def terminal_progress(unit: str) -> Callable[[int, int], None]:
    """A progress callback that counts `unit` done, with the time left at this run's rate, on one overwritten line,
    on a terminal only (logs stay clean)."""
    start: dict[str, float] = {}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        then, first = start.setdefault("time", now), start.setdefault("done", done)
        left = f", {(total - done) * (now - then) / (done - first) / 60:.1f} min left" if done > first else ""
        if console.is_terminal:
            console.print(f"{done}/{total} {unit}{left}", end="\r")

    return progress


@app.command("segment")
def segment(
    model: Annotated[str, typer.Argument(help="An exported segmentation model folder (models/<name>), a training "
                                              "checkpoint, or a Triton URL grpc://host:port/<name>.")],
    source: Annotated[str, typer.Argument(help="EM to segment: a <dataset>.zarr / .n5 store or s3:// URL, or an "
                                               "8-bit PNG / TIFF image or multi-page TIFF stack.")],
    out: Annotated[Path, typer.Argument(help="The store to write, e.g. out/predictions.zarr.")],
    axis: opt.SliceAxis = "z",
    tile: Annotated[int | None, typer.Option(help="Tile size in voxels (default: the model's patch size).")] = None,
    overlap: Annotated[int | None, typer.Option(help="Tile overlap in voxels (default: a quarter tile).")] = None,
    threshold: Annotated[float, typer.Option(help="Multi-label models: probability above which a voxel is "
                                                  "labelled.")] = 0.5,
    probabilities: Annotated[bool, typer.Option(help="Also write per-class probabilities (x255, uint8).")] = False,
    voxel_size: Annotated[str, typer.Option(help="Stores: the scale level, 'Z,Y,X' in nm (default: the finest).")] = "",
    batch_size: Annotated[int, typer.Option(help="Tiles per model call.")] = 8,
    memory_budget: opt.MemoryBudget = DEFAULT_MEMORY_BUDGET,
    backend: opt.Backend = "auto",
    served_card: opt.ServedCard = "",
    device: opt.Device = "auto",
    precision: opt.RuntimePrecision = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (once the new one is complete), or "
                                                 "discard an unfinished run of other settings.")] = False,
    scheduler: opt.Scheduler = "",
    block_size: Annotated[int | None, typer.Option(help="In-plane block size in voxels, a multiple of 256 (the "
                                                        "output chunk); default emserve.volumes.BLOCK_SIZE.")] = None,
    samples: opt.LabelSamples = DEFAULT_LABEL_DRAWS,
    sampler: opt.LabelSampler = DEFAULT_LABEL_SAMPLER,
    steps: opt.LabelSteps = DEFAULT_STEPS,
    seed: opt.LabelSeed = 0,
    dataset: opt.LabelDataset = None,
) -> None:
    """Segment an image or volume of any size, tile by tile with blended overlaps, into the CellMap layout.

    Writes recon-1/labels/inference/segmentation/<class>/s0.. (0/1) with a multiscale pyramid and the source's
    voxel size and offset, so the predictions overlay the EM. The volume is cut into blocks of whole output
    chunks, run here or on Dask (--scheduler); a run that stopped continues when the same command runs again.
    MODEL may also be a pairs DDPM: it segments by drawing --samples label maps per tile for the tile's EM, their
    mean the probability and their spread the uncertainty (written to .../uncertainty/<class>).
    """
    from emserve.distributed import check_scheduler
    from emserve.runtime.load import load_runtime
    from emserve.volumes import OpenedOnWorker, segment_store, segmentation_source

    check_scheduler(scheduler)
    options = {"device": device, "precision": precision, "memory_budget": parse_bytes(memory_budget),
               **({"card": served_card} if served_card else {})}
    runtime = load_runtime(model, backend, **options)
    try:
        sampling = label_sampling(runtime.card.mode, samples, sampler, steps, seed, dataset)
        source_data = segmentation_source(source, voxel_size)
        with dask_cluster(scheduler) as client:
            segment_store(runtime, source_data, out, axis=axis, tile=tile, overlap=overlap, batch_size=batch_size,
                          threshold=threshold, keep_probabilities=probabilities, overwrite=overwrite,
                          source_name=source, block_size=block_size, client=client,
                          on_workers=OpenedOnWorker(worker_spec(model, runtime, options, scheduler), source,
                                                    voxel_size), progress=terminal_progress("blocks"),
                          sampling=sampling)
        console.print(f"wrote {out}")
    finally:
        runtime.close()


@app.command("view")
def view(
    stores: Annotated[list[str], typer.Argument(help="Stores to show: EM, ground-truth crops, and the predictions "
                                                    "and probabilities of `emserve segment`.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 0,
    screenshot: Annotated[Path | None, typer.Option(help="Save a PNG of the first view here and exit, taken by a "
                                                         "headless Chrome or Chromium (needs one on PATH).")] = None,
    size: Annotated[str | None, typer.Option(help="The view's size, WIDTHxHEIGHT in pixels (the first view fits "
                                                  "the section to it); default emserve.viewer.SCREEN.")] = None,
) -> None:
    """Open stores in neuroglancer, served from this process on 127.0.0.1; prints the link and serves until Ctrl-C
    (or, with --screenshot, saves a picture of the view and exits)."""
    from emserve.viewer import parse_size, serve
    from emserve.viewer import screenshot as take_screenshot

    screen = parse_size(size)
    viewer = serve(stores, port, screen)
    if screenshot is not None:
        take_screenshot(viewer, screenshot, screen)
        console.print(f"wrote {screenshot}")
        return
    console.print(f"neuroglancer: {viewer.get_viewer_url()}", soft_wrap=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@evaluate_app.command("seg")
def evaluate_seg(
    model: Annotated[str, typer.Argument(help="A segmentation model folder, checkpoint, or Triton URL.")],
    stores: Annotated[list[str], typer.Argument(help="Stores with ground-truth crops.")],
    crops: Annotated[str, typer.Option(help="Held-out crops, comma-separated: 'crop3' (in every store) or "
                                            "'<dataset>/crop3' (default: every crop).")] = "",
    axis: opt.SliceAxis = "z",
    tile: Annotated[int | None, typer.Option(help="Tile size (default: the model's patch size).")] = None,
    threshold: Annotated[float, typer.Option(help="Multi-label models: probability threshold.")] = 0.5,
    json_out: opt.JsonOut = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the per-class table as CSV here.")] = None,
    backend: opt.Backend = "auto",
    device: opt.Device = "auto",
    samples: opt.LabelSamples = DEFAULT_LABEL_DRAWS,
    sampler: opt.LabelSampler = DEFAULT_LABEL_SAMPLER,
    steps: opt.LabelSteps = DEFAULT_STEPS,
    seed: opt.LabelSeed = 0,
    dataset: opt.LabelDataset = None,
) -> None:
    """Per-class Dice (F1), IoU, precision and recall on held-out crops, and their means; the calibration of the
    probabilities, whether the uncertainty finds the errors (AUROC), and seconds per megavoxel.

    A class a crop did not annotate is skipped there (not counted as absent); "-" marks a score that is
    undefined (the class is annotated nowhere, or absent and never predicted). MODEL may be a pairs DDPM, which
    segments by drawing label maps (see `emserve segment`).
    """
    from emserve.evaluation.evaluate import evaluate_segmentation, held_out_crops
    from emserve.runtime.load import load_runtime

    with load_runtime(model, backend, device=device) as runtime:
        sampling = label_sampling(runtime.card.mode, samples, sampler, steps, seed, dataset)
        report = evaluate_segmentation(runtime, held_out_crops(stores, runtime.card.classes, opt.parse_csv(crops)),
                                       axis=axis, tile=tile, threshold=threshold, sampling=sampling)
    report["model"] = model
    _print_scores(report)
    if json_out is not None:
        write_json(json_out, report)
    if csv_out is not None:
        write_text(csv_out, scores_csv(report))


@evaluate_app.command("realism")
def evaluate_realism(
    generated: Annotated[str, typer.Argument(help="A generated store (from `emserve generate`).")],
    real: Annotated[list[str], typer.Argument(help="Real stores to compare with (same imaging, ideally).")],
    samples: Annotated[int, typer.Option(help="Generated samples to use (real patches: twice as many).")] = 256,
    seed: Annotated[int, typer.Option(help="Seeds the real patch draw and the quiz order.")] = 0,
    picture: Annotated[Path | None, typer.Option(help="Write a 'which one is fake?' grid here (PNG).")] = None,
    voxel_size: opt.RealVoxelSize = "",
    json_out: opt.JsonOut = None,
) -> None:
    """Frechet distance and KID of generated EM against real EM, beside the real-vs-real floor.

    Features come from a fixed filter bank that ships with emserve (no downloads): compare numbers from the
    same version only. The floor is the distance between two independent draws of real patches.
    """
    from emserve.evaluation.evaluate import evaluate_realism as run

    report = run(generated, real, samples=samples, seed=seed, picture=picture,
                 voxel_size=opt.parse_voxel_size(voxel_size))
    console.print(f"FD  {report['fd']:.3f}   (real vs real {report['fd_real_vs_real']:.3f})")
    console.print(f"KID {report['kid']:.4f} +- {report['kid_std']:.4f}   (real vs real "
                  f"{report['kid_real_vs_real']:.4f} +- {report['kid_real_vs_real_std']:.4f})")
    console.print(f"{report['generated']} generated, {report['real']} + {report['real_reference']} real patches")
    if picture is not None:
        console.print(f"quiz: {picture} (answers in the JSON report)")
    if json_out is not None:
        write_json(json_out, report)


@evaluate_app.command("presence")
def evaluate_presence(
    generated: Annotated[str, typer.Argument(help="A generated store of pairs (from `emserve generate pairs`).")],
    real: Annotated[list[str], typer.Argument(help="Real stores with labelled crops (the model's training data, "
                                                   "say).")],
    classes: Annotated[str, typer.Option(help="Classes, comma-separated (default: every class the real crops "
                                              "annotate).")] = "",
    crops: Annotated[str, typer.Option(help="Real crops, comma-separated: 'crop3' or '<dataset>/crop3' (default: "
                                            "every crop).")] = "",
    voxel_size: opt.RealVoxelSize = "",
    json_out: opt.JsonOut = None,
) -> None:
    """Share of generated samples that hold each class, beside the share of real patches of their size.

    A sample holds a class only if one of its objects is at least as large as the smallest tenth of the real
    ones, so specks do not count. Compare two generated stores (unguided, and with `--present <class>`) to see
    whether class-presence guidance raises a rare class's share.
    """
    from emserve.data.store import annotated_classes
    from emserve.evaluation.evaluate import evaluate_presence as run
    from emserve.evaluation.metrics import format_score

    report = run(generated, real, opt.parse_csv(classes) or annotated_classes(real), crops=opt.parse_csv(crops),
                 voxel_size=opt.parse_voxel_size(voxel_size))
    table = Table(title=f"{report['samples']} samples of {generated} vs real {report['patch_size']}-pixel patches")
    for col in ("class", "min object (pixels)", "generated", "real"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in report["classes"]:
        table.add_row(row["name"], str(row["min_object_pixels"]), format_score(row["generated"]),
                      format_score(row["real"]))
    console.print(table)
    if json_out is not None:
        write_json(json_out, report)


@evaluate_app.command("transfer")
def evaluate_transfer(
    model: Annotated[str, typer.Argument(help="An em-from-labels model (folder, checkpoint or Triton URL).")],
    segmenter: Annotated[str, typer.Argument(help="A segmentation model that covers the model's classes.")],
    labels_from: Annotated[str, typer.Argument(help="A store whose crops give the label maps.")],
    dataset: Annotated[str | None, typer.Option(help="Render the labels as EM of this dataset (domain).")] = None,
    samples: Annotated[int, typer.Option(help="Label maps to render.")] = 64,
    seed: Annotated[int, typer.Option(help="Picks the label maps and seeds their noise; the same seed renders "
                                           "the same maps.")] = 0,
    sampler: opt.Sampler = DEFAULT_SAMPLER,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = DEFAULT_STEPS,
    spacing: opt.Spacing = DEFAULT_SPACING,
    guidance: Annotated[str, typer.Option(
        help="Classifier-free guidance scale, or a weight per condition, e.g. label_map=3,dataset=1 (as `emserve "
             "generate`).")] = f"{DEFAULT_LABEL_GUIDANCE:g}",
    json_out: opt.JsonOut = None,
) -> None:
    """Label transfer: render one store's label maps as EM (of another dataset, say), segment the EM, and
    score the segmentation against the label maps. High scores: the generated EM carries its labels."""
    from emserve.evaluation.evaluate import evaluate_label_transfer
    from emserve.runtime.load import load_runtime

    with load_runtime(model) as denoiser, load_runtime(segmenter) as seg:
        report = evaluate_label_transfer(denoiser, seg, labels_from, dataset=dataset, samples=samples, seed=seed,
                                         sampler=sampler, steps=steps, spacing=spacing,
                                         guidance=opt.parse_guidance(guidance))
    report["crops"] = [f"{labels_from} rendered as {dataset or 'any dataset'}"]
    _print_scores(report)
    if json_out is not None:
        write_json(json_out, report)


def _print_scores(report: dict) -> None:
    from emserve.evaluation.metrics import format_score

    table = Table(title=f"segmentation scores on {', '.join(report['crops'])}")
    for col in ("class", *SCORE_COLUMNS, "annotated voxels", "present"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in report["classes"]:
        table.add_row(row["name"], *(format_score(row[m]) for m in SCORE_COLUMNS), str(row["annotated"]),
                      str(row["present"]))
    table.add_row("mean", *(format_score(report["mean"][m]) for m in SCORE_COLUMNS), "", "", style="bold")
    console.print(table)
    if "calibration_error" in report:  # segmentation scores (transfer reports have none)
        console.print(f"calibration error {format_score(report['calibration_error']['pooled'])}, uncertainty "
                      f"({report['uncertainty']}) finds errors with AUROC {format_score(report['error_auroc'])}, "
                      f"{report['seconds_per_mvoxel']:.3g} s per Mvoxel")


def command_line() -> str:
    """The command as typed, recorded in provenance and model cards."""
    return " ".join(["emserve", *sys.argv[1:]])


def _report_checkpoint(last: Path | None) -> None:
    if last is not None:  # None on torchrun ranks other than 0
        console.print(f"checkpoint: {last}")


if __name__ == "__main__":
    main()

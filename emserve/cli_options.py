"""The options several `emserve` commands share, declared once: typer `Annotated` types for single options, option
groups (dataclasses) for the many options `train ddpm` and `train seg` both take, and the parsers that turn option
strings into the values the library takes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from emserve.diffusion import SAMPLERS, SPACINGS

RunFolder = Annotated[Path, typer.Option(help="Run folder: checkpoints, samples/, log.jsonl.")]
ClassList = Annotated[str, typer.Option(help="Comma-separated class names (default: every class annotated in "
                                             "the stores).")]
PatchSize = Annotated[int, typer.Option(help="Square 2D patch size in voxels.")]
BatchSize = Annotated[int, typer.Option(help="Patches per optimizer step (split across torchrun processes).")]
MemoryBudget = Annotated[str, typer.Option(help="Most memory one model call may take, e.g. 4GiB or 512MB; larger "
                                                "batches are split into calls that fit (same results).")]
LearningRate = Annotated[float, typer.Option(help="AdamW learning rate.")]
Width = Annotated[int, typer.Option(help="UNet base channels (the study: 64).")]
Multipliers = Annotated[str, typer.Option(help="Channel multipliers per level (the study: 1,2,4,8).")]
BlocksPerLevel = Annotated[int, typer.Option(help="ResNet blocks per UNet level.")]
ClassGroups = Annotated[str, typer.Option(help="Groups for class-balanced patches, e.g. "
                                               "'mito_mem+mito_lum,ld_mem+ld_lum'.")]
VoxelSize = Annotated[str, typer.Option(help="Scale level to train on, 'Z,Y,X' in nm (default: finest).")]
RealVoxelSize = Annotated[str, typer.Option(help="Read the real EM at this voxel size in nm, z,y,x (default: the "
                                                 "finest); match the model's training data.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda (auto: CUDA where present).")]
Sampler = Annotated[str, typer.Option(help=" | ".join(SAMPLERS) + ".")]
LabelMethod = Annotated[str, typer.Option(help="Generated channels to labels: auto (paired for a model of atomic "
                                               "classes, else threshold) | threshold (overlapping) | argmax (one "
                                               "class per pixel) | paired (argmax; the ring around each lumen not "
                                               "drawn as its membrane becomes membrane).")]
RuntimePrecision = Annotated[str, typer.Option(
    "--precision", help="fp32 | bf16 (bf16: autocast with --backend torchscript or torch; faster where the CPU or "
                        "GPU has bf16; not parity-checked, recorded in the output store).")]
Despeckle = Annotated[int, typer.Option(help="Drop generated label objects smaller than this many pixels before "
                                             "screening (0: keep all).")]
Spacing = Annotated[str, typer.Option(help=f"Which timesteps the steps visit: {' | '.join(SPACINGS)} (trailing: "
                                           "evenly spaced; karras: crowded at low noise, ends at noise 0).")]
ServedCard = Annotated[str, typer.Option("--card", help="triton: the exported folder whose card the server's model "
                                                        "has.")]
Backend = Annotated[str, typer.Option(help="auto | onnx | torchscript | torch | triton.")]
Scheduler = Annotated[str, typer.Option(help="Run the blocks (segment) or batches (generate) on Dask: local:N (N "
                                              "worker processes here) or a running scheduler's address "
                                              "tcp://HOST:PORT (default: in this process).")]
# A pairs DDPM segmenting (`emserve segment`, `emserve evaluate seg`): label maps drawn for each tile's EM.
LabelSamples = Annotated[int, typer.Option("--samples", help="Pairs models: label maps drawn per tile.")]
LabelSampler = Annotated[str, typer.Option("--sampler", help="Pairs models: the sampler drawing them.")]
LabelSteps = Annotated[int, typer.Option("--steps", help="Pairs models: sampler steps.")]
LabelSeed = Annotated[int, typer.Option("--seed", help="Pairs models: random seed of the draws.")]
LabelDataset = Annotated[str | None, typer.Option("--dataset", help="Pairs models: the dataset condition.")]
SliceAxis = Annotated[str, typer.Option(help="Segment slices normal to this axis: z | y | x.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")]


@dataclass(frozen=True)
class NetOptions:
    """The network `train ddpm` and `train seg` train, and how: the first of the option groups they share."""

    patch_size: PatchSize = 64
    batch_size: BatchSize = 16
    steps: Annotated[int, typer.Option(help="Optimizer steps in all (a resumed run stops here too).")] = 2000
    lr: LearningRate = 2e-4
    width: Width = 32
    multipliers: Multipliers = "1,2,4"
    blocks_per_level: BlocksPerLevel = 2

    def config(self) -> dict:
        """These options as fields of the training config."""
        return {**asdict(self), "multipliers": parse_ints("multipliers", self.multipliers)}


@dataclass(frozen=True)
class RunOptions:
    """The patches `train ddpm` and `train seg` draw, and how their run goes: the second shared option group."""

    class_groups: ClassGroups = ""
    balance: Annotated[float, typer.Option(help="Share of patches centred on a class group.")] = 0.5
    axis: Annotated[str, typer.Option(help="Axis the 2D patches are normal to: z | y | x.")] = "z"
    voxel_size: VoxelSize = ""
    labelled_slices: Annotated[int, typer.Option(help="Keep labels on only this many evenly spaced slices per crop "
                                                      "(the low-label regime; 0: all).")] = 0
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 (auto: bf16 where the hardware has it).")] = "auto"
    device: Device = "auto"
    data_workers: Annotated[int | None, typer.Option(
        help="Processes that draw batches ahead of training (same batches whatever the number); default: none on "
             "a CPU, every core but one (at most 8) with a GPU.", show_default=False)] = None
    seed: Annotated[int, typer.Option(help="Seeds weights, batches and dropout; a run is reproducible from "
                                           "it.")] = 0
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500
    preview_every: Annotated[int, typer.Option(help="Steps between PNG previews (samples/).")] = 500
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = False

    def config(self) -> dict:
        """These options as fields of the training config (resume is not one: it says how to start the run)."""
        options = {**asdict(self), "class_groups": parse_groups(self.class_groups),
                   "voxel_size": parse_voxel_size(self.voxel_size)}
        del options["resume"]
        return options


def option_groups(command: Callable[..., None]) -> Callable[..., None]:
    """Let a command take option groups (the dataclasses above) as parameters: typer sees each group's fields as
    options in the group's place, in order, and the command gets the group as one value. So options commands share
    are declared once, with their defaults, and --help lists them where the group stands."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: p.annotation for p in signature.parameters.values() if is_dataclass(p.annotation)}
    flat: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        if param.name not in groups:
            flat.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        hints = get_type_hints(groups[param.name], include_extras=True)
        flat += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                   default=f.default) for f in fields(groups[param.name])]

    @functools.wraps(command)
    def flattened(**options: Any) -> None:
        for name, group in groups.items():
            options[name] = group(**{f.name: options.pop(f.name) for f in fields(group)})
        command(**options)

    flattened.__signature__ = signature.replace(parameters=flat)  # what typer reads the options from
    return flattened


def parse_csv(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_ints(field: str, value: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); `field` names the option in the error."""
    try:
        return tuple(int(v) for v in parse_csv(value))
    except ValueError:
        raise ValueError(f"{field}: {value!r} must be comma-separated integers, e.g. 1,2,4") from None


def parse_groups(value: str) -> list[list[str]]:
    """'mito_mem+mito_lum,ld_mem' -> [['mito_mem', 'mito_lum'], ['ld_mem']]."""
    return [g.split("+") for g in parse_csv(value)]


def parse_guidance(value: str) -> float | dict[str, float]:
    """'3' -> 3.0 (one scale for every condition); 'label_map=3,dataset=1.5' -> a weight per condition."""
    try:
        if "=" not in value:
            return float(value)
        pairs = [part.split("=", 1) for part in parse_csv(value)]
        return {name.strip(): float(scale) for name, scale in pairs}
    except ValueError:
        raise ValueError(f"guidance: {value!r} must be a number (e.g. 3) or condition=scale pairs (e.g. "
                         f"label_map=3,dataset=1.5)") from None


def parse_voxel_size(value: str) -> tuple[float, float, float] | None:
    """'Z,Y,X' in nm -> a scale level's voxel size; '' -> None (the finest level)."""
    from emserve.data import stacks

    return stacks.parse_voxel_size(value) if value else None

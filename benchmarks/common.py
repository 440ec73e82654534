"""What the benchmarks share: the models they time, the backends that run them, machine facts, peak and tables.

A number without its machine is no use, and on a shared machine it can be wrong, so every report says where,
when, on how many threads and under what load it was taken, and how close the machine got to its own measured
matmul peak in the same run. Models are either an exported folder (served as is) or a named size built with
random weights: speed does not depend on the weight values, only on the architecture and the input size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from emserve.card import ModelCard
from emserve.classes import ATOMIC_NAMES
from emserve.runtime.base import Runtime
from emserve.runtime.load import load_runtime
from emserve.unet import UNet, count_parameters
from training.checkpoint import TrainingState, checkpoints, save_checkpoint
from training.device import cpu_has_bf16
from training.export import EXPORTERS, export_model

#: Named model sizes: UNet arguments, patch size, classes (channels = raw + one per class) and datasets.
SIZES: dict[str, dict[str, Any]] = {
    # The study's denoiser: width 64, four levels, 96x96 patches of raw EM + 31 organelle classes,
    # conditioned on class presence and dataset.
    "study": {"unet": {"width": 64, "multipliers": (1, 2, 4, 8), "blocks_per_level": 2}, "patch": 96,
              "classes": ATOMIC_NAMES[:31], "datasets": 4},
    # The test suite's model: seconds to export and time.
    "tiny": {"unet": {"width": 8, "multipliers": (1, 2), "blocks_per_level": 1}, "patch": 16,
             "classes": ("mito_mem", "ld_lum"), "datasets": 2},
}
#: Backends a benchmark can time: (runtime backend, precision). "torch" and "torch-bf16" are eager torch on the
#: training checkpoint, the second under bf16 autocast (what `--precision bf16` training uses); "torchscript-bf16"
#: is the exported TorchScript graph under the same autocast (the runtime's precision="bf16"); "triton" is the
#: model on a Triton server (--triton-url), timed from this client, transport included.
BACKENDS: dict[str, tuple[str, str]] = {"onnx": ("onnx", "fp32"), "torchscript": ("torchscript", "fp32"),
                                        "torchscript-bf16": ("torchscript", "bf16"), "torch": ("torch", "fp32"),
                                        "torch-bf16": ("torch", "bf16"), "triton": ("triton", "fp32")}
LOCAL_BACKENDS = tuple(name for name in BACKENDS if name != "triton")  # the default: all that run in-process
#: The device column of Triton rows: the server's hardware is not this machine's, so no peak is set against them.
TRITON_DEVICE = "triton server"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the precisions, in report order


@dataclasses.dataclass
class Model:
    """A model ready to benchmark: an exported folder (onnx, torchscript) and a training checkpoint of the same
    architecture (eager torch), with the eager module kept for counting FLOPs."""

    name: str
    card: ModelCard
    exported: Path
    checkpoint: Path
    module: UNet
    stand_in_weights: bool  # eager torch rows run random weights in place of the trained folder's
    reexported: bool = False  # the graphs timed were exported by this run (--reexport), not the folder's files

    def describe(self) -> str:
        u = self.card.unet
        mults = ",".join(str(m) for m in u["multipliers"])
        params = number(count_parameters(self.module) / 1e6)
        size = self.card.patch_size
        return (f"{self.name}: UNet width {u['width']}, multipliers {mults}, blocks_per_level "
                f"{u['blocks_per_level']}, {params}M parameters, {size}x{size}, {u['in_channels']} channels in / "
                f"{u['out_channels']} out, conditions: {', '.join(self.card.conditions) or 'none'}; ONNX exported "
                f"with {self.card.export.get('exporter', 'unknown')}")


@dataclasses.dataclass
class Backend:
    """One way of running the denoiser: a Runtime loaded at a precision, on a device."""

    name: str
    precision: str
    device: str
    runtime: Runtime


# ---- command line ---------------------------------------------------------------------------------------------

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmarks take: what to run, where, and where the report goes."""
    parser.add_argument("--model", default="study",
                        help=f"a named size ({', '.join(SIZES)}; random weights) or an exported model folder")
    parser.add_argument("--backends", default=",".join(LOCAL_BACKENDS), type=parse_backends,
                        help=f"comma-separated, from {', '.join(BACKENDS)} (triton needs --triton-url)")
    parser.add_argument("--triton-url", default="",
                        help="triton backend: grpc://host:port/<name> or http://host:port/<name>, a server "
                             "hosting --model's export (its card is checked against the served model)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA where present, else CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and ONNX Runtime (None: torch's default, one per core)")
    parser.add_argument("--exporter", default="dynamo", choices=EXPORTERS,
                        help="ONNX exporter for named sizes and --reexport (dynamo is what `emserve export` "
                             "ships)")
    parser.add_argument("--reexport", action="store_true",
                        help="with a model folder: time graphs exported now from its architecture (random weights) "
                             "instead of its own files, i.e. what re-exporting it with this code would serve")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated checkpoint and export here and reuse them next time "
                             "(None: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also append the report to this Markdown file")


@contextlib.contextmanager
def workspace(workdir: Path | None) -> Iterator[Path]:
    """`workdir` (kept), or a temporary folder removed at the end."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="emserve-bench-") as tmp:
        yield Path(tmp)


# ---- models ---------------------------------------------------------------------------------------------------

def prepare_model(spec: str, workdir: Path, exporter: str = "dynamo", reexport: bool = False) -> Model:
    """The Model for `spec`, a named size (SIZES) or an exported model folder (its own graphs, or with `reexport`
    graphs exported now from its architecture with random weights: speed does not depend on the values).

    Files go to `workdir/<name>/`; a checkpoint or export already there with the same architecture (and exporter;
    same seed, so the same weights) is reused, so a second run skips the export (a minute for the study's model).
    """
    if spec in SIZES:
        return _named_model(spec, workdir / spec, exporter)
    folder = Path(spec)
    if not (folder / "card.json").is_file():
        raise ValueError(f"--model: {spec!r} is neither a named size ({', '.join(SIZES)}) nor a model folder with "
                         f"a card.json")
    card = ModelCard.load(folder)
    if not card.files:
        raise ValueError(f"--model: {folder} is a training checkpoint; export it first (emserve export)")
    if card.mode == "segmentation":
        raise ValueError(f"--model: {folder} is a segmentation network; these benchmarks time denoisers")
    card_only = dataclasses.replace(card, files={}, export={}, weights={}, training={})
    module = _random_unet(card_only)
    checkpoint = _checkpoint(workdir / folder.name / "checkpoint", card_only, module)
    if not reexport:
        return Model(folder.name, card, folder, checkpoint, module, stand_in_weights=True)
    exported = _export(checkpoint, workdir / folder.name, card_only, exporter, reuse=False)
    return Model(folder.name, ModelCard.load(exported), exported, checkpoint, module, stand_in_weights=True,
                 reexported=True)


def _named_model(name: str, folder: Path, exporter: str) -> Model:
    size = SIZES[name]
    classes = list(size["classes"])
    k = len(classes)
    config = UNet(1 + k, 1 + k, **size["unet"], num_classes=k, num_datasets=size["datasets"]).config
    card = ModelCard(mode="pairs", classes=classes, patch_size=size["patch"], unet=config.to_dict(),
                     datasets=[f"dataset{i}" for i in range(size["datasets"])], class_condition=True)
    module = _random_unet(card)
    checkpoint = _checkpoint(folder / "checkpoint", card, module)
    exported = _export(checkpoint, folder, card, exporter)
    return Model(name, ModelCard.load(exported), exported, checkpoint, module, stand_in_weights=False)


def _export(checkpoint: Path, folder: Path, card: ModelCard, exporter: str, reuse: bool = True) -> Path:
    """`folder/model`, exported from `checkpoint`, or with `reuse` an export of the same architecture and exporter
    already there (which may come from older code: --reexport exists to time the current code, so it never reuses)."""
    exported = folder / "model"
    previous = ModelCard.load(exported) if reuse and (exported / "card.json").is_file() else None
    if previous is None or previous.unet != card.unet or previous.export.get("exporter") != exporter:
        export_model(checkpoint, folder, name="model", exporter=exporter, overwrite=True)
    return exported


def _random_unet(card: ModelCard) -> UNet:
    """The card's UNet with seeded random weights (the same on every run)."""
    torch.manual_seed(0)
    return UNet.from_config(card.unet).eval()


def _checkpoint(run: Path, card: ModelCard, module: UNet) -> Path:
    """A real training checkpoint of `module`, so eager torch is loaded by load_runtime as for a trained model;
    the one in `run` is reused when it has the same architecture."""
    found = checkpoints(run)
    if found and ModelCard.load(found[-1]).unet == card.unet:
        return found[-1]
    optimizer = torch.optim.AdamW(module.parameters())
    return save_checkpoint(run, card, module, module, optimizer, TrainingState(step=1, ranks=[], losses=[]))


def weight_facts(model: Model, rows: Sequence[Sequence[object]]) -> dict[str, str]:
    """The report lines saying which rows ran random weights (and graphs not from the model folder)."""
    facts = {}
    if model.reexported:
        facts["exported graphs"] = ("exported by this run from the card's architecture with random weights "
                                    "(--reexport), not the folder's files")
    if model.stand_in_weights and any(BACKENDS[str(row[0])][0] == "torch" for row in rows):
        facts["eager torch"] = "the card's architecture with random weights (speed does not depend on the values)"
    return facts


def flops_per_sample(model: Model) -> int:
    """FLOPs of one denoiser call on one sample at the card's patch size (a multiply-add counts 2).

    Counted by torch's FlopCounterMode: convolutions, linear layers and the attention matmuls. Norms, activations
    and upsampling are not counted: little arithmetic, but memory-bound on a CPU, so their time shows as a lower %
    of peak. Attention is forced onto the math kernel while counting, because the fused CPU kernel has no FLOP
    formula and would count 0.
    """
    inputs = model.module.example_inputs(1, model.card.patch_size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.module(**inputs)
    return int(counter.get_total_flops())


# ---- backends -------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    """"auto" -> "cuda" where torch sees a GPU, else "cpu"; a named device is kept (and fails later if absent)."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_triton_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail at the command line, before any export, when the triton backend has no server to call, or is asked to
    time a re-export (the server runs the graphs it was given)."""
    if "triton" in args.backends and not args.triton_url:
        parser.error("--backends: triton needs --triton-url (grpc://host:port/<model name> or http://...)")
    if "triton" in args.backends and args.reexport:
        parser.error("--reexport: the triton backend times the server's own graphs, not a re-export; time triton "
                     "without --reexport")


def open_backend(name: str, model: Model, device: str, threads: int, triton_url: str = "") -> Backend:
    """A loaded backend through emserve.runtime.load_runtime, the same path the CLI and the service take."""
    backend, precision = BACKENDS[name]
    if backend == "torch":
        runtime = load_runtime(model.checkpoint, "torch", device=device, precision=precision)
        used = resolve_device(device)
    elif backend == "triton":
        runtime = load_runtime(triton_url, "triton", card=str(model.exported))
        used = TRITON_DEVICE
    else:
        options = {"threads": threads} if backend == "onnx" else {}
        runtime = load_runtime(model.exported, backend, device=device, precision=precision, **options)
        used = runtime.device
    return Backend(name, precision, used, runtime)


def parse_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{unknown or text!r} not known; choose from {', '.join(BACKENDS)}")
    return names


def example_inputs(card: ModelCard, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Random (x, t, cond) a runtime accepts for this card: noise, timesteps, and every condition the card takes
    (its shapes and dtypes) drawn from its non-null values: -1 / +1 for masks and presence, a known dataset."""
    rng = np.random.default_rng(seed)
    size = card.patch_size
    x = rng.standard_normal((batch, card.unet["in_channels"], size, size), dtype=np.float32)
    t = rng.uniform(0, card.timesteps - 1, batch).astype(np.float32)
    cond = {name: (rng.integers(0, len(card.datasets), null.shape) if name == "dataset"
                   else rng.choice([-1.0, 1.0], null.shape)).astype(null.dtype)
            for name, null in card.null_conditions(batch, size, size).items()}
    return x, t, cond


# ---- timing and peak ------------------------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads in torch (and report them); None keeps torch's default (one per core)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: {threads} must be at least 1")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` over `repeats` calls, after `warmup` untimed calls (allocations, kernel choice)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@functools.cache
def matmul_peak(precision: str, device: str, size: int, repeats: int = 5) -> float:
    """GFLOP/s of a square `size` matmul (median of `repeats`): the practical peak the UNet's convs compare with.

    Cached: measured once per run for each device and precision, on the threads set at that moment.
    """
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])

    def run() -> None:
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * size**3 / statistics.median(timed(run, 1, repeats)) / 1e9


# ---- reports --------------------------------------------------------------------------------------------------

def machine_facts() -> dict[str, str]:
    """CPU, cores, memory, GPU, start time, load and library versions: what a reader needs to compare two reports."""
    usable, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    busy = " (BUSY: other work competes for the cores; these numbers are not comparable)" if load > usable else ""
    facts = {"cpu": _cpu_model(), "cores": f"{os.cpu_count()} logical, {usable} usable", "memory": _mem_total(),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
             "cpu bf16": "native (avx512_bf16/amx)" if cpu_has_bf16() else "emulated (no avx512_bf16/amx)",
             "started": datetime.now(UTC).isoformat(timespec="seconds"),
             "load average (1 min) at start": f"{load:.2f}{busy}"}
    try:
        import onnxruntime

        ort = f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        ort = "onnxruntime not installed"
    facts["versions"] = (f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
                         f"{ort}")
    return facts


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run."""
    return shlex.join(["python", "-m", module, *argv])


def header(title: str, command: str, facts: Mapping[str, str]) -> str:
    lines = [f"## {title}", "", f"- command: `{command}`"]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines.append(f"- finished: {datetime.now(UTC).isoformat(timespec='seconds')}")
    return "\n".join(lines) + "\n"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def number(value: float) -> str:
    """Three significant digits, no thousands separators (tables are read by people and by the tests)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def emit(text: str, out: Path | None) -> None:
    """Print the report, and append it to `out` when given (several runs collect in one file)."""
    sys.stdout.write(text)
    sys.stdout.flush()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")

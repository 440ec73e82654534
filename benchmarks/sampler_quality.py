"""Which samplers give the study's quality, and at what speed? Frechet distance to DDIM-250 samples of the same model.

    python -m benchmarks.sampler_quality --model models/phantom-pairs --samples 64 --out docs/BENCHMARKS.md

"Equal quality" measured, not assumed: the reference is one draw of `--samples` samples with the study's sampler
(DDIM, 250 steps; request seed 0); a second DDIM-250 draw with other seeds (request seed 1) gives the floor, the
distance two draws of the same sampler have by chance. Every other sampler draws from the same noise as that second
draw (request seed 1), so its distance to the reference is the floor plus what the sampler changes. Distances are
Frechet distances of the EM channel on emserve's fixed filter-bank features (emserve.evaluation.metrics, as
`emserve evaluate realism`), standardised by the reference's features. The model must be trained: the weights
decide quality, so a folder of exported weights is required (no random-weight sizes here). Each row is also timed
(seconds per sample, through emserve.pipelines.generate as served), so the table gives samples per second at each
quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, emit, header, machine_facts, markdown_table, number, set_threads
from benchmarks.sampling import parse_samplers
from emserve.diffusion import SPACINGS
from emserve.evaluation.metrics import frechet_distance, patch_features, standardize
from emserve.pipelines import GenerationRequest, generate
from emserve.runtime.base import PRECISIONS, Runtime, check_precision
from emserve.runtime.load import load_runtime, pick_backend

MODULE = "benchmarks.sampler_quality"
# The rows that picked the defaults (docs/BENCHMARKS.md): DDIM-50, then 2M and 3M at the step counts where they
# cross the previous default (2M-25).
DEFAULT_SAMPLERS = ("ddim:50:karras,dpmpp_2m:15:karras,dpmpp_2m:20:karras,dpmpp_2m:25:karras,dpmpp_3m:15:karras,"
                    "dpmpp_3m:20:karras,dpmpp_3m:25:karras")
COLUMNS = ("sampler", "steps", "spacing", "precision", "evaluations per sample", "s per sample", "samples/s",
           "FD to reference", "FD / floor")


def parse_settings(text: str) -> list[tuple[str, int, str]]:
    """"ddim:250,dpmpp_2m:20:karras" -> [("ddim", 250, "trailing"), ("dpmpp_2m", 20, "karras")]."""
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        head, _, spacing = item.rpartition(":") if item.count(":") == 2 else (item, ":", "trailing")
        if spacing not in SPACINGS:
            raise argparse.ArgumentTypeError(f"{item!r}: the spacing after sampler:steps must be one of "
                                             f"{', '.join(SPACINGS)}, e.g. dpmpp_2m:20:karras")
        (sampler, steps), = parse_samplers(head)
        out.append((sampler, steps, spacing))
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/phantom-pairs"),
                        help="an exported pairs or em model folder (trained weights)")
    parser.add_argument("--backend", default="onnx", help="runtime backend (emserve.runtime.load)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="the rows' precision (bf16: autocast, torchscript or torch backend); the reference "
                             "and the floor stay fp32, as in the study")
    parser.add_argument("--reference", type=parse_settings, default="ddim:250",
                        help="the study's sampler:steps[:spacing], drawn twice (reference and floor)")
    parser.add_argument("--samplers", type=parse_settings, default=DEFAULT_SAMPLERS,
                        help=f"sampler:steps[:spacing], ... (spacing: {' or '.join(SPACINGS)}; default trailing)")
    parser.add_argument("--samples", type=int, default=64, help="samples per draw (more: a lower, steadier floor)")
    parser.add_argument("--batch", type=int, default=32, help="samples per generate call")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (1: unguided)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (None: one per core)")
    parser.add_argument("--out", type=Path, default=None, help="also append the report to this Markdown file")
    args = parser.parse_args(argv)
    if len(args.reference) != 1:
        parser.error("--reference: give one sampler:steps[:spacing]")
    if args.samples < 2 or args.batch < 1:
        parser.error("--samples must be at least 2 and --batch at least 1")
    try:
        check_precision(args.precision, pick_backend(args.model) if args.backend == "auto" else args.backend)
    except ValueError as error:
        parser.error(f"--{error}")
    return args


def draw(runtime: Runtime, args: argparse.Namespace, setting: tuple[str, int, str], seed: int
         ) -> tuple[np.ndarray, float]:
    """(EM channel [N, H, W] of `args.samples` samples drawn with (sampler, steps, spacing), seconds per sample)."""
    card = runtime.card
    sampler, steps, spacing = setting
    request = GenerationRequest(samples=args.samples, seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                                guidance=args.guidance, batch_size=args.batch,
                                dataset=card.datasets[0] if card.datasets else None)
    start = time.perf_counter()
    raw = np.concatenate([batch.samples[:, 0] for batch in generate(card, runtime, request)])
    return raw, (time.perf_counter() - start) / args.samples


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = set_threads(args.threads)
    facts = machine_facts()
    options = {"threads": threads} if args.backend == "onnx" else {}
    reference_runtime = load_runtime(args.model, args.backend, **options)  # the study's numbers: fp32
    card = reference_runtime.card
    if card.mode not in ("pairs", "em"):
        raise SystemExit(f"--model: {args.model} is a {card.mode!r} model; give a pairs or em model")
    runtime = (reference_runtime if args.precision == "fp32" else
               load_runtime(args.model, args.backend, precision=args.precision, **options))
    ref_setting, = args.reference
    reference, _ = draw(reference_runtime, args, ref_setting, seed=0)
    floor_raw, floor_seconds = draw(reference_runtime, args, ref_setting, seed=1)
    features, seconds = {("fp32", ref_setting): patch_features(floor_raw)}, {("fp32", ref_setting): floor_seconds}
    for setting in dict.fromkeys([ref_setting, *args.samplers]):
        key = (args.precision, setting)
        if key not in features:
            raw, seconds[key] = draw(runtime, args, setting, seed=1)
            features[key] = patch_features(raw)
    ref_features, *others = standardize(patch_features(reference), *features.values())
    distances = {key: frechet_distance(f, ref_features) for key, f in zip(features, others, strict=True)}
    floor = distances["fp32", ref_setting]
    rows = []
    for (precision, (sampler, steps, spacing)), fd in distances.items():
        evaluations = steps * (2 if args.guidance != 1.0 else 1)
        per_sample = seconds[precision, (sampler, steps, spacing)]
        rows.append([sampler, steps, spacing, precision, evaluations, number(per_sample), number(1 / per_sample),
                     number(fd), number(fd / floor) if floor > 0 else "-"])
    facts.update({"threads": str(threads), "model": f"{args.model} ({card.mode}, sha256 "
                  f"{card.files.get('1/model.onnx', '?')[:12]})", "backend": args.backend,
                  "request": f"{args.samples} samples per draw, batch {args.batch}, guidance {args.guidance}, "
                             f"dataset {card.datasets[0] if card.datasets else None}",
                  "reference": f"{' '.join(map(str, ref_setting))} in fp32, request seed 0; every row draws with "
                               f"request seed 1, so the reference's fp32 row is the floor (FD / floor = 1)"})
    for r in {reference_runtime, runtime}:
        r.close()
    emit(header(f"Sampler quality: {args.model.name}", command_line(MODULE, argv), facts) + "\n"
         + markdown_table(COLUMNS, rows), args.out)


if __name__ == "__main__":
    main()

"""The training input pipeline: patches per second drawn in the training process and by worker processes.

    python -m benchmarks.input_pipeline --store data/phantom/phantom_a.zarr --patch-size 96 --batch-size 8 \\
        --steps 200 --workers 0,1,2 --out docs/BENCHMARKS.md

A pairs DDPM's training batches of the store (every class it annotates; patches cut class-balanced over its crops,
flipped and rotated, label channels and class presence made, noised at random time steps: exactly what `emserve
train ddpm` draws, `training.ddpm.BatchSource.noised`) go through `training.batches.step_batches` to a consumer that
does nothing, so the table is the pipeline's own rate. 0 workers: drawn in the consuming process, one core; N: N
worker processes (torch's DataLoader). The first batches (worker start-up) are not timed. With a network the
consumer is busy and the workers have the other cores: a run keeps its data share small while the workers' rate
exceeds the patches its steps take per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from benchmarks.common import command_line, emit, header, machine_facts, markdown_table, number
from emserve.data.store import EMStore, annotated_classes
from emserve.diffusion.schedules import make_schedule
from training.batches import PREFETCH, step_batches
from training.ddpm import BatchSource, DDPMConfig

MODULE = "benchmarks.input_pipeline"
COLUMNS = ("workers", "batches timed", "s", "patches/s", "patches/s per drawing process")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("data/phantom/phantom_a.zarr"),
                        help="a store with labelled crops")
    parser.add_argument("--patch-size", type=int, default=96, help="patch side (the study's: 96)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="batches drawn per row")
    parser.add_argument("--workers", default="0,1,2", help="worker processes of each row, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="also append the report to this Markdown file")
    return parser.parse_args(argv)


def rate(source: BatchSource, batch: int, timesteps: int, steps: int, workers: int) -> tuple[int, float]:
    """(batches timed, seconds) of drawing `steps` batches with `workers` processes, after the start-up ones."""
    draw = partial(source.noised, batch=batch, alphas_cumprod=make_schedule("sigmoid", timesteps).alphas_cumprod)
    batches = step_batches(draw, seed=0, rank=0, start=0, stop=steps, workers=workers)
    untimed = max(1, workers * PREFETCH)  # the workers' first batches were drawn while they started
    for _ in range(untimed):
        next(batches)
    start = time.perf_counter()
    timed = sum(1 for _ in batches)
    return timed, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if min(workers) < 0 or args.steps <= max(1, max(workers) * PREFETCH):
        raise SystemExit(f"--steps {args.steps} must exceed the untimed start-up batches of every row "
                         f"(workers x {PREFETCH}), and --workers must be >= 0")
    classes = annotated_classes([str(args.store)])
    cfg = DDPMConfig(stores=[str(args.store)], out="unused", classes=classes, patch_size=args.patch_size,
                     batch_size=args.batch_size, device="cpu")
    store = EMStore(args.store)
    source = BatchSource(cfg, [store], {store.name: 0})
    facts = machine_facts()
    rows = []
    for n in workers:
        timed, seconds = rate(source, args.batch_size, cfg.timesteps, args.steps, n)
        patches = timed * args.batch_size / seconds
        rows.append([n, timed, number(seconds), number(patches), number(patches / max(n, 1))])
    facts.update({"batches": f"pairs DDPM batches of {args.batch_size} patches of {args.patch_size}x"
                             f"{args.patch_size}, {1 + len(classes)} channels (EM + {len(classes)} classes of "
                             f"{args.store}), class-balanced, augmented, noised"})
    emit(header("Training input pipeline: patches per second", command_line(MODULE, argv), facts) + "\n"
         + markdown_table(COLUMNS, rows), args.out)


if __name__ == "__main__":
    main()

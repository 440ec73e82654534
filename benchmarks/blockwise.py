"""Blockwise segmentation on one machine: what running `emserve segment` on Dask costs against one process.

    python -m benchmarks.blockwise --model models/phantom-seg --shape 64,1024,1024 --repeat 8 --workers 2 \\
        --out docs/BENCHMARKS.md

One phantom volume (`emserve data phantom --shape`, stacked --repeat times along z: the generator holds about 40
bytes per voxel, so a 0.5 Gvoxel phantom would not fit this machine's memory, and speed does not depend on what
the volume shows; kept in --workdir for the next run) is segmented by the command users run, timed from start to
exit: in one process (ONNX Runtime on every usable core), then with `--scheduler local:N` (N worker processes
sharing the same cores; cluster start-up included). Both write the same store (checked), so the ratio is the price
of the Dask path: start-up, task scheduling, each worker opening the model and the source once, the blocks' reads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from benchmarks.common import command_line, emit, header, machine_facts, markdown_table, number, workspace
from emserve.card import ModelCard
from emserve.data.store import EMStore
from emserve.data.writer import write_store
from emserve.volumes import MASKS

MODULE = "benchmarks.blockwise"
COLUMNS = ("path", "processes", "s per volume", "Mvoxel/s", "vs one process")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/phantom-seg"), help="an exported segmentation model")
    parser.add_argument("--shape", default="64,1024,1024", help="Z,Y,X of the phantom volume")
    parser.add_argument("--repeat", type=int, default=1, help="copies of the phantom stacked along z")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes of local:N (default: one per usable core)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the phantom volume here for the next run")
    parser.add_argument("--out", type=Path, default=None, help="also append the report to this Markdown file")
    return parser.parse_args(argv)


def segment(model: Path, store: Path, out: Path, *extra: str) -> float:
    """Seconds `emserve segment` takes from start to exit."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "emserve.cli", "segment", str(model), str(store), str(out),
                           "--overwrite", *extra], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"emserve segment failed:\n{done.stderr}")
    return seconds


def benchmark_volume(work: Path, shape: str, repeat: int) -> Path:
    """The phantom of `shape` stacked `repeat` times along z, as a store in `work` (made once, then reused)."""
    store = work / f"phantom-{shape.replace(',', 'x')}-x{repeat}.zarr"
    if store.is_dir():
        return store
    data = work / f"phantom-{shape.replace(',', 'x')}"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "emserve.cli", "data", "phantom", str(data), "--datasets", "1",
                        "--crops", "1", "--shape", shape], check=True, capture_output=True)
    phantom = EMStore(next(data.glob("*.zarr")))
    level = phantom.em_level()
    raw = np.asarray(phantom.em_volume(level)[...])
    return write_store(store, np.concatenate([raw] * repeat), level.voxel_size, levels=1)


def same_masks(card: ModelCard, a: Path, b: Path) -> bool:
    first, second = (zarr.open_group(str(p), mode="r") for p in (a, b))
    return all(np.array_equal(first[f"{MASKS}/{name}/s0"][...], second[f"{MASKS}/{name}/s0"][...])
               for name in card.classes)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    card = ModelCard.load(args.model)
    facts = machine_facts()  # the load before the runs
    with workspace(args.workdir) as work:
        store = EMStore(benchmark_volume(work, args.shape, args.repeat))
        shape = tuple(store.em_volume(store.em_level()).shape)
        voxels = int(np.prod(shape))
        alone = segment(args.model, store.path, work / "alone.zarr")
        dask = segment(args.model, store.path, work / "dask.zarr", "--scheduler", f"local:{args.workers}")
        if not same_masks(card, work / "alone.zarr", work / "dask.zarr"):
            raise SystemExit("the Dask run wrote other masks than the one-process run")
    rows = [["one process", 1, number(alone), number(voxels / alone / 1e6), "1"],
            [f"local:{args.workers}", args.workers, number(dask), number(voxels / dask / 1e6),
             number(alone / dask)]]
    facts.update({"model": f"{args.model} ({len(card.classes)} classes, UNet width {card.unet['width']} x "
                           f"{tuple(card.unet['multipliers'])}, tile {card.patch_size})",
                  "volume": f"phantom {args.shape} x {args.repeat} along z = {shape} uint8 ({voxels / 1e9:.3g} "
                            f"Gvoxel), masks only, default block size",
                  "timing": "one run each, `emserve segment` start to exit (Dask start-up included); the masks "
                            "of both runs are equal"})
    emit(header("Blockwise segmentation: Dask against one process", command_line(MODULE, argv), facts) + "\n"
         + markdown_table(COLUMNS, rows), args.out)


if __name__ == "__main__":
    main()

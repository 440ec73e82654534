"""How many voxels per second does `emserve segment` get through, against a plain PyTorch tile loop?

    python -m benchmarks.segmentation --model models/phantom-seg --volume 8,512,512 --out docs/BENCHMARKS.md

The emserve rows run emserve.volumes.segment_store, what `emserve segment` runs: block by block, tiles with
overlap and blended seams, masks (and no probabilities) written to a CellMap-layout store on disk, through a
Runtime from load_runtime. The baseline is what a user would write by hand with the same TorchScript graph:
non-overlapping tiles of the same size, batched, a sigmoid (softmax for exclusive models), results kept in
memory, nothing written. With overlap,
emserve evaluates more tile pixels than voxels (column "tile pixels per voxel"), so it cannot reach the baseline's
rate; the table shows the price of overlap and writing, and a row without overlap shows the rest. The volume is
random uint8: speed does not depend on the content.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import command_line, emit, header, machine_facts, markdown_table, number, set_threads, timed
from emserve.card import ModelCard
from emserve.runtime.load import load_runtime
from emserve.runtime.torchscript import TORCHSCRIPT_FILE
from emserve.segmentation import raw_to_network, tile_starts
from emserve.volumes import EMSource, segment_store

MODULE = "benchmarks.segmentation"
COLUMNS = ("path", "backend", "tile", "overlap", "tile pixels per voxel", "s per volume", "Mvoxel/s",
           "vs plain loop")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/phantom-seg"), help="an exported segmentation model")
    parser.add_argument("--volume", default="8,512,512", help="Z,Y,X of the random uint8 volume")
    parser.add_argument("--backends", default="onnx,torchscript", help="emserve rows: runtime backends")
    parser.add_argument("--tiles", default="", help="tile sizes, comma-separated (default: the model's patch size)")
    parser.add_argument("--batch", type=int, default=8, help="tiles per model call (both paths)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (None: one per core)")
    parser.add_argument("--out", type=Path, default=None, help="also append the report to this Markdown file")
    args = parser.parse_args(argv)
    try:
        args.shape = tuple(int(v) for v in args.volume.split(","))
    except ValueError:
        parser.error(f"--volume: {args.volume!r} is not Z,Y,X")
    if len(args.shape) != 3 or min(args.shape) < 1:
        parser.error(f"--volume: {args.volume!r} must be three positive sizes Z,Y,X")
    return args


def plain_loop(card: ModelCard, module: torch.jit.ScriptModule, volume: np.ndarray, tile: int,
               batch: int) -> np.ndarray:
    """Probabilities of every slice from non-overlapping tiles (the last one flush with the edge), no blending."""
    z, height, width = volume.shape
    out = np.empty((z, card.unet["out_channels"], height, width), np.float32)
    activation = (lambda logits: torch.softmax(logits, 1)) if card.exclusive else torch.sigmoid
    corners = [(a, b) for a in tile_starts(height, tile, tile) for b in tile_starts(width, tile, tile)]
    with torch.inference_mode():
        for index in range(z):
            image = torch.from_numpy(raw_to_network(volume[index]))
            for i in range(0, len(corners), batch):
                chunk = corners[i:i + batch]
                x = torch.stack([image[a:a + tile, b:b + tile] for a, b in chunk])[:, None]
                probs = activation(module(x)).numpy()
                for (a, b), p in zip(chunk, probs, strict=True):
                    out[index, :, a:a + tile, b:b + tile] = p
    return out


def tile_pixels_per_voxel(shape: tuple[int, int, int], tile: int, overlap: int) -> float:
    rows, cols = (len(tile_starts(n, tile, tile - overlap)) for n in shape[1:])
    return rows * cols * tile * tile / (shape[1] * shape[2])


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = set_threads(args.threads)
    facts = machine_facts()
    card = ModelCard.load(args.model)
    if card.mode != "segmentation":
        raise SystemExit(f"--model: {args.model} is a {card.mode!r} model; give a segmentation network")
    volume = np.random.default_rng(0).integers(0, 256, args.shape, dtype=np.uint8)
    voxels = volume.size
    tiles = [int(t) for t in args.tiles.split(",") if t.strip()] or [card.patch_size]
    module = torch.jit.load(str(args.model / TORCHSCRIPT_FILE), map_location="cpu").eval()
    rows = []
    for tile in tiles:
        baseline = statistics.median(timed(partial(plain_loop, card, module, volume, tile, args.batch), 1,
                                           args.repeats))
        rows.append(["plain torch loop", "torchscript", tile, 0, number(tile_pixels_per_voxel(args.shape, tile, 0)),
                     number(baseline), number(voxels / baseline / 1e6), "1"])
        for backend in (b.strip() for b in args.backends.split(",") if b.strip()):
            runtime = load_runtime(args.model, backend, **({"threads": threads} if backend == "onnx" else {}))
            for overlap in (tile // 4, 0):
                with tempfile.TemporaryDirectory(prefix="emserve-bench-seg-") as tmp:
                    run = partial(segment_store, runtime, EMSource(volume), Path(tmp) / "seg.zarr", tile=tile,
                                  overlap=overlap, batch_size=args.batch, overwrite=True)
                    seconds = statistics.median(timed(run, 1, args.repeats))
                rows.append(["emserve segment", backend, tile, overlap,
                             number(tile_pixels_per_voxel(args.shape, tile, overlap)), number(seconds),
                             number(voxels / seconds / 1e6), number(baseline / seconds)])
            runtime.close()
    facts.update({"threads": str(threads), "model": f"{args.model} ({len(card.classes)} classes, UNet width "
                  f"{card.unet['width']} x {tuple(card.unet['multipliers'])})",
                  "volume": f"{args.shape} uint8 ({voxels} voxels), {args.batch} tiles per call",
                  "timing": f"median of {args.repeats} runs after one warm-up run"})
    emit(header(f"Segmentation speed: {args.model.name}", command_line(MODULE, argv), facts) + "\n"
         + markdown_table(COLUMNS, rows), args.out)


if __name__ == "__main__":
    main()

"""How far from converged is `few`? Score the checkpoints of an experiment's `few` networks on the training crop's
unlabelled sections (where the segmentation budget may be chosen) and on the held-out crops (reported only), with
95 % intervals over seeds and tiles and the paired gain of each budget over the one before.

    python curve.py OUT.json EXPERIMENT_DIR STEP [STEP ...]

Reads EXPERIMENT_DIR/experiment.json for the stores, classes, voxel size, holdout and labelled slices; scores
EXPERIMENT_DIR/seed-*/seg-few/step-<STEP> with the experiment's own scoring call (evaluate_segmentation, columns of
one patch side through every section) and intervals (emserve.evaluation.statistics).
"""

import json
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np

from emserve.classes import UNKNOWN
from emserve.evaluation.evaluate import evaluate_segmentation, held_out_crops
from emserve.evaluation.statistics import dice_interval, mean_dice, paired_difference, verdict
from emserve.runtime.load import load_runtime


def unlabelled_sections(crops, count):
    """The training crops with the `count` labelled sections the few arms trained on marked unannotated (the
    planes training keeps: emserve.data.patches.keep_labelled_slices)."""
    for crop in crops:
        planes = crop.labels.shape[1]
        kept = np.unique(np.linspace(0, planes - 1, min(count, planes)).round().astype(int))
        crop.labels[:, kept] = UNKNOWN
    return crops


out, folder, steps = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3:]]
cfg = json.loads((folder / "experiment.json").read_text())
held = held_out_crops(cfg["stores"], cfg["classes"], cfg["holdout"], cfg["voxel_size"])
training = [c for c in held_out_crops(cfg["stores"], cfg["classes"], (), cfg["voxel_size"])
            if c.name not in cfg["holdout"] and f"{c.dataset}/{c.name}" not in cfg["holdout"]]
training = unlabelled_sections(training, cfg["few_slices"])
seeds = sorted(int(p.name.removeprefix("seed-")) for p in folder.glob("seed-*"))
counts = {"training": {}, "held_out": {}}
for step in steps:
    for where, crops in (("training", training), ("held_out", held)):
        per_seed = []
        for seed in seeds:
            checkpoint = folder / f"seed-{seed}" / "seg-few" / f"step-{step:08d}"
            with load_runtime(checkpoint, "torch") as runtime:
                per_seed.append(evaluate_segmentation(runtime, crops, count_tile=cfg["patch_size"])["tile_counts"])
            print(where, step, seed, f"{mean_dice(np.sum(per_seed[-1], axis=0)):.3f}", flush=True)
        counts[where][step] = np.asarray(per_seed)
report = {"experiment": str(folder), "seeds": seeds, "steps": steps,
          "training_crops": [f"{c.dataset}/{c.name} without its {cfg['few_slices']} labelled sections"
                             for c in training],
          "held_out_crops": [f"{c.dataset}/{c.name}" for c in held]}
for where, by_step in counts.items():
    report[where] = {str(step): {**dice_interval(c), "per_seed": [float(mean_dice(s.sum(0))) for s in c]}
                     for step, c in by_step.items()}
    gains = []
    for before, after in pairwise(steps):
        diff = paired_difference(by_step[after], by_step[before])
        gains.append({"from": before, "to": after, **diff, "reading": verdict(diff["ci95"], diff["per_seed"])})
    report[f"{where}_gains"] = gains
out.write_text(json.dumps(report, indent=2))

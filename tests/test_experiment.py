"""`emserve experiment`: every arm scored on held-out crops never trained on; a rerun resumes, not retrains."""

import json
import subprocess
import sys

import numpy as np
from checkpoints import CLASSES

from emserve.classes import UNKNOWN
from emserve.data.patches import load_crops
from emserve.data.store import EMStore
from emserve.metrics import plane_object_sizes
from training.experiment import (
    ARMS,
    RENDERED_ARM,
    ExperimentConfig,
    few_label_maps,
    split_in_proportion,
)


def test_the_smoke_experiment_scores_every_arm_and_resumes(toy_store, tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "emserve.cli", "experiment", *map(str, toy_store), "--out", str(out),
           "--holdout", "toy_b/crop1", "--classes", ",".join(CLASSES), "--patch-size", "16", "--width", "8",
           "--multipliers", "1,2", "--batch-size", "4", "--seg-steps", "6", "--ddpm-steps", "6", "--samples", "8",
           "--sample-steps", "3", "--despeckle", "5", "--from-labels-steps", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                 "PATH": ""})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["held_out"] == ["toy_b/crop1"]
    assert report["training_crops"] == {"toy_a": ["crop1"], "toy_b": []}
    assert list(report["arms"]) == [*ARMS, RENDERED_ARM]
    cards = list(out.glob("*/step-*/card.json"))  # every network the experiment trained: none saw the held-out labels
    assert len({c.parents[1] for c in cards}) == len(report["arms"]) + 3  # + the full, few and from-labels DDPMs
    for card in cards:
        crops = json.loads(card.read_text())["training"]["config"]["crops"]
        assert crops is not None and "crop1" not in crops.get("toy_b", []), card
    for arm in report["arms"]:
        assert [c["name"] for c in report["arms"][arm]["classes"]] == CLASSES
        assert report["arms"][arm]["crops"] == ["toy_b/crop1"]
    for name in ("full", "few"):
        assert report["realism"][name]["generated"] == 8
        assert (out / f"quiz-{name}.png").exists() and (out / f"generated-{name}.png").exists()
    assert report["class_balance"]["class"] in CLASSES and report["class_balance"]["min_object_pixels"] >= 1
    generated = EMStore(out / "generated-full.zarr")  # --despeckle 5: no labelled object under 5 pixels is left
    sizes = np.concatenate([plane_object_sizes(labels) for crop in generated.crops
                            for labels in generated.read_crop(crop, CLASSES).labels])
    assert sizes.size and sizes.min() >= 5
    cfg = ExperimentConfig(stores=[str(p) for p in toy_store], out=str(out), holdout=["toy_b/crop1"],
                           classes=list(CLASSES), patch_size=16, few_slices=2)
    maps = few_label_maps(cfg, report["training_crops"])["toy_a"]
    rendered = EMStore(out / "rendered-toy_a.zarr")  # real labels of the labelled slices only, under new EM
    assert report["rendered"] == {"stores": [str(out / "rendered-toy_a.zarr")], "guidance": 3.0}
    drawn = np.concatenate([rendered.read_crop(c, CLASSES).labels.transpose(1, 0, 2, 3) for c in rendered.crops])
    assert len(drawn) == 8 and all(any(np.array_equal(d, m) for m in maps) for d in drawn)
    markdown = (out / "report.md").read_text()
    assert all(f"| {arm} |" in markdown for arm in report["arms"]) and "rendered-toy_a.png" in markdown

    checkpoints = sorted(p.stat().st_mtime_ns for p in out.glob("*/step-*"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                  "PATH": ""})
    assert again.returncode == 0, again.stderr
    assert sorted(p.stat().st_mtime_ns for p in out.glob("*/step-*")) == checkpoints  # nothing retrained
    assert json.loads((out / "report.json").read_text())["arms"] == report["arms"]


def test_few_labelled_slices_keep_raw_everywhere_and_labels_on_evenly_spaced_planes(toy_store):
    store = EMStore(toy_store[0])
    full = load_crops([store], CLASSES)[0]
    few = load_crops([store], CLASSES, labelled_slices=3)[0]
    annotated = [z for z in range(few.labels.shape[1]) if (few.labels[:, z] != UNKNOWN).any()]
    assert annotated == [0, 4, 7]  # 8 planes: linspace(0, 7, 3) rounded
    np.testing.assert_array_equal(few.labels[:, annotated], full.labels[:, annotated])
    np.testing.assert_array_equal(few.raw, full.raw)


def test_rendered_label_maps_come_from_labelled_planes_of_training_crops_only(toy_store, tmp_path):
    cfg = ExperimentConfig(stores=[str(p) for p in toy_store], out=str(tmp_path), holdout=["toy_b/crop1"],
                           classes=list(CLASSES), patch_size=8, few_slices=3)
    maps = few_label_maps(cfg, {"toy_a": ["crop1"], "toy_b": []})
    assert list(maps) == ["toy_a"]  # toy_b's only crop is held out
    few = load_crops([EMStore(toy_store[0])], CLASSES, labelled_slices=3)[0]
    planes = [few.labels[:, z] for z in (0, 4, 7)]  # the labelled planes (see the test above), 64x64 each
    expected = [p[:, a:a + 8, b:b + 8] for p in planes for a in range(0, 64, 8) for b in range(0, 64, 8)]
    assert sorted(m.tobytes() for m in maps["toy_a"]) == sorted(t.tobytes() for t in expected)


def test_rendered_samples_are_shared_among_datasets_in_proportion_and_add_up():
    assert split_in_proportion(256, [10, 10, 10]) == [86, 85, 85]
    assert split_in_proportion(8, [1000, 1]) == [8, 0]  # a dataset with a sliver of the maps may get none
    assert split_in_proportion(7, [3, 1]) == [5, 2]

"""Metrics and `emserve evaluate`: unannotated voxels skipped, distances that see what they should."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from checkpoints import CLASSES, make_checkpoint

from emserve.classes import ABSENT, PRESENT, UNKNOWN
from emserve.data.store import EMStore
from emserve.data.writer import CropToWrite, write_store
from emserve.evaluation.evaluate import evaluate_presence, evaluate_realism, held_out_crops
from emserve.evaluation.metrics import (
    Calibration,
    Counts,
    ErrorDetection,
    frechet_distance,
    kernel_distance,
    plane_object_sizes,
    segmentation_report,
)
from training.export import export_model


def test_unannotated_voxels_are_skipped_not_counted_as_absent():
    labels = np.array([PRESENT, PRESENT, ABSENT, ABSENT, UNKNOWN, UNKNOWN], np.uint8)
    predicted = np.array([True, False, True, False, True, False])
    c = Counts()
    c.add(predicted, labels)
    assert (c.tp, c.fp, c.fn, c.annotated) == (1, 1, 1, 4)
    report = segmentation_report(["mito_mem"], [c])
    assert report["classes"][0]["dice"] == pytest.approx(2 / 4)
    assert report["classes"][0]["iou"] == pytest.approx(1 / 3)


def test_classes_annotated_nowhere_are_undefined_and_left_out_of_the_mean():
    seen, unseen = Counts(), Counts()
    seen.add(np.array([True, False]), np.array([PRESENT, ABSENT], np.uint8))
    unseen.add(np.array([True, True]), np.array([UNKNOWN, UNKNOWN], np.uint8))
    report = segmentation_report(["mito_mem", "ld_lum"], [seen, unseen])
    assert report["classes"][1]["dice"] is None and report["classes"][1]["annotated"] == 0
    assert report["mean"]["dice"] == 1.0


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0, 0])
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2 * 2I) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kernel_distance_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(1)
    a, same, other = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 0.5
    kid, std = kernel_distance(a, same)
    assert abs(kid) < 3 * std + 1e-3
    assert kernel_distance(a, other)[0] > 10 * max(std, 1e-4)


def test_realism_ranks_noise_far_from_real_em_and_real_near_the_floor(toy_store, tmp_path):
    rng = np.random.default_rng(2)
    noise = write_store(tmp_path / "noise.zarr", rng.integers(0, 256, (40, 32, 32), dtype=np.uint8), (1, 1, 1))
    report = evaluate_realism(str(noise), [str(toy_store[0])], samples=40, picture=tmp_path / "quiz.png")
    assert report["fd"] > 5 * report["fd_real_vs_real"]
    assert report["kid"] > report["kid_real_vs_real"]
    assert sorted(report["quiz"]["answers"]) == ["generated"] * 8 + ["real"] * 8
    assert (tmp_path / "quiz.png").exists()


def test_realism_cli_reports_what_the_function_does_with_its_options(toy_store, tmp_path):
    rng = np.random.default_rng(2)
    noise = write_store(tmp_path / "noise.zarr", rng.integers(0, 256, (40, 32, 32), dtype=np.uint8), (1, 1, 1))
    done = subprocess.run([sys.executable, "-m", "emserve.cli", "evaluate", "realism", str(noise), str(toy_store[0]),
                           "--samples", "24", "--seed", "1", "--picture", str(tmp_path / "quiz.png"), "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    expected = evaluate_realism(str(noise), [str(toy_store[0])], samples=24, seed=1, picture=tmp_path / "q.png")
    assert report["generated"] == expected["generated"] == 24
    for key in ("fd", "fd_real_vs_real", "kid", "kid_real_vs_real"):
        assert report[key] == pytest.approx(expected[key], rel=1e-6), key
    assert report["quiz"]["answers"] == expected["quiz"]["answers"]  # the same seed: the same quiz order
    assert (tmp_path / "quiz.png").is_file()
    assert f"FD  {expected['fd']:.3f}" in done.stdout

    coarse = EMStore(toy_store[0]).em_levels[1].voxel_size  # the real EM read at its second scale level
    done = subprocess.run([sys.executable, "-m", "emserve.cli", "evaluate", "realism", str(noise), str(toy_store[0]),
                           "--samples", "24", "--seed", "1", "--voxel-size", ",".join(map(str, coarse)), "--json",
                           str(tmp_path / "coarse.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    at_level = evaluate_realism(str(noise), [str(toy_store[0])], samples=24, seed=1, voxel_size=coarse)
    assert json.loads((tmp_path / "coarse.json").read_text())["fd"] == pytest.approx(at_level["fd"], rel=1e-6)
    assert at_level["fd_real_vs_real"] != pytest.approx(expected["fd_real_vs_real"], rel=1e-3)  # other patches


def test_held_out_crops_are_named_per_store_and_unknown_names_refused(toy_store):
    crops = held_out_crops([str(p) for p in toy_store], CLASSES, ["toy_b/crop1"])
    assert [(c.dataset, c.name) for c in crops] == [("toy_b", "crop1")]
    with pytest.raises(ValueError, match=r"crops: \['crop9'\] not found; available: toy_a/crop1, toy_b/crop1"):
        held_out_crops([str(p) for p in toy_store], CLASSES, ["crop9"])


def test_evaluate_cli_writes_json_and_csv_that_agree(toy_store, tmp_path):
    model = export_model(make_checkpoint(tmp_path / "runs" / "seg", "segmentation"), tmp_path / "models",
                         exporter="legacy")
    cmd = [sys.executable, "-m", "emserve.cli", "evaluate", "seg", str(model), str(toy_store[0]),
           "--tile", "32", "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["class"] for r in rows] == [*CLASSES, "mean"]
    for row, scores in zip(rows, report["classes"], strict=False):
        assert float(row["dice"]) == pytest.approx(scores["dice"], abs=1e-6)
        assert int(row["annotated"]) == scores["annotated"] == 8 * 64 * 64
    assert "mito_mem" in done.stdout and "mean" in done.stdout


def test_label_transfer_scores_the_segmentation_of_rendered_labels(toy_store):
    from emserve.card import ModelCard
    from emserve.evaluation.evaluate import evaluate_label_transfer
    from emserve.runtime.base import CallableRuntime

    unet = {"in_channels": 1, "out_channels": 1, "multipliers": [1, 2], "timestep": True, "label_channels": 2}
    card = ModelCard(mode="em-from-labels", classes=CLASSES, patch_size=16, unet=unet, objective="x0")
    # an oracle renderer: the clean image it predicts is the first class's label channel
    renderer = CallableRuntime(card, lambda x, t, cond: cond["label_map"][:, :1], backend="test")
    seg_unet = {"in_channels": 1, "out_channels": 2, "multipliers": [1, 2], "timestep": False}
    seg_card = ModelCard(mode="segmentation", classes=CLASSES, patch_size=16, unet=seg_unet)
    # a segmenter that finds the first class where the image is bright and never the second
    segmenter = CallableRuntime(seg_card, lambda x, t, cond: np.concatenate([20 * x, np.full_like(x, -20)], 1),
                                backend="test")
    report = evaluate_label_transfer(renderer, segmenter, str(toy_store[0]), dataset=None, samples=64, steps=5,
                                     sampler="ddim", guidance=1.0)
    first, second = report["classes"]
    assert first["dice"] == pytest.approx(1.0) and first["present"] > 0
    assert second["present"] > 0 and second["recall"] == 0.0  # 64 windows: some hold the lipid droplet
    assert report["samples"] == 64


@pytest.mark.slow
def test_transfer_cli_renders_with_the_options_given(toy_store, tmp_path):
    from emserve.evaluation.evaluate import evaluate_label_transfer
    from emserve.runtime.load import load_runtime

    renderer = make_checkpoint(tmp_path / "renderer", "em-from-labels", label_channels=len(CLASSES),
                               num_datasets=2)
    segmenter = make_checkpoint(tmp_path / "seg", "segmentation", seed=1)
    options = dict(dataset="b", samples=6, seed=3, sampler="ddim", steps=3,
                   guidance={"label_map": 2.0, "dataset": 0.5})  # a weight per condition, as `generate` takes
    done = subprocess.run([sys.executable, "-m", "emserve.cli", "evaluate", "transfer", str(renderer), str(segmenter),
                           str(toy_store[0]), "--dataset", "b", "--samples", "6", "--seed", "3", "--sampler", "ddim",
                           "--steps", "3", "--guidance", "label_map=2,dataset=0.5", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    with load_runtime(renderer) as denoiser, load_runtime(segmenter) as seg:
        expected = evaluate_label_transfer(denoiser, seg, str(toy_store[0]), **options)
    assert {k: report[k] for k in options} == options
    assert [c["name"] for c in report["classes"]] == CLASSES
    for got, want in zip(report["classes"], expected["classes"], strict=True):
        assert got["annotated"] == want["annotated"] > 0
        for metric in ("dice", "precision", "recall"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-6)


def test_objects_are_counted_per_plane_with_4_connectivity():
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, 1:4, 1:4] = PRESENT  # a 3x3 object
    labels[0, 6, 6] = labels[0, 7, 7] = PRESENT  # two specks touching only at a corner
    labels[1, 0, :] = PRESENT  # a line in the next plane: not joined to the square above it
    labels[1, 5, 5] = UNKNOWN  # unannotated is no object
    assert sorted(plane_object_sizes(labels).tolist()) == [1, 1, 8, 9]
    assert plane_object_sizes(np.zeros((0, 4, 4), np.uint8)).size == 0


def _square(labels: np.ndarray, z: int, y: int, x: int, side: int) -> None:
    labels[z, y:y + side, x:x + side] = PRESENT


def test_presence_counts_objects_of_real_size_in_samples_and_in_real_patches_of_their_size(tmp_path):
    # real: two 32x32 planes = eight 16x16 patches; 3x3 mitochondria in three of them, so objects of 9 pixels
    # are the smallest real tenth and a patch holds the class in 3 of 8
    real = np.zeros((2, 32, 32), np.uint8)
    for z, y, x in ((0, 2, 2), (0, 20, 4), (1, 18, 18)):
        _square(real, z, y, x, 3)
    real_store = write_store(tmp_path / "real.zarr", np.zeros((2, 32, 32), np.uint8), (8, 8, 8),
                             [CropToWrite("crop1", (0, 0, 0), {"mito_mem": real})])
    # generated: five 16x16 samples; a 3x3 object, a 2x2 speck (too small), both, nothing, and one that screening
    # rejected (unknown labels): the class is held by 2 of the 4 samples with labels
    drawn = np.zeros((5, 16, 16), np.uint8)
    _square(drawn, 0, 5, 5, 3)
    _square(drawn, 1, 5, 5, 2)
    _square(drawn, 2, 1, 1, 3)
    _square(drawn, 2, 10, 10, 2)
    drawn[4] = UNKNOWN
    generated = write_store(tmp_path / "gen.zarr", np.zeros((5, 16, 16), np.uint8), (8, 8, 8),
                            [CropToWrite("samples", (0, 0, 0), {"mito_mem": drawn})])
    cmd = [sys.executable, "-m", "emserve.cli", "evaluate", "presence", str(generated), str(real_store),
           "--classes", "mito_mem", "--json", str(tmp_path / "p.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["samples"] == 4 and report["patch_size"] == 16 and report["crops"] == ["real/crop1"]
    assert report["classes"] == [{"name": "mito_mem", "min_object_pixels": 9, "generated": 0.5, "real": 3 / 8}]
    assert "mito_mem" in done.stdout and "0.500" in done.stdout and "0.375" in done.stdout


def test_presence_refuses_a_store_without_label_maps(toy_store, tmp_path):
    em_only = write_store(tmp_path / "em.zarr", np.zeros((3, 16, 16), np.uint8), (8, 8, 8))
    with pytest.raises(ValueError, match=r"generated: .*em\.zarr holds no label maps; generate pairs"):
        evaluate_presence(str(em_only), [str(toy_store[0])], CLASSES)


def test_calibration_error_is_zero_when_probabilities_come_true_and_their_gap_when_overconfident():
    rng = np.random.default_rng(0)
    probs = rng.random(200_000)
    labels = np.where(rng.random(probs.size) < probs, PRESENT, ABSENT).astype(np.uint8)
    calibrated = Calibration()
    calibrated.add(probs, labels)
    assert calibrated.error() < 0.01
    overconfident = Calibration()
    truth = np.where(np.arange(1000) < 600, PRESENT, ABSENT).astype(np.uint8)
    overconfident.add(np.full(1000, 0.9), truth)
    overconfident.add(np.full(500, 0.2), np.full(500, UNKNOWN, np.uint8))  # unannotated: not counted
    assert overconfident.error() == pytest.approx(0.3)
    assert Calibration.pooled([calibrated, overconfident]).count.sum() == 201_000
    assert Calibration().error() is None


def test_error_auroc_ranks_wrong_voxels_against_right_ones_with_ties_counted_half():
    rng = np.random.default_rng(1)
    uncertainty = rng.integers(0, 256, 400) / 256
    masks = rng.random(400) < 0.5
    labels = np.where(rng.random(400) < 0.5, PRESENT, ABSENT).astype(np.uint8)
    detection = ErrorDetection()
    detection.add(uncertainty, masks, labels)
    wrong = masks != (labels == PRESENT)
    u_wrong, u_right = uncertainty[wrong][:, None], uncertainty[~wrong][None, :]
    expected = ((u_wrong > u_right) + 0.5 * (u_wrong == u_right)).mean()  # every pair, by brute force
    assert detection.auroc() == pytest.approx(expected)
    perfect = ErrorDetection()
    perfect.add(np.where(wrong, 0.9, 0.1), masks, labels)
    assert perfect.auroc() == 1.0
    assert ErrorDetection().auroc() is None

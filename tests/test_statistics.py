"""Intervals of segmentation scores: bootstrap over seeds and held-out tiles, paired differences."""

import numpy as np
import pytest

from emserve.evaluation.metrics import Counts, segmentation_report, tile_counts
from emserve.evaluation.statistics import dice_interval, mean_dice, paired_difference, verdict


def random_counts(rng, seeds=3, tiles=40, classes=3, scale=200):
    tp = rng.integers(0, scale, size=(seeds, tiles, classes))
    return np.stack([tp, rng.integers(0, scale // 2, tp.shape), rng.integers(0, scale // 2, tp.shape)], -1)


def test_mean_dice_is_the_reports_mean_over_classes_leaving_out_classes_with_nothing_to_score():
    counts = np.array([[10, 2, 3], [0, 0, 0], [0, 5, 1]])  # class 1: nothing present, nothing predicted
    expected = np.mean([20 / 25, 0.0])
    assert mean_dice(counts) == pytest.approx(expected)
    report = segmentation_report(["a", "b", "c"], [Counts(tp, fp, fn, annotated=100) for tp, fp, fn in counts])
    assert report["mean"]["dice"] == pytest.approx(expected)
    assert np.isnan(mean_dice(np.zeros((2, 3), int)))


def test_tile_counts_are_columns_through_every_plane_and_add_up_to_the_whole_crops_counts():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 255], size=(2, 3, 50, 70)).astype(np.uint8)
    predicted = rng.random((2, 3, 50, 70)) < 0.5
    tiles = tile_counts(predicted, labels, 32)
    assert tiles.shape == (2 * 3, 2, 3)  # 2 x 3 columns (the last ones narrower), each through all 3 planes
    corner = Counts()
    corner.add(predicted[1, :, :32, :32], labels[1, :, :32, :32])
    assert tuple(tiles[0, 1]) == (corner.tp, corner.fp, corner.fn)
    for k in range(2):
        whole = Counts()
        whole.add(predicted[k], labels[k])
        assert tuple(tiles[:, k].sum(0)) == (whole.tp, whole.fp, whole.fn)


def test_the_point_estimate_is_the_mean_of_the_seeds_mean_dice_and_lies_in_its_interval():
    counts = random_counts(np.random.default_rng(1))
    result = dice_interval(counts)
    per_seed = [mean_dice(c.sum(0)) for c in counts]
    assert result["mean_dice"] == pytest.approx(np.mean(per_seed)) and result["seeds"] == 3
    assert result["ci95"][0] < result["mean_dice"] < result["ci95"][1]


def test_an_arm_better_on_every_tile_and_seed_is_told_apart_and_the_same_arm_is_not():
    rng = np.random.default_rng(2)
    base = random_counts(rng)
    better = base.copy()
    better[..., 0] += 20  # more true positives everywhere...
    better[..., 2] = np.maximum(better[..., 2] - 20, 0)  # ...found among the misses
    diff = paired_difference(better, base)
    assert diff["mean_dice_diff"] > 0 and diff["ci95"][0] > 0 and verdict(diff["ci95"], diff["per_seed"]) == "better"
    same = paired_difference(base, base)
    assert same["mean_dice_diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["per_seed"] == [0.0] * 3
    assert verdict(same["ci95"], same["per_seed"]) == "not distinguishable from zero"
    worse = paired_difference(base, better)
    assert verdict(worse["ci95"], worse["per_seed"]) == "worse"


def test_a_difference_that_one_seed_contradicts_is_not_called():
    assert verdict([0.01, 0.05], [0.04, 0.03, -0.01]) == "not distinguishable from zero"
    assert verdict([-0.05, -0.01], [-0.04, 0.01, -0.03]) == "not distinguishable from zero"
    assert verdict([0.01, 0.05], [0.04, 0.03, 0.01]) == "better"


def test_pairing_removes_the_variation_arm_and_baseline_share():
    rng = np.random.default_rng(3)
    base = random_counts(rng, tiles=60)
    shifted = base.copy()
    shifted[..., 0] += rng.integers(0, 6, size=base.shape[:-1])  # a small gain, on top of large shared variation
    paired = paired_difference(shifted, base)["ci95"]
    separate = [dice_interval(a)["ci95"] for a in (shifted, base)]
    assert paired[1] - paired[0] < 0.5 * min(high - low for low, high in separate)
    assert paired[0] > 0  # the small gain is found, though the two separate intervals overlap
    assert separate[0][0] < separate[1][1]


def test_noise_alone_gives_an_interval_that_holds_zero_in_about_95_percent_of_experiments():
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(60):
        truth = rng.integers(50, 150, size=(1, 40, 2))  # the same tiles, two arms with independent errors
        arms = [np.stack([np.broadcast_to(truth, (3, 40, 2)) - (m := rng.integers(0, 40, (3, 40, 2))),
                          rng.integers(0, 40, (3, 40, 2)), m], -1) for _ in range(2)]
        low, high = paired_difference(*arms, draws=400, seed=int(rng.integers(1 << 30)))["ci95"]
        covered += low <= 0 <= high
    assert covered >= 50  # 95 % nominal; a bootstrap over 3 seeds runs a little narrow, never at half


def test_counts_that_do_not_pair_are_refused_by_name():
    counts = random_counts(np.random.default_rng(5))
    with pytest.raises(ValueError, match=r"baseline: shape \(2, 40, 3, 3\) does not pair with the arm's "
                                         r"\(3, 40, 3, 3\)"):
        paired_difference(counts, counts[:2])
    with pytest.raises(ValueError, match=r"counts: shape \(40, 3, 3\); expected \[seeds, tiles, classes, 3\]"):
        dice_interval(counts[0])

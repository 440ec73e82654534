"""Intervals for segmentation scores: how sure is "this arm beats that one"?

A score on held-out data varies with two things: which network training produced (the seed) and which part of
the volume it was scored on (the tiles). The bootstrap here resamples both: each draw picks the seeds with
replacement and, independently, one set of held-out tiles with replacement (shared by the drawn seeds, since they
are scored on the same tiles), recomputes every drawn seed's mean Dice from the voxel counts summed over the drawn
tiles (Dice is a ratio of sums, never an average of per-tile ratios, so small tiles with nothing in them do not
swing it), and averages over the drawn seeds. A class with nothing to score in a draw's tiles is left out of that
draw's mean, as the reports leave out such a class.

With few seeds the resampled seed spread runs narrow (three seeds give ten distinct draws and shrink the seed
variance by a third), so `verdict` also asks every seed to show the difference with the same sign.

A paired difference uses the same seeds and tiles for the arm and its baseline in every draw, which removes the
variation both share (a hard tile is hard for both), so it is far tighter than two separate intervals.

Counts come as arrays [seeds, tiles, classes, 3] of (true positives, false positives, false negatives), from
`emserve.evaluation.evaluate.evaluate_segmentation(..., count_tile=N)`; seed s of an arm and of its baseline must be the
same training seed.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000
LEVEL = 0.95


def mean_dice(counts: np.ndarray) -> np.ndarray:
    """Mean over classes of Dice = 2tp / (2tp + fp + fn) from counts [..., classes, 3]; classes with nothing to
    score (no voxel present or predicted) are left out, as in the reports; NaN where no class is left."""
    tp, fp, fn = np.moveaxis(np.asarray(counts, np.float64), -1, 0)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denominator > 0, 2 * tp / denominator, np.nan)
    defined = ~np.isnan(dice)
    total = np.where(defined, dice, 0.0).sum(-1)
    return np.where(defined.any(-1), total / np.maximum(defined.sum(-1), 1), np.nan)


def _check(counts: np.ndarray, name: str) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 4 or counts.shape[-1] != 3 or 0 in counts.shape[:2]:
        raise ValueError(f"{name}: shape {counts.shape}; expected [seeds, tiles, classes, 3] with at least one "
                         f"seed and one tile")
    return counts


def _bootstrap(counts: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """[draws] mean Dice of the hierarchical resamples (seeds, then tiles) of counts [S, T, K, 3] (or of the
    difference of two such arrays stacked on a leading axis of 2, with the same resamples for both)."""
    seeds, tiles = counts.shape[-4:-2]
    rng = np.random.default_rng(seed)
    picked_seeds = rng.integers(seeds, size=(draws, seeds))
    tile_weights = np.stack([np.bincount(rng.integers(tiles, size=tiles), minlength=tiles) for _ in range(draws)])
    sums = np.einsum("bt,...stkc->...bskc", tile_weights.astype(np.float64), counts.astype(np.float64))
    per_seed = mean_dice(sums)  # [..., draws, seeds]
    chosen = np.take_along_axis(per_seed, np.broadcast_to(picked_seeds, per_seed.shape), axis=-1)
    return np.nanmean(chosen, axis=-1)


def _interval(values: np.ndarray) -> list[float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def dice_interval(counts: np.ndarray, *, draws: int = DRAWS, seed: int = 0) -> dict:
    """{"mean_dice": mean over seeds of each seed's mean Dice on all tiles, "ci95": [low, high], "seeds": n}."""
    counts = _check(counts, "counts")
    point = float(np.nanmean(mean_dice(counts.sum(1))))
    return {"mean_dice": point, "ci95": _interval(_bootstrap(counts, draws, seed)), "seeds": counts.shape[0]}


def paired_difference(counts: np.ndarray, baseline: np.ndarray, *, draws: int = DRAWS, seed: int = 0) -> dict:
    """{"mean_dice_diff": arm minus baseline (mean over seeds), "ci95": [low, high], "seeds": n, "per_seed": each
    seed's difference}, both resampled with the same seeds and tiles in every draw."""
    counts, baseline = _check(counts, "counts"), _check(baseline, "baseline")
    if counts.shape[:2] != baseline.shape[:2] or counts.shape[2] != baseline.shape[2]:
        raise ValueError(f"baseline: shape {baseline.shape} does not pair with the arm's {counts.shape} (same seeds, "
                         f"tiles and classes needed)")
    both = _bootstrap(np.stack([counts, baseline]), draws, seed)
    per_seed = mean_dice(counts.sum(1)) - mean_dice(baseline.sum(1))
    return {"mean_dice_diff": float(np.nanmean(per_seed)), "ci95": _interval(both[0] - both[1]),
            "seeds": counts.shape[0], "per_seed": per_seed.tolist()}


def verdict(ci95: list[float], per_seed: list[float]) -> str:
    """A difference in words: "better" or "worse" only when the interval leaves out zero and every seed goes the
    same way; otherwise it cannot be told from zero."""
    low, high = ci95
    if low > 0 and min(per_seed) > 0:
        return "better"
    if high < 0 and max(per_seed) < 0:
        return "worse"
    return "not distinguishable from zero"

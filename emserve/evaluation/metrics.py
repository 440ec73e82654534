"""How good is a segmentation, and how real does generated EM look.

Segmentation: per-class Dice (F1), IoU, precision and recall from voxel counts summed over all evaluated crops.
Voxels where a class was not annotated are left out for that class (never counted as absent), and a class
annotated nowhere is reported as such, not as zero.

Presence: does a sample hold a class? Only if one of its 2D objects (4-connected pixels) is at least as large as
the smallest tenth of the class's real objects: an undertrained model sprinkles specks of every class everywhere,
and counting specks would call every sample a hit.

Realism: Frechet distance (FD) and kernel inception distance (KID) between feature sets of real and generated
patches. The features come from a fixed, hand-built filter bank that ships with the code (no weights to
download, identical on every machine): at several scales, the mean and spread of smoothed intensity, gradient
magnitude, Laplacian and Hessian determinant, plus intensity quantiles and a radial power spectrum. They see
texture, edges, membranes and blobs at EM scales; the distances compare only relatively (generated vs real
against real vs real from disjoint sets), never across feature sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

import numpy as np
from scipy import linalg, ndimage

from emserve.classes import PRESENT, UNKNOWN

SCALES = (1.0, 2.0, 4.0, 8.0)
QUANTILES = np.linspace(0.05, 0.95, 10)
SPECTRUM_BINS = 8


@dataclass
class Counts:
    """Voxel counts of one class: true/false positives, false negatives, annotated voxels."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    annotated: int = 0

    def add(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        """Add a prediction (bool) against labels (0/1/255) of the same shape; 255 voxels are skipped."""
        tp, fp, fn = confusion(predicted, labels).reshape(-1, 3).sum(0)
        self.tp += int(tp)
        self.fp += int(fp)
        self.fn += int(fn)
        self.annotated += int((labels != UNKNOWN).sum())


def confusion(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per voxel, whether it is a true positive, a false positive or a false negative [..., 3] (bool), for a
    prediction (bool) against labels (0/1/255) of the same shape; unannotated voxels are none of them."""
    known = labels != UNKNOWN
    truth = labels == PRESENT
    return np.stack([predicted & truth & known, predicted & ~truth & known, ~predicted & truth & known], -1)


def tile_counts(predicted: np.ndarray, labels: np.ndarray, tile: int) -> np.ndarray:
    """(tp, fp, fn) per tile and class [T, K, 3] of masks against labels [K, Z, Y, X] (0/1/255; 255 skipped),
    the units a bootstrap over held-out data resamples (`statistics`). A tile is a column: a `tile` x `tile` block
    through every z-plane (the last row and column of blocks may be narrower), because neighbouring planes
    show the same organelles and would not be independent draws."""
    if tile < 1:
        raise ValueError(f"tile: {tile} must be a positive number of pixels")
    _, _, height, width = labels.shape
    columns = confusion(predicted, labels).sum(axis=1)  # [K, Y, X, 3]
    rows, cols = np.arange(0, height, tile), np.arange(0, width, tile)
    summed = np.add.reduceat(np.add.reduceat(columns, rows, axis=1), cols, axis=2)  # [K, R, C, 3]
    return summed.transpose(1, 2, 0, 3).reshape(-1, labels.shape[0], 3)


@dataclass
class ClassScores:
    name: str
    dice: float | None
    iou: float | None
    precision: float | None
    recall: float | None
    annotated: int  # voxels where the class was annotated
    present: int  # of which the class is present


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def class_scores(name: str, c: Counts) -> ClassScores:
    """Scores from counts; None where undefined (class annotated nowhere, or absent and never predicted)."""
    if not c.annotated:
        return ClassScores(name, None, None, None, None, 0, 0)
    return ClassScores(name, _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn), _ratio(c.tp, c.tp + c.fp + c.fn),
                       _ratio(c.tp, c.tp + c.fp), _ratio(c.tp, c.tp + c.fn), c.annotated, c.tp + c.fn)


def format_score(value: float | None) -> str:
    """A score for tables: three decimals, "-" where undefined."""
    return "-" if value is None else f"{value:.3f}"


def segmentation_report(names: Sequence[str], counts: Sequence[Counts]) -> dict:
    """{"classes": [per-class scores], "mean": {metric: mean over classes where defined}} (JSON-ready)."""
    scores = [class_scores(n, c) for n, c in zip(names, counts, strict=True)]
    mean = {}
    for metric in ("dice", "iou", "precision", "recall"):
        values = [getattr(s, metric) for s in scores if getattr(s, metric) is not None]
        mean[metric] = float(np.mean(values)) if values else None
    return {"classes": [asdict(s) for s in scores], "mean": mean}


# --- calibration and uncertainty ------------------------------------------------------------------------------
class Calibration:
    """Expected calibration error of per-voxel probabilities over annotated voxels, pooled over everything added:
    voxels binned by probability into `bins` equal bins, each bin's |mean probability - share present| weighted by
    its voxels (Guo et al. 2017). Sums only, so crops of any size add up without keeping their voxels."""

    def __init__(self, bins: int = 10) -> None:
        self.bins = bins
        self.count, self.prob, self.present = (np.zeros(bins) for _ in range(3))

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        known = labels != UNKNOWN
        p, y = probs[known].astype(np.float64), labels[known] == PRESENT
        index = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        self.count += np.bincount(index, minlength=self.bins)
        self.prob += np.bincount(index, weights=p, minlength=self.bins)
        self.present += np.bincount(index, weights=y, minlength=self.bins)

    @classmethod
    def pooled(cls, parts: Sequence[Calibration]) -> Calibration:
        """One calibration of everything `parts` were given (classes pooled, say)."""
        out = cls(parts[0].bins)
        for part in parts:
            out.count, out.prob, out.present = out.count + part.count, out.prob + part.prob, out.present + part.present
        return out

    def error(self) -> float | None:
        total = self.count.sum()
        return float(np.abs(self.prob - self.present).sum() / total) if total else None


class ErrorDetection:
    """How well a per-voxel uncertainty in [0, 1] finds the wrong voxels: the AUROC of uncertainty for wrong against
    right annotated voxels (0.5: no better than chance), from 256-bin histograms (ties count half)."""

    LEVELS = 256

    def __init__(self) -> None:
        self.wrong, self.right = np.zeros(self.LEVELS), np.zeros(self.LEVELS)

    def add(self, uncertainty: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> None:
        known = labels != UNKNOWN
        level = np.minimum((uncertainty[known] * self.LEVELS).astype(np.int64), self.LEVELS - 1)
        wrong = masks[known] != (labels[known] == PRESENT)
        self.wrong += np.bincount(level[wrong], minlength=self.LEVELS)
        self.right += np.bincount(level[~wrong], minlength=self.LEVELS)

    def auroc(self) -> float | None:
        wrong, right = self.wrong.sum(), self.right.sum()
        if not wrong or not right:
            return None
        below = np.cumsum(self.right) - self.right  # right voxels strictly less uncertain than each level
        return float((self.wrong * (below + 0.5 * self.right)).sum() / (wrong * right))


# --- presence -------------------------------------------------------------------------------------------------
def plane_object_sizes(labels: np.ndarray) -> np.ndarray:
    """Pixel counts of the 2D connected objects (4-connected, PRESENT voxels) of each plane of labels [Z, Y, X]."""
    sizes = [np.bincount(ndimage.label(plane == PRESENT)[0].ravel())[1:] for plane in labels]
    return np.concatenate(sizes) if sizes else np.zeros(0, np.int64)


def presence_threshold(real_sizes: np.ndarray) -> int:
    """The smallest object that counts as the class drawn: the 10th percentile of the real object sizes (at least
    one pixel; one pixel where the real data holds no object of the class)."""
    return max(1, int(np.percentile(real_sizes, 10))) if real_sizes.size else 1


def presence_share(planes: Sequence[np.ndarray], min_pixels: int) -> float | None:
    """Share of the annotated planes [Y, X] that hold an object of at least `min_pixels`; None if none is
    annotated."""
    hits = [bool((plane_object_sizes(p[None]) >= min_pixels).any()) for p in planes if (p != UNKNOWN).any()]
    return float(np.mean(hits)) if hits else None


# --- realism --------------------------------------------------------------------------------------------------
def patch_features(raw: np.ndarray) -> np.ndarray:
    """Features [N, D] (float64) of 2D patches raw [N, H, W] in [-1, 1] from the fixed filter bank."""
    raw = np.asarray(raw, np.float64)
    if raw.ndim != 3 or min(raw.shape[1:]) < 16:
        raise ValueError(f"patches: shape {raw.shape}; expected [N, H, W] with H, W >= 16")
    return np.stack([_features(p) for p in raw])


def _features(patch: np.ndarray) -> np.ndarray:
    out = list(np.quantile(patch, QUANTILES))
    for s in SCALES:
        smooth = ndimage.gaussian_filter(patch, s)
        grad = ndimage.gaussian_gradient_magnitude(patch, s)
        lap = ndimage.gaussian_laplace(patch, s) * s**2
        hyy = ndimage.gaussian_filter(patch, s, order=(2, 0))
        hxx = ndimage.gaussian_filter(patch, s, order=(0, 2))
        hxy = ndimage.gaussian_filter(patch, s, order=(1, 1))
        det = (hxx * hyy - hxy**2) * s**4
        for response in (smooth, grad, lap, det):
            out += [response.mean(), response.std()]
    out += list(_radial_spectrum(patch))
    return np.asarray(out)


def _radial_spectrum(patch: np.ndarray) -> np.ndarray:
    """Log power in SPECTRUM_BINS radial frequency bands (texture and noise scale)."""
    power = np.abs(np.fft.fftshift(np.fft.fft2(patch - patch.mean()))) ** 2
    h, w = patch.shape
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot((yy - h // 2) / h, (xx - w // 2) / w)
    edges = np.linspace(0, 0.5, SPECTRUM_BINS + 1)
    return np.array([np.log1p(power[(radius >= a) & (radius < b)].mean()) for a, b in pairwise(edges)])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)  # no disp=: deprecated, gone in SciPy 1.18
    if not np.isfinite(root).all():  # near-singular product: regularise, as the usual FID code does
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real)
    return float(max(value, 0.0))


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 20, subset_size: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets."""
    rng = np.random.default_rng(seed)
    n = min(subset_size, len(a), len(b))
    if n < 2:
        raise ValueError(f"patches: KID needs at least 2 patches per set; got {len(a)} and {len(b)}")
    dim = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = 1 - np.eye(n)
        values.append(((kxx * off).sum() + (kyy * off).sum()) / (n * (n - 1)) - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def standardize(*feature_sets: np.ndarray) -> list[np.ndarray]:
    """Scale every feature by the mean and std of the first set, so no feature dominates by its units."""
    mean, std = feature_sets[0].mean(0), feature_sets[0].std(0)
    std = np.where(std > 0, std, 1.0)
    return [(f - mean) / std for f in feature_sets]


def realism(generated: np.ndarray, real: np.ndarray, real_reference: np.ndarray) -> dict[str, float]:
    """FD and KID of generated vs real patches, and of two disjoint real sets (the floor to compare with)."""
    real_f, gen_f, ref_f = standardize(patch_features(real), patch_features(generated), patch_features(real_reference))
    kid, kid_std = kernel_distance(gen_f, real_f)
    floor, floor_std = kernel_distance(ref_f, real_f)
    return {"fd": frechet_distance(gen_f, real_f), "fd_real_vs_real": frechet_distance(ref_f, real_f),
            "kid": kid, "kid_std": kid_std, "kid_real_vs_real": floor, "kid_real_vs_real_std": floor_std,
            "generated": len(gen_f), "real": len(real_f), "real_reference": len(ref_f)}

"""Crop choice: which sub-boxes of the EM volume get labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .labels import ID, PHANTOM_CLASSES


def choose_crops(ids: np.ndarray, crop_shape: Sequence[int], n: int, rng: np.random.Generator,
                 candidates: int = 32) -> list[tuple[int, int, int]]:
    """Crop offsets (voxels) that together cover many classes, rare ones first, overlapping each other little."""
    crop_shape = tuple(int(c) for c in crop_shape)
    room = [s - c for s, c in zip(ids.shape, crop_shape, strict=True)]
    if min(room) < 0:
        raise ValueError(f"crop_shape: {crop_shape} does not fit in the EM volume of shape {ids.shape}")
    offsets = [tuple(int(rng.integers(0, r + 1)) for r in room) for _ in range(candidates)]
    class_ids = np.array([ID[c] for c in PHANTOM_CLASSES])
    total = np.bincount(ids.ravel(), minlength=256)[class_ids] / ids.size
    weight = 1.0 / (total + 1e-3)
    present = np.array([
        np.bincount(ids[tuple(slice(o, o + c) for o, c in zip(off, crop_shape, strict=True))].ravel(),
                    minlength=256)[class_ids] > 0 for off in offsets])
    chosen: list[int] = []
    covered = np.zeros(len(class_ids), bool)
    for _ in range(n):
        best, best_score = None, -np.inf
        for i, off in enumerate(offsets):
            if i in chosen:
                continue
            overlap = max((_overlap(off, offsets[j], crop_shape) for j in chosen), default=0.0)
            score = float((weight * (present[i] & ~covered)).sum()) + present[i].sum() - 50.0 * max(overlap - 0.25, 0)
            if score > best_score:
                best, best_score = i, score
        if best is None:
            break
        chosen.append(best)
        covered |= present[best]
    return [offsets[i] for i in chosen]


def _overlap(a: Sequence[int], b: Sequence[int], shape: Sequence[int]) -> float:
    inter = 1.0
    for x, y, s in zip(a, b, shape, strict=True):
        inter *= max(0, min(x, y) + s - max(x, y)) / s
    return inter

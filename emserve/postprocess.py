"""From generated channels to label maps, and screening that rejects implausible ones.

A diffusion model emits one channel per class in [-1, 1]. `labels_from_channels` turns them into masks either
per class (threshold: classes may overlap, as group classes do), exclusively (argmax with background: the
strongest class wins where it clears the threshold), or exclusively with each lumen decoded together with its
membrane (paired: every lumen enclosed by its membrane by construction), optionally without specks below a size.
Screening then checks what biology guarantees: a lumen is enclosed by its membrane (unless it leaves the patch),
no lumen lacks a membrane, objects are not specks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from emserve.classes import MEMBRANE_OF

LABEL_METHODS = ("threshold", "argmax", "paired")
DEFAULT_LABEL_METHOD = "threshold"


def labels_from_channels(channels: np.ndarray, method: str = DEFAULT_LABEL_METHOD, threshold: float = 0.0,
                         despeckle: int = 0, classes: Sequence[str] = ()) -> np.ndarray:
    """Bool masks [..., K, H, W] from channels [..., K, H, W] in [-1, 1], without objects smaller than
    `despeckle` pixels (0: all kept). "paired" needs the channels' class names, to know lumens and membranes."""
    if method not in LABEL_METHODS:
        raise ValueError(f"labels: method {method!r} is not allowed; choose one of {', '.join(LABEL_METHODS)}")
    if method == "threshold":
        masks = channels > threshold
    else:
        winner = channels.argmax(axis=-3)
        best = np.take_along_axis(channels, winner[..., None, :, :], axis=-3)[..., 0, :, :]
        k = channels.shape[-3]
        masks = (winner[..., None, :, :] == np.arange(k)[:, None, None]) & (best > threshold)[..., None, :, :]
    if despeckle:
        masks = remove_specks(masks, despeckle)
    return enclose_lumens(masks, classes) if method == "paired" else masks


def enclose_lumens(masks: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Masks [..., K, H, W] with each lumen decoded together with its membrane: the union of the two is the
    organelle; its pixels at least one pixel inside the organelle (4-connected; the patch border does not count
    as outside) stay lumen where the lumen was drawn, every other pixel of it is membrane. So every lumen is
    enclosed by its membrane by construction, and a lumen drawn without one gains the ring it lacked at the cost
    of its outermost pixels; a lumen under three pixels across becomes membrane."""
    index = {name: k for k, name in enumerate(classes)}
    pairs = [(index[lumen], index[membrane]) for lumen, membrane in MEMBRANE_OF.items()
             if lumen in index and membrane in index]
    if not pairs:
        return masks
    out = masks.copy()
    for sample in np.ndindex(masks.shape[:-3]):
        for lumen, membrane in pairs:
            organelle = masks[sample][lumen] | masks[sample][membrane]
            inside = masks[sample][lumen] & ndimage.binary_erosion(organelle, border_value=1)
            out[sample][lumen] = inside
            out[sample][membrane] = organelle & ~inside
    return out


def remove_specks(masks: np.ndarray, min_pixels: int) -> np.ndarray:
    """Masks [..., H, W] without their objects (4-connected) of fewer than `min_pixels` pixels.

    A diffusion model that is not fully trained sprinkles few-pixel specks of small classes over its label maps,
    with nothing under them in the EM; each speck is a lumen without its membrane, so screening would reject the
    whole map for them. Dropping them first keeps the maps whose real objects are plausible.
    """
    out = masks.copy()
    for index in np.ndindex(masks.shape[:-2]):
        labelled, n = ndimage.label(masks[index])
        if n:
            out[index] = np.bincount(labelled.ravel())[labelled] >= min_pixels
            out[index] &= masks[index]  # the background's count is large: keep it background
    return out


@dataclass
class Screening:
    """Rules for plausible label maps, and a tally of what they rejected.

    `min_size` in pixels (0: no limit). `enclosure`: the share of a lumen's outer rim that must be its membrane
    (or lumen) when the lumen does not leave the patch.
    """

    min_size: int = 0
    enclosure: float = 0.9
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)  # reason -> samples rejected for it

    def check(self, masks: np.ndarray, classes: Sequence[str]) -> list[str]:
        """Reasons to reject one label map [K, H, W] (empty: plausible), counted in the tally."""
        reasons: set[str] = set()
        index = {name: i for i, name in enumerate(classes)}
        for lumen, membrane in MEMBRANE_OF.items():
            if lumen in index and membrane in index:
                reasons |= _lumen_reasons(masks[index[lumen]], masks[index[membrane]], lumen, self.enclosure)
        if self.min_size:
            for name, mask in zip(classes, masks, strict=True):
                labelled, n = ndimage.label(mask)
                if n and (np.bincount(labelled.ravel())[1:] < self.min_size).any():
                    reasons.add(f"{name}: object smaller than {self.min_size} px")
        if reasons:
            self.rejected += 1
            self.reasons.update(reasons)
        else:
            self.accepted += 1
        return sorted(reasons)

    def summary(self) -> str:
        parts = [f"{reason} ({count})" for reason, count in self.reasons.most_common()]
        text = f"screening accepted {self.accepted} of {self.accepted + self.rejected}"
        return text + (f"; rejected: {'; '.join(parts)}" if parts else "")


def _lumen_reasons(lumen: np.ndarray, membrane: np.ndarray, name: str, enclosure: float) -> set[str]:
    reasons = set()
    labelled, n = ndimage.label(lumen)
    for i in range(1, n + 1):
        component = labelled == i
        rim = ndimage.binary_dilation(component) & ~component
        if not (rim & membrane).any():
            reasons.add(f"{name}: lumen without membrane")
            continue
        touches_border = component[0].any() or component[-1].any() or component[:, 0].any() or component[:, -1].any()
        if not touches_border and (rim & (membrane | lumen)).sum() < enclosure * rim.sum():
            reasons.add(f"{name}: lumen not enclosed by {MEMBRANE_OF[name]}")
    return reasons

"""From generated channels to label maps, and screening that rejects implausible ones.

A diffusion model emits one channel per class in [-1, 1]. `labels_from_channels` turns them into masks either
per class (threshold: classes may overlap, as group classes do), exclusively (argmax with background: the
strongest class wins where it clears the threshold), or exclusively with each lumen decoded together with its
membrane (paired: the ring around each lumen that was not drawn as its membrane becomes membrane), optionally
without specks below a size. "auto", the default, decodes a model of atomic CellMap classes (mutually exclusive by
their definition) as paired and any other (group classes overlap their members) by threshold.
Screening then checks what biology guarantees: a lumen is enclosed by its membrane (unless it leaves the patch),
no lumen lacks a membrane, objects are not specks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from emserve.classes import MEMBRANE_OF, get_class

LABEL_METHODS = ("auto", "threshold", "argmax", "paired")
DEFAULT_LABEL_METHOD = "auto"


def resolve_label_method(method: str, classes: Sequence[str]) -> str:
    """The method "auto" means for these classes: paired where every class is atomic (CellMap's atomic classes
    never overlap), threshold otherwise; any other method as it is. Measured on the default pairs model
    (docs/experiments/label-decoding.md): paired keeps argmax's pair consistency and passes screening as drawn
    where threshold and argmax decoding fail it for nearly every sample."""
    if method != "auto":
        return method
    return "paired" if classes and not any(get_class(name).is_group for name in classes) else "threshold"


def labels_from_channels(channels: np.ndarray, method: str = DEFAULT_LABEL_METHOD, threshold: float = 0.0,
                         despeckle: int = 0, classes: Sequence[str] = ()) -> np.ndarray:
    """Bool masks [..., K, H, W] from channels [..., K, H, W] in [-1, 1], without objects smaller than
    `despeckle` pixels (0: all kept). "paired" and "auto" need the channels' class names."""
    if method not in LABEL_METHODS:
        raise ValueError(f"labels: method {method!r} is not allowed; choose one of {', '.join(LABEL_METHODS)}")
    method = resolve_label_method(method, classes)
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
    """Exclusive masks [..., K, H, W] with each lumen decoded together with its membrane: the lumen stays as drawn,
    and the pixels around it (4-connected, the rim screening checks) that were not drawn as its membrane become
    membrane, taken from whatever class held them. So a lumen drawn with a broken or missing membrane gains the
    ring it lacked. The lumen is kept rather than eroded into a ring: eroding cost pair consistency
    (docs/experiments/label-decoding.md), since the model's EM shows the lumen where it drew it."""
    index = {name: k for k, name in enumerate(classes)}
    pairs = [(index[lumen], index[membrane]) for lumen, membrane in MEMBRANE_OF.items()
             if lumen in index and membrane in index]
    out = masks.copy()
    for sample in np.ndindex(masks.shape[:-3]):
        for lumen, membrane in pairs:
            drawn = out[sample][lumen]
            ring = ndimage.binary_dilation(drawn) & ~drawn
            out[sample][:, ring] = False
            out[sample][membrane][ring] = True
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

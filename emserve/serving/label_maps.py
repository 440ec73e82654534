"""Uploaded label maps as the condition of an em-from-labels model: index maps (CellMap ids, or 1..C naming the
given classes) or masks [N, C, H, W], checked against the model's classes and patch size, as +1 / -1 / 0 maps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emserve.card import ModelCard
from emserve.classes import ABSENT, PRESENT, UNKNOWN, get_class
from emserve.data.patches import label_channels
from emserve.pipelines import label_maps_from_ids
from emserve.serving.uploads import Decoded, UploadError


def label_maps(card: ModelCard, decoded: Decoded, classes: Sequence[str] | None, field: str,
               max_maps: int) -> np.ndarray:
    """Uploaded labels -> the label-map condition [N, K, H, W] of an em-from-labels model (+1/-1/0), counted and
    shaped first: the condition takes 4 bytes per voxel and model class, many times the upload's bytes.

    Two shapes are understood. Index maps [H, W] or [N, H, W] of integers: CellMap class ids, or with
    `classes`, value i means classes[i - 1] (0: none). Per-class masks [N, C, H, W] whose C channels are named by
    `classes` (else by the file, else they must be the model's classes in order): integer or bool masks use the
    CellMap codes (1 present, 0 absent, 255 unannotated); float masks are the condition itself, in [-1, 1].
    Model classes no channel names are "not given" (0).
    """
    array = decoded.array
    names = tuple(classes) if classes else decoded.classes
    if array.ndim not in (2, 3, 4):
        raise UploadError(f"{field}: shape {array.shape}; give index maps [N, H, W] (integer class ids) or per-class "
                          f"masks [N, C, H, W]")
    maps = 1 if array.ndim == 2 else len(array)
    if maps > max_maps:
        raise UploadError(f"{field}: {maps} label maps; at most {max_maps} per request (EMSERVE_MAX_SAMPLES), one "
                          f"sample each")
    _check_patch(card, array.shape[-2:], field)
    if array.ndim in (2, 3) and (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        ids = array[None] if array.ndim == 2 else array
        return label_maps_from_ids(card, _cellmap_ids(ids, names, field) if names else ids)
    if array.ndim != 4:
        raise UploadError(f"{field}: index maps of dtype {array.dtype}; index maps hold integer class ids, masks are "
                          f"[N, C, H, W]")
    names = names or _model_channels(card, array.shape[1], field)
    if len(names) != array.shape[1]:
        raise UploadError(f"classes: {len(names)} names {list(names)} for {array.shape[1]} mask channels")
    values = _condition_values(array, field)
    out = np.zeros((array.shape[0], len(card.classes), *array.shape[2:]), np.float32)
    for channel, name in enumerate(names):
        out[:, _model_index(card, name)] = values[:, channel]
    return out


def _cellmap_ids(values: np.ndarray, names: Sequence[str], field: str) -> np.ndarray:
    """Index-map values 1..len(names) -> the CellMap ids of those (atomic) classes; 0 stays 0."""
    for name in names:
        if get_class(name).is_group:
            raise UploadError(f"classes: {name!r} is a group class; index maps take atomic classes "
                              f"({', '.join(get_class(name).members)})")
    if values.min() < 0 or values.max() > len(names):
        raise UploadError(f"{field}: index-map values in [{values.min()}, {values.max()}]; with classes "
                          f"{list(names)} they must be in [0, {len(names)}] (0 = none)")
    lookup = np.array([0, *(get_class(name).id for name in names)], np.int64)
    return lookup[values.astype(np.int64)]


def _check_patch(card: ModelCard, size: Sequence[int], field: str) -> None:
    if tuple(size) != (card.patch_size, card.patch_size):
        raise UploadError(f"{field}: label maps of {size[0]}x{size[1]}; this model takes {card.patch_size}x"
                          f"{card.patch_size} (its patch size)")


def _model_channels(card: ModelCard, channels: int, field: str) -> tuple[str, ...]:
    if channels != len(card.classes):
        raise UploadError(f"{field}: {channels} mask channels and no class names; name them with 'classes', or give "
                          f"all {len(card.classes)} of the model's classes in order ({', '.join(card.classes)})")
    return tuple(card.classes)


def _model_index(card: ModelCard, name: str) -> int:
    get_class(name)  # an unknown name gets the error listing every known class
    if name not in card.classes:
        raise UploadError(f"classes: {name!r} is not one of the model's classes; allowed: {', '.join(card.classes)}")
    return card.classes.index(name)


def _condition_values(masks: np.ndarray, field: str) -> np.ndarray:
    """Masks -> condition values: CellMap codes (integer or bool) to +1/-1/0; float checked to lie in [-1, 1]."""
    if masks.dtype == bool or np.issubdtype(masks.dtype, np.integer):
        bad = ~np.isin(masks, (ABSENT, PRESENT, UNKNOWN))
        if bad.any():
            raise UploadError(f"{field}: integer masks hold {sorted(np.unique(masks[bad]).tolist())[:5]}; allowed: "
                              f"1 present, 0 absent, 255 unannotated")
        return label_channels(masks)
    if not np.issubdtype(masks.dtype, np.floating):
        raise UploadError(f"{field}: dtype {masks.dtype}; masks are integer / bool (0/1/255) or float in [-1, 1]")
    if not np.isfinite(masks).all():
        raise UploadError(f"{field}: float masks contain NaN or infinite values")
    if masks.min() < -1 or masks.max() > 1:
        raise UploadError(f"{field}: float masks in [{masks.min():.3g}, {masks.max():.3g}]; they must be in [-1, 1] "
                          f"(+1 present, -1 absent, 0 not given)")
    return masks.astype(np.float32)



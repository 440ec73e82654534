"""Pictures for people: raw EM beside coloured labels, as PNG grids (samples, montages, previews)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from emserve.classes import colorize


def raw_to_uint8(raw: np.ndarray) -> np.ndarray:
    """Raw in [-1, 1] -> uint8 0..255 (the fibsem-uint8 convention; stores read it back with window 0..255)."""
    return np.clip(np.round((raw + 1) * 127.5), 0, 255).astype(np.uint8)


def raw_to_rgb(raw: np.ndarray) -> np.ndarray:
    """[H,W] raw in [-1, 1] -> grey RGB uint8."""
    return np.repeat(raw_to_uint8(raw)[..., None], 3, axis=-1)


def pair_tile(raw: np.ndarray | None, masks: np.ndarray | None, classes: Sequence[str]) -> np.ndarray:
    """One sample as RGB: raw, coloured labels, or both side by side ([H,W] raw in [-1,1], [K,H,W] masks)."""
    parts = []
    if raw is not None:
        parts.append(raw_to_rgb(raw))
    if masks is not None:
        parts.append(colorize(masks, classes))
    return np.concatenate(parts, axis=1)


def grid(tiles: Sequence[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """Tiles of equal shape [H,W,3] in rows of `columns`, separated by white lines."""
    h, w, _ = tiles[0].shape
    rows = -(-len(tiles) // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return out


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write atomically (temporary name, then rename) so a viewer never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rgb).save(tmp, format="PNG")
    tmp.replace(path)
    return path

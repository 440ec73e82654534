"""The montage picture of a dataset: EM slices with the crop outlined, its labels and an overlay, and a legend."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emserve.classes import BY_NAME, colorize, masks_from_ids
from emserve.data.ngff import format_nm
from emserve.pictures import save_png

from .labels import PHANTOM_CLASSES
from .volume import PhantomVolume


def montage_image(volume: PhantomVolume, offset: Sequence[int], crop_shape: Sequence[int],
                  crop_ids: np.ndarray, n_slices: int = 3) -> np.ndarray:
    """RGB picture: per z-slice, the whole EM slice (crop outlined), the crop's raw, its labels and an overlay."""
    z0, y0, x0 = (int(o) for o in offset)
    cz, ch, cw = (int(c) for c in crop_shape)
    h, w = volume.raw.shape[1:]
    f = max(1, min(h // ch, w // cw))
    rows = []
    for zc in np.linspace(0, cz - 1, n_slices + 2)[1:-1].round().astype(int):
        em = np.repeat(volume.raw[z0 + zc][..., None], 3, axis=-1)
        em[[y0, y0 + ch - 1], x0:x0 + cw] = (255, 220, 0)
        em[y0:y0 + ch, [x0, x0 + cw - 1]] = (255, 220, 0)
        raw = np.repeat(volume.raw[z0 + zc, y0:y0 + ch, x0:x0 + cw][..., None], 3, axis=-1)
        lab = colorize(masks_from_ids(crop_ids[zc], PHANTOM_CLASSES), PHANTOM_CLASSES)
        labelled = (crop_ids[zc] != 0)[..., None]
        over = np.where(labelled, (0.55 * raw + 0.45 * lab).astype(np.uint8), raw)
        panels = [em] + [np.kron(p, np.ones((f, f, 1), np.uint8)) for p in (raw, lab, over)]
        height = max(p.shape[0] for p in panels)
        panels = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=255) for p in panels]
        rows.append(np.pad(np.concatenate(panels, axis=1), ((0, 4), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(rows, axis=0)


def write_montage(path: str | os.PathLike, volume: PhantomVolume, offset: Sequence[int],
                  crop_shape: Sequence[int], crop_ids: np.ndarray) -> Path:
    """Save `montage_image` with a class legend as PNG (written to a temp name, then renamed)."""
    from PIL import Image, ImageDraw

    grid = montage_image(volume, offset, crop_shape, crop_ids)
    per_row, cell_w, cell_h = 6, 120, 16
    legend_rows = math.ceil(len(PHANTOM_CLASSES) / per_row)
    width = max(grid.shape[1], per_row * cell_w)
    canvas = Image.new("RGB", (width, grid.shape[0] + legend_rows * cell_h + 22), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(canvas)
    top = grid.shape[0] + 2
    vs = format_nm(volume.voxel_size)
    draw.text((2, top), f"{volume.name} ({vs} nm): {volume.preset.description}", fill=(0, 0, 0))
    for i, name in enumerate(PHANTOM_CLASSES):
        x, y = (i % per_row) * cell_w + 2, top + 18 + (i // per_row) * cell_h
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=BY_NAME[name].color, outline=(0, 0, 0))
        draw.text((x + 14, y), name, fill=(0, 0, 0))
    return save_png(np.asarray(canvas), path)

"""One phantom dataset in memory: the generation steps in order, each with its own random stream."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cells import cells, nucleus
from .geometry import Block, dilate26
from .labels import ID, PHANTOM_CLASSES
from .organelles import er, lipid_droplets, microtubules, mitochondria, vesicles
from .presets import DatasetPreset, preset_for
from .render import render_em

DEFAULT_SHAPE = (64, 256, 256)


@dataclass
class PhantomVolume:
    """One generated dataset in memory: uint8 EM, atomic class ids (same shape) and what made them."""

    name: str
    preset: DatasetPreset
    raw: np.ndarray
    ids: np.ndarray
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    stats: dict[str, Any]

    def fractions(self) -> dict[str, float]:
        """Voxel fraction of each phantom class (and of the unlabelled cytosol, `background`) in the volume."""
        counts = np.bincount(self.ids.ravel(), minlength=256) / self.ids.size
        return {"background": float(counts[0]), **{n: float(counts[ID[n]]) for n in PHANTOM_CLASSES}}


def make_phantom(index: int = 0, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                 preset: DatasetPreset | None = None) -> PhantomVolume:
    """Generate dataset `index` of `seed` in memory: EM (uint8 z-y-x) and atomic class ids of the whole volume."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape: expected three sizes (z, y, x) of at least 8 voxels, got {shape}")
    preset = preset or preset_for(index, seed)
    content, imaging = preset.content, preset.imaging
    start = time.perf_counter()
    stage = lambda k: np.random.default_rng([seed, index, k])  # noqa: E731  one stream per stage
    block = Block(shape, imaging.voxel_size, stage(1))
    ext = block.extent
    nucleus_radius = min(600.0 * content.size, 0.33 * min(ext[1], ext[2])) * stage(0).uniform(0.85, 1.1)
    layout = cells(block, content, nucleus_radius)
    block.rng = stage(2)
    nucleus(block, content, layout["nucleus_center"], nucleus_radius, layout["boundary_distance"])
    del layout
    for k, step in enumerate((lipid_droplets, mitochondria, microtubules, er, vesicles), start=3):
        block.rng = stage(k)
        step(block, content)
    block.count("enclosure_repaired_voxels", _enclose(block))
    raw = render_em(block.ids, block.vs, imaging, stage(20))
    translation = tuple(float(v * o) for v, o in zip(block.vs, (index * 40, 1000 + index * 300, 2000), strict=True))
    stats = {"objects": dict(block.log), "seconds": round(time.perf_counter() - start, 2)}
    volume = PhantomVolume(preset.name, preset, raw, block.ids, tuple(float(v) for v in block.vs), translation,
                           stats)
    stats["fractions"] = {k: round(v, 5) for k, v in volume.fractions().items()}
    return volume


def _enclose(block: Block) -> int:
    """Turn any inner voxel that touches (26-neighbourhood) something outside its compartment into membrane."""
    rules = (
        (("mito_lum", "mito_ribo"), ("mito_mem",), "mito_mem"),
        (("er_lum",), ("er_mem",), "er_mem"),
        (("ves_lum",), ("ves_mem",), "ves_mem"),
        (("ld_lum",), ("ld_mem",), "ld_mem"),
        (("ne_lum",), ("ne_mem",), "ne_mem"),
        (("nucpl", "hchrom", "nucleo"), ("ne_mem",), "ne_mem"),
        (("mt_in",), ("mt_out",), "mt_out"),
    )
    fixed = 0
    for inner, walls, wall in rules:
        lut_inner = np.zeros(256, bool)
        lut_inner[[ID[n] for n in inner]] = True
        lut_ok = lut_inner.copy()
        lut_ok[[ID[n] for n in walls]] = True
        inside = lut_inner[block.ids]
        if not inside.any():
            continue
        bad = inside & dilate26(~lut_ok[block.ids])
        block.ids[bad] = ID[wall]
        fixed += int(bad.sum())
    return fixed

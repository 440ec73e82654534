"""Phantom vEM: procedural FIB-SEM-like volumes with exact organelle labels (the embedded default dataset).

Each phantom dataset is a block of a few cells seen by FIB-SEM: cells separated by plasma membrane, some pairs
with extracellular space between them; one nucleus (double envelope with its lumen, heterochromatin along the
envelope, a nucleolus); mitochondria (capsules at random orientations, double membrane, lamellar cristae, rare
matrix granules); ER tubules and stacked sheets; many small vesicles, a few lipid droplets and microtubules.
Sizes are loosely biological but compressed (a "cell" is 1-2 um across) so a few hundred voxels show several.

Labels are atomic CellMap classes, one id per voxel, so the `all` array is exact. Every shape is built from a
depth map (nm inside its surface, 1-Lipschitz), and a membrane is the band 0 < depth <= T with T at least one
voxel diagonal, so no lumen voxel can touch the outside, even diagonally; a final pass checks that and closes
any gap the wavy cell boundaries leave. The raw EM is rendered from the labels: class intensities (membranes
dark on a lighter cytosol), granular texture and ribosome dots, a Gaussian PSF, gamma, slice-to-slice
brightness jitter, shading, shot noise (Poisson, in its Gaussian form) plus read noise and (in one preset) FIB
curtaining stripes.

Datasets differ the way real acquisitions do: voxel size (8 nm isotropic, 4 nm isotropic, 12 x 6 x 6 nm),
contrast, brightness, gamma, noise, blur and organelle size / density. Crops annotate sub-boxes of a larger EM
volume (the rest is raw-only), chosen to cover rare classes; one crop leaves a class unannotated on purpose.
Everything is a function of (seed, dataset index, shapes): the same seed writes byte-identical arrays.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from emserve.classes import BY_NAME, UNKNOWN, colorize, masks_from_ids
from emserve.data.ngff import format_nm
from emserve.pictures import save_png

# The classes the phantom annotates, in CellMap id order; the default class list of models trained on it.
PHANTOM_CLASSES: tuple[str, ...] = (
    "ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "ves_mem", "ves_lum", "ld_mem", "ld_lum",
    "er_mem", "er_lum", "ne_mem", "ne_lum", "hchrom", "nucpl", "nucleo", "mt_out", "mt_in",
)
RARE_CLASSES: tuple[str, ...] = ("mito_ribo", "ld_mem", "ld_lum", "mt_out", "mt_in")
# The class one crop leaves unannotated (no array at all), so readers must tell "unannotated" from "absent";
# the first of these present in that crop is dropped.
UNANNOTATED_CANDIDATES: tuple[str, ...] = ("er_mem", "ves_mem", "mito_mem", "pm")

DEFAULT_SHAPE = (64, 256, 256)
DEFAULT_CROP_SHAPE = (32, 128, 128)

_ID = {name: BY_NAME[name].id for name in PHANTOM_CLASSES}
_FREE, _BOUNDARY, _NUCLEUS = 0, 1, 2  # owner codes; organelles get 3, 4, ...


@dataclass(frozen=True)
class Imaging:
    """How a dataset was imaged: voxel size and the detector / PSF model that turns labels into uint8 EM."""

    voxel_size: tuple[float, float, float]  # nm, z y x
    psf_sigma_nm: tuple[float, float, float]  # Gaussian PSF, nm, z y x
    offset: float  # grey level of a black object
    gain: float  # grey levels from black to white (before noise)
    gamma: float  # intensity**gamma before the gain
    photons: float  # detected electrons per grey level: Poisson noise std = sqrt(level / photons)
    read_noise: float  # Gaussian noise std, grey levels
    slice_jitter: float  # relative brightness std from one z slice to the next (FIB-SEM drift)
    shading: float  # relative amplitude of a smooth lateral brightness gradient
    curtaining: float  # relative amplitude of vertical stripes (FIB curtaining), constant along y


@dataclass(frozen=True)
class Content:
    """What the block of tissue holds: organelle size and density (per cubic micrometre of cytosol)."""

    size: float  # organelle size factor (1 = HeLa-like, compressed)
    cell_spacing_nm: float
    ecs_pairs: float  # chance that two neighbouring cells have extracellular space between them
    open_ecs: bool  # one Voronoi region is all extracellular space (cells in culture, resin around them)
    mito_per_um3: float
    er_tubes_per_um3: float
    er_sheets_per_um3: float
    vesicles_per_um3: float
    ld_per_um3: float
    mt_per_um3: float
    granules_per_mito: float


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    description: str
    imaging: Imaging
    content: Content


PRESETS: tuple[DatasetPreset, ...] = (
    DatasetPreset(
        "phantom_a", "8 nm isotropic, HeLa-like cells, moderate noise and contrast",
        Imaging(voxel_size=(8.0, 8.0, 8.0), psf_sigma_nm=(6.0, 5.0, 5.0), offset=30.0, gain=190.0, gamma=1.0,
                photons=1.5, read_noise=4.0, slice_jitter=0.01, shading=0.04, curtaining=0.0),
        Content(size=1.0, cell_spacing_nm=1500.0, ecs_pairs=0.35, open_ecs=False, mito_per_um3=8.0,
                er_tubes_per_um3=20.0, er_sheets_per_um3=4.0, vesicles_per_um3=150.0, ld_per_um3=0.3,
                mt_per_um3=0.8, granules_per_mito=0.8),
    ),
    DatasetPreset(
        "phantom_b", "4 nm isotropic, small dense cells, bright, low noise, soft focus",
        Imaging(voxel_size=(4.0, 4.0, 4.0), psf_sigma_nm=(6.0, 5.0, 5.0), offset=55.0, gain=185.0, gamma=0.8,
                photons=5.0, read_noise=2.0, slice_jitter=0.006, shading=0.02, curtaining=0.0),
        Content(size=0.6, cell_spacing_nm=900.0, ecs_pairs=0.6, open_ecs=False, mito_per_um3=50.0,
                er_tubes_per_um3=150.0, er_sheets_per_um3=25.0, vesicles_per_um3=1000.0, ld_per_um3=1.0,
                mt_per_um3=4.0, granules_per_mito=0.6),
    ),
    DatasetPreset(
        "phantom_c", "12 x 6 x 6 nm anisotropic, cultured cells in resin, dark, high contrast, noisy, curtaining",
        Imaging(voxel_size=(12.0, 6.0, 6.0), psf_sigma_nm=(10.0, 5.0, 5.0), offset=10.0, gain=200.0, gamma=1.4,
                photons=0.6, read_noise=6.0, slice_jitter=0.02, shading=0.08, curtaining=0.08),
        Content(size=0.8, cell_spacing_nm=1300.0, ecs_pairs=0.2, open_ecs=True, mito_per_um3=7.0,
                er_tubes_per_um3=15.0, er_sheets_per_um3=3.0, vesicles_per_um3=100.0, ld_per_um3=0.8,
                mt_per_um3=1.0, granules_per_mito=1.0),
    ),
)

# Grey value of each class before texture, PSF and noise (0 black, 1 white), and texture amplitudes.
_BASE = {"cyto": 0.64, "ecs": 0.86, "pm": 0.22, "mito_mem": 0.20, "mito_lum": 0.44, "mito_ribo": 0.08,
         "ves_mem": 0.26, "ves_lum": 0.74, "ld_mem": 0.24, "ld_lum": 0.36, "er_mem": 0.24, "er_lum": 0.58,
         "ne_mem": 0.20, "ne_lum": 0.62, "hchrom": 0.26, "nucpl": 0.54, "nucleo": 0.34, "mt_out": 0.28,
         "mt_in": 0.56}
_TEXTURE = {"cyto": 0.05, "ecs": 0.015, "mito_lum": 0.05, "er_lum": 0.03, "ves_lum": 0.02, "ne_lum": 0.03,
            "hchrom": 0.05, "nucpl": 0.08, "nucleo": 0.07}
_DOTS = {"cyto": 0.30, "nucleo": 0.25, "nucpl": 0.10, "er_lum": 0.05}  # ribosome-like granules


def _lut(table: dict[str, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(256, default, np.float32)
    for name, value in table.items():
        lut[0 if name == "cyto" else _ID[name]] = value
    return lut


def preset_for(index: int, seed: int = 0) -> DatasetPreset:
    """The preset of dataset `index`: the three built-in ones, then random variations of them."""
    if index < len(PRESETS):
        return PRESETS[index]
    base = PRESETS[index % len(PRESETS)]
    rng = np.random.default_rng([seed, index, 991])
    im, co = base.imaging, base.content
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    imaging = replace(im, offset=im.offset * u(0.6, 1.4), gain=min(im.gain * u(0.8, 1.15), 250 - im.offset),
                      gamma=im.gamma * u(0.8, 1.25), photons=im.photons * u(0.5, 2.0),
                      read_noise=im.read_noise * u(0.5, 1.5), psf_sigma_nm=tuple(s * u(0.7, 1.4) for s in
                                                                                  im.psf_sigma_nm))
    content = replace(co, size=co.size * u(0.85, 1.2), mito_per_um3=co.mito_per_um3 * u(0.6, 1.6),
                      vesicles_per_um3=co.vesicles_per_um3 * u(0.5, 1.5), ecs_pairs=u(0.1, 0.7))
    return DatasetPreset(f"phantom_{_letters(index)}", f"random variation of {base.name}", imaging, content)


def _letters(index: int) -> str:
    out = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        out = chr(ord("a") + r) + out
    return out


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
        return {"background": float(counts[0]), **{n: float(counts[_ID[n]]) for n in PHANTOM_CLASSES}}


# --------------------------------------------------------------------------------------------------------------
# geometry: boxes, coordinates and depth maps (nm inside the surface; 1-Lipschitz)
# --------------------------------------------------------------------------------------------------------------
Box = tuple[slice, slice, slice]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _random_direction(rng: np.random.Generator, z_weight: float = 1.0) -> np.ndarray:
    v = rng.standard_normal(3)
    v[0] *= z_weight
    return _unit(v)


def _perpendicular(axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return _unit(v - axis * float(v @ axis))


class _Block:
    """The tissue block being built: label ids, object owners and cell index per voxel."""

    def __init__(self, shape: Sequence[int], voxel_size: Sequence[float], rng: np.random.Generator):
        self.shape = tuple(int(s) for s in shape)
        self.vs = np.asarray(voxel_size, dtype=np.float64)
        self.extent = self.vs * np.asarray(self.shape)
        self.rng = rng
        self.ids = np.zeros(self.shape, np.uint8)
        self.owner = np.zeros(self.shape, np.int32)
        self.cell = np.zeros(self.shape, np.int16)
        self.diag = float(np.linalg.norm(self.vs))
        self.gap = float(self.vs.max())  # cytosol kept between two organelles
        self.next_owner = 3
        self.log: dict[str, int] = {}

    # --- helpers ------------------------------------------------------------------------------------------------
    def wall(self, nm: float) -> float:
        """Membrane band thickness: at least a voxel diagonal, so a lumen can never touch the outside."""
        return max(float(nm), 1.02 * self.diag)

    def box(self, lo_nm: np.ndarray, hi_nm: np.ndarray) -> Box | None:
        lo = np.maximum(np.floor(np.asarray(lo_nm) / self.vs).astype(int), 0)
        hi = np.minimum(np.ceil(np.asarray(hi_nm) / self.vs).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable nm coordinates (z[:,1,1], y[1,:,1], x[1,1,:]) of the voxel centres in `box`."""
        z = (np.arange(box[0].start, box[0].stop, dtype=np.float32) * np.float32(self.vs[0]))[:, None, None]
        y = (np.arange(box[1].start, box[1].stop, dtype=np.float32) * np.float32(self.vs[1]))[None, :, None]
        x = (np.arange(box[2].start, box[2].stop, dtype=np.float32) * np.float32(self.vs[2]))[None, None, :]
        return z, y, x

    def random_free_point(self, cell: int | None = None, tries: int = 200) -> np.ndarray | None:
        """A random position (nm) in free cytosol, optionally of one cell."""
        for _ in range(tries):
            idx = tuple(int(self.rng.integers(0, s)) for s in self.shape)
            if self.owner[idx] == _FREE and self.cell[idx] >= 0 and (cell is None or self.cell[idx] == cell):
                return (np.asarray(idx) + self.rng.uniform(-0.5, 0.5, 3)) * self.vs
        return None

    def new_owner(self) -> int:
        self.next_owner += 1
        return self.next_owner - 1

    # --- depth maps ---------------------------------------------------------------------------------------------
    def capsule(self, a: np.ndarray, b: np.ndarray, radius: float, pad: float):
        """Box and (depth, axial nm) of a capsule (segment a-b thickened by `radius`), or None if off-volume."""
        box = self.box(np.minimum(a, b) - radius - pad, np.maximum(a, b) + radius + pad)
        if box is None:
            return None
        z, y, x = self.coords(box)
        ab = (b - a).astype(np.float32)
        length = float(np.linalg.norm(ab))
        pz, py, px = z - np.float32(a[0]), y - np.float32(a[1]), x - np.float32(a[2])
        if length < 1e-6:
            axial = np.zeros(np.broadcast_shapes(pz.shape, py.shape, px.shape), np.float32)
            t = axial
        else:
            axis = ab / length
            axial = pz * axis[0] + py * axis[1] + px * axis[2]
            t = np.clip(axial, 0, length)
        dz, dy, dx = pz - t * ab[0] / max(length, 1e-6), py - t * ab[1] / max(length, 1e-6), \
            px - t * ab[2] / max(length, 1e-6)
        depth = np.float32(radius) - np.sqrt(dz * dz + dy * dy + dx * dx)
        return box, depth, axial

    def ellipsoid(self, center: np.ndarray, radii: np.ndarray, rot: np.ndarray, pad: float):
        """Box and depth of a rotated ellipsoid: (1 - |A^-1 R^T p|) * min(radii), 1-Lipschitz, 0 on the surface."""
        r = float(np.max(radii))
        box = self.box(center - r - pad, center + r + pad)
        if box is None:
            return None
        z, y, x = self.coords(box)
        p = (z - np.float32(center[0]), y - np.float32(center[1]), x - np.float32(center[2]))
        s = 0.0
        for i in range(3):
            q = p[0] * np.float32(rot[0, i]) + p[1] * np.float32(rot[1, i]) + p[2] * np.float32(rot[2, i])
            s = s + (q / np.float32(radii[i])) ** 2
        depth = (1 - np.sqrt(s)) * np.float32(np.min(radii))
        return box, depth.astype(np.float32)

    def disc(self, center: np.ndarray, normal: np.ndarray, radius: float, half_thickness: float, pad: float):
        """Box and depth of a flat disc (an ER sheet): min(h - |axial|, R - radial)."""
        r = radius + half_thickness
        box = self.box(center - r - pad, center + r + pad)
        if box is None:
            return None
        z, y, x = self.coords(box)
        pz, py, px = z - np.float32(center[0]), y - np.float32(center[1]), x - np.float32(center[2])
        axial = pz * np.float32(normal[0]) + py * np.float32(normal[1]) + px * np.float32(normal[2])
        radial = np.sqrt(np.maximum(pz * pz + py * py + px * px - axial * axial, 0))
        depth = np.minimum(np.float32(half_thickness) - np.abs(axial), np.float32(radius) - radial)
        return box, depth

    # --- placing ------------------------------------------------------------------------------------------------
    def cell_at(self, p: np.ndarray) -> int:
        return int(self.cell[tuple(np.clip(np.floor(p / self.vs + 0.5).astype(int), 0, np.array(self.shape) - 1))])

    def free_at(self, points: np.ndarray, cell: int, owner: int = -1) -> bool:
        """Cheap pre-check: are these points (nm, [n, 3]) free cytosol of `cell` (or `owner`'s), where in view?"""
        idx = np.floor(points / self.vs + 0.5).astype(int)
        inside = ((idx >= 0) & (idx < np.array(self.shape))).all(1)
        idx = tuple(idx[inside].T)
        own = self.owner[idx]
        return bool((((own == _FREE) | (own == owner)) & (self.cell[idx] == cell)).all())

    def fits(self, box: Box, depth: np.ndarray, cell: int, owner: int = -1) -> bool:
        """Whether an object (with `gap` of cytosol around it) lies in free cytosol of one cell (or its own)."""
        near = depth > -self.gap
        if not near.any():
            return False
        own = self.owner[box]
        return bool((((own == _FREE) | (own == owner)) & (self.cell[box] == cell))[near].all())

    def paint(self, box: Box, depth: np.ndarray, owner: int, wall: float, mem: str, lum: str | None) -> np.ndarray:
        """Membrane where 0 < depth <= wall, lumen deeper; a union with earlier parts of the same owner."""
        inside = depth > 0
        ids, own = self.ids[box], self.owner[box]
        if lum is None:
            ids[inside] = _ID[mem]
        else:
            lumen = depth > wall
            already_lumen = (own == owner) & (ids == _ID[lum])
            ids[inside & ~lumen & ~already_lumen] = _ID[mem]
            ids[lumen] = _ID[lum]
        own[inside] = owner
        return inside

    def count(self, key: str, n: int = 1) -> None:
        self.log[key] = self.log.get(key, 0) + n

    def cyto_volume_um3(self) -> float:
        return float((self.owner == _FREE).sum() * np.prod(self.vs) / 1e9)


# --------------------------------------------------------------------------------------------------------------
# the tissue: cells, nucleus, organelles
# --------------------------------------------------------------------------------------------------------------
def _smooth_field(shape: Sequence[int], corr_vox: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ~corr_vox voxels (coarse noise, upsampled)."""
    corr = np.maximum(np.asarray(corr_vox, dtype=float), 1.0)
    coarse_shape = tuple(math.ceil(s / c) + 2 for s, c in zip(shape, corr, strict=True))
    field = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, corr, strict=True)):  # separable linear interpolation
        pos = np.arange(n, dtype=np.float32) / np.float32(c)
        i0 = pos.astype(np.int64)
        w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        field = np.take(field, i0, axis=axis) * (1 - w) + np.take(field, i0 + 1, axis=axis) * w
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _shifted(a: np.ndarray, axis: int, op) -> np.ndarray:
    """op-combine `a` with its two neighbours along `axis` (edges see only the neighbour that exists)."""
    out = a.copy()
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    op(out[tuple(hi)], a[tuple(lo)], out=out[tuple(hi)])
    op(out[tuple(lo)], a[tuple(hi)], out=out[tuple(lo)])
    return out


def _filter26(a: np.ndarray, op) -> np.ndarray:
    """Max / min (or OR) over each voxel's 3x3x3 neighbourhood, separably and without scipy's per-voxel loop."""
    for axis in range(a.ndim):
        a = _shifted(a, axis, op)
    return a


def _dilate26(mask: np.ndarray) -> np.ndarray:
    return _filter26(mask, np.logical_or)


def _cells(block: _Block, content: Content, nucleus_radius: float) -> dict[str, Any]:
    """Voronoi cells on wavy coordinates; pm bands between cells, ecs gaps between some pairs."""
    rng, ext = block.rng, block.extent
    spacing = content.cell_spacing_nm
    # the nucleated cell: its seed near one side, so the nucleus is partly in view
    theta = rng.uniform(0, 2 * np.pi)
    reach = 0.5 * min(ext[1], ext[2]) * rng.uniform(0.65, 0.95)
    nuc_center = np.array([rng.uniform(0.3, 0.7) * ext[0], ext[1] / 2 + reach * np.sin(theta),
                           ext[2] / 2 + reach * np.cos(theta)])
    seeds = [nuc_center]
    lo, hi = -0.3 * ext, 1.3 * ext
    lo[0], hi[0] = -1.0 * ext[0], 2.0 * ext[0]
    n_target = max(2, round(ext[1] * ext[2] * 1.69 / spacing**2))
    for _ in range(400):
        if len(seeds) > n_target:
            break
        s = rng.uniform(lo, hi)
        if np.linalg.norm(s - nuc_center) < 2.4 * nucleus_radius:
            continue
        if min(np.linalg.norm(s - t) for t in seeds[1:] or [s + 1e9]) < 0.7 * spacing:
            continue
        seeds.append(s)
    seeds = np.asarray(seeds)
    k = len(seeds)
    is_ecs = np.zeros(k, bool)
    if content.open_ecs and k > 2:
        # the seed farthest from the nucleus becomes open extracellular space
        is_ecs[int(np.argmax(np.linalg.norm(seeds - nuc_center, axis=1)))] = True
    gap = np.zeros((k, k), np.float32)
    for i in range(k):
        for j in range(i + 1, k):
            if rng.random() < content.ecs_pairs:
                gap[i, j] = gap[j, i] = rng.uniform(12.0, 45.0) * max(content.size, 0.5)
    # squared distances to the seeds, separably (one full-volume pass per seed)
    z, y, x = (np.arange(n, dtype=np.float32) * np.float32(v) for n, v in zip(block.shape, block.vs, strict=True))

    def d2(s: np.ndarray) -> np.ndarray:
        return (np.square(z - np.float32(s[0]))[:, None, None] + np.square(y - np.float32(s[1]))[None, :, None]
                + np.square(x - np.float32(s[2]))[None, None, :])

    best = d2(seeds[0])
    near = np.zeros(block.shape, np.int16)
    for i in range(1, k):
        d = d2(seeds[i])
        near[d < best] = i
        np.minimum(best, d, out=best)
    # distance to the bisector plane with each other seed: (d_j^2 - d_i^2) / (2 |s_i - s_j|)
    sep = np.linalg.norm(seeds[:, None] - seeds[None], axis=-1)
    inv = np.where(sep > 0, 1 / (2 * np.maximum(sep, 1e-9)), 0).astype(np.float32)
    bis = np.full(block.shape, np.inf, np.float32)
    nb = np.zeros(block.shape, np.int16)
    for j in range(k):
        d = d2(seeds[j])
        d -= best
        d *= np.take(inv[:, j], near)
        d[near == j] = np.inf
        nb[d < bis] = j
        np.minimum(bis, d, out=bis)
    del best, d
    # wavy boundaries: shift each boundary by a smooth field (antisymmetric in the pair, small slope); voxels
    # pushed across change cell
    amp = 45.0 * max(content.size, 0.5)
    wave = _smooth_field(block.shape, 500.0 * max(content.size, 0.5) / block.vs, rng) * np.float32(amp)
    bis += np.where(near < nb, wave, -wave)
    del wave
    flip = bis < 0
    near, nb = np.where(flip, nb, near), np.where(flip, near, nb)
    np.abs(bis, out=bis)
    t_side = block.wall(9.0)  # one membrane facing extracellular space
    half = 0.55 * block.diag  # each side of two touching membranes
    g = gap[near, nb]
    ecs_near, ecs_nb = is_ecs[near], is_ecs[nb]
    ecs = ecs_near | (bis < g)
    pm = ~ecs & ((ecs_nb & (bis < t_side)) | ((g > 0) & (bis < g + t_side)) | ((g == 0) & ~ecs_nb & (bis < half)))
    block.ids[ecs] = _ID["ecs"]
    block.ids[pm] = _ID["pm"]
    block.owner[ecs | pm] = _BOUNDARY
    block.cell[...] = near
    block.cell[ecs] = -1
    # close any cytosol-to-cytosol or ecs-to-cytosol contact the wavy boundaries left
    cyto = block.ids == 0
    mx = _filter26(np.where(cyto, block.cell, -2).astype(np.int16), np.maximum)
    mn = _filter26(np.where(cyto, block.cell, 999).astype(np.int16), np.minimum)
    leak = cyto & ((mx != block.cell) | (mn != block.cell))
    leak |= cyto & _dilate26(block.ids == _ID["ecs"])
    block.ids[leak] = _ID["pm"]
    block.owner[leak] = _BOUNDARY
    block.count("pm_repaired_voxels", int(leak.sum()))
    block.count("cells", int((~is_ecs).sum()))
    return {"nucleus_center": nuc_center, "boundary_distance": bis}


def _nucleus(block: _Block, content: Content, center: np.ndarray, radius: float, bis: np.ndarray) -> None:
    rng = block.rng
    radii = radius * np.array([rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)])
    rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    t_mem = max(block.wall(9.0), 1.25 * block.diag)  # the wavy envelope has slopes a bit above 1
    t_lum = max(20.0 * content.size, 0.8 * float(block.vs.max()))
    margin = 120.0 * content.size + block.gap
    got = block.ellipsoid(center, radii, rot, pad=block.gap)
    if got is None:
        return
    box, depth = got
    # a gently wavy envelope: add a smooth field with small slope
    corr = 350.0 * content.size / block.vs
    depth = depth + np.float32(0.04 * radius) * _smooth_field(depth.shape, corr, rng)
    depth = np.where(block.cell[box] == 0, np.minimum(depth, bis[box] - np.float32(margin)), -np.inf)
    depth = depth.astype(np.float32)
    inside = depth > 0
    if not inside.any():
        return
    ids = block.ids[box]
    inner = depth > 2 * t_mem + t_lum
    ids[inside] = _ID["ne_mem"]
    ids[(depth > t_mem) & (depth <= t_mem + t_lum)] = _ID["ne_lum"]
    ids[inner] = _ID["nucpl"]
    block.owner[box][inside] = _NUCLEUS
    # heterochromatin: a patchy layer along the inner envelope, a rim around the nucleolus and a few clumps
    patch = _smooth_field(depth.shape, 250.0 * content.size / block.vs, rng)
    h_layer = np.float32(45.0 * content.size) * np.clip(patch + 0.6, 0, 2.0)
    hchrom = inner & (depth - np.float32(2 * t_mem + t_lum) < h_layer)
    # nucleolus: an ellipsoid deep inside
    deep = np.argwhere(depth > 0.55 * float(np.max(depth)))
    if len(deep):
        spot = (deep[rng.integers(len(deep))] + np.array([b.start for b in box])) * block.vs
        n_r = min(radius * rng.uniform(0.22, 0.32), 0.45 * float(np.max(depth)))
        n_radii = n_r * rng.uniform(0.8, 1.2, 3)
        got = block.ellipsoid(spot, n_radii, np.linalg.qr(rng.standard_normal((3, 3)))[0], pad=50.0 * content.size)
        if got is not None:
            nbox, ndepth = got
            # the part of the nucleolus box inside the nucleus box, in both boxes' local coordinates
            lo = [max(nb.start, b.start) for nb, b in zip(nbox, box, strict=True)]
            hi = [min(nb.stop, b.stop) for nb, b in zip(nbox, box, strict=True)]
            local = tuple(slice(a - b.start, c - b.start) for a, c, b in zip(lo, hi, box, strict=True))
            ndepth = ndepth[tuple(slice(a - nb.start, c - nb.start) for a, c, nb in zip(lo, hi, nbox, strict=True))]
            nucleo = np.zeros_like(inner)
            nucleo[local] = (ndepth > 0) & inner[local]
            rim = np.zeros_like(inner)
            rim[local] = (ndepth > -40.0 * content.size) & (ndepth <= 0) & (patch[local] > -0.3)
            hchrom |= rim & inner
            ids[nucleo] = _ID["nucleo"]
            hchrom &= ~nucleo
    ids[hchrom] = _ID["hchrom"]
    block.count("nuclei")


def _mitochondria(block: _Block, content: Content) -> None:
    rng, s = block.rng, content.size
    n = max(1, int(rng.poisson(content.mito_per_um3 * block.cyto_volume_um3())))
    wall = block.wall(20.0)
    crista_w = max(16.0 * s, float(block.vs.max()))
    placed = 0
    schedule = [1.0] * (n * 25) + [0.7] * 40 + [0.5] * 40  # smaller ones when a small block leaves no room
    for scale in schedule:
        if placed >= n or (scale < 1 and placed):
            break
        center = block.random_free_point()
        if center is None:
            break
        radius = max(rng.uniform(95.0, 170.0) * s * scale, wall + 2 * float(block.vs.max()))
        half = rng.uniform(0.0, 650.0) * s * scale
        axis = _random_direction(rng)
        a, b = center - axis * half, center + axis * half
        cell = block.cell_at(center)
        if cell < 0 or not block.free_at(_probe(a, b, radius + block.gap, rng), cell):
            continue
        got = block.capsule(a, b, radius, pad=block.gap)
        if got is None:
            continue
        box, depth, axial = got
        if not block.fits(box, depth, cell):
            continue
        owner = block.new_owner()
        block.paint(box, depth, owner, wall, "mito_mem", "mito_lum")
        lumen = depth > wall
        # lamellar cristae: plates across the axis, each reaching in from one side
        z, y, x = block.coords(box)
        rel = (z - np.float32(a[0]), y - np.float32(a[1]), x - np.float32(a[2]))
        cristae = np.zeros(depth.shape, bool)
        spacing = max(rng.uniform(55.0, 95.0) * s, 2.5 * crista_w)
        for u in np.arange(-radius + spacing / 2, 2 * half + radius, spacing):
            u = u + rng.uniform(-0.2, 0.2) * spacing
            perp = _perpendicular(axis, rng)
            reach = rng.uniform(-0.1, 0.9) * radius
            v = rel[0] * np.float32(perp[0]) + rel[1] * np.float32(perp[1]) + rel[2] * np.float32(perp[2])
            cristae |= (np.abs(axial - np.float32(u)) < crista_w / 2) & (v < np.float32(reach)) & lumen
        block.ids[box][cristae] = _ID["mito_mem"]
        # matrix granules: rare dark spheres in the lumen
        n_gran = int(rng.poisson(content.granules_per_mito)) + (block.log.get("mito_granules", 0) == 0)
        r_gran = max(15.0 * s, 0.75 * float(block.vs.max()))
        candidates = np.argwhere(lumen & ~cristae & (depth > wall + r_gran))
        for _ in range(n_gran if len(candidates) else 0):
            p = (candidates[rng.integers(len(candidates))] + np.array([b_.start for b_ in box])) * block.vs
            gbox = block.box(p - r_gran, p + r_gran)
            gz, gy, gx = block.coords(gbox)
            sphere = (gz - np.float32(p[0])) ** 2 + (gy - np.float32(p[1])) ** 2 + (gx - np.float32(p[2])) ** 2 \
                <= np.float32(r_gran) ** 2
            ids = block.ids[gbox]
            ids[sphere & (ids == _ID["mito_lum"]) & (block.owner[gbox] == owner)] = _ID["mito_ribo"]
            block.count("mito_granules")
        placed += 1
    block.count("mitochondria", placed)


def _compact(block: _Block, n: int, radius: Callable[[], float], wall: float, mem: str, lum: str, key: str,
             centers: Callable[[], np.ndarray | None] | None = None, tries: int = 20) -> int:
    """Place `n` spheres (vesicles, lipid droplets) in free cytosol by rejection."""
    placed = 0
    for _ in range(n * tries):
        if placed >= n:
            break
        center = centers() if centers is not None else block.random_free_point()
        if center is None:
            continue
        r = radius()
        cell = block.cell_at(center)
        if cell < 0 or not block.free_at(_probe(center, center, r + block.gap, block.rng), cell):
            continue
        got = block.ellipsoid(center, np.array([r, r, r]), np.eye(3), pad=block.gap)
        if got is None:
            continue
        box, depth = got
        if not (depth > wall).any() or not block.fits(box, depth, cell):
            continue
        block.paint(box, depth, block.new_owner(), wall, mem, lum)
        placed += 1
    block.count(key, placed)
    return placed


def _probe(a: np.ndarray, b: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Points (nm) on the segment a-b and around it at `radius`, for a cheap fits-or-not pre-check."""
    axis = b - a
    length = float(np.linalg.norm(axis))
    n = max(2, int(length / max(radius, 1.0)) + 2)
    line = a + axis * np.linspace(0, 1, n)[:, None]
    if length > 0:
        t = axis / length
        u = _perpendicular(t, rng)
        dirs = [u, -u, np.cross(t, u), -np.cross(t, u)]
        ends = [a - t * radius, b + t * radius]
    else:
        dirs = list(np.concatenate([np.eye(3), -np.eye(3)]))
        ends = []
    return np.concatenate([line, *(line + radius * d for d in dirs), np.reshape(ends, (-1, 3))])


def _walk(block: _Block, start: np.ndarray, direction: np.ndarray, steps: int, step: Callable[[], float],
          turn: float, radius: float, wall: float, mem: str, lum: str, owner: int, cell: int) -> int:
    """Grow a tube (ER tubule, microtubule) step by step from `start`, steering around what is in the way.

    Each step is a capsule painted as part of one object (lumen joins across steps); a step that finds no free
    way after a few turns ends the tube. Returns the number of steps painted."""
    rng, painted, p = block.rng, 0, start
    for _ in range(steps):
        for attempt in range(6):  # turn harder on each retry, to get around an obstacle
            d = _unit(direction + (turn * (1 + attempt) + 0.15 * attempt) * rng.standard_normal(3))
            q = p + d * step()
            if not block.free_at(_probe(p, q, radius + block.gap, rng)[1:], cell, owner):
                continue
            got = block.capsule(p, q, radius, pad=block.gap)
            if got is None:
                return painted
            box, depth, _ = got
            if block.fits(box, depth, cell, owner):
                block.paint(box, depth, owner, wall, mem, lum)
                p, direction, painted = q, d, painted + 1
                break
        else:
            return painted
    return painted


def _er(block: _Block, content: Content) -> None:
    rng, s = block.rng, content.size
    vol = block.cyto_volume_um3()
    wall = block.wall(8.0)
    # sheets: stacks of 1-3 parallel discs (rough ER)
    n_sheets = int(rng.poisson(content.er_sheets_per_um3 * vol))
    placed = 0
    for _ in range(n_sheets * 6):
        if placed >= n_sheets:
            break
        center = block.random_free_point()
        if center is None:
            break
        cell = block.cell_at(center)
        normal = _random_direction(rng)
        radius = rng.uniform(180.0, 420.0) * s
        lum_half = max(rng.uniform(10.0, 22.0) * s, 0.6 * float(block.vs.max()))
        h = wall + lum_half
        owner = block.new_owner()
        step = rng.uniform(80.0, 140.0) * s
        discs = 0
        for k in range(int(rng.integers(1, 4))):
            c = center + normal * step * k + _perpendicular(normal, rng) * rng.uniform(0, 60) * s
            for shrink in (1.0, 0.7, 0.5):
                got = block.disc(c, normal, radius * shrink * rng.uniform(0.8, 1.1), h, pad=block.gap)
                if got is not None and block.fits(got[0], got[1], cell, owner) and (got[1] > wall).any():
                    block.paint(got[0], got[1], owner, wall, "er_mem", "er_lum")
                    discs += 1
                    break
        placed += discs > 0
    block.count("er_sheets", placed)
    # tubules: random walks
    n_tubes = int(rng.poisson(content.er_tubes_per_um3 * vol))
    placed = 0
    for _ in range(n_tubes * 4):
        if placed >= n_tubes:
            break
        p = block.random_free_point()
        if p is None:
            break
        radius = max(rng.uniform(22.0, 38.0) * max(s, 0.7), wall + 0.75 * float(block.vs.max()))
        placed += _walk(block, p, _random_direction(rng), int(rng.integers(3, 9)),
                        lambda: rng.uniform(120.0, 280.0) * s, 0.7, radius, wall, "er_mem", "er_lum",
                        block.new_owner(), block.cell_at(p)) > 0
    block.count("er_tubes", placed)


def _microtubules(block: _Block, content: Content) -> None:
    rng = block.rng
    n = max(1, int(rng.poisson(content.mt_per_um3 * block.cyto_volume_um3())))
    wall = block.wall(5.0)
    radius = max(12.5, wall + 0.75 * float(block.vs.max()))
    placed, length = 0, 0
    for _ in range(n * 15):
        if placed >= n:
            break
        p = block.random_free_point()
        if p is None:
            break
        direction = _random_direction(rng, z_weight=0.25)
        steps = int(rng.uniform(1000.0, 3000.0) / 2 / 200.0)
        owner, cell = block.new_owner(), block.cell_at(p)
        grown = sum(_walk(block, p, sign * direction, steps, lambda: 200.0, 0.06, radius, wall, "mt_out", "mt_in",
                          owner, cell) for sign in (1, -1))
        placed += grown >= 2
        length += grown * 200
    block.count("microtubules", placed)
    block.count("microtubule_nm", length)


def _vesicles(block: _Block, content: Content) -> None:
    rng, s = block.rng, content.size
    n = int(rng.poisson(content.vesicles_per_um3 * block.cyto_volume_um3()))
    wall = block.wall(7.0)
    clusters = [c for c in (block.random_free_point() for _ in range(max(1, n // 25))) if c is not None]

    def center() -> np.ndarray | None:
        if clusters and rng.random() < 0.5:
            return clusters[int(rng.integers(len(clusters)))] + rng.normal(0, 160.0 * s, 3)
        return block.random_free_point(tries=20)

    def radius() -> float:
        return max(rng.uniform(20.0, 55.0) * s, wall + 0.75 * float(block.vs.max()))

    _compact(block, n, radius, wall, "ves_mem", "ves_lum", "vesicles", centers=center, tries=6)


def _lipid_droplets(block: _Block, content: Content) -> None:
    rng, s = block.rng, content.size
    n = max(1, int(rng.poisson(content.ld_per_um3 * block.cyto_volume_um3())))
    wall = block.wall(5.0)
    for scale in (1.0, 0.7, 0.5):  # shrink when a small or crowded block leaves no room

        def radius(scale: float = scale) -> float:
            return max(rng.uniform(70.0, 150.0) * s * scale, wall + float(block.vs.max()))

        if _compact(block, n, radius, wall, "ld_mem", "ld_lum", "lipid_droplets", tries=40):
            return


def _enclose(block: _Block) -> int:
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
        lut_inner[[_ID[n] for n in inner]] = True
        lut_ok = lut_inner.copy()
        lut_ok[[_ID[n] for n in walls]] = True
        inside = lut_inner[block.ids]
        if not inside.any():
            continue
        bad = inside & _dilate26(~lut_ok[block.ids])
        block.ids[bad] = _ID[wall]
        fixed += int(bad.sum())
    return fixed


# --------------------------------------------------------------------------------------------------------------
# rendering: labels -> FIB-SEM-like uint8
# --------------------------------------------------------------------------------------------------------------
def _render(ids: np.ndarray, vs: np.ndarray, imaging: Imaging, rng: np.random.Generator) -> np.ndarray:
    shape = ids.shape
    image = _lut(_BASE)[ids]
    # granular texture (fine, ~10 nm correlation)
    tex = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=np.maximum(10.0 / vs, 0.6),
                              truncate=3.0)
    tex /= max(float(tex.std()), 1e-6)
    image += _lut(_TEXTURE)[ids] * tex
    # ribosome-like dark dots: sparse points blurred to ~12 nm blobs, peak 1
    density = float(np.prod(vs)) / 55.0**3
    points = (rng.random(shape, dtype=np.float32) < density).astype(np.float32)
    sigma = np.maximum(6.0 / vs, 0.5)
    delta = np.zeros(tuple(2 * math.ceil(4 * s) + 1 for s in sigma), np.float32)
    delta[tuple(d // 2 for d in delta.shape)] = 1
    peak = float(ndi.gaussian_filter(delta, sigma).max())
    image -= _lut(_DOTS)[ids] * ndi.gaussian_filter(points, sigma) / np.float32(peak)
    # point spread function
    image = ndi.gaussian_filter(image, sigma=np.asarray(imaging.psf_sigma_nm) / vs)
    # shading (smooth lateral gradient) and z-slice brightness jitter
    yy = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :, None]
    xx = np.linspace(-1, 1, shape[2], dtype=np.float32)[None, None, :]
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1 + np.float32(imaging.shading) * (np.float32(np.cos(angle)) * yy + np.float32(np.sin(angle)) * xx)
    jitter = 1 + imaging.slice_jitter * ndi.gaussian_filter1d(rng.standard_normal(shape[0]), 1.0)
    gain = gain * jitter.astype(np.float32)[:, None, None]
    image = np.clip(image, 0, 1) ** np.float32(imaging.gamma) * gain
    signal = imaging.offset + imaging.gain * image
    if imaging.curtaining:
        stripes = ndi.gaussian_filter1d(rng.standard_normal(shape[2]), 1.5)
        stripes = stripes / max(float(np.abs(stripes).max()), 1e-6)
        drift = 1 + 0.5 * ndi.gaussian_filter1d(rng.standard_normal(shape[0]), 4.0)
        signal = signal + np.float32(imaging.curtaining * imaging.gain) * (
            drift.astype(np.float32)[:, None, None] * stripes.astype(np.float32)[None, None, :])
    # shot noise (Poisson, variance = mean, in its Gaussian form: exact enough at >= a few electrons per voxel
    # and 10x faster than numpy's Poisson sampler) plus detector read noise
    std = np.sqrt(np.maximum(signal, 0) / np.float32(imaging.photons) + np.float32(imaging.read_noise) ** 2)
    signal += std * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(np.rint(signal), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------
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
    block = _Block(shape, imaging.voxel_size, stage(1))
    ext = block.extent
    nucleus_radius = min(600.0 * content.size, 0.33 * min(ext[1], ext[2])) * stage(0).uniform(0.85, 1.1)
    cells = _cells(block, content, nucleus_radius)
    block.rng = stage(2)
    _nucleus(block, content, cells["nucleus_center"], nucleus_radius, cells["boundary_distance"])
    del cells
    for k, step in enumerate((_lipid_droplets, _mitochondria, _microtubules, _er, _vesicles), start=3):
        block.rng = stage(k)
        step(block, content)
    block.count("enclosure_repaired_voxels", _enclose(block))
    raw = _render(block.ids, block.vs, imaging, stage(20))
    translation = tuple(float(v * o) for v, o in zip(block.vs, (index * 40, 1000 + index * 300, 2000), strict=True))
    stats = {"objects": dict(block.log), "seconds": round(time.perf_counter() - start, 2)}
    volume = PhantomVolume(preset.name, preset, raw, block.ids, tuple(float(v) for v in block.vs), translation,
                           stats)
    stats["fractions"] = {k: round(v, 5) for k, v in volume.fractions().items()}
    return volume


def choose_crops(ids: np.ndarray, crop_shape: Sequence[int], n: int, rng: np.random.Generator,
                 candidates: int = 32) -> list[tuple[int, int, int]]:
    """Crop offsets (voxels) that together cover many classes, rare ones first, overlapping each other little."""
    crop_shape = tuple(int(c) for c in crop_shape)
    room = [s - c for s, c in zip(ids.shape, crop_shape, strict=True)]
    if min(room) < 0:
        raise ValueError(f"crop_shape: {crop_shape} does not fit in the EM volume of shape {ids.shape}")
    offsets = [tuple(int(rng.integers(0, r + 1)) for r in room) for _ in range(candidates)]
    class_ids = np.array([_ID[c] for c in PHANTOM_CLASSES])
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


def write_phantoms(
    out_dir: str | os.PathLike,
    seed: int = 0,
    datasets: int = 3,
    crops_per_dataset: int = 3,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    crop_shape: Sequence[int] = DEFAULT_CROP_SHAPE,
    levels: int = 2,
    montage: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write `datasets` phantom stores `<out_dir>/<name>.zarr` (CellMap layout) and a PNG montage for each.

    Returns the store paths. With more than one crop per dataset, the last crop of the second dataset (or of the
    only one) leaves one class unannotated (no array): it reads back as UNKNOWN, and its voxels are UNKNOWN (255)
    in that crop's `all` ids. Crops are numbered across datasets (crop1, crop2, ...) as in CellMap.
    """
    from emserve.data.writer import CropToWrite, provenance, write_store

    if datasets < 1 or crops_per_dataset < 1:
        raise ValueError(f"datasets / crops_per_dataset: need at least 1 each, got {datasets} / {crops_per_dataset}")
    shape, crop_shape = tuple(int(s) for s in shape), tuple(int(c) for c in crop_shape)
    if len(crop_shape) != 3 or any(c < 1 or c > s for c, s in zip(crop_shape, shape, strict=False)):
        raise ValueError(f"crop_shape: {crop_shape} must be three sizes between 1 and the EM shape {shape}")
    out = Path(out_dir)
    names = [preset_for(i, seed).name for i in range(datasets)]
    if not overwrite:
        for name in names:
            if (out / f"{name}.zarr").exists():
                raise FileExistsError(f"output: {out / f'{name}.zarr'} already exists; choose another folder or "
                                      f"pass --overwrite")
    partial_index = min(1, datasets - 1) if crops_per_dataset > 1 else None
    paths, crop_number = [], 0
    for index in range(datasets):
        volume = make_phantom(index, seed, shape)
        offsets = choose_crops(volume.ids, crop_shape, crops_per_dataset, np.random.default_rng([seed, index, 30]))
        crops = []
        for k, offset in enumerate(offsets):
            crop_number += 1
            box = tuple(slice(o, o + c) for o, c in zip(offset, crop_shape, strict=True))
            ids = volume.ids[box].copy()
            classes = list(PHANTOM_CLASSES)
            unannotated: list[str] = []
            if index == partial_index and k == len(offsets) - 1:
                present = [c for c in UNANNOTATED_CANDIDATES if (ids == _ID[c]).any()]
                drop = (present or list(UNANNOTATED_CANDIDATES))[0]
                classes.remove(drop)
                unannotated.append(drop)
                ids[ids == _ID[drop]] = UNKNOWN
            labels = {c: (ids == _ID[c]).astype(np.uint8) for c in classes}
            attrs = {"phantom": {"dataset": volume.name, "offset_voxels": list(offset), "annotated": classes,
                                 "unannotated": unannotated,
                                 "note": ("classes listed under 'unannotated' have no array here: unknown, not "
                                          "absent; their voxels are 255 in 'all' (the other arrays are exact)")
                                 if unannotated else "all phantom classes annotated; 'all' holds exact ids"}}
            crops.append(CropToWrite(f"crop{crop_number}", offset, labels, ids=ids, attrs=attrs))
        attrs = {
            **provenance(generator="phantom", seed=seed, dataset=volume.name, dataset_index=index,
                         shape=list(shape), crop_shape=list(crop_shape), classes=list(PHANTOM_CLASSES),
                         content=asdict(volume.preset.content)),
            "phantom": {"description": volume.preset.description, "imaging": asdict(volume.preset.imaging),
                        "objects": volume.stats["objects"], "fractions": volume.stats["fractions"]},
        }
        path = write_store(out / f"{volume.name}.zarr", volume.raw, volume.voxel_size, crops,
                           translation=volume.translation, levels=levels, attrs=attrs, overwrite=overwrite)
        paths.append(path)
        if montage:  # show the fully annotated crop with the most classes
            full = [c for c in crops if not c.attrs["phantom"]["unannotated"]] or crops
            best = max(full, key=lambda c: len(np.unique(c.ids)))
            write_montage(out / f"{volume.name}.png", volume, best.offset, crop_shape, best.ids)
    return paths


# --------------------------------------------------------------------------------------------------------------
# montage
# --------------------------------------------------------------------------------------------------------------
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

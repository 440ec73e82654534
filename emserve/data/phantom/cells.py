"""The tissue around the organelles: cells, their boundaries, extracellular space and the nucleus."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .geometry import BOUNDARY, NUCLEUS, Block, dilate26, filter26
from .labels import ID
from .presets import Content


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


def cells(block: Block, content: Content, nucleus_radius: float) -> dict[str, Any]:
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
    block.ids[ecs] = ID["ecs"]
    block.ids[pm] = ID["pm"]
    block.owner[ecs | pm] = BOUNDARY
    block.cell[...] = near
    block.cell[ecs] = -1
    # close any cytosol-to-cytosol or ecs-to-cytosol contact the wavy boundaries left
    cyto = block.ids == 0
    mx = filter26(np.where(cyto, block.cell, -2).astype(np.int16), np.maximum)
    mn = filter26(np.where(cyto, block.cell, 999).astype(np.int16), np.minimum)
    leak = cyto & ((mx != block.cell) | (mn != block.cell))
    leak |= cyto & dilate26(block.ids == ID["ecs"])
    block.ids[leak] = ID["pm"]
    block.owner[leak] = BOUNDARY
    block.count("pm_repaired_voxels", int(leak.sum()))
    block.count("cells", int((~is_ecs).sum()))
    return {"nucleus_center": nuc_center, "boundary_distance": bis}


def nucleus(block: Block, content: Content, center: np.ndarray, radius: float, bis: np.ndarray) -> None:
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
    ids[inside] = ID["ne_mem"]
    ids[(depth > t_mem) & (depth <= t_mem + t_lum)] = ID["ne_lum"]
    ids[inner] = ID["nucpl"]
    block.owner[box][inside] = NUCLEUS
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
            ids[nucleo] = ID["nucleo"]
            hchrom &= ~nucleo
    ids[hchrom] = ID["hchrom"]
    block.count("nuclei")

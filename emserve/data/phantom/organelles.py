"""Organelles placed in free cytosol: mitochondria, ER sheets and tubules, microtubules, vesicles, lipid droplets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .geometry import Block, perpendicular, random_direction, unit
from .labels import ID
from .presets import Content


def mitochondria(block: Block, content: Content) -> None:
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
        axis = random_direction(rng)
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
            perp = perpendicular(axis, rng)
            reach = rng.uniform(-0.1, 0.9) * radius
            v = rel[0] * np.float32(perp[0]) + rel[1] * np.float32(perp[1]) + rel[2] * np.float32(perp[2])
            cristae |= (np.abs(axial - np.float32(u)) < crista_w / 2) & (v < np.float32(reach)) & lumen
        block.ids[box][cristae] = ID["mito_mem"]
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
            ids[sphere & (ids == ID["mito_lum"]) & (block.owner[gbox] == owner)] = ID["mito_ribo"]
            block.count("mito_granules")
        placed += 1
    block.count("mitochondria", placed)


def _compact(block: Block, n: int, radius: Callable[[], float], wall: float, mem: str, lum: str, key: str,
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
        u = perpendicular(t, rng)
        dirs = [u, -u, np.cross(t, u), -np.cross(t, u)]
        ends = [a - t * radius, b + t * radius]
    else:
        dirs = list(np.concatenate([np.eye(3), -np.eye(3)]))
        ends = []
    return np.concatenate([line, *(line + radius * d for d in dirs), np.reshape(ends, (-1, 3))])


def _walk(block: Block, start: np.ndarray, direction: np.ndarray, steps: int, step: Callable[[], float],
          turn: float, radius: float, wall: float, mem: str, lum: str, owner: int, cell: int) -> int:
    """Grow a tube (ER tubule, microtubule) step by step from `start`, steering around what is in the way.

    Each step is a capsule painted as part of one object (lumen joins across steps); a step that finds no free
    way after a few turns ends the tube. Returns the number of steps painted."""
    rng, painted, p = block.rng, 0, start
    for _ in range(steps):
        for attempt in range(6):  # turn harder on each retry, to get around an obstacle
            d = unit(direction + (turn * (1 + attempt) + 0.15 * attempt) * rng.standard_normal(3))
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


def er(block: Block, content: Content) -> None:
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
        normal = random_direction(rng)
        radius = rng.uniform(180.0, 420.0) * s
        lum_half = max(rng.uniform(10.0, 22.0) * s, 0.6 * float(block.vs.max()))
        h = wall + lum_half
        owner = block.new_owner()
        step = rng.uniform(80.0, 140.0) * s
        discs = 0
        for k in range(int(rng.integers(1, 4))):
            c = center + normal * step * k + perpendicular(normal, rng) * rng.uniform(0, 60) * s
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
        placed += _walk(block, p, random_direction(rng), int(rng.integers(3, 9)),
                        lambda: rng.uniform(120.0, 280.0) * s, 0.7, radius, wall, "er_mem", "er_lum",
                        block.new_owner(), block.cell_at(p)) > 0
    block.count("er_tubes", placed)


def microtubules(block: Block, content: Content) -> None:
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
        direction = random_direction(rng, z_weight=0.25)
        steps = int(rng.uniform(1000.0, 3000.0) / 2 / 200.0)
        owner, cell = block.new_owner(), block.cell_at(p)
        grown = sum(_walk(block, p, sign * direction, steps, lambda: 200.0, 0.06, radius, wall, "mt_out", "mt_in",
                          owner, cell) for sign in (1, -1))
        placed += grown >= 2
        length += grown * 200
    block.count("microtubules", placed)
    block.count("microtubule_nm", length)


def vesicles(block: Block, content: Content) -> None:
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


def lipid_droplets(block: Block, content: Content) -> None:
    rng, s = block.rng, content.size
    n = max(1, int(rng.poisson(content.ld_per_um3 * block.cyto_volume_um3())))
    wall = block.wall(5.0)
    for scale in (1.0, 0.7, 0.5):  # shrink when a small or crowded block leaves no room

        def radius(scale: float = scale) -> float:
            return max(rng.uniform(70.0, 150.0) * s * scale, wall + float(block.vs.max()))

        if _compact(block, n, radius, wall, "ld_mem", "ld_lum", "lipid_droplets", tries=40):
            return

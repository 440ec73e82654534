"""Geometry: the block being built, boxes, coordinates and depth maps (nm inside the surface; 1-Lipschitz).

Also the separable 26-neighbourhood filters the cell boundaries and the enclosure check use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .labels import ID

FREE, BOUNDARY, NUCLEUS = 0, 1, 2  # owner codes; organelles get 3, 4, ...

Box = tuple[slice, slice, slice]


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def random_direction(rng: np.random.Generator, z_weight: float = 1.0) -> np.ndarray:
    v = rng.standard_normal(3)
    v[0] *= z_weight
    return unit(v)


def perpendicular(axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return unit(v - axis * float(v @ axis))


class Block:
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
            if self.owner[idx] == FREE and self.cell[idx] >= 0 and (cell is None or self.cell[idx] == cell):
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
        return bool((((own == FREE) | (own == owner)) & (self.cell[idx] == cell)).all())

    def fits(self, box: Box, depth: np.ndarray, cell: int, owner: int = -1) -> bool:
        """Whether an object (with `gap` of cytosol around it) lies in free cytosol of one cell (or its own)."""
        near = depth > -self.gap
        if not near.any():
            return False
        own = self.owner[box]
        return bool((((own == FREE) | (own == owner)) & (self.cell[box] == cell))[near].all())

    def paint(self, box: Box, depth: np.ndarray, owner: int, wall: float, mem: str, lum: str | None) -> np.ndarray:
        """Membrane where 0 < depth <= wall, lumen deeper; a union with earlier parts of the same owner."""
        inside = depth > 0
        ids, own = self.ids[box], self.owner[box]
        if lum is None:
            ids[inside] = ID[mem]
        else:
            lumen = depth > wall
            already_lumen = (own == owner) & (ids == ID[lum])
            ids[inside & ~lumen & ~already_lumen] = ID[mem]
            ids[lumen] = ID[lum]
        own[inside] = owner
        return inside

    def count(self, key: str, n: int = 1) -> None:
        self.log[key] = self.log.get(key, 0) + n

    def cyto_volume_um3(self) -> float:
        return float((self.owner == FREE).sum() * np.prod(self.vs) / 1e9)


def _shifted(a: np.ndarray, axis: int, op) -> np.ndarray:
    """op-combine `a` with its two neighbours along `axis` (edges see only the neighbour that exists)."""
    out = a.copy()
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    op(out[tuple(hi)], a[tuple(lo)], out=out[tuple(hi)])
    op(out[tuple(lo)], a[tuple(hi)], out=out[tuple(lo)])
    return out


def filter26(a: np.ndarray, op) -> np.ndarray:
    """Max / min (or OR) over each voxel's 3x3x3 neighbourhood, separably and without scipy's per-voxel loop."""
    for axis in range(a.ndim):
        a = _shifted(a, axis, op)
    return a


def dilate26(mask: np.ndarray) -> np.ndarray:
    return filter26(mask, np.logical_or)

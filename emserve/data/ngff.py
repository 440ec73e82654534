"""OME-NGFF multiscale metadata: parse what CellMap / OpenOrganelle publish, and write the same.

A multiscale image is a group whose `multiscales` attribute lists its arrays (s0, s1, ...) with a `scale` and a
`translation` per level, in physical units (nanometres), axes z, y, x. The translation is the physical position
of voxel [0, 0, 0] (its centre), which is what places a label crop inside the EM volume: a 2x coarser level of a
volume at the origin starts at half a fine voxel (CellMap s1 of 5.24 x 4 x 4 nm is translated by 2.62, 2, 2).

Three spellings reach us and all become the same `ScaleLevel` list:

- OME-NGFF 0.4 (CellMap zarr v2): `multiscales[0].datasets[i].coordinateTransformations` = scale, translation,
  optionally followed by multiscale-level `coordinateTransformations` applied after the per-level ones;
- OME-NGFF 0.5 (zarr v3): the same object under an `ome` key;
- COSEM / OpenOrganelle N5: `multiscales[0].datasets[i].transform` = {axes, units, scale, translate}, an
  "STTransform" whose axes name their own order (z, y, x on OpenOrganelle even though N5 is x, y, z).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

AXES = ("z", "y", "x")
UNIT = "nanometer"
# Length units as OME-NGFF spells them (UDUNITS names) and as N5 / COSEM attributes abbreviate them.
_UNIT_TO_NM = {
    "nanometer": 1.0, "nanometers": 1.0, "nanometre": 1.0, "nm": 1.0,
    "micrometer": 1000.0, "micrometers": 1000.0, "micrometre": 1000.0, "micron": 1000.0, "um": 1000.0,
    "\u00b5m": 1000.0, "\u03bcm": 1000.0,
    "millimeter": 1e6, "mm": 1e6,
    "angstrom": 0.1, "\u00e5": 0.1,
    "picometer": 1e-3, "pm": 1e-3,
}


@dataclass(frozen=True)
class ScaleLevel:
    """One array of a multiscale image: its path in the group, voxel size and offset, both in nm, z-y-x."""

    path: str
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]


def unit_to_nm(unit: str | None, where: str) -> float:
    """Nanometres per `unit`; a missing unit is taken as nm (what CellMap means when it leaves it out)."""
    if unit is None or unit == "":
        return 1.0
    factor = _UNIT_TO_NM.get(str(unit).strip().lower())
    if factor is None:
        raise ValueError(f"{where}: unit {unit!r} is not a length unit; expected one of nanometer, nm, micrometer")
    return factor


def multiscales_of(attrs: Mapping[str, Any]) -> list[Any] | None:
    """The `multiscales` list of a group's attributes: top level (NGFF 0.4, COSEM) or under `ome` (NGFF 0.5)."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        return ome["multiscales"]
    return attrs.get("multiscales")


def parse_multiscales(attrs: Mapping[str, Any], where: str) -> list[ScaleLevel]:
    """Scale levels from a `multiscales` attribute (NGFF 0.4 / 0.5 or COSEM), converted to nm and z-y-x order.

    `where` names the group in error messages.
    """
    multiscales = multiscales_of(attrs)
    if not multiscales or not isinstance(multiscales, Sequence):
        raise ValueError(f"{where}: no OME-NGFF 'multiscales' attribute; expected a multiscale image group")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise ValueError(f"{where}: 'multiscales' lists no datasets; expected s0, s1, ... with scale and translation")
    if all("transform" in ds and "coordinateTransformations" not in ds for ds in datasets):
        return [level_from_transform(ds["path"], ds["transform"], f"{where}/{ds['path']}") for ds in datasets]
    names, to_nm = _spatial_axes(ms.get("axes"), where)
    order = [names.index(a) for a in AXES]
    global_scale, global_translation = _transforms(ms.get("coordinateTransformations") or [], len(names), where)
    levels = []
    for ds in datasets:
        here = f"{where}/{ds.get('path')}"
        scale, translation = _transforms(ds.get("coordinateTransformations") or [], len(names), here)
        scale = scale * global_scale
        translation = translation * global_scale + global_translation
        levels.append(ScaleLevel(
            path=str(ds["path"]),
            voxel_size=tuple(float(scale[i] * to_nm[i]) for i in order),
            translation=tuple(float(translation[i] * to_nm[i]) for i in order),
        ))
    return levels


def level_from_transform(path: str, transform: Mapping[str, Any], where: str) -> ScaleLevel:
    """A level from a COSEM `transform` ({axes, units, scale, translate}); the axes name the order of the lists.

    OpenOrganelle N5 writes axes ["z", "y", "x"] (C order) next to an x-y-z `pixelResolution`; trusting the
    `axes` list, not the container's convention, is what keeps both spellings right.
    """
    axes = list(transform.get("axes") or AXES)
    if sorted(axes) != sorted(AXES):
        raise ValueError(f"{where}: transform axes {axes} are not z, y, x")
    units = transform.get("units") or [UNIT] * len(axes)
    to_nm = [unit_to_nm(u, where) for u in units]
    scale = transform.get("scale") or [1.0] * len(axes)
    translate = transform.get("translate") or [0.0] * len(axes)
    if not len(axes) == len(to_nm) == len(scale) == len(translate):
        raise ValueError(f"{where}: transform axes, units, scale and translate differ in length: {dict(transform)}")
    order = [axes.index(a) for a in AXES]
    return ScaleLevel(str(path), tuple(float(scale[i]) * to_nm[i] for i in order),
                      tuple(float(translate[i]) * to_nm[i] for i in order))


def _spatial_axes(axes: Any, where: str) -> tuple[list[str], list[float]]:
    """Axis names and nm-per-unit factors; the axes must be exactly z, y, x (in any order)."""
    if not axes:  # NGFF < 0.4 had no axes; CellMap data is always z, y, x
        return list(AXES), [1.0, 1.0, 1.0]
    names = [a["name"] if isinstance(a, Mapping) else str(a) for a in axes]
    if sorted(names) != sorted(AXES):
        raise ValueError(f"{where}: axes {names} are not z, y, x; expected three spatial axes named z, y, x")
    factors = [unit_to_nm(a.get("unit"), where) if isinstance(a, Mapping) else 1.0 for a in axes]
    return names, factors


def _transforms(transforms: Sequence[Mapping[str, Any]], ndim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The scale and translation vectors of an NGFF `coordinateTransformations` list (identity when absent)."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for tr in transforms:
        kind = tr.get("type")
        if kind == "scale":
            scale = _vector(tr, "scale", ndim, where)
        elif kind == "translation":
            translation = _vector(tr, "translation", ndim, where)
        elif kind != "identity":
            raise ValueError(f"{where}: coordinate transformation {kind!r} is not supported; expected scale, "
                             f"translation or identity (inline vectors, not 'path')")
    return scale, translation


def _vector(transform: Mapping[str, Any], key: str, ndim: int, where: str) -> np.ndarray:
    if key not in transform:
        raise ValueError(f"{where}: {key} transformation without an inline '{key}' vector (a 'path' is not read)")
    values = np.asarray(transform[key], dtype=float)
    if values.shape != (ndim,):
        raise ValueError(f"{where}: {key} {transform[key]} has {values.size} values; expected {ndim} (z, y, x)")
    return values


def multiscales_attrs(name: str, levels: Sequence[ScaleLevel]) -> dict[str, Any]:
    """The `multiscales` attribute for `levels` (nm, z-y-x), as CellMap writes it (OME-NGFF 0.4)."""
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": [{"name": a, "type": "space", "unit": UNIT} for a in AXES],
                "datasets": [
                    {
                        "path": lv.path,
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [float(v) for v in lv.voxel_size]},
                            {"type": "translation", "translation": [float(v) for v in lv.translation]},
                        ],
                    }
                    for lv in levels
                ],
            }
        ]
    }


def pyramid_factors(voxel_size: Sequence[float], count: int) -> list[tuple[int, ...]]:
    """Downsampling factors from s0 of levels s0..s<count-1>, per axis.

    Each level halves the axes finer than twice the finest one: isotropic data (and FIB-SEM's 5.24 x 4 x 4 nm)
    halves all three, serial sections (50 x 4 x 4 nm) keep z until y and x catch up, because averaging
    sections 50 nm apart mixes unrelated structures.
    """
    factors = [(1,) * len(voxel_size)]
    for _ in range(count - 1):
        current = [v * f for v, f in zip(voxel_size, factors[-1], strict=True)]
        finest = min(current)
        factors.append(tuple(f * 2 if c < 2 * finest else f for f, c in zip(factors[-1], current, strict=True)))
    return factors


def pyramid_levels(
    voxel_size: Sequence[float], translation: Sequence[float], count: int
) -> list[ScaleLevel]:
    """Levels s0..s<count-1> with the voxel sizes of `pyramid_factors`; voxel centres shift to the blocks' centres."""
    return [
        ScaleLevel(f"s{i}", tuple(float(v * f) for v, f in zip(voxel_size, factor, strict=True)),
                   tuple(float(t + (f - 1) * v / 2) for t, v, f in zip(translation, voxel_size, factor, strict=True)))
        for i, factor in enumerate(pyramid_factors(voxel_size, count))
    ]


def select_level(levels: Sequence[ScaleLevel], voxel_size: Sequence[float] | None, where: str) -> ScaleLevel:
    """The level whose voxel size equals `voxel_size` (within 1%), or s0 when none is asked for."""
    if voxel_size is None:
        return levels[0]
    want = np.asarray(voxel_size, dtype=float)
    if want.shape != (3,) or not np.all(want > 0):
        raise ValueError(f"voxel_size: {list(voxel_size)} is not three positive numbers; expected z, y, x in nm")
    for lv in levels:
        if np.allclose(lv.voxel_size, want, rtol=0.01):
            return lv
    have = ", ".join(f"{lv.path}={format_nm(lv.voxel_size)}" for lv in levels)
    raise ValueError(f"{where}: no scale level has voxel size {format_nm(want)} nm (z, y, x); available: {have}")


def format_nm(values: Sequence[float], sep: str = "x") -> str:
    """Voxel sizes or offsets for people: (8.0, 4.0, 4.0) -> "8x4x4"."""
    return sep.join(f"{v:g}" for v in values)

"""OME-NGFF 0.4 multiscale metadata: parse what CellMap publishes, and write the same.

A multiscale image is a group whose `multiscales` attribute lists its arrays (s0, s1, ...) with a `scale` and a
`translation` per level, in physical units (nanometres), axes z, y, x. The translation is the physical position
of voxel [0, 0, 0] (its centre), which is what places a label crop inside the EM volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

AXES = ("z", "y", "x")
UNIT = "nanometer"
_UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1000.0, "um": 1000.0, "angstrom": 0.1}


@dataclass(frozen=True)
class ScaleLevel:
    """One array of a multiscale image: its path in the group, voxel size and offset, both in nm, z-y-x."""

    path: str
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]


def parse_multiscales(attrs: Mapping[str, Any], where: str) -> list[ScaleLevel]:
    """Scale levels from an OME-NGFF 0.4 `multiscales` attribute, converted to nm and z-y-x order.

    `where` names the group in error messages.
    """
    multiscales = attrs.get("multiscales")
    if not multiscales:
        raise ValueError(f"{where}: no OME-NGFF 'multiscales' attribute; expected a multiscale image group")
    ms = multiscales[0]
    axes = ms.get("axes") or [{"name": a, "type": "space", "unit": UNIT} for a in AXES]
    names = [a["name"] if isinstance(a, Mapping) else a for a in axes]
    factors = [_UNIT_TO_NM.get(a.get("unit", UNIT)) if isinstance(a, Mapping) else 1.0 for a in axes]
    if sorted(names) != sorted(AXES) or None in factors:
        raise ValueError(f"{where}: axes {axes} are not z, y, x in a length unit; expected {list(AXES)} in nm")
    order = [names.index(a) for a in AXES]
    global_scale, global_translation = _transforms(ms.get("coordinateTransformations", []), len(names))
    levels = []
    for ds in ms["datasets"]:
        scale, translation = _transforms(ds.get("coordinateTransformations", []), len(names))
        scale = scale * global_scale
        translation = translation * global_scale + global_translation
        levels.append(
            ScaleLevel(
                path=ds["path"],
                voxel_size=tuple(float(scale[i] * factors[i]) for i in order),
                translation=tuple(float(translation[i] * factors[i]) for i in order),
            )
        )
    return levels


def _transforms(transforms: Sequence[Mapping[str, Any]], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for tr in transforms:
        if tr["type"] == "scale":
            scale = np.asarray(tr["scale"], dtype=float)
        elif tr["type"] == "translation":
            translation = np.asarray(tr["translation"], dtype=float)
    return scale, translation


def multiscales_attrs(name: str, levels: Sequence[ScaleLevel]) -> dict[str, Any]:
    """The `multiscales` attribute for `levels` (nm, z-y-x), as CellMap writes it."""
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


def pyramid_levels(
    voxel_size: Sequence[float], translation: Sequence[float], count: int
) -> list[ScaleLevel]:
    """Levels s0..s<count-1> of a 2x pyramid: the voxel size doubles and voxel centres shift by half a voxel."""
    levels = []
    for i in range(count):
        factor = 2**i
        vs = tuple(float(v * factor) for v in voxel_size)
        tr = tuple(float(t + (factor - 1) * v / 2) for t, v in zip(translation, voxel_size, strict=True))
        levels.append(ScaleLevel(f"s{i}", vs, tr))
    return levels


def select_level(levels: Sequence[ScaleLevel], voxel_size: Sequence[float] | None, where: str) -> ScaleLevel:
    """The level whose voxel size equals `voxel_size` (within 1%), or s0 when none is asked for."""
    if voxel_size is None:
        return levels[0]
    want = np.asarray(voxel_size, dtype=float)
    for lv in levels:
        if np.allclose(lv.voxel_size, want, rtol=0.01):
            return lv
    have = ", ".join(f"{lv.path}={_fmt(lv.voxel_size)}" for lv in levels)
    raise ValueError(f"{where}: no scale level has voxel size {_fmt(want)} nm; available: {have}")


def _fmt(v: Sequence[float]) -> str:
    return "x".join(f"{x:g}" for x in v)

"""Organelle classes: the CellMap annotation table, in one place.

CellMap / OpenOrganelle ground truth stores one array per class under
`recon-1/labels/groundtruth/crop<N>/<class>/` and an `all` array of atomic class ids. Atomic classes are the
smallest annotated compartments (mito_mem, mito_lum, ...); group classes (mito, nuc, er, ...) are unions of atomic
ones and are derived, never annotated on their own. Every store and model in emserve carries its class list by
name; ids are only used to decode `all` arrays and to keep colours stable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OrganelleClass:
    """One CellMap class: id, short name, description, RGB colour and (for groups) its atomic members."""

    id: int
    name: str
    description: str
    color: tuple[int, int, int]
    members: tuple[str, ...] = ()

    @property
    def is_group(self) -> bool:
        return bool(self.members)


def _atomic(id_: int, name: str, description: str, color: tuple[int, int, int]) -> OrganelleClass:
    return OrganelleClass(id_, name, description, color)


def _group(id_: int, name: str, description: str, color: tuple[int, int, int], *members: str) -> OrganelleClass:
    return OrganelleClass(id_, name, description, color, members)


# Atomic ids and colours follow the CellMap annotation table (janelia-cellmap); groups follow the CellMap
# segmentation challenge's definitions.
CLASS_TABLE: tuple[OrganelleClass, ...] = (
    _atomic(1, "ecs", "extracellular space", (50, 50, 50)),
    _atomic(2, "pm", "plasma membrane", (100, 100, 100)),
    _atomic(3, "mito_mem", "mitochondrial membrane", (255, 128, 0)),
    _atomic(4, "mito_lum", "mitochondrial lumen", (128, 64, 0)),
    _atomic(5, "mito_ribo", "mitochondrial ribosome", (220, 172, 104)),
    _atomic(6, "golgi_mem", "Golgi membrane", (0, 132, 255)),
    _atomic(7, "golgi_lum", "Golgi lumen", (0, 66, 128)),
    _atomic(8, "ves_mem", "vesicle membrane", (255, 0, 0)),
    _atomic(9, "ves_lum", "vesicle lumen", (128, 0, 0)),
    _atomic(10, "endo_mem", "endosome membrane", (0, 0, 255)),
    _atomic(11, "endo_lum", "endosome lumen", (0, 0, 128)),
    _atomic(12, "lyso_mem", "lysosome membrane", (255, 216, 0)),
    _atomic(13, "lyso_lum", "lysosome lumen", (128, 108, 0)),
    _atomic(14, "ld_mem", "lipid droplet membrane", (134, 164, 247)),
    _atomic(15, "ld_lum", "lipid droplet lumen", (79, 66, 252)),
    _atomic(16, "er_mem", "endoplasmic reticulum membrane", (57, 215, 46)),
    _atomic(17, "er_lum", "endoplasmic reticulum lumen", (51, 128, 46)),
    _atomic(18, "eres_mem", "ER exit site membrane", (85, 254, 219)),
    _atomic(19, "eres_lum", "ER exit site lumen", (6, 185, 157)),
    _atomic(20, "ne_mem", "nuclear envelope membrane", (9, 128, 0)),
    _atomic(21, "ne_lum", "nuclear envelope lumen", (5, 77, 0)),
    _atomic(22, "np_out", "nuclear pore outer", (175, 249, 111)),
    _atomic(23, "np_in", "nuclear pore inner", (252, 144, 211)),
    _atomic(24, "hchrom", "heterochromatin", (168, 55, 188)),
    _atomic(25, "nhchrom", "nuclear heterochromatin", (84, 23, 94)),
    _atomic(26, "echrom", "euchromatin", (204, 0, 102)),
    _atomic(27, "nechrom", "nuclear euchromatin", (102, 0, 51)),
    _atomic(28, "nucpl", "nucleoplasm", (255, 0, 255)),
    _atomic(29, "nucleo", "nucleolus", (247, 82, 104)),
    _atomic(30, "mt_out", "microtubule outer", (255, 255, 255)),
    _atomic(36, "mt_in", "microtubule inner", (128, 128, 128)),
    _atomic(46, "perox_mem", "peroxisome membrane", (255, 110, 60)),
    _atomic(47, "perox_lum", "peroxisome lumen", (128, 55, 30)),
    _group(37, "nuc", "nucleus", (64, 0, 160),
           "ne_mem", "ne_lum", "np_out", "np_in", "hchrom", "nhchrom", "echrom", "nechrom", "nucpl", "nucleo"),
    _group(40, "golgi", "Golgi apparatus", (0, 100, 200), "golgi_mem", "golgi_lum"),
    _group(41, "ves", "vesicle", (200, 0, 0), "ves_mem", "ves_lum"),
    _group(42, "endo", "endosome", (0, 0, 200), "endo_mem", "endo_lum"),
    _group(43, "lyso", "lysosome", (200, 170, 0), "lyso_mem", "lyso_lum"),
    _group(44, "ld", "lipid droplet", (100, 110, 250), "ld_mem", "ld_lum"),
    _group(45, "eres", "ER exit site", (40, 220, 190), "eres_mem", "eres_lum"),
    _group(48, "perox", "peroxisome", (200, 90, 45), "perox_mem", "perox_lum"),
    _group(49, "mito", "mitochondrion", (200, 100, 0), "mito_mem", "mito_lum", "mito_ribo"),
    _group(50, "er", "endoplasmic reticulum", (50, 170, 45),
           "er_mem", "er_lum", "eres_mem", "eres_lum", "ne_mem", "ne_lum", "np_out", "np_in"),
    _group(51, "ne", "nuclear envelope", (7, 100, 0), "ne_mem", "ne_lum", "np_out", "np_in"),
    _group(52, "np", "nuclear pore", (210, 200, 160), "np_out", "np_in"),
    _group(53, "chrom", "chromatin", (140, 40, 150), "hchrom", "nhchrom", "echrom", "nechrom"),
    _group(54, "mt", "microtubule", (200, 200, 200), "mt_out", "mt_in"),
    # Not a CellMap class: synaptic densities of the ssTEM stacks (Gerhard 2013 Drosophila VNC). The id is far
    # above CellMap's so that it never collides with an id of theirs.
    _atomic(100, "syn", "synaptic density (not a CellMap class; from ssTEM stacks)", (255, 0, 128)),
)

BY_NAME: dict[str, OrganelleClass] = {c.name: c for c in CLASS_TABLE}
ATOMIC_NAMES: tuple[str, ...] = tuple(c.name for c in CLASS_TABLE if not c.is_group)

# Every lumen is bounded by its membrane: <organelle>_lum -> <organelle>_mem (used to screen generated labels).
MEMBRANE_OF: dict[str, str] = {
    c.name: c.name.removesuffix("_lum") + "_mem"
    for c in CLASS_TABLE
    if c.name.endswith("_lum") and c.name.removesuffix("_lum") + "_mem" in {x.name for x in CLASS_TABLE}
}

# Voxel values of CellMap label arrays (`cellmap.annotation` attributes).
ABSENT, PRESENT, UNKNOWN = 0, 1, 255
ENCODING = {"absent": ABSENT, "present": PRESENT, "unknown": UNKNOWN}  # as `cellmap.annotation` writes it


def get_class(name: str) -> OrganelleClass:
    """Look a class up by name, with an error that lists what is allowed."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"class: unknown class name {name!r}; allowed: {', '.join(sorted(BY_NAME))}"
        ) from None


def check_class_names(names: Iterable[str]) -> tuple[str, ...]:
    """Validate a class list (known names, no duplicates) and return it as a tuple."""
    names = tuple(names)
    if not names:
        raise ValueError("classes: the class list is empty; give at least one class name")
    for name in names:
        get_class(name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"classes: duplicate class names {dupes}")
    return names


def atomic_members(name: str) -> tuple[str, ...]:
    """The atomic classes that make up `name` (itself if atomic)."""
    cls = get_class(name)
    return cls.members if cls.is_group else (cls.name,)


def masks_from_ids(ids: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Binary masks [len(names), *ids.shape] from an `all`-style array of atomic class ids.

    Group classes are the union of their members, so `mito` comes out right from an array that only holds
    mito_mem / mito_lum / mito_ribo ids.
    """
    out = np.zeros((len(names), *ids.shape), dtype=bool)
    for i, name in enumerate(names):
        member_ids = [BY_NAME[m].id for m in atomic_members(name)]
        out[i] = np.isin(ids, member_ids)
    return out


def colorize(masks: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """RGB uint8 picture [*spatial, 3] of binary masks [len(names), *spatial]; later classes paint over earlier."""
    rgb = np.zeros((*masks.shape[1:], 3), dtype=np.uint8)
    for mask, name in zip(masks, names, strict=True):
        rgb[mask.astype(bool)] = get_class(name).color
    return rgb

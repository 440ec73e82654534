"""The classes the phantom annotates and their CellMap ids (the values of the `all` arrays)."""

from __future__ import annotations

from emserve.classes import BY_NAME

# The classes the phantom annotates, in CellMap id order; the default class list of models trained on it.
PHANTOM_CLASSES: tuple[str, ...] = (
    "ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "ves_mem", "ves_lum", "ld_mem", "ld_lum",
    "er_mem", "er_lum", "ne_mem", "ne_lum", "hchrom", "nucpl", "nucleo", "mt_out", "mt_in",
)
RARE_CLASSES: tuple[str, ...] = ("mito_ribo", "ld_mem", "ld_lum", "mt_out", "mt_in")

ID = {name: BY_NAME[name].id for name in PHANTOM_CLASSES}

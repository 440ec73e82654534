"""What every backend checks before it runs a graph: inputs against the model card."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from emserve.card import ModelCard

INPUT_NAMES = ("x", "t", "classes", "dataset", "label_map")  # the exported graph's input names, in order
OUTPUT_NAME = "out"


def check_inputs(card: ModelCard, x: np.ndarray, t: np.ndarray | None, cond: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming the input, what came and what the card allows."""
    batch = x.shape[0]
    in_channels = card.unet["in_channels"]
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x: shape {x.shape}; this model takes [B, {in_channels}, H, W] "
                         f"(channels {', '.join(card.channels) if card.mode != 'segmentation' else 'raw'})")
    factor = 2 ** (len(card.unet["multipliers"]) - 1)
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"x: spatial size {x.shape[2]}x{x.shape[3]} must be a multiple of {factor}")
    if card.unet["timestep"] and (t is None or t.shape != (batch,)):
        raise ValueError(f"t: expected one timestep per sample, shape ({batch},); got {None if t is None else t.shape}")
    expected = card.conditions
    unknown = sorted(set(cond) - set(expected))
    if unknown:
        raise ValueError(f"conditions: {unknown} are not inputs of this model; it takes {sorted(expected) or 'none'}")
    for name, spec in expected.items():
        if name not in cond:
            raise ValueError(f"{name}: missing; this model needs it (use {spec['null']} for 'no condition')")
        shape = tuple(batch if d == "B" else x.shape[2] if d == "H" else x.shape[3] if d == "W" else d
                      for d in spec["shape"])
        if cond[name].shape != shape:
            raise ValueError(f"{name}: shape {cond[name].shape}; this model wants {shape}")

"""How much memory one sample's forward pass takes, so large calls can be split to fit a memory budget.

A UNet's inference memory grows linearly with the batch: the skip tensors the down path keeps for the up path,
the working tensors of the level being computed, and the attention scores (quadratic in the pixels of the
attention levels). `activation_bytes` estimates that per sample from the card's UNet config alone, so it holds for
every backend (ONNX Runtime, TorchScript, Triton behind its own budget) and needs no trial run. The constant
`WORKING_MAPS` is calibrated on this project's exported models: on CPU, ONNX Runtime took 11.4 MB per 64x64
sample and 67 MB per 128x128 sample of the width-32 phantom-seg, and 5.7 and 34 MB of the width-16 one (peak
resident size growth from a call of 9 samples to one of 33), where the estimate is 12.4 / 75 and 6.4 / 38 MB.
TorchScript takes less (3.0 and 11.6 MB for the width-16 model): its fused attention keeps no score matrix, which
the estimate counts because ONNX Runtime does. tests/test_memory.py measures it again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

WORKING_MAPS = 16  # feature maps of a level's width, at its resolution, alive at once while it is computed
BYTES_PER_VALUE = 4  # the graphs compute in float32
DEFAULT_MEMORY_BUDGET = "4GiB"  # generate, segment and the service: ~380 samples per 64x64 denoiser call
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def activation_bytes(unet: Mapping[str, Any], height: int, width: int) -> int:
    """Estimated peak memory (bytes) of one sample's forward pass at `height` x `width`, for a card's UNet config."""
    base, multipliers = unet["width"], unet["multipliers"]
    head_dim = unet.get("attention_head_dim", 32)
    skips = base * height * width  # the stem's output
    working = attention = 0
    for level, multiplier in enumerate(multipliers):
        channels = base * multiplier
        pixels = (height >> level) * (width >> level)
        skips += unet["blocks_per_level"] * channels * pixels
        if level < len(multipliers) - 1:
            skips += channels * (pixels // 4)  # the downsampled map is a skip too
        working = max(working, WORKING_MAPS * channels * pixels)
        if level in unet["attention_levels"] or level == len(multipliers) - 1:  # the middle attends at the lowest
            heads = channels // head_dim if channels % head_dim == 0 else 1
            attention = max(attention, 2 * heads * pixels * pixels)  # scores and their softmax
    io = (unet["in_channels"] + unet["out_channels"] + unet.get("label_channels", 0)) * height * width
    return BYTES_PER_VALUE * (skips + working + attention + io)


def samples_within(budget: int, unet: Mapping[str, Any], height: int, width: int) -> int:
    """How many samples of `height` x `width` one call may hold under `budget` bytes (at least 1)."""
    return max(1, budget // activation_bytes(unet, height, width))


def parse_bytes(text: str | int, field: str = "memory_budget") -> int:
    """'2GiB', '512MB', '1.5 gib' or a plain number of bytes -> bytes; a ValueError names `field` otherwise."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{field}: {text!r} is not a size; use bytes or a number with one of "
                             f"KB, MB, GB, KiB, MiB, GiB (e.g. 2GiB)")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"{field}: {text!r} must be at least 1 byte")
    return value

"""Denoising pretraining: a segmentation network that starts as a trained denoiser.

With few labels a segmenter has seen two annotated sections, while the DDPM of the same experiment has learned the
EM of every section, unlabelled ones included. A denoiser's features are known to carry what label-efficient
segmentation needs (Baranchuk et al. 2022, "Label-efficient semantic segmentation with diffusion models"; Brempong
et al. 2022, "Denoising pretraining for semantic segmentation"), and our segmenter is the same UNet without the
conditioning vector. So the denoiser is folded into it exactly, at one fixed time step and null conditions:

- each ResNet block's scale-shift of that conditioning vector becomes a constant, folded into the affine
  parameters of the GroupNorm it follows (weight * (1 + scale), bias * (1 + scale) + shift);
- the stem keeps the EM input channel; every other input (the label channels of a pairs denoiser, a spatial label
  condition) reads zero, i.e. its weights are dropped; a segmenter with depth context reads the denoiser's EM
  weights on its middle section and starts with zero weights on the neighbouring ones (it starts as the 2D
  denoiser and learns what the neighbours add);
- the head's last conv is the segmenter's own, zero as at any segmenter's start: its outputs mean something else
  (logits, not a noise estimate) even where the shapes agree, so training starts from the denoiser's features
  and the usual zero logits.

The time step follows Baranchuk et al., whose segmentation features were best early in the schedule
(t = 50 ... 250 of 1000): FOLD_TIME is 10 % of the schedule. It is fixed by that principle, not tuned on our crops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from emserve.unet import ResBlock, UNet

FOLD_TIME = 0.1  # share of the denoiser's schedule whose time embedding is folded in


@torch.no_grad()
def segmenter_weights(denoiser: UNet, segmenter: UNet, timesteps: int) -> dict[str, Tensor]:
    """The segmenter's state dict with every tensor but the head's last conv taken from the denoiser (see module
    doc).

    Raises ValueError naming the first tensor whose shape differs anywhere but the input and output convs (the
    two networks must have the same width, multipliers, blocks and attention)."""
    if segmenter.config.timestep or segmenter.config.num_classes or segmenter.config.num_datasets:
        raise ValueError("segmenter: expected an unconditioned UNet (timestep=False, no classes, no datasets)")
    if not denoiser.config.timestep:
        raise ValueError("init: the checkpoint is not a denoiser (timestep=False); pass a DDPM checkpoint")
    x = next(denoiser.parameters()).new_zeros(1, denoiser.config.in_channels, 1, 1)
    t = x.new_full((1,), FOLD_TIME * timesteps)
    emb = denoiser.embedding(x, t, None, None)  # null class presence and dataset
    weights = dict(segmenter.state_dict())
    source = denoiser.state_dict()
    for name, block in denoiser.named_modules():
        if isinstance(block, ResBlock) and block.emb_proj is not None:
            scale, shift = block.emb_proj(torch.nn.functional.silu(emb))[0].chunk(2)
            source[f"{name}.norm2.weight"] = block.norm2.weight * (1 + scale)
            source[f"{name}.norm2.bias"] = block.norm2.bias * (1 + scale) + shift
    stem = source["stem.weight"]  # [width, denoiser inputs, k, k], the EM channel first
    source["stem.weight"] = torch.zeros_like(stem[:, :1]).repeat(1, segmenter.config.in_channels, 1, 1)
    source["stem.weight"][:, segmenter.config.in_channels // 2] = stem[:, 0]
    head_conv = f"head.{len(segmenter.head) - 1}."
    for name, value in weights.items():
        if name.startswith(head_conv):
            continue
        if name not in source:
            raise ValueError(f"init: the denoiser has no {name}; it must have the segmenter's UNet shape")
        if source[name].shape == value.shape:
            weights[name] = source[name].clone()
        else:
            raise ValueError(f"init: {name} is {list(source[name].shape)} in the denoiser and {list(value.shape)} "
                             f"here; width, multipliers, blocks_per_level and attention must match")
    return weights

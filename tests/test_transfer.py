"""Denoising pretraining: a segmenter started from a DDPM's denoiser is that denoiser, folded at one time step."""

import pytest
import torch
from checkpoints import CLASSES, TINY_UNET, make_checkpoint, tiny_unet

from emserve.card import ModelCard
from emserve.unet import UNet
from training.checkpoint import load_checkpoint
from training.seg import SegConfig, train_seg
from training.transfer import FOLD_TIME, segmenter_weights

SHAPE = dict(width=16, attention_levels=(1,), attention_head_dim=8)  # tiny, wider: attention at the second level


def random_denoiser(label_channels: int = 2) -> UNet:
    """A pairs-style denoiser (EM + label channels in and out, class and dataset conditions) with every
    parameter away from its initial value, so a wrong fold of any of them shows."""
    torch.manual_seed(0)
    denoiser = tiny_unet(1 + label_channels, 1 + label_channels, timestep=True, num_classes=2, num_datasets=2, **SHAPE)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return denoiser.eval()


def test_the_folded_segmenter_computes_the_denoiser_at_the_fold_time_with_null_conditions():
    denoiser = random_denoiser()
    segmenter = tiny_unet(1, 3, timestep=False, **SHAPE).eval()
    weights = segmenter_weights(denoiser, segmenter, timesteps=1000)
    assert not weights["head.2.weight"].any()  # its own head, even of the denoiser's shape: logits start at zero
    weights.update({f"head.2.{k}": v for k, v in denoiser.head[2].state_dict().items()})  # to compare the rest
    segmenter.load_state_dict(weights)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = denoiser(torch.cat([x, torch.zeros(2, 2, 32, 32)], 1), torch.full((2,), FOLD_TIME * 1000))
        torch.testing.assert_close(segmenter(x), expected, atol=1e-5, rtol=1e-4)
        other_time = denoiser(torch.cat([x, torch.zeros(2, 2, 32, 32)], 1), torch.full((2,), 900.0))
    assert not torch.allclose(segmenter(x), other_time, atol=1e-3)  # the time step is really folded in


def test_the_stem_keeps_the_em_channel_and_a_different_shape_is_refused_by_name():
    denoiser = random_denoiser()
    segmenter = tiny_unet(1, 5, timestep=False, **SHAPE)
    weights = segmenter_weights(denoiser, segmenter, timesteps=1000)
    assert not weights["head.2.weight"].any() and not weights["head.2.bias"].any()
    torch.testing.assert_close(weights["stem.weight"], denoiser.state_dict()["stem.weight"][:, :1])
    with pytest.raises(ValueError, match=r"init: stem\.weight is \[16, 1, 3, 3\] in the denoiser and \[24, 1, 3, 3\] "
                                         r"here; width, multipliers"):
        segmenter_weights(denoiser, tiny_unet(1, 3, timestep=False, **{**SHAPE, "width": 24}), timesteps=1000)


def test_a_depth_3_segmenter_starts_as_the_2d_one_reading_its_middle_section():
    denoiser = random_denoiser()
    flat, deep = tiny_unet(1, 3, timestep=False, **SHAPE).eval(), tiny_unet(3, 3, timestep=False, **SHAPE).eval()
    head = {f"head.2.{k}": v for k, v in denoiser.head[2].state_dict().items()}  # the heads start at zero: a
    flat.load_state_dict(segmenter_weights(denoiser, flat, timesteps=1000) | head)  # nonzero one, to compare
    weights = segmenter_weights(denoiser, deep, timesteps=1000)
    assert not weights["stem.weight"][:, [0, 2]].any()  # the neighbours' weights start at zero, to be learned
    deep.load_state_dict(weights | head)
    below, x, above = torch.randn(3, 2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deep(torch.cat([below, x, above], 1)), flat(x))


def test_train_seg_init_from_a_ddpm_checkpoint_starts_from_its_folded_denoiser(toy_store, tmp_path):
    ddpm = make_checkpoint(tmp_path / "ddpm", "pairs")  # of TINY_UNET's shape, as the segmenter below
    common = dict(stores=[str(toy_store[0])], classes=CLASSES, patch_size=32, batch_size=4, steps=1,
                  checkpoint_every=1, preview_every=1, lr=0.0, **TINY_UNET)
    tuned = train_seg(SegConfig(out=str(tmp_path / "tuned"), init=str(ddpm), **common))
    _, _, ema, _, _ = load_checkpoint(tuned)
    _, _, denoiser_weights, _, _ = load_checkpoint(ddpm)
    denoiser = UNet.from_config(ModelCard.load(ddpm).unet)
    denoiser.load_state_dict(denoiser_weights)
    expected = segmenter_weights(denoiser, UNet.from_config(ModelCard.load(tuned).unet), timesteps=1000)
    for name, value in expected.items():  # lr 0: still the starting weights after a step
        torch.testing.assert_close(ema[name], value, msg=name)
    assert ModelCard.load(tuned).training["init"]["checkpoint"] == str(ddpm)

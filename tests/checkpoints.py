"""The tests' tiny models: one UNet shape (TINY_UNET) for networks built directly, trained by a test, or saved as
real training checkpoints with random weights (make_checkpoint) for the export, runtime and service tests."""

import torch

from emserve.card import ModelCard
from emserve.unet import UNet
from training.checkpoint import TrainingState, save_checkpoint

CLASSES = ["mito_mem", "ld_lum"]
TINY_UNET = dict(width=8, multipliers=(1, 2), blocks_per_level=1)  # UNet options, and the same training options


def tiny_unet(in_channels: int, out_channels: int, **options) -> UNet:
    """A UNet of the tests' tiny shape; `options` add conditions or override the shape."""
    return UNet(in_channels, out_channels, **{**TINY_UNET, **options})


def make_checkpoint(run_dir, mode, seed=0, depth=1, **unet):
    """A real training checkpoint (step-1) of a tiny UNet with random weights and a non-zero head; a segmentation
    network of `depth` > 1 reads that many sections."""
    torch.manual_seed(seed)
    k = len(CLASSES)
    channels = {"pairs": (1 + k, 1 + k), "em-from-labels": (1, 1), "segmentation": (depth, k)}[mode]
    model = tiny_unet(*channels, timestep=mode != "segmentation", **unet)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # the head starts at zero: make the output depend on x
    card = ModelCard(mode=mode, classes=CLASSES, patch_size=16, unet=model.config.to_dict(),
                     datasets=["a", "b"] if unet.get("num_datasets") else [],
                     class_condition=bool(unet.get("num_classes")), depth=depth)
    state = TrainingState(step=1, ranks=[], losses=[])
    return save_checkpoint(run_dir, card, model, model, torch.optim.AdamW(model.parameters()), state)

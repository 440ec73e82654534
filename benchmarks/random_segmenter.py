"""A random-weight segmentation network to time blockwise segmentation with: `python -m benchmarks.random_segmenter
OUT` exports OUT/tiny-seg (UNet width 8, multipliers 1,2,4, patch 64, 3 classes). Speed does not depend on the
weights, and a small network makes the costs around it (blocks, Dask, writing) a larger share: a harsher test."""
import sys
from pathlib import Path

import torch

from emserve.card import ModelCard
from emserve.unet import UNet
from training.checkpoint import TrainingState, save_checkpoint
from training.export import export_model

out = Path(sys.argv[1])
torch.manual_seed(0)
model = UNet(1, 3, width=8, multipliers=(1, 2, 4), blocks_per_level=1, timestep=False)
torch.nn.init.normal_(model.head[-1].weight, std=0.1)
card = ModelCard(mode="segmentation", classes=["mito_mem", "mito_lum", "er_mem"], patch_size=64,
                 unet=model.config.to_dict())
checkpoint = save_checkpoint(out / "run", card, model, model, torch.optim.AdamW(model.parameters()),
                             TrainingState(step=1, ranks=[], losses=[]))
print(export_model(checkpoint, out, name="tiny-seg", exporter="legacy", overwrite=True))

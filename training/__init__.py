"""Training: the UNet, DDPM and segmentation training, checkpoints, export, experiments (needs torch)."""

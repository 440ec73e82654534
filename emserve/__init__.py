"""emserve: diffusion-generated training data for organelle segmentation in volume EM."""

__version__ = "0.1.0"

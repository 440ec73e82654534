"""Reproducible speed benchmarks: `python -m benchmarks.denoiser` and `python -m benchmarks.sampling` (README.md)."""

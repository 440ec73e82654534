"""Rendering: labels -> FIB-SEM-like uint8."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .labels import ID
from .presets import Imaging

# Grey value of each class before texture, PSF and noise (0 black, 1 white), and texture amplitudes.
_BASE = {"cyto": 0.64, "ecs": 0.86, "pm": 0.22, "mito_mem": 0.20, "mito_lum": 0.44, "mito_ribo": 0.08,
         "ves_mem": 0.26, "ves_lum": 0.74, "ld_mem": 0.24, "ld_lum": 0.36, "er_mem": 0.24, "er_lum": 0.58,
         "ne_mem": 0.20, "ne_lum": 0.62, "hchrom": 0.26, "nucpl": 0.54, "nucleo": 0.34, "mt_out": 0.28,
         "mt_in": 0.56}
_TEXTURE = {"cyto": 0.05, "ecs": 0.015, "mito_lum": 0.05, "er_lum": 0.03, "ves_lum": 0.02, "ne_lum": 0.03,
            "hchrom": 0.05, "nucpl": 0.08, "nucleo": 0.07}
_DOTS = {"cyto": 0.30, "nucleo": 0.25, "nucpl": 0.10, "er_lum": 0.05}  # ribosome-like granules


def _lut(table: dict[str, float], default: float = 0.0) -> np.ndarray:
    lut = np.full(256, default, np.float32)
    for name, value in table.items():
        lut[0 if name == "cyto" else ID[name]] = value
    return lut


def render_em(ids: np.ndarray, vs: np.ndarray, imaging: Imaging, rng: np.random.Generator) -> np.ndarray:
    shape = ids.shape
    image = _lut(_BASE)[ids]
    # granular texture (fine, ~10 nm correlation)
    tex = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=np.maximum(10.0 / vs, 0.6),
                              truncate=3.0)
    tex /= max(float(tex.std()), 1e-6)
    image += _lut(_TEXTURE)[ids] * tex
    # ribosome-like dark dots: sparse points blurred to ~12 nm blobs, peak 1
    density = float(np.prod(vs)) / 55.0**3
    points = (rng.random(shape, dtype=np.float32) < density).astype(np.float32)
    sigma = np.maximum(6.0 / vs, 0.5)
    delta = np.zeros(tuple(2 * math.ceil(4 * s) + 1 for s in sigma), np.float32)
    delta[tuple(d // 2 for d in delta.shape)] = 1
    peak = float(ndi.gaussian_filter(delta, sigma).max())
    image -= _lut(_DOTS)[ids] * ndi.gaussian_filter(points, sigma) / np.float32(peak)
    # point spread function
    image = ndi.gaussian_filter(image, sigma=np.asarray(imaging.psf_sigma_nm) / vs)
    # shading (smooth lateral gradient) and z-slice brightness jitter
    yy = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :, None]
    xx = np.linspace(-1, 1, shape[2], dtype=np.float32)[None, None, :]
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1 + np.float32(imaging.shading) * (np.float32(np.cos(angle)) * yy + np.float32(np.sin(angle)) * xx)
    jitter = 1 + imaging.slice_jitter * ndi.gaussian_filter1d(rng.standard_normal(shape[0]), 1.0)
    gain = gain * jitter.astype(np.float32)[:, None, None]
    image = np.clip(image, 0, 1) ** np.float32(imaging.gamma) * gain
    signal = imaging.offset + imaging.gain * image
    if imaging.curtaining:
        stripes = ndi.gaussian_filter1d(rng.standard_normal(shape[2]), 1.5)
        stripes = stripes / max(float(np.abs(stripes).max()), 1e-6)
        drift = 1 + 0.5 * ndi.gaussian_filter1d(rng.standard_normal(shape[0]), 4.0)
        signal = signal + np.float32(imaging.curtaining * imaging.gain) * (
            drift.astype(np.float32)[:, None, None] * stripes.astype(np.float32)[None, None, :])
    # shot noise (Poisson, variance = mean, in its Gaussian form: exact enough at >= a few electrons per voxel
    # and 10x faster than numpy's Poisson sampler) plus detector read noise
    std = np.sqrt(np.maximum(signal, 0) / np.float32(imaging.photons) + np.float32(imaging.read_noise) ** 2)
    signal += std * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(np.rint(signal), 0, 255).astype(np.uint8)

"""Dataset presets: how each dataset was imaged and what its block of tissue holds."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Imaging:
    """How a dataset was imaged: voxel size and the detector / PSF model that turns labels into uint8 EM."""

    voxel_size: tuple[float, float, float]  # nm, z y x
    psf_sigma_nm: tuple[float, float, float]  # Gaussian PSF, nm, z y x
    offset: float  # grey level of a black object
    gain: float  # grey levels from black to white (before noise)
    gamma: float  # intensity**gamma before the gain
    photons: float  # detected electrons per grey level: Poisson noise std = sqrt(level / photons)
    read_noise: float  # Gaussian noise std, grey levels
    slice_jitter: float  # relative brightness std from one z slice to the next (FIB-SEM drift)
    shading: float  # relative amplitude of a smooth lateral brightness gradient
    curtaining: float  # relative amplitude of vertical stripes (FIB curtaining), constant along y


@dataclass(frozen=True)
class Content:
    """What the block of tissue holds: organelle size and density (per cubic micrometre of cytosol)."""

    size: float  # organelle size factor (1 = HeLa-like, compressed)
    cell_spacing_nm: float
    ecs_pairs: float  # chance that two neighbouring cells have extracellular space between them
    open_ecs: bool  # one Voronoi region is all extracellular space (cells in culture, resin around them)
    mito_per_um3: float
    er_tubes_per_um3: float
    er_sheets_per_um3: float
    vesicles_per_um3: float
    ld_per_um3: float
    mt_per_um3: float
    granules_per_mito: float


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    description: str
    imaging: Imaging
    content: Content


PRESETS: tuple[DatasetPreset, ...] = (
    DatasetPreset(
        "phantom_a", "8 nm isotropic, HeLa-like cells, moderate noise and contrast",
        Imaging(voxel_size=(8.0, 8.0, 8.0), psf_sigma_nm=(6.0, 5.0, 5.0), offset=30.0, gain=190.0, gamma=1.0,
                photons=1.5, read_noise=4.0, slice_jitter=0.01, shading=0.04, curtaining=0.0),
        Content(size=1.0, cell_spacing_nm=1500.0, ecs_pairs=0.35, open_ecs=False, mito_per_um3=8.0,
                er_tubes_per_um3=20.0, er_sheets_per_um3=4.0, vesicles_per_um3=150.0, ld_per_um3=0.3,
                mt_per_um3=0.8, granules_per_mito=0.8),
    ),
    DatasetPreset(
        "phantom_b", "4 nm isotropic, small dense cells, bright, low noise, soft focus",
        Imaging(voxel_size=(4.0, 4.0, 4.0), psf_sigma_nm=(6.0, 5.0, 5.0), offset=55.0, gain=185.0, gamma=0.8,
                photons=5.0, read_noise=2.0, slice_jitter=0.006, shading=0.02, curtaining=0.0),
        Content(size=0.6, cell_spacing_nm=900.0, ecs_pairs=0.6, open_ecs=False, mito_per_um3=50.0,
                er_tubes_per_um3=150.0, er_sheets_per_um3=25.0, vesicles_per_um3=1000.0, ld_per_um3=1.0,
                mt_per_um3=4.0, granules_per_mito=0.6),
    ),
    DatasetPreset(
        "phantom_c", "12 x 6 x 6 nm anisotropic, cultured cells in resin, dark, high contrast, noisy, curtaining",
        Imaging(voxel_size=(12.0, 6.0, 6.0), psf_sigma_nm=(10.0, 5.0, 5.0), offset=10.0, gain=200.0, gamma=1.4,
                photons=0.6, read_noise=6.0, slice_jitter=0.02, shading=0.08, curtaining=0.08),
        Content(size=0.8, cell_spacing_nm=1300.0, ecs_pairs=0.2, open_ecs=True, mito_per_um3=7.0,
                er_tubes_per_um3=15.0, er_sheets_per_um3=3.0, vesicles_per_um3=100.0, ld_per_um3=0.8,
                mt_per_um3=1.0, granules_per_mito=1.0),
    ),
)


def preset_for(index: int, seed: int = 0) -> DatasetPreset:
    """The preset of dataset `index`: the three built-in ones, then random variations of them."""
    if index < len(PRESETS):
        return PRESETS[index]
    base = PRESETS[index % len(PRESETS)]
    rng = np.random.default_rng([seed, index, 991])
    im, co = base.imaging, base.content
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    imaging = replace(im, offset=im.offset * u(0.6, 1.4), gain=min(im.gain * u(0.8, 1.15), 250 - im.offset),
                      gamma=im.gamma * u(0.8, 1.25), photons=im.photons * u(0.5, 2.0),
                      read_noise=im.read_noise * u(0.5, 1.5), psf_sigma_nm=tuple(s * u(0.7, 1.4) for s in
                                                                                  im.psf_sigma_nm))
    content = replace(co, size=co.size * u(0.85, 1.2), mito_per_um3=co.mito_per_um3 * u(0.6, 1.6),
                      vesicles_per_um3=co.vesicles_per_um3 * u(0.5, 1.5), ecs_pairs=u(0.1, 0.7))
    return DatasetPreset(f"phantom_{_letters(index)}", f"random variation of {base.name}", imaging, content)


def _letters(index: int) -> str:
    out = ""
    index += 1
    while index:
        index, r = divmod(index - 1, 26)
        out = chr(ord("a") + r) + out
    return out

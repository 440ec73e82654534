"""Noise schedules: how much signal survives at each discrete training timestep.

A schedule is fully described by ``alphas_cumprod``: ``alphas_cumprod[t]`` is alpha_bar_t, the signal variance at
timestep index ``t`` (0..T-1), so that ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps``. Everything
else (betas, signal-to-noise ratio, the sampling timesteps) is derived from it, which is why the dataclass stores
nothing more: a model card only needs the schedule name and T to rebuild the exact same array.

The constructors follow the papers (and lucidrains/denoising-diffusion-pytorch) so that a model trained with one of
these names elsewhere samples correctly here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "sigmoid")
SPACINGS: tuple[str, ...] = ("trailing", "karras")

# Karras et al. 2022 (EDM), eq. 5: rho = 7 spends most of a short step budget at low noise, where the fine texture
# of the sample is decided; rho = 1 would be even spacing in sigma.
KARRAS_RHO = 7.0
# EDM's sigma_max (Karras et al. 2022, table 1): data in [-1, 1] under noise of std 80 is drowned. The clipped last
# beta of the cosine and sigmoid schedules puts sigma(T - 1) at 10^3-10^4, and a ramp from there would spend half
# the steps on timesteps T-1, T-2, ... that all see pure noise; the ramp starts at 80 and the first step stays T-1.
KARRAS_SIGMA_MAX = 80.0

# Betas are clipped below 1 so that no step destroys the signal completely (Nichol & Dhariwal 2021, sec. 3.2):
# a beta of 1 would make alpha_bar exactly 0 and every later step singular for eps- and x0-prediction.
MAX_BETA = 0.999


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete diffusion noise schedule.

    Attributes:
        name: the constructor name ("linear", "cosine", "sigmoid") or any label for a custom schedule.
        alphas_cumprod: float64 [T], alpha_bar_t for t = 0..T-1; strictly decreasing, inside (0, 1).
            Stored read-only so a schedule shared between threads cannot be changed under a running sampler.
    """

    name: str
    alphas_cumprod: np.ndarray

    def __post_init__(self) -> None:
        ab = np.array(self.alphas_cumprod, dtype=np.float64)  # own copy: the caller's array may change later
        if ab.ndim != 1 or ab.shape[0] < 2:
            raise ValueError(f"alphas_cumprod: got shape {ab.shape}; must be 1-D with at least 2 timesteps")
        if not (np.all(np.isfinite(ab)) and np.all(ab > 0.0) and np.all(ab < 1.0)):
            raise ValueError("alphas_cumprod: every value must lie strictly inside (0, 1)")
        if not np.all(np.diff(ab) < 0.0):
            raise ValueError("alphas_cumprod: must be strictly decreasing (more noise at every later timestep)")
        ab.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", ab)

    @property
    def num_steps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.alphas_cumprod.shape[0])

    @property
    def betas(self) -> np.ndarray:
        """Per-step noise variances beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} (with alpha_bar_{-1} = 1)."""
        prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / prev

    def alpha_bar(self, t: np.ndarray | int) -> np.ndarray:
        """alpha_bar at integer timestep index/indices ``t``; ``t = -1`` means clean data (alpha_bar = 1).

        Samplers step from the last sampling timestep to "t = -1", i.e. all the way to the data.
        """
        t = np.asarray(t)
        padded = np.concatenate([self.alphas_cumprod, [1.0]])  # index -1 -> the appended 1.0
        return padded[t.astype(np.int64)]

    def timesteps(self, steps: int, spacing: str = "trailing") -> np.ndarray:
        """Descending timestep indices for sampling with ``steps`` model evaluations.

        Both spacings start at T - 1, the timestep whose input the model saw as (nearly) pure noise in training,
        so sampling starts from the distribution it was trained on ("leading" spacing, the original DDIM code,
        starts at T - T/n and hands the model pure noise labelled as a less noisy timestep). ``n = T`` gives every
        timestep (T-1, ..., 0), i.e. the original DDPM chain, with either spacing.

        - "trailing" (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", table 2):
          ``t_i = T - 1 - floor(i * T / n)``, evenly spaced; the last step is T/n - 1, so with few steps the sample
          is the model's x0 estimate at a noise level where fine detail is still averaged away.
        - "karras" (Karras et al. 2022, eq. 5, with rho = 7): evenly spaced in sigma^(1/rho), where
          sigma = sqrt((1 - alpha_bar) / alpha_bar), from min(sigma(T - 1), 80) to sigma(0), each rounded to the
          nearest timestep in log sigma, and the first replaced by T - 1; the last step is 0, and the steps crowd
          where the noise is low. Where rounding would repeat a timestep (many steps, small T), it moves down one,
          so the steps stay distinct.

        Returns:
            int64 [n], strictly decreasing, first element T - 1 (and last 0 for "karras").
        """
        T = self.num_steps
        n = _check_int("steps", steps, 1, T)
        i = np.arange(n, dtype=np.int64)
        if spacing == "trailing":
            return (T - 1 - (i * T) // n).astype(np.int64)
        if spacing != "karras":
            raise ValueError(f"spacing: got {spacing!r}; allowed: {', '.join(repr(s) for s in SPACINGS)}")
        log_sigmas = 0.5 * np.log((1.0 - self.alphas_cumprod) / self.alphas_cumprod)  # increasing in t
        inv_rho = 1.0 / KARRAS_RHO
        ramp = np.linspace(0.0, 1.0, n)
        high = min(np.exp(log_sigmas[-1]), KARRAS_SIGMA_MAX) ** inv_rho
        low = np.exp(log_sigmas[0] * inv_rho)
        targets = KARRAS_RHO * np.log(high + ramp * (low - high))
        t = np.rint(np.interp(targets, log_sigmas, np.arange(T, dtype=np.float64))).astype(np.int64)
        t[0] = T - 1
        t = np.maximum(t, n - 1 - i)  # room below for the remaining steps
        for k in range(1, n):  # distinct: a repeat moves one down (stays >= n - 1 - k by the line above)
            t[k] = min(t[k], t[k - 1] - 1)
        return t


def _check_int(field: str, value: object, low: int, high: int | None = None) -> int:
    """Validate an integer field and return it; the error names the field, the value and the allowed range."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{field}: got {value!r}; allowed: {allowed}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{field}: got {value!r}; allowed: {allowed}")
    return int(value)


def _from_betas(name: str, betas: np.ndarray) -> NoiseSchedule:
    betas = np.clip(betas, 0.0, MAX_BETA)
    return NoiseSchedule(name=name, alphas_cumprod=np.cumprod(1.0 - betas))


def _from_alpha_bar_curve(name: str, curve: np.ndarray) -> NoiseSchedule:
    """Schedules defined by a continuous alpha_bar(s), s in [0, 1], sampled at T + 1 points.

    Betas are taken from consecutive ratios and clipped, as in the papers, so the clipped final step (where the
    continuous curve reaches 0) keeps alpha_bar_{T-1} tiny but positive.
    """
    curve = curve / curve[0]
    return _from_betas(name, 1.0 - curve[1:] / curve[:-1])


def linear_schedule(num_steps: int = 1000) -> NoiseSchedule:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 for T = 1000, scaled by 1000 / T for other T.

    The scaling keeps the total noise (sum of betas) roughly independent of T, so alpha_bar_{T-1} stays near 0.
    """
    T = _check_int("num_steps", num_steps, 2)
    scale = 1000.0 / T
    return _from_betas("linear", np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))


def cosine_schedule(num_steps: int = 1000, s: float = 0.008) -> NoiseSchedule:
    """Nichol & Dhariwal 2021: alpha_bar(s) = cos^2(((s + off) / (1 + off)) * pi / 2), normalised, betas <= 0.999.

    Destroys information more slowly than the linear schedule at low noise, which suits small images.
    """
    T = _check_int("num_steps", num_steps, 2)
    u = np.linspace(0.0, 1.0, T + 1, dtype=np.float64)
    return _from_alpha_bar_curve("cosine", np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2)


def sigmoid_schedule(num_steps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> NoiseSchedule:
    """Jabri et al. 2022 / Chen 2023 ("On the importance of noise scheduling"): a sigmoid alpha_bar curve.

    alpha_bar(s) = (sigmoid(end / tau) - sigmoid((s * (end - start) + start) / tau)) / (sigmoid(end/tau) -
    sigmoid(start/tau)); reported to train better than cosine on larger images.
    """
    T = _check_int("num_steps", num_steps, 2)

    def sigmoid(z: np.ndarray | float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    u = np.linspace(0.0, 1.0, T + 1, dtype=np.float64)
    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    curve = (v_end - sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    return _from_alpha_bar_curve("sigmoid", curve)


_CONSTRUCTORS = {"linear": linear_schedule, "cosine": cosine_schedule, "sigmoid": sigmoid_schedule}


def make_schedule(name: str, num_steps: int = 1000) -> NoiseSchedule:
    """Build a named schedule with T = ``num_steps`` training timesteps (the model card stores both)."""
    if name not in _CONSTRUCTORS:
        raise ValueError(f"schedule: got {name!r}; allowed: {', '.join(repr(n) for n in SCHEDULES)}")
    return _CONSTRUCTORS[name](num_steps)

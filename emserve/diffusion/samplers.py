"""Samplers: turn noise into data by calling a denoise callable over a descending subset of timesteps.

Every sampler here works the same way at each step: ask the model for its prediction at (x_t, t), turn it into
the pair (x0, eps) (objectives.py), and move x_t to the next, less noisy, timestep s. The last step goes to
"t = -1", alpha_bar = 1, i.e. to the data itself, so the returned array is a clean sample (no leftover noise).

- "ddpm": ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020). With ``steps = T`` it is the
  original chain; with fewer steps it uses the posterior between the two strided timesteps, whose variance is
  (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s) -- the DDPM "beta tilde" generalised to a skip.
- "ddim": Song et al. 2021; ``eta = 0`` is the deterministic ODE-like sampler, ``eta = 1`` has DDPM's variance.
- "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022, algorithm 2), a second-order multistep solver of the probability
  flow ODE in data (x0) prediction; good samples in ~20 steps. The first step (no history yet) and the last step
  (to noise level 0, where the log-SNR step is infinite) are first order.
- "dpmpp_3m": DPM-Solver++(3M), the third-order multistep solver (Lu et al. 2022, "DPM-Solver++", appendix; the
  form of diffusers' ``solver_order=3``): x0 is extrapolated from the last three predictions. On karras spacing
  it lands 2-4x closer to the exact ODE solution than 2M at 15 steps and 10-100x at 20-25 (measured with the
  tests' exact denoiser, which check 20-25 steps); at 10-12 steps the log-SNR steps are too uneven for a
  quadratic fit and it is worse than 2M.
- "dpmpp_2m_sde": the same multistep data prediction on the reverse SDE (Lu et al. 2022, "DPM-Solver++", sec. 5;
  the midpoint form of diffusers and k-diffusion): each step forgets part of x_t and draws fresh noise, which
  corrects errors of earlier steps instead of carrying them to the end.

Every sampler's last step returns the x0 estimate made at the last sampling timestep, i.e. a posterior mean. With
"trailing" spacing and few steps that timestep is T / steps - 1, and detail weaker than its noise level is averaged
away (with an exact denoiser on Gaussian data: a 1-3% low standard deviation at 25-250 steps, see the tests);
"karras" spacing ends at timestep 0 (schedules.py).

Randomness is per sample: sample i owns ``np.random.default_rng(seeds[i])``, which draws its initial noise and
then, in step order, every noise it needs. A sample is therefore a function of its seed (and model and request)
alone, whatever the batch size and whichever other samples share the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .guidance import Denoise, Guidance, classifier_free_guidance
from .objectives import check_objective, to_x0_eps
from .schedules import NoiseSchedule

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde")

# What `emserve generate`, the service and the experiment sample with unless told otherwise: picked from the
# sampler-quality tables of docs/BENCHMARKS.md (speed at a measured distance to the study's DDIM-250): 3M at 20
# karras steps is closer to DDIM-250 than 2M at 25, guided and unguided, with 20 % fewer model calls.
DEFAULT_SAMPLER = "dpmpp_3m"
DEFAULT_STEPS = 20
DEFAULT_SPACING = "karras"
# Guidance scale for drawing EM for given label maps (`emserve generate from-labels`, the service's
# generate_from_labels, `emserve evaluate transfer`, the experiment's few+rendered arm): label fidelity peaks at
# 2-3 and falls on both sides (docs/experiments/label-transfer.md, "Guidance scale").
DEFAULT_LABEL_GUIDANCE = 3.0
# Drawing label maps for given EM (a pairs model segmenting, `sample(known=...)`): the SDE sampler, because
# deterministic samplers settle the free channels before the held ones show through (0.84 against 0.985 agreement
# with an exact model at 20 steps, tests/test_diffusion_samplers.py); 8 draws per tile for a mean and a spread.
DEFAULT_LABEL_SAMPLER = "dpmpp_2m_sde"
DEFAULT_LABEL_DRAWS = 8

#: progress(steps_done, total_steps), called after every step: (1, n), (2, n), ..., (n, n).
Progress = Callable[[int, int], None]


def ddpm_step(x_t: np.ndarray, x0: np.ndarray, ab_t: float, ab_s: float, noise: np.ndarray | None) -> np.ndarray:
    """One ancestral step t -> s (s < t, or s = -1 with ab_s = 1): a draw from q(x_s | x_t, x0).

    ``noise`` may be None only on the final step, where the posterior variance is 0.
    """
    ab_ts = ab_t / ab_s  # alpha_bar of the skip from s to t
    coef_x0 = math.sqrt(ab_s) * (1.0 - ab_ts) / (1.0 - ab_t)
    coef_xt = math.sqrt(ab_ts) * (1.0 - ab_s) / (1.0 - ab_t)
    variance = (1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_ts)
    x_s = coef_x0 * x0 + coef_xt * x_t
    if variance > 0.0:
        if noise is None:
            raise ValueError("ddpm_step: noise is required when the posterior variance is positive")
        x_s = x_s + math.sqrt(variance) * noise
    return x_s


def ddim_sigma(ab_t: float, ab_s: float, eta: float) -> float:
    """The DDIM noise level for t -> s: eta times the DDPM posterior standard deviation."""
    return eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))


def ddim_step(
    x0: np.ndarray, eps: np.ndarray, ab_t: float, ab_s: float, eta: float, noise: np.ndarray | None
) -> np.ndarray:
    """One DDIM step t -> s: re-noise the x0 estimate to level s, reusing eps for the deterministic part."""
    sigma = ddim_sigma(ab_t, ab_s, eta)
    direction = math.sqrt(max(1.0 - ab_s - sigma * sigma, 0.0))  # max(): rounding at ab_s = 1
    x_s = math.sqrt(ab_s) * x0 + direction * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step: noise is required when eta > 0")
        x_s = x_s + sigma * noise
    return x_s


class DPMSolverPP:
    """DPM-Solver++ state: the previous data predictions and log-SNR steps (the "multistep" memory).

    In log-SNR time lambda = log(alpha / sigma), the exact solution of the probability flow ODE from t to s is
    ``x_s = (sigma_s / sigma_t) x_t + sigma_s * integral of e^lambda x0(lambda)``; first order holds x0 constant
    over the step, second order extrapolates it linearly from the previous step's prediction (the midpoint form),
    third order quadratically from the two previous ones. Until the history is long enough, a step uses the
    highest order it can.

    Given ``noise`` (second order only), the step solves the reverse SDE instead: x_t is damped by a further e^-h,
    the data prediction gets weight alpha_s (1 - e^-2h), and fresh noise of variance sigma_s^2 (1 - e^-2h) makes up
    the rest; the second-order correction uses the same extrapolated prediction (the midpoint form).
    """

    def __init__(self, order: int = 2) -> None:
        if order not in (2, 3):
            raise ValueError(f"order: got {order!r}; allowed: 2 or 3")
        self.order = order
        self.history: list[tuple[np.ndarray, float]] = []  # (x0, h) of the last order - 1 steps, oldest first

    def step(self, x_t: np.ndarray, x0: np.ndarray, ab_t: float, ab_s: float,
             noise: np.ndarray | None = None) -> np.ndarray:
        """Advance x_t to level ab_s given the model's data prediction ``x0`` at ab_t (the SDE step with noise)."""
        if noise is not None and self.order != 2:
            raise ValueError("DPMSolverPP.step: the SDE step (noise given) is second order only")
        if ab_s >= 1.0:  # to noise level 0: the first-order step is exactly the data prediction
            return x0
        lam_t = 0.5 * math.log(ab_t / (1.0 - ab_t))
        lam_s = 0.5 * math.log(ab_s / (1.0 - ab_s))
        h = lam_s - lam_t
        sigma_ratio = math.sqrt((1.0 - ab_s) / (1.0 - ab_t))
        alpha_s = math.sqrt(ab_s)
        history, self.history = self.history, [*self.history, (x0, h)][1 - self.order:]
        if len(history) == 2:  # third order (diffusers' multistep_dpm_solver_third_order_update, data prediction)
            (x0_2, h_1), (x0_1, h_0) = history
            r0, r1 = h_0 / h, h_1 / h
            d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            e = math.expm1(-h)
            return (sigma_ratio * x_t - alpha_s * e * x0 + alpha_s * (e / h + 1.0) * d1
                    - alpha_s * ((e + h) / (h * h) - 0.5) * d2)
        if history:
            x0_1, h_0 = history[-1]
            r = h_0 / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_1
        else:
            d = x0
        if noise is None:
            return sigma_ratio * x_t - alpha_s * math.expm1(-h) * d
        kept = -math.expm1(-2.0 * h)  # 1 - e^-2h
        return (sigma_ratio * math.exp(-h) * x_t + alpha_s * kept * d
                + math.sqrt((1.0 - ab_s) * kept) * noise)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    out = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seeds: got {seed!r}; allowed: integers >= 0, one per sample")
        out.append(int(seed))
    if not out:
        raise ValueError("seeds: got an empty list; allowed: one integer >= 0 per sample")
    return out


def _check_cond(cond: Mapping[str, np.ndarray] | None, batch: int) -> dict[str, np.ndarray]:
    out = {}
    for key, value in (cond or {}).items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != batch:
            raise ValueError(f"cond[{key!r}]: got shape {value.shape}; allowed: leading dimension {batch} (= seeds)")
        out[key] = value
    return out


def _check_known(known: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    values, mask = np.asarray(known[0], dtype=np.float64), np.asarray(known[1], dtype=bool)
    if values.shape != shape:
        raise ValueError(f"known: values of shape {values.shape}; allowed: the samples' shape {shape}")
    try:
        mask = np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(f"known: mask of shape {mask.shape} does not broadcast to the samples' {shape}") from None
    if not np.isfinite(values[mask]).all() or np.abs(values[mask]).max(initial=0.0) > 1.0:
        raise ValueError("known: values must be finite and in [-1, 1] where the mask is set")
    return values, mask


def _noise(rngs: Sequence[np.random.Generator], shape_chw: tuple[int, ...]) -> np.ndarray:
    """One standard normal draw per sample, each from that sample's own generator."""
    return np.stack([rng.standard_normal(shape_chw) for rng in rngs])


def sample(
    denoise: Denoise,
    schedule: NoiseSchedule,
    objective: str,
    shape_chw: tuple[int, int, int],
    seeds: Sequence[int],
    cond: Mapping[str, np.ndarray] | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    spacing: str = DEFAULT_SPACING,
    eta: float = 0.0,
    clip_x0: bool = True,
    guidance: Guidance | None = None,
    progress: Progress | None = None,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Generate ``len(seeds)`` samples of shape ``shape_chw``; returns float32 [B, C, H, W].

    Args:
        denoise: the model, called as ``denoise(x_t float32 [B,C,H,W], t float32 [B], cond)``.
        schedule: the schedule the model was trained with.
        objective: what the model predicts: "eps", "x0" or "v".
        shape_chw: (C, H, W) of one sample.
        seeds: one integer per sample; sample i depends only on seeds[i] (and model, cond[i], settings).
        cond: condition arrays with leading dim B, passed through to ``denoise`` untouched.
        sampler: one of SAMPLERS.
        steps: number of model evaluations, 1..T.
        spacing: which timesteps those are: "trailing" or "karras" (NoiseSchedule.timesteps).
        eta: DDIM stochasticity in [0, 1] (0 = deterministic); only for sampler "ddim".
        clip_x0: clip every x0 estimate to the data range [-1, 1] (eps recomputed to match).
        guidance: classifier-free guidance settings; None = call ``denoise`` on ``cond`` as is.
        progress: called as progress(steps_done, steps) after every step.
        known: (values [B,C,H,W] in [-1, 1], mask broadcastable to them): entries the samples must equal, e.g. the
            EM channel of a pairs model when its labels are sampled for a given image. Every step's data
            prediction is replaced there by the known value (eps recomputed to match), so those entries follow
            q(x_t | known) along the sampler's own path, are seen by the model at the noise level it was trained
            on, and end exactly at the known value; the model fills in the rest to agree with them (replacement
            conditioning as in RePaint, applied to the data prediction so that it holds for every sampler here).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: got {sampler!r}; allowed: {', '.join(repr(s) for s in SAMPLERS)}")
    check_objective(objective)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: got {eta!r}; allowed: a number in [0, 1]")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta: got {eta!r} for sampler {sampler!r}; eta is only used by sampler 'ddim'")
    shape = tuple(shape_chw)
    if len(shape) != 3 or not all(isinstance(n, int | np.integer) and n > 0 for n in shape):
        raise ValueError(f"shape_chw: got {shape_chw!r}; allowed: three positive integers (C, H, W)")
    rngs = [np.random.default_rng(seed) for seed in _check_seeds(seeds)]
    batch = len(rngs)
    cond = _check_cond(cond, batch)
    timesteps = schedule.timesteps(steps, spacing)  # validates steps and spacing
    if guidance is not None:
        denoise = classifier_free_guidance(
            denoise, guidance.null_cond, guidance.scale, guidance.rescale, schedule=schedule, objective=objective
        )

    if known is not None:
        values, mask = _check_known(known, (batch, *shape))
    ab_now = schedule.alpha_bar(timesteps)
    ab_next = schedule.alpha_bar(np.append(timesteps[1:], -1))  # the last step goes to the data (ab = 1)
    solver = DPMSolverPP(order=3 if sampler == "dpmpp_3m" else 2)
    x = _noise(rngs, shape)  # float64 state; the model sees float32
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        ab_t, ab_s = float(ab_now[i]), float(ab_next[i])
        t_in = np.full(batch, t, dtype=np.float32)
        prediction = np.asarray(denoise(x.astype(np.float32), t_in, cond))
        if prediction.shape != x.shape:
            raise ValueError(f"denoise returned shape {prediction.shape}; expected {x.shape}")
        x0, eps = to_x0_eps(objective, prediction, x, ab_t, clip_x0=clip_x0)
        if known is not None:
            x0 = np.where(mask, values, x0)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1.0 - ab_t)
        last = ab_s >= 1.0
        if sampler == "ddpm":
            x = ddpm_step(x, x0, ab_t, ab_s, None if last else _noise(rngs, shape))
        elif sampler == "ddim":
            x = ddim_step(x0, eps, ab_t, ab_s, eta, None if last or eta == 0.0 else _noise(rngs, shape))
        elif sampler in ("dpmpp_2m", "dpmpp_3m"):
            x = solver.step(x, x0, ab_t, ab_s)
        else:
            x = solver.step(x, x0, ab_t, ab_s, None if last else _noise(rngs, shape))
        if progress is not None:
            progress(i + 1, total)
    return x.astype(np.float32)

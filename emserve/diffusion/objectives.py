"""What the network predicts ("objective") and how to move between the three parametrisations.

With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar) and ``x_t = alpha * x0 + sigma * eps``:

- "eps": the noise eps (Ho et al. 2020);
- "x0":  the clean data x0;
- "v":   v = alpha * eps - sigma * x0 (Salimans & Ho 2022), well-conditioned at both ends of the schedule.

Given x_t, any one of (x0, eps, v) determines the other two, so samplers work on (x0, eps) and never care which
objective the model was trained with. All maps are affine in the prediction for a fixed x_t, which is why
classifier-free guidance gives the same result whichever space it is combined in (see guidance.py).

``alpha_bar`` is a scalar or one value per sample ([B]); it is broadcast to [B, 1, 1, ...] against the arrays.
"""

from __future__ import annotations

import numpy as np

OBJECTIVES: tuple[str, ...] = ("eps", "x0", "v")

#: The data range: raw EM and every label channel are scaled to [-1, 1] while diffusing.
DATA_RANGE: tuple[float, float] = (-1.0, 1.0)


def check_objective(objective: str, field: str = "objective") -> str:
    """Return ``objective`` if known, else raise ValueError naming the field, the value and the allowed values."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{field}: got {objective!r}; allowed: {', '.join(repr(o) for o in OBJECTIVES)}")
    return objective


def _coefficients(alpha_bar: np.ndarray | float, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) as float64 arrays shaped [B, 1, ..., 1] (or scalars) to broadcast over [B, C, H, W]."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    if ab.ndim == 1:
        ab = ab.reshape(ab.shape + (1,) * (ndim - 1))
    elif ab.ndim != 0:
        raise ValueError(f"alpha_bar: got shape {ab.shape}; allowed: a scalar or one value per sample [B]")
    return np.sqrt(ab), np.sqrt(1.0 - ab)


def training_target(objective: str, x0: np.ndarray, eps: np.ndarray, alpha_bar: np.ndarray | float) -> np.ndarray:
    """The regression target for a model trained with ``objective`` on ``x_t = alpha * x0 + sigma * eps``."""
    check_objective(objective)
    if objective == "eps":
        return np.asarray(eps)
    if objective == "x0":
        return np.asarray(x0)
    alpha, sigma = _coefficients(alpha_bar, np.ndim(x0))
    return alpha * eps - sigma * x0


def to_x0_eps(
    objective: str,
    prediction: np.ndarray,
    x_t: np.ndarray,
    alpha_bar: np.ndarray | float,
    clip_x0: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a model output into the pair (x0, eps) consistent with ``x_t`` (float64).

    With ``clip_x0`` the x0 estimate is clipped to the data range [-1, 1] and eps is recomputed from x_t and the
    clipped x0, so the pair still satisfies ``x_t = alpha * x0 + sigma * eps`` and the sampler's next state stays
    on the same noise level. Clipping matters early in sampling, when eps-prediction divided by a tiny alpha
    gives wild x0 estimates.
    """
    check_objective(objective)
    pred = np.asarray(prediction, dtype=np.float64)
    x_t = np.asarray(x_t, dtype=np.float64)
    alpha, sigma = _coefficients(alpha_bar, x_t.ndim)
    if objective == "eps":
        eps = pred
        x0 = (x_t - sigma * eps) / alpha
    elif objective == "x0":
        x0 = pred
        eps = (x_t - alpha * x0) / sigma
    else:  # v = alpha * eps - sigma * x0, and alpha^2 + sigma^2 = 1
        x0 = alpha * x_t - sigma * pred
        eps = sigma * x_t + alpha * pred
    if clip_x0:
        x0 = np.clip(x0, *DATA_RANGE)
        eps = (x_t - alpha * x0) / sigma
    return x0, eps


def from_x0_eps(objective: str, x0: np.ndarray, eps: np.ndarray, alpha_bar: np.ndarray | float) -> np.ndarray:
    """The prediction a model with ``objective`` would output for the pair (x0, eps)."""
    return training_target(objective, x0, eps, alpha_bar)


def convert(
    prediction: np.ndarray,
    from_objective: str,
    to_objective: str,
    x_t: np.ndarray,
    alpha_bar: np.ndarray | float,
) -> np.ndarray:
    """Re-express a prediction made in ``from_objective`` in ``to_objective`` (float64)."""
    check_objective(from_objective, "from_objective")
    check_objective(to_objective, "to_objective")
    if from_objective == to_objective:
        return np.asarray(prediction, dtype=np.float64)
    x0, eps = to_x0_eps(from_objective, prediction, x_t, alpha_bar)
    return from_x0_eps(to_objective, x0, eps, alpha_bar)

"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023), as a denoise wrapper.

One network learns both p(x | c) and p(x) because every condition is replaced by its learned "null" at random
during training. At sampling time the two predictions are extrapolated:

    guided = uncond + scale * (cond - uncond)

``scale = 1`` is the conditional model, ``scale = 0`` the unconditional one, larger values follow the condition
more strictly (the study used 6).

A weight per condition (Brooks et al. 2023, InstructPix2Pix, eq. 3, for any number of conditions) chains the
conditions in a given order, each step adding one to those before it:

    guided = pred(none) + sum_k scale_k * (pred(c_1..c_k) - pred(c_1..c_k-1))

With one weight for all the sum telescopes to the single-scale formula above, so a chain of equal weights *is*
plain guidance (and is computed as such: consecutive conditions of equal weight are merged into one step before
anything runs). It costs a pass per step plus the null pass, all in one batched call. The chain is chosen over
the independent composition (Liu et al. 2022, ``pred(none) + sum_k scale_k (pred(c_k) - pred(none))``) for that
reason: equal weights there give a different, over-counted result whenever conditions are correlated (a label
map already says which classes are present).

All objectives are affine in the prediction for a fixed x_t, with weights that sum to one in the combinations
above, so the guided result is the same whether it is combined on eps, x0 or v; we combine on the model's own
output and only change space where it matters, for the rescale.

Rescale (Lin et al. 2023, sec. 3.4): large scales inflate the per-sample standard deviation of the prediction
("over-exposure"). The guided prediction is scaled to the conditional prediction's std and blended:

    guided_x0 = rescale * guided_x0 * std(cond_x0) / std(guided_x0) + (1 - rescale) * guided_x0

We do this on the **x0 prediction** (std over C, H, W per sample): x0 is the image, whose brightness and contrast
the rescale is meant to keep, and the statistic then means the same thing whatever objective the model was
trained with. (The paper's v-prediction gives v ~ -x0 at high noise, so the two agree where it matters most.)
The study used rescale 0.7.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .objectives import check_objective, from_x0_eps, to_x0_eps
from .schedules import NoiseSchedule

#: denoise(x_t float32 [B,C,H,W], t float32 [B] timestep indices, cond {name: [B, ...]}) -> prediction [B,C,H,W]
Denoise = Callable[[np.ndarray, np.ndarray, Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings for :func:`emserve.diffusion.sample`.

    Attributes:
        null_cond: the "no condition" inputs, same keys as the sampling cond; each array has leading dim B or 1
            (1 is repeated for every sample). Built by the caller, who knows the model's null conventions.
        scale: guidance scale w (1 = conditional, 0 = unconditional), or a chain of weights per condition:
            (condition names, weight) steps in order, every condition in exactly one step.
        rescale: guidance rescale phi in [0, 1]; 0 = plain CFG.
    """

    null_cond: Mapping[str, np.ndarray] = field(default_factory=dict)
    scale: float | Sequence[tuple[Sequence[str], float]] = 1.0
    rescale: float = 0.0


def _null_batch(cond: Mapping[str, np.ndarray], null_cond: Mapping[str, np.ndarray], batch: int) -> dict:
    """Null conditions matched to ``cond``: same keys, batch size and dtype kind."""
    if set(cond) != set(null_cond):
        raise ValueError(
            f"null_cond: keys {sorted(null_cond)} must equal the cond keys {sorted(cond)} "
            "(every condition needs its null value)"
        )
    out = {}
    for key, value in cond.items():
        value = np.asarray(value)
        null = np.asarray(null_cond[key])
        if null.shape[1:] != value.shape[1:] or null.shape[0] not in (1, batch):
            raise ValueError(
                f"null_cond[{key!r}]: got shape {null.shape}; allowed: {(batch, *value.shape[1:])} "
                f"or {(1, *value.shape[1:])}"
            )
        if not np.can_cast(null.dtype, value.dtype, casting="same_kind"):
            raise ValueError(f"null_cond[{key!r}]: dtype {null.dtype} cannot stand in for cond dtype {value.dtype}")
        out[key] = np.broadcast_to(null, value.shape).astype(value.dtype)
    return out


def guidance_chain(scale: float | Sequence[tuple[Sequence[str], float]],
                   keys: Sequence[str]) -> list[tuple[tuple[str, ...], float]]:
    """The chain of (conditions added, weight) steps that ``scale`` means for conditions ``keys``: one step of
    all of them for a single scale; consecutive steps of equal weight merged (the same result, one pass fewer)."""
    if isinstance(scale, int | float | np.floating | np.integer):
        steps = [(tuple(keys), float(scale))]
    else:
        steps = [(tuple(names), float(weight)) for names, weight in scale]
        named = [name for names, _ in steps for name in names]
        if sorted(named) != sorted(keys) or len(set(named)) != len(named):
            raise ValueError(f"guidance scale: the chain names {named}; allowed: each of the conditions "
                             f"{sorted(keys)} exactly once")
    for _, weight in steps:
        if not np.isfinite(weight):
            raise ValueError(f"guidance scale: got {weight!r}; allowed: a finite number (1 = conditional, 0 = none)")
    merged: list[tuple[tuple[str, ...], float]] = []
    for names, weight in steps:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + names, weight)
        else:
            merged.append((names, weight))
    return merged


def _per_sample_std(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).std(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def rescale_guided(guided_x0: np.ndarray, cond_x0: np.ndarray, rescale: float) -> np.ndarray:
    """Lin et al.'s guidance rescale on x0 predictions [B, ...]: blend toward the conditional per-sample std."""
    if rescale == 0.0:
        return guided_x0
    std_cond = _per_sample_std(cond_x0)
    std_guided = np.maximum(_per_sample_std(guided_x0), 1e-12)  # a constant image has nothing to rescale
    factor = rescale * (std_cond / std_guided) + (1.0 - rescale)
    return guided_x0 * factor


def classifier_free_guidance(
    denoise: Denoise,
    null_cond: Mapping[str, np.ndarray],
    scale: float | Sequence[tuple[Sequence[str], float]],
    rescale: float = 0.0,
    *,
    schedule: NoiseSchedule | None = None,
    objective: str | None = None,
) -> Denoise:
    """Wrap ``denoise`` so that it returns the guided prediction (in the model's own objective).

    The passes (unconditional, then each step of the chain; for one scale: conditional and unconditional) go
    through the inner ``denoise`` in **one** call with batch (steps + 1) x B (x, t and each cond array
    concatenated along axis 0), so an exported network runs one larger batch instead of several. A single
    ``scale == 1`` or ``scale == 0`` skips the other pass entirely: the result is then exactly the conditional (or
    unconditional) prediction, at half the cost.

    ``schedule`` and ``objective`` are needed only when ``rescale > 0``, to express the prediction as x0.
    """
    rescale = float(rescale)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale: got {rescale!r}; allowed: a number in [0, 1]")
    if rescale > 0.0:
        if schedule is None or objective is None:
            raise ValueError("guidance rescale > 0 needs the schedule and objective to compute x0 predictions")
        check_objective(objective)
    guidance_chain(scale, sorted(null_cond))  # a bad scale fails here, before sampling starts

    def guided(x_t: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = x_t.shape[0]
        null = _null_batch(cond, null_cond, batch)
        chain = guidance_chain(scale, list(cond))
        if len(chain) == 1 and chain[0][1] in (0.0, 1.0):
            return np.asarray(denoise(x_t, t, cond if chain[0][1] == 1.0 else null), dtype=np.float32)

        given, passes = set(), [null]  # conditions given so far; the inputs of each pass, null first
        for names, _ in chain:
            given |= set(names)
            passes.append({key: cond[key] if key in given else null[key] for key in cond})
        if len(chain) == 1:
            passes = passes[::-1]  # conditional first, as before chains existed: the same batch, the same numbers
        stacked = {key: np.concatenate([np.asarray(p[key]) for p in passes], axis=0) for key in cond}
        out = np.asarray(denoise(np.concatenate([x_t] * len(passes)), np.concatenate([t] * len(passes)), stacked),
                         dtype=np.float64)
        preds = [out[i * batch: (i + 1) * batch] for i in range(len(passes))]
        if len(chain) == 1:
            preds = preds[::-1]
        pred = preds[0]
        for k, (_, weight) in enumerate(chain, start=1):
            pred = pred + weight * (preds[k] - preds[k - 1])
        pred_cond = preds[-1]
        if rescale > 0.0:
            assert schedule is not None and objective is not None
            alpha_bar = schedule.alpha_bar(np.rint(t).astype(np.int64))
            x0_cond, _ = to_x0_eps(objective, pred_cond, x_t, alpha_bar)
            x0, _ = to_x0_eps(objective, pred, x_t, alpha_bar)
            x0 = rescale_guided(x0, x0_cond, rescale)
            _, eps = to_x0_eps("x0", x0, x_t, alpha_bar)  # the eps that goes with the rescaled x0 at this x_t
            pred = from_x0_eps(objective, x0, eps, alpha_bar)
        return pred.astype(np.float32)

    return guided

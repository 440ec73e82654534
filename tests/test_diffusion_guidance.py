"""Classifier-free guidance of emserve.diffusion: one batched call, exact ends (scale 0 / 1), rescale."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from emserve.diffusion import (
    OBJECTIVES,
    Guidance,
    classifier_free_guidance,
    make_schedule,
    sample,
    to_x0_eps,
)

B = 3
PATTERN = np.random.default_rng(0).standard_normal((2, 8, 8)).astype(np.float32)
COND = {
    "classes": np.array([[1, 1, -1], [1, 0, 0], [-1, 1, 1]], dtype=np.float32),
    "dataset": np.array([0, 1, 2], dtype=np.int64),
}
NULL = {"classes": np.zeros((1, 3), np.float32), "dataset": np.array([-1], dtype=np.int64)}


class ToyModel:
    """A conditional 'network': the condition sets the strength of a fixed pattern. Records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []

    def __call__(self, x_t: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        self.calls.append((x_t.copy(), t.copy(), {k: np.array(v) for k, v in cond.items()}))
        gain = 0.5 + np.abs(cond["classes"]).sum(axis=1) + 0.1 * (cond["dataset"] >= 0)
        return (0.3 * x_t + gain[:, None, None, None] * PATTERN + 1e-4 * t[:, None, None, None]).astype(np.float32)


def inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, 2, 8, 8)).astype(np.float32), np.array([999, 500, 20], dtype=np.float32)


def null_batch() -> dict[str, np.ndarray]:
    return {k: np.repeat(v, B, axis=0) for k, v in NULL.items()}


def test_scale_one_is_exactly_the_conditional_prediction() -> None:
    model = ToyModel()
    x, t = inputs()
    guided = classifier_free_guidance(model, NULL, scale=1.0, rescale=0.7, schedule=make_schedule("linear", 1000),
                                      objective="v")(x, t, COND)  # fmt: skip
    np.testing.assert_array_equal(guided, ToyModel()(x, t, COND))
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == B  # no wasted unconditional half


def test_scale_zero_is_exactly_the_unconditional_prediction() -> None:
    model = ToyModel()
    x, t = inputs()
    guided = classifier_free_guidance(model, NULL, scale=0.0)(x, t, COND)
    np.testing.assert_array_equal(guided, ToyModel()(x, t, null_batch()))


def test_guidance_evaluates_both_halves_in_one_call() -> None:
    model = ToyModel()
    x, t = inputs()
    guided = classifier_free_guidance(model, NULL, scale=6.0)(x, t, COND)
    assert len(model.calls) == 1
    x_in, t_in, cond_in = model.calls[0]
    np.testing.assert_array_equal(x_in, np.concatenate([x, x]))
    np.testing.assert_array_equal(t_in, np.concatenate([t, t]))
    for key in COND:
        np.testing.assert_array_equal(cond_in[key], np.concatenate([COND[key], null_batch()[key]]))
        assert cond_in[key].dtype == COND[key].dtype
    conditional, unconditional = ToyModel()(x, t, COND), ToyModel()(x, t, null_batch())
    np.testing.assert_allclose(guided, unconditional + 6.0 * (conditional - unconditional), rtol=1e-6, atol=1e-5)


def test_rescale_zero_is_plain_guidance() -> None:
    x, t = inputs()
    schedule = make_schedule("cosine", 1000)
    plain = classifier_free_guidance(ToyModel(), NULL, scale=4.0)(x, t, COND)
    rescaled = classifier_free_guidance(ToyModel(), NULL, scale=4.0, rescale=0.0, schedule=schedule,
                                        objective="eps")(x, t, COND)  # fmt: skip
    np.testing.assert_array_equal(plain, rescaled)


def test_guidance_is_the_same_in_every_objective_space() -> None:
    """Why we may combine on the raw output: the conversions are affine with the same x_t for both halves."""
    x, t = inputs()
    schedule = make_schedule("linear", 1000)
    alpha_bar = schedule.alphas_cumprod[t.astype(int)]
    guided_eps = classifier_free_guidance(ToyModel(), NULL, scale=5.0)(x, t, COND)
    x0_c, _ = to_x0_eps("eps", ToyModel()(x, t, COND), x, alpha_bar)
    x0_u, _ = to_x0_eps("eps", ToyModel()(x, t, null_batch()), x, alpha_bar)
    x0_guided, _ = to_x0_eps("eps", guided_eps, x, alpha_bar)
    np.testing.assert_allclose(x0_guided, x0_u + 5.0 * (x0_c - x0_u), rtol=1e-4, atol=1e-3)


def _std(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).std(axis=1)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rescale_pulls_the_x0_std_toward_the_conditional_one(objective: str) -> None:
    x, t = inputs()
    schedule = make_schedule("linear", 1000)
    alpha_bar = schedule.alphas_cumprod[t.astype(int)]

    def x0_of(prediction: np.ndarray) -> np.ndarray:
        return to_x0_eps(objective, prediction, x, alpha_bar)[0]

    def guided(rescale: float) -> np.ndarray:
        wrapper = classifier_free_guidance(ToyModel(), NULL, 6.0, rescale, schedule=schedule, objective=objective)
        return x0_of(wrapper(x, t, COND))

    std_cond = _std(x0_of(ToyModel()(x, t, COND)))
    std_cfg = _std(guided(0.0))
    assert np.all(std_cfg > 1.5 * std_cond)  # guidance inflated the std: there is something to rescale
    np.testing.assert_allclose(_std(guided(1.0)), std_cond, rtol=1e-4)
    # Lin et al.: phi * rescaled + (1 - phi) * plain, with a positive factor, so the std blends linearly
    np.testing.assert_allclose(_std(guided(0.7)), 0.7 * std_cond + 0.3 * std_cfg, rtol=1e-4)
    # the mean direction is kept: rescale only multiplies the x0 prediction per sample
    ratio = guided(1.0) / guided(0.0)
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1, :1], ratio.shape), rtol=1e-3)


def test_null_condition_mismatch_and_bad_settings_are_rejected() -> None:
    x, t = inputs()
    with pytest.raises(ValueError, match=r"null_cond: keys \['classes'\] must equal the cond keys "
                                         r"\['classes', 'dataset'\]"):
        classifier_free_guidance(ToyModel(), {"classes": NULL["classes"]}, scale=2.0)(x, t, COND)
    with pytest.raises(ValueError, match=r"null_cond\['classes'\]"):
        classifier_free_guidance(ToyModel(), {**NULL, "classes": np.zeros((2, 3), np.float32)}, 2.0)(x, t, COND)
    with pytest.raises(ValueError, match=r"null_cond\['dataset'\]: dtype float64 cannot stand in for cond dtype int64"):
        classifier_free_guidance(ToyModel(), {**NULL, "dataset": np.array([-1.5])}, 2.0)(x, t, COND)
    with pytest.raises(ValueError, match=r"rescale.*\[0, 1\]"):
        classifier_free_guidance(ToyModel(), NULL, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="schedule and objective"):
        classifier_free_guidance(ToyModel(), NULL, 2.0, rescale=0.7)
    with pytest.raises(ValueError, match=r"guidance scale: got nan; allowed: a finite number"):
        classifier_free_guidance(ToyModel(), NULL, float("nan"))


def test_sampling_with_guidance_calls_the_model_once_per_step_with_double_batch() -> None:
    schedule = make_schedule("cosine", 1000)
    model = ToyModel()
    guidance = Guidance(null_cond=NULL, scale=6.0, rescale=0.7)
    out = sample(model, schedule, "v", (2, 8, 8), [4, 5, 6], COND, sampler="dpmpp_2m", steps=9, guidance=guidance)
    assert out.shape == (B, 2, 8, 8) and np.all(np.isfinite(out))
    assert len(model.calls) == 9
    assert all(x_in.shape[0] == 2 * B and t_in.shape == (2 * B,) for x_in, t_in, _ in model.calls)


def test_sampling_with_scale_one_equals_sampling_without_guidance() -> None:
    schedule = make_schedule("sigmoid", 1000)
    plain = sample(ToyModel(), schedule, "x0", (2, 8, 8), [1, 2, 3], COND, steps=8)
    guided = sample(ToyModel(), schedule, "x0", (2, 8, 8), [1, 2, 3], COND, steps=8,
                    guidance=Guidance(null_cond=NULL, scale=1.0, rescale=0.7))  # fmt: skip
    np.testing.assert_array_equal(plain, guided)


class InteractingModel:
    """Like ToyModel, but the dataset condition also changes what the classes do: a chain and an independent
    composition of per-condition weights then differ, so the test below can tell which one is computed."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x_t: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        self.batches.append(len(x_t))
        classes, known = np.abs(cond["classes"]).sum(axis=1), cond["dataset"] >= 0
        gain = 0.5 + classes + 0.1 * known + 0.7 * classes * known
        return (0.3 * x_t + gain[:, None, None, None] * PATTERN).astype(np.float32)


def test_weights_per_condition_follow_the_chain_formula_in_one_batched_call() -> None:
    x, t = inputs()
    model = InteractingModel()
    chain = [(("classes",), 3.0), (("dataset",), 1.5)]
    guided = classifier_free_guidance(model, NULL, chain)(x, t, COND)
    null = null_batch()
    none = InteractingModel()(x, t, null)
    classes = InteractingModel()(x, t, {**null, "classes": COND["classes"]})
    both = InteractingModel()(x, t, COND)
    expected = none.astype(np.float64) + 3.0 * (classes - none) + 1.5 * (both - classes)
    np.testing.assert_allclose(guided, expected, rtol=1e-6, atol=1e-6)
    assert model.batches == [3 * B]  # the null pass and one per step, together
    independent = none + 3.0 * (classes - none) + 1.5 * (InteractingModel()(x, t, {**null, "dataset": COND["dataset"]})
                                                         - none)
    assert not np.allclose(guided, independent, atol=1e-3)


def test_a_chain_of_equal_weights_is_plain_guidance_to_the_bit() -> None:
    x, t = inputs()
    plain = classifier_free_guidance(ToyModel(), NULL, 2.5, 0.7, schedule=make_schedule("linear", 1000),
                                     objective="v")(x, t, COND)
    model = ToyModel()
    chained = classifier_free_guidance(model, NULL, [(("dataset",), 2.5), (("classes",), 2.5)], 0.7,
                                       schedule=make_schedule("linear", 1000), objective="v")(x, t, COND)
    np.testing.assert_array_equal(chained, plain)
    assert len(model.calls) == 1 and len(model.calls[0][0]) == 2 * B  # merged into one step: two passes


@pytest.mark.parametrize(("chain", "message"), [
    ([(("classes",), 2.0)], r"the chain names \['classes'\]; allowed: each of the conditions \['classes', 'dataset'\]"),
    ([(("classes", "dataset"), 2.0), (("dataset",), 1.0)], "exactly once"),
    ([(("classes",), 2.0), (("dataset",), float("nan"))], "got nan; allowed: a finite number"),
])
def test_a_chain_that_misses_repeats_or_breaks_a_condition_is_refused(chain, message) -> None:
    with pytest.raises(ValueError, match=message):
        classifier_free_guidance(ToyModel(), NULL, chain)

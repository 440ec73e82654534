"""Noise schedules and objectives of emserve.diffusion (samplers and guidance have their own test files)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from emserve.diffusion import (
    OBJECTIVES,
    SCHEDULES,
    NoiseSchedule,
    convert,
    from_x0_eps,
    make_schedule,
    to_x0_eps,
    training_target,
)

# --- schedules ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("num_steps", [2, 10, 1000])
def test_schedule_is_monotone_inside_unit_interval(name: str, num_steps: int) -> None:
    schedule = make_schedule(name, num_steps)
    ab = schedule.alphas_cumprod
    assert schedule.name == name
    assert schedule.num_steps == num_steps
    assert ab.dtype == np.float64 and ab.shape == (num_steps,)
    assert np.all(ab > 0.0) and np.all(ab < 1.0)
    assert np.all(np.diff(ab) < 0.0)
    betas = schedule.betas
    assert np.all(betas > 0.0) and np.all(betas <= 0.999 + 1e-12)
    np.testing.assert_allclose(np.cumprod(1.0 - betas), ab, rtol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_ends_near_pure_noise_and_starts_near_data(name: str) -> None:
    ab = make_schedule(name, 1000).alphas_cumprod
    assert ab[-1] < 1e-3  # the last training timestep is (almost) pure noise: sampling starts there
    assert ab[0] > 0.999


def test_linear_schedule_uses_ddpm_betas() -> None:
    betas = make_schedule("linear", 1000).betas
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4, 0.02], rtol=1e-9)
    assert np.allclose(np.diff(betas), np.diff(betas)[0])
    # other T: scaled by 1000 / T so the total noise stays comparable
    np.testing.assert_allclose(make_schedule("linear", 250).betas[[0, -1]], [4e-4, 0.08], rtol=1e-9)


def test_cosine_schedule_follows_the_squared_cosine() -> None:
    T, s = 1000, 0.008
    ab = make_schedule("cosine", T).alphas_cumprod
    for t in (0, 100, 500, 900):  # away from the clipped end, alpha_bar is the closed form at u = (t + 1) / T
        f = math.cos(((t + 1) / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
        assert ab[t] == pytest.approx(f, rel=1e-9)


def test_sigmoid_schedule_follows_the_sigmoid_curve() -> None:
    T = 1000

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    ab = make_schedule("sigmoid", T).alphas_cumprod
    for t in (0, 250, 500, 750):
        u = (t + 1) / T
        expected = (sig(3.0) - sig(6.0 * u - 3.0)) / (sig(3.0) - sig(-3.0))
        assert ab[t] == pytest.approx(expected, rel=1e-9)
    assert ab[499] == pytest.approx(0.5, abs=0.01)  # symmetric curve: half the signal variance at mid-schedule


@pytest.mark.parametrize("bad", ["cos", "Linear", "", "ddpm"])
def test_unknown_schedule_name_is_rejected_with_allowed_values(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        make_schedule(bad, 1000)
    message = str(info.value)
    assert repr(bad) in message
    for name in SCHEDULES:
        assert repr(name) in message


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, True, "1000"])
def test_bad_num_steps_is_rejected_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        make_schedule("linear", bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert "num_steps" in message and repr(bad) in message and ">= 2" in message


def test_schedule_array_is_read_only_and_validated() -> None:
    schedule = make_schedule("cosine", 100)
    with pytest.raises(ValueError):
        schedule.alphas_cumprod[0] = 0.5
    with pytest.raises(ValueError, match="decreasing"):
        NoiseSchedule("custom", np.array([0.9, 0.95, 0.1]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule("custom", np.array([1.0, 0.5, 0.1]))
    source = np.array([0.9, 0.5, 0.1])
    custom = NoiseSchedule("custom", source)
    source[0] = 0.0  # the schedule keeps its own copy
    assert custom.alphas_cumprod[0] == 0.9


def test_alpha_bar_of_minus_one_is_clean_data() -> None:
    schedule = make_schedule("linear", 1000)
    np.testing.assert_array_equal(schedule.alpha_bar(np.array([999, 0, -1])), [*schedule.alphas_cumprod[[999, 0]], 1.0])


@pytest.mark.parametrize("n", [1, 7, 20, 50, 333, 999, 1000])
def test_trailing_timesteps_start_at_last_step_and_are_evenly_spaced(n: int) -> None:
    T = 1000
    ts = make_schedule("linear", T).timesteps(n)
    assert ts.dtype == np.int64 and ts.shape == (n,)
    assert ts[0] == T - 1
    assert np.all(np.diff(ts) < 0) and ts[-1] >= 0
    gaps = -np.diff(ts)
    assert gaps.size == 0 or gaps.max() - gaps.min() <= 1  # as even as integers allow
    if T % n == 0:
        np.testing.assert_array_equal(ts, np.arange(T - 1, -1, -T // n))


def test_all_timesteps_is_the_full_chain() -> None:
    np.testing.assert_array_equal(make_schedule("cosine", 50).timesteps(50), np.arange(49, -1, -1))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("n", [1, 2, 5, 10, 25, 100, 999, 1000])
def test_karras_timesteps_run_from_pure_noise_to_the_data_and_crowd_at_low_noise(name: str, n: int) -> None:
    schedule = make_schedule(name, 1000)
    ts = schedule.timesteps(n, "karras")
    assert ts.dtype == np.int64 and ts.shape == (n,)
    assert ts[0] == 999 and np.all(np.diff(ts) < 0)
    assert ts[-1] == (0 if n > 1 else 999)
    if 5 <= n <= 100:  # more steps at low noise (sigma < 0.3, fine texture) than evenly spaced steps put there
        ab = schedule.alphas_cumprod
        low_noise = int(np.searchsorted(np.sqrt((1 - ab) / ab), 0.3))  # first timestep with sigma >= 0.3
        trailing = schedule.timesteps(n, "trailing")
        assert (ts < low_noise).sum() > (trailing < low_noise).sum()


def test_karras_timesteps_stay_distinct_when_rounding_collides() -> None:
    """With few training timesteps, neighbouring Karras levels round to the same timestep: each moves down one."""
    for n in range(1, 21):
        ts = make_schedule("cosine", 20).timesteps(n, "karras")
        assert len(set(ts.tolist())) == n and ts[0] == 19 and (n == 1 or ts[-1] == 0)


@pytest.mark.parametrize("n", [0, -1, 1001, 2.0])
def test_bad_number_of_sampling_steps_is_rejected(n: object) -> None:
    with pytest.raises(ValueError) as info:
        make_schedule("linear", 1000).timesteps(n)  # type: ignore[arg-type]
    assert f"steps: got {n!r}; allowed: an integer in [1, 1000]" in str(info.value)


# --- objectives --------------------------------------------------------------------------------------------------


def _random_state(seed: int = 0, batch: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1.0, 1.0, size=(batch, 2, 4, 4))
    eps = rng.standard_normal((batch, 2, 4, 4))
    alpha_bar = rng.uniform(0.01, 0.99, size=batch)
    a = np.sqrt(alpha_bar)[:, None, None, None]
    s = np.sqrt(1.0 - alpha_bar)[:, None, None, None]
    return x0, eps, alpha_bar, a * x0 + s * eps


def test_training_targets_follow_the_definitions() -> None:
    x0, eps, alpha_bar, _ = _random_state()
    a = np.sqrt(alpha_bar)[:, None, None, None]
    s = np.sqrt(1.0 - alpha_bar)[:, None, None, None]
    np.testing.assert_array_equal(training_target("eps", x0, eps, alpha_bar), eps)
    np.testing.assert_array_equal(training_target("x0", x0, eps, alpha_bar), x0)
    np.testing.assert_allclose(training_target("v", x0, eps, alpha_bar), a * eps - s * x0, rtol=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_prediction_of_the_target_recovers_x0_and_eps(objective: str) -> None:
    x0, eps, alpha_bar, x_t = _random_state(1)
    target = training_target(objective, x0, eps, alpha_bar)
    x0_hat, eps_hat = to_x0_eps(objective, target, x_t, alpha_bar)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-9)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-9)
    # and the pair reconstructs the noisy input
    a = np.sqrt(alpha_bar)[:, None, None, None]
    np.testing.assert_allclose(a * x0_hat + np.sqrt(1 - a**2) * eps_hat, x_t, atol=1e-12)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(OBJECTIVES, OBJECTIVES)))
def test_conversions_round_trip_for_every_pair(source: str, target: str) -> None:
    rng = np.random.default_rng(2)
    prediction = rng.standard_normal((4, 1, 3, 3))
    x_t = rng.standard_normal((4, 1, 3, 3))
    alpha_bar = rng.uniform(0.05, 0.95, size=4)
    there = convert(prediction, source, target, x_t, alpha_bar)
    back = convert(there, target, source, x_t, alpha_bar)
    np.testing.assert_allclose(back, prediction, atol=1e-10)
    # converting agrees with the (x0, eps) route
    x0, eps = to_x0_eps(source, prediction, x_t, alpha_bar)
    np.testing.assert_allclose(there, from_x0_eps(target, x0, eps, alpha_bar), atol=1e-12)


def test_scalar_alpha_bar_broadcasts_like_a_per_sample_one() -> None:
    x0, eps, _, _ = _random_state(3)
    ab = 0.3
    np.testing.assert_allclose(
        training_target("v", x0, eps, ab), training_target("v", x0, eps, np.full(x0.shape[0], ab)), rtol=0
    )


def test_x0_clipping_keeps_the_pair_consistent_with_x_t() -> None:
    rng = np.random.default_rng(4)
    x_t = 3.0 * rng.standard_normal((3, 1, 8, 8))
    alpha_bar = np.array([0.9, 0.5, 0.01])
    prediction = rng.standard_normal((3, 1, 8, 8))
    x0, eps = to_x0_eps("eps", prediction, x_t, alpha_bar, clip_x0=True)
    assert x0.min() >= -1.0 and x0.max() <= 1.0
    assert np.any(np.abs(to_x0_eps("eps", prediction, x_t, alpha_bar)[0]) > 1.0)  # clipping really happened
    a = np.sqrt(alpha_bar)[:, None, None, None]
    np.testing.assert_allclose(a * x0 + np.sqrt(1 - a**2) * eps, x_t, atol=1e-12)


def test_unknown_objective_is_rejected() -> None:
    x0, eps, alpha_bar, x_t = _random_state()
    for call in (
        lambda: training_target("epsilon", x0, eps, alpha_bar),
        lambda: to_x0_eps("epsilon", eps, x_t, alpha_bar),
        lambda: convert(eps, "eps", "epsilon", x_t, alpha_bar),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert "'epsilon'" in str(info.value) and all(repr(o) in str(info.value) for o in OBJECTIVES)

"""Tests for pipeline.kdiffusion: k-diffusion's sampler loops as A1111 drives them (§8.3, §8.5, §9).

The model is an analytic denoiser: for data N(μ, s²) the exact denoiser is
D(x; σ) = (x·s² + μ·σ²)/(σ² + s²), and the probability-flow ODE from x_T at σ_max has the
closed form x(σ) = μ + (x_T − μ)·√(s² + σ²)/√(s² + σ_max²). With s = 0 the data is a single
point and every sampler that ends at σ = 0 must land on μ exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from pipeline import kdiffusion, kdiffusion_dpm, kdiffusion_restart
from pipeline.kdiffusion import SAMPLERS, BrownianNoiseSampler, get_ancestral_step
from pipeline.rng import ImageRNG
from pipeline.samplers import list_samplers, sigma_schedule
from pipeline.sampling import SamplingContext

MU = 0.3
S = 0.5
SHAPE = (2, 4, 8, 8)
SIGMA_MIN = 0.0291675

BROWNIAN = ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")
ENDS_ABOVE_ZERO = ("DPM fast", "DPM adaptive")  # they stop at σ_min
TIMESTEP_SAMPLERS = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")


def gaussian_denoiser(
    mu: float | torch.Tensor, s: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
        return (x * s**2 + mu * s2) / (s2 + s**2)

    return model


@dataclass
class Run:
    out: torch.Tensor
    x_start: torch.Tensor
    sigmas: torch.Tensor
    model_sigmas: list[torch.Tensor] = field(default_factory=list)
    draws: int = 0
    steps: list[tuple[int, int]] = field(default_factory=list)


def run(
    name: str,
    steps: int = 10,
    schedule: str = "Automatic",
    *,
    shape: tuple[int, ...] = SHAPE,
    mu: float | torch.Tensor = MU,
    s: float = S,
    eta: float | None = None,
    extra: dict[str, object] | None = None,
    seeds: list[int] | None = None,
    seed: int = 0,
    sigmas: torch.Tensor | None = None,
    solver_type: str | None = None,
) -> Run:
    """Run one sampler over an analytic model, recording model calls, noise draws and steps."""
    gen = torch.Generator().manual_seed(seed)
    if sigmas is None:
        sigmas = sigma_schedule(name, schedule, steps).sigmas
    if name in ENDS_ABOVE_ZERO and int((sigmas > 0).sum()) < 2:
        # A schedule with one non-zero σ has no σ range; A1111's txt2img passes the model's.
        extra = {"sigma_min": SIGMA_MIN, **(extra or {})}
    x_start = torch.randn(shape, generator=gen) * sigmas[0]
    denoiser = gaussian_denoiser(mu, s)
    result = Run(out=x_start, x_start=x_start, sigmas=sigmas)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        result.model_sigmas.append(sigma.clone())
        return denoiser(x, sigma)

    def noise() -> torch.Tensor:
        result.draws += 1
        return torch.randn(shape, generator=gen)

    ctx = SamplingContext(
        model=model,
        noise=noise,
        seeds=seeds if seeds is not None else list(range(100, 100 + shape[0])),
        eta=eta,
        solver_type=solver_type,
        callback=lambda i, total: result.steps.append((i, total)),
        extra=dict(extra or {}),
    )
    result.out = SAMPLERS[name](x_start.clone(), sigmas, ctx)
    return result


def ode_solution(x_start: torch.Tensor, sigma_max: float, sigma_end: float, mu: float = MU, s: float = S):
    return mu + (x_start - mu) * math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_max**2)


# --------------------------------------------------------------------------------------
# Registry


def test_registry_has_every_k_diffusion_sampler_and_lcm_by_a1111_name() -> None:
    expected = [info.name for info in list_samplers() if info.name not in TIMESTEP_SAMPLERS]
    assert list(SAMPLERS) == expected
    assert len(SAMPLERS) == 16
    assert all(callable(fn) for fn in SAMPLERS.values())


# --------------------------------------------------------------------------------------
# Convergence on analytic data


@pytest.mark.parametrize("schedule", ["Uniform", "Karras"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_single_point_data_is_reached(name: str, schedule: str) -> None:
    mu = torch.tensor([0.5, -0.3, 0.1, 0.9]).view(1, 4, 1, 1)
    result = run(name, 12, schedule, mu=mu, s=0.0)
    target = mu.expand_as(result.out)
    if name in ENDS_ABOVE_ZERO:
        # They stop at σ_min: what is left is at most a few σ_min of (ancestral) noise.
        assert (result.out - target).abs().max() < 6 * SIGMA_MIN
    else:
        torch.testing.assert_close(result.out, target, rtol=0, atol=1e-5)


# Max abs error against the closed-form ODE solution at 30 steps (Uniform, Karras): about
# twice what the algorithms give. The Uniform schedule is coarse at low σ, hence its larger
# errors for samplers whose last steps are long.
ODE_TOLERANCE = {
    "Euler": (0.35, 0.25),
    "Heun": (0.015, 0.02),
    "DPM2": (0.25, 0.005),
    "LMS": (0.006, 0.008),
    "DPM++ 2M": (0.35, 0.02),
    "DPM++ 2M SDE": (0.35, 0.02),
    "DPM++ 2M SDE Heun": (0.5, 0.03),
    "DPM++ 3M SDE": (0.25, 0.01),
    "DPM++ SDE": (0.09, 0.02),
    "DPM fast": (0.002, 0.002),
    "DPM adaptive": (0.1, 0.1),
}


def _ode_error(name: str, steps: int, schedule: str) -> float:
    result = run(name, steps, schedule, eta=0.0)
    positive = result.sigmas[result.sigmas > 0]
    sigma_end = float(positive.min()) if name in ENDS_ABOVE_ZERO else 0.0
    exact = ode_solution(result.x_start, float(result.sigmas[0]), sigma_end)
    return float((result.out - exact).abs().max())


@pytest.mark.parametrize("schedule", ["Uniform", "Karras"])
@pytest.mark.parametrize("name", list(ODE_TOLERANCE))
def test_deterministic_samplers_follow_the_probability_flow_ode(name: str, schedule: str) -> None:
    """With η = 0 (where a sampler takes η) every sampler below solves the ODE."""
    tolerance = ODE_TOLERANCE[name][0 if schedule == "Uniform" else 1]
    assert _ode_error(name, 30, schedule) < tolerance


@pytest.mark.parametrize(
    ("name", "factor"),
    [
        ("Euler", 3),
        ("Heun", 8),
        ("DPM2", 8),
        ("LMS", 8),
        ("DPM++ 2M", 8),
        ("DPM++ SDE", 8),
        ("DPM++ 3M SDE", 8),
    ],
)
def test_ode_error_shrinks_with_the_sampler_order(name: str, factor: float) -> None:
    """4x the steps: a first-order sampler's error drops about 4x, higher orders far more."""
    assert _ode_error(name, 10, "Karras") > factor * _ode_error(name, 40, "Karras")


STOCHASTIC = (
    "Euler a",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "DPM fast",
    "DPM adaptive",
    "Restart",
)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_reproduce_the_data_distribution(name: str) -> None:
    """At η = 1 the samples must be distributed as N(μ, s²) (4096 values per run)."""
    result = run(name, 40, "Karras", shape=(4, 4, 16, 16), seeds=[1, 2, 3, 4])
    assert abs(float(result.out.mean()) - MU) < 0.03
    assert abs(float(result.out.std()) - S) < 0.06
    # Not simply the ODE solution: the noise changed the path.
    exact = ode_solution(result.x_start, float(result.sigmas[0]), 0.0)
    assert (result.out - exact).abs().max() > 0.5


def test_lcm_returns_posterior_means_of_the_last_noisy_sample() -> None:
    """LCM jumps to D(x; σ) each step: with the exact denoiser the spread shrinks to s²/√(s²+σ²)."""
    result = run("LCM", 8, "Automatic", shape=(4, 4, 16, 16))
    assert abs(float(result.out.mean()) - MU) < 0.03
    assert float(result.out.std()) < S


# --------------------------------------------------------------------------------------
# Model calls, noise draws and progress


def _expected_calls(name: str, n: int) -> int:
    second_order = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}
    return 2 * n - 1 if name in second_order else n


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "DPM adaptive"])
def test_model_call_counts(name: str, steps: int) -> None:
    result = run(name, steps, "Karras")
    assert len(result.sigmas) - 1 == steps
    assert len(result.model_sigmas) == _expected_calls(name, steps)


@pytest.mark.parametrize("steps", [20, 40])
def test_restart_calls_two_per_heun_step_at_any_length(steps: int) -> None:
    assert len(run("Restart", steps, "Karras").model_sigmas) == 2 * steps - 1


def test_second_order_samplers_call_twice_on_a_last_step_that_ends_above_zero() -> None:
    """KL Optimal has no trailing 0 (§9.2), so there is no Euler step at the end."""
    sigmas = sigma_schedule("Heun", "KL Optimal", 5).sigmas
    assert float(sigmas[-1]) > 0
    assert len(run("Heun", sigmas=sigmas).model_sigmas) == 10
    assert len(run("DPM++ 2M", sigmas=sigmas).model_sigmas) == 5


def test_model_sigmas_of_heun_and_dpm2() -> None:
    heun = run("Heun", 3, "Karras")
    s = heun.sigmas
    assert [float(v[0]) for v in heun.model_sigmas] == pytest.approx(
        [float(s[0]), float(s[1]), float(s[1]), float(s[2]), float(s[2])]
    )
    dpm2 = run("DPM2", 3, "Karras")
    s = dpm2.sigmas
    mids = [math.sqrt(float(s[i]) * float(s[i + 1])) for i in range(2)]  # log-space midpoints
    assert [float(v[0]) for v in dpm2.model_sigmas] == pytest.approx(
        [float(s[0]), mids[0], float(s[1]), mids[1], float(s[2])], rel=1e-5
    )


def test_dpm_adaptive_calls_in_whole_attempts() -> None:
    third = run("DPM adaptive", 10)
    assert len(third.model_sigmas) % 3 == 0 and len(third.model_sigmas) >= 3
    second = run("DPM adaptive", 10, extra={"order": 2})
    assert len(second.model_sigmas) % 2 == 0
    # Adaptive: the request's step count plays no part.
    assert len(run("DPM adaptive", 30).model_sigmas) == len(third.model_sigmas)


def test_dpm_fast_spends_exactly_n_calls_from_sigma_max_to_sigma_min() -> None:
    for n in (1, 2, 3, 4, 5, 6, 10, 20):
        result = run("DPM fast", n)
        assert len(result.model_sigmas) == n
        assert float(result.model_sigmas[0][0]) == pytest.approx(float(result.sigmas[0]), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Euler a", lambda n: n - 1),  # none after the step to σ = 0
        ("DPM++ 2S a", lambda n: n - 1),
        ("LCM", lambda n: n - 1),
        ("DPM2 a", lambda n: n - 1),  # none on the final step to σ = 0 (σ_down = 0)
        ("DPM fast", lambda n: len(kdiffusion_dpm._fast_orders(n))),  # after every solver step
        ("Euler", lambda n: n),  # one at the start of every step, churn or not
        ("Heun", lambda n: n),
        ("DPM2", lambda n: n),
        ("LMS", lambda n: 0),
        ("DPM++ 2M", lambda n: 0),
        ("Restart", lambda n: 0),  # below 20 steps it is plain Heun
    ],
)
@pytest.mark.parametrize("steps", [1, 6, 11])
def test_noise_draw_counts(name: str, expected: Callable[[int], int], steps: int) -> None:
    assert run(name, steps, "Karras").draws == expected(steps)


def test_ancestral_samplers_draw_even_at_eta_zero() -> None:
    """The draw happens whatever σ_up is, so η does not shift the noise stream."""
    assert run("Euler a", 8, eta=0.0).draws == 7
    assert run("DPM2 a", 8, "Karras", eta=0.0).draws == 7
    assert run("DPM fast", 8, eta=0.0).draws == len(kdiffusion_dpm._fast_orders(8))


def test_euler_a_draws_on_the_last_step_when_the_schedule_ends_above_zero() -> None:
    sigmas = sigma_schedule("Euler a", "KL Optimal", 6).sigmas
    assert run("Euler a", sigmas=sigmas).draws == 6


@pytest.mark.parametrize("steps", [20, 35, 36, 50])
def test_restart_draws_once_per_restart(steps: int) -> None:
    assert run("Restart", steps, "Karras").draws == (1 if steps < 36 else 2)


def test_dpm_adaptive_draws_once_per_accepted_step() -> None:
    result = run("DPM adaptive", 10)
    assert 1 <= result.draws <= len(result.model_sigmas) // 3
    assert run("DPM adaptive", 10, eta=0.0).draws >= 1


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_adds_noise_and_raises_sigma(name: str) -> None:
    steps = 6
    extra = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}
    result = run(name, steps, "Karras", extra=extra)
    sigmas = result.sigmas[:-1]
    in_range = [0.5 <= float(s) <= 10.0 for s in sigmas]
    assert result.draws == steps  # drawn every step, added only where churned
    gamma = min(1.0 / steps, 2**0.5 - 1)
    first_calls = result.model_sigmas[:: 1 if name == "Euler" else 2]
    for sigma, churned, call in zip(sigmas, in_range, first_calls, strict=False):
        expected = float(sigma) * (1 + gamma) if churned else float(sigma)
        assert float(call[0]) == pytest.approx(expected, rel=1e-6)
    assert not torch.equal(result.out, run(name, steps, "Karras").out)


def test_churn_zero_is_deterministic_whatever_it_draws() -> None:
    result = run("Euler", 6, extra={"s_churn": 0.0, "s_noise": 2.0})
    assert result.draws == 6
    # churn 0 and no churn run different branches of the loop: compared with a tolerance
    torch.testing.assert_close(result.out, run("Euler", 6).out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_progress_is_reported_once_per_sampler_step(name: str) -> None:
    steps = 7
    result = run(name, steps, "Karras")
    if name == "DPM adaptive":
        attempts = len(result.model_sigmas) // 3
        assert [i for i, _ in result.steps] == list(range(attempts))
        assert all(total > i for i, total in result.steps)
        assert result.steps[-1][1] == attempts
    elif name == "DPM fast":
        total = len(kdiffusion_dpm._fast_orders(steps))
        assert result.steps == [(i, total) for i in range(total)]
    else:
        assert result.steps == [(i, steps) for i in range(steps)]


def test_restart_progress_counts_the_restart_steps_too() -> None:
    result = run("Restart", 24, "Karras")
    assert result.steps == [(i, 24) for i in range(24)]


# --------------------------------------------------------------------------------------
# Specific algorithm details


def test_get_ancestral_step() -> None:
    down, up = get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), 1.0)
    assert float(up) == pytest.approx(math.sqrt(1.0 * (4.0 - 1.0) / 4.0))
    assert float(down) ** 2 + float(up) ** 2 == pytest.approx(1.0)
    down, up = get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), 0.0)
    assert float(down) == 1.0 and up == 0.0
    down, up = get_ancestral_step(torch.tensor(2.0), torch.tensor(0.0), 1.0)
    assert float(down) == 0.0 and float(up) == 0.0
    # σ_up never exceeds σ_to, even for large η.
    down, up = get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), 10.0)
    assert float(up) == 1.0 and float(down) == 0.0


def test_lms_coefficients_integrate_the_lagrange_basis() -> None:
    t = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]).numpy()
    assert kdiffusion._lms_coefficient(1, t, 0, 0) == pytest.approx(-4.0)
    # Order 2 at step 1 (nodes 6 and 10, interval [6, 3]).
    c0 = kdiffusion._lms_coefficient(2, t, 1, 0)
    c1 = kdiffusion._lms_coefficient(2, t, 1, 1)
    assert c0 + c1 == pytest.approx(3.0 - 6.0)  # the basis sums to 1
    assert c1 == pytest.approx(((3 - 6) ** 2 / 2) / (10 - 6))  # ∫(τ−6)/(10−6) dτ over [6, 3]
    with pytest.raises(ValueError, match="too high"):
        kdiffusion._lms_coefficient(3, t, 1, 0)


def test_lms_order_is_read_from_extra() -> None:
    base = run("LMS", 10)
    first_order = run("LMS", 10, extra={"order": 1})
    euler = run("Euler", 10)
    torch.testing.assert_close(first_order.out, euler.out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.out, euler.out, atol=1e-3)


def test_dpmpp_2m_last_step_is_the_denoised_prediction() -> None:
    outputs: list[torch.Tensor] = []
    denoiser = gaussian_denoiser(MU, S)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        outputs.append(denoiser(x, sigma))
        return outputs[-1]

    sigmas = sigma_schedule("DPM++ 2M", "Karras", 5).sigmas
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    out = SAMPLERS["DPM++ 2M"](x, sigmas, SamplingContext(model=model, noise=lambda: torch.zeros_like(x)))
    assert torch.equal(out, outputs[-1])
    for name in ("DPM++ 2M SDE", "DPM++ 3M SDE"):
        outputs.clear()
        ctx = SamplingContext(model=model, seeds=[1, 2])
        out = SAMPLERS[name](x, sigma_schedule(name, "Karras", 5).sigmas, ctx)
        assert torch.equal(out, outputs[-1])


def test_eta_none_means_one() -> None:
    for name in ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ 2M SDE", "DPM fast"):
        torch.testing.assert_close(run(name, 6).out, run(name, 6, eta=1.0).out, rtol=0, atol=0)
        assert not torch.equal(run(name, 6).out, run(name, 6, eta=0.5).out)


def test_dpmpp_2m_sde_solver_types() -> None:
    midpoint = run("DPM++ 2M SDE", 8)
    heun_named = run("DPM++ 2M SDE Heun", 8)
    heun_by_ctx = run("DPM++ 2M SDE", 8, solver_type="heun")
    assert torch.equal(heun_named.out, heun_by_ctx.out)
    assert not torch.allclose(midpoint.out, heun_named.out)
    with pytest.raises(ValueError, match="solver_type"):
        run("DPM++ 2M SDE", 8, solver_type="euler")


def test_restart_plan_matches_the_default_restart_list() -> None:
    sigmas = sigma_schedule("Restart", "Karras", 10).sigmas
    assert [(float(a), float(b)) for a, b in kdiffusion_restart._restart_plan(sigmas)] == [
        (float(sigmas[i]), float(sigmas[i + 1])) for i in range(10)
    ]
    for steps, restart_steps, times in ((20, 9, 1), (36, 9, 2), (40, 10, 2)):
        sigmas = sigma_schedule("Restart", "Karras", steps).sigmas
        plan = kdiffusion_restart._restart_plan(sigmas)
        assert len(plan) == steps
        ups = [k for k in range(1, len(plan)) if float(plan[k][0]) > float(plan[k - 1][1])]
        assert len(ups) == times
        assert ups == [ups[0] + r * restart_steps for r in range(times)]
        for k in ups:
            # Each restart jumps from the main σ nearest 0.1 back up to the one nearest 2
            # and walks down again in restart_steps steps.
            assert float(plan[k - 1][1]) == pytest.approx(0.1, abs=0.05)
            assert float(plan[k][0]) == pytest.approx(2.0, rel=0.35)
            segment = plan[k : k + restart_steps]
            assert float(segment[-1][1]) == pytest.approx(float(plan[ups[0] - 1][1]), rel=1e-5)
        # Outside the restarts: Karras rebuilt with steps − restart_steps·times steps
        # between the given schedule's sigmas[-2] and sigmas[0].
        main = plan[: ups[0]] + plan[ups[0] + restart_steps * times :]
        rebuilt = kdiffusion_restart._karras(
            steps - restart_steps * times, float(sigmas[-2]), float(sigmas[0]), torch.device("cpu")
        )
        assert [float(a) for a, _ in main] + [float(main[-1][1])] == rebuilt.tolist()


# --------------------------------------------------------------------------------------
# Reproducibility and per-image noise


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seeds_same_result(name: str) -> None:
    a = run(name, 6, "Karras", seed=5, seeds=[11, 12])
    b = run(name, 6, "Karras", seed=5, seeds=[11, 12])
    assert torch.equal(a.out, b.out)


@pytest.mark.parametrize("name", BROWNIAN)
def test_brownian_noise_depends_on_the_seeds_only(name: str) -> None:
    a = run(name, 6, "Karras", seeds=[11, 12])
    b = run(name, 6, "Karras", seeds=[11, 13])
    assert torch.equal(a.out[0], b.out[0])
    assert not torch.allclose(a.out[1], b.out[1])


@pytest.mark.parametrize("name", BROWNIAN)
def test_brownian_samplers_are_independent_of_batch_composition(name: str) -> None:
    sigmas = sigma_schedule(name, "Automatic", 8).sigmas
    start = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(9)) * sigmas[0]
    model = gaussian_denoiser(MU, S)

    def never() -> torch.Tensor:
        raise AssertionError("Brownian samplers must not use the ImageRNG stream (no ENSD, §8.5)")

    batch = SAMPLERS[name](start, sigmas, SamplingContext(model=model, noise=never, seeds=[7, 8, 9]))
    for i, seed in enumerate([7, 8, 9]):
        solo = SAMPLERS[name](
            start[i : i + 1], sigmas, SamplingContext(model=model, noise=never, seeds=[seed])
        )
        torch.testing.assert_close(solo[0], batch[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a", "LCM", "Restart"])
def test_image_rng_noise_makes_ancestral_samplers_batch_independent(name: str) -> None:
    """With A1111's ImageRNG behind ctx.noise (§8.3), image i is the same alone or batched."""
    steps = 20 if name == "Restart" else 6
    sigmas = sigma_schedule(name, "Automatic", steps).sigmas
    model = gaussian_denoiser(MU, S)

    def sample(seeds: list[int]) -> torch.Tensor:
        image_rng = ImageRNG((4, 8, 8), seeds, source="CPU", ensd=31337)
        start = image_rng.next() * sigmas[0]
        return SAMPLERS[name](start, sigmas, SamplingContext(model=model, noise=image_rng.next, seeds=seeds))

    batch = sample([21, 22])
    torch.testing.assert_close(sample([22])[0], batch[1], rtol=0, atol=1e-6)


def test_brownian_sampler_needs_one_seed_per_image() -> None:
    with pytest.raises(ValueError, match="one seed per image"):
        run("DPM++ 2M SDE", 4, seeds=[1])


def test_brownian_increments_are_normalised_and_signed() -> None:
    x = torch.zeros((2, 4, 16, 16))
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.0])
    sampler = BrownianNoiseSampler(x, sigmas, [1, 2], "CPU")
    down = sampler(torch.tensor(5.0), torch.tensor(1.0))
    up = sampler(torch.tensor(1.0), torch.tensor(5.0))
    torch.testing.assert_close(down, -up)
    assert down.shape == x.shape
    assert abs(float(down.std()) - 1.0) < 0.1
    # Increments over disjoint intervals are independent; over one interval they add up.
    a = sampler(torch.tensor(10.0), torch.tensor(5.0)) * math.sqrt(5.0)
    b = sampler(torch.tensor(5.0), torch.tensor(1.0)) * math.sqrt(4.0)
    whole = sampler(torch.tensor(10.0), torch.tensor(1.0)) * math.sqrt(9.0)
    torch.testing.assert_close(a + b, whole, rtol=1e-4, atol=1e-4)


def test_brownian_cpu_source_equals_torchsdes_own_draws() -> None:
    import torchsde

    x = torch.zeros((2, 3, 4, 4))
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    sampler = BrownianNoiseSampler(x, sigmas, [123, 456], "CPU")
    ours = sampler(sigmas[1], sigmas[2])
    for i, seed in enumerate([123, 456]):
        tree = torchsde.BrownianTree(sigmas[3], torch.zeros_like(x[0]), sigmas[0], entropy=seed)
        native = -tree(sigmas[2], sigmas[1]) / (sigmas[2] - sigmas[1]).abs().sqrt()
        torch.testing.assert_close(ours[i], native, rtol=0, atol=0)


def test_brownian_draws_follow_the_rng_source_and_restore_torchsde() -> None:
    from torchsde._brownian import brownian_interval

    original = brownian_interval._randn
    x = torch.zeros((1, 4, 8, 8))
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    cpu = BrownianNoiseSampler(x, sigmas, [5], "CPU")(sigmas[1], sigmas[2])
    nv = BrownianNoiseSampler(x, sigmas, [5], "NV")(sigmas[1], sigmas[2])
    nv_again = BrownianNoiseSampler(x, sigmas, [5], "NV")(sigmas[1], sigmas[2])
    assert torch.equal(nv, nv_again)
    assert not torch.allclose(cpu, nv)
    assert abs(float(nv.std()) - 1.0) < 0.3
    # "GPU" on a CPU device draws like "CPU", as A1111's randn_local does.
    if not torch.cuda.is_available():
        gpu = BrownianNoiseSampler(x, sigmas, [5], "GPU")(sigmas[1], sigmas[2])
        assert torch.equal(gpu, cpu)
    assert brownian_interval._randn is original
    with pytest.raises(ValueError, match="RNG source"):
        BrownianNoiseSampler(x, sigmas, [5], "XYZ")


def test_brownian_samplers_use_the_rng_source() -> None:
    sigmas = sigma_schedule("DPM++ 2M SDE", "Automatic", 6).sigmas
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * sigmas[0]
    model = gaussian_denoiser(MU, S)
    outs = {
        source: SAMPLERS["DPM++ 2M SDE"](
            start, sigmas, SamplingContext(model=model, seeds=[3], rng_source=source)
        )
        for source in ("CPU", "NV")
    }
    assert not torch.allclose(outs["CPU"], outs["NV"])


def test_no_torchsde_range_warnings_escape() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("DPM++ SDE", 6, "Automatic")


# --------------------------------------------------------------------------------------
# Errors


def test_errors() -> None:
    sigmas = sigma_schedule("Euler", "Automatic", 4).sigmas
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="model"):
        SAMPLERS["Euler"](x, sigmas, SamplingContext(noise=lambda: torch.zeros(SHAPE)))
    with pytest.raises(ValueError, match="noise"):
        SAMPLERS["Euler a"](x, sigmas, SamplingContext(model=gaussian_denoiser(MU, S)))
    with pytest.raises(ValueError, match="sigmas"):
        SAMPLERS["Euler"](x, sigmas[:1], SamplingContext(model=gaussian_denoiser(MU, S)))
    with pytest.raises(ValueError, match="order"):
        run("DPM adaptive", 4, extra={"order": 4})


# --------------------------------------------------------------------------------------
# Against diffusers, which implements some of the same algorithms (§9.1 table)


def _diffusers_loop(
    scheduler,
    sigmas: torch.Tensor,
    x: torch.Tensor,
    output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """Drive a diffusers scheduler over our σ's; ``output(x, σ)`` is the model output it expects."""
    for k, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else k]
        x = scheduler.step(output(x, sigma), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def diffusers_schedulers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import diffusers
    return diffusers


def _start(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(42)) * sigmas[0]


def test_euler_matches_diffusers(diffusers_schedulers) -> None:
    sigmas = sigma_schedule("Euler", "Automatic", 12).sigmas
    x = _start(sigmas)
    model = gaussian_denoiser(MU, S)
    scheduler = diffusers_schedulers.EulerDiscreteScheduler(prediction_type="sample")
    scheduler.set_timesteps(12)
    scheduler.sigmas = sigmas.clone()
    theirs = _diffusers_loop(scheduler, sigmas, x, lambda x, s: model(x, s.view(1).expand(x.shape[0])))
    ours = SAMPLERS["Euler"](x, sigmas, SamplingContext(model=model, noise=lambda: torch.zeros_like(x)))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_euler_ancestral_matches_diffusers_with_the_same_noise(diffusers_schedulers) -> None:
    sigmas = sigma_schedule("Euler a", "Automatic", 12).sigmas
    x = _start(sigmas)
    model = gaussian_denoiser(MU, S)
    scheduler = diffusers_schedulers.EulerAncestralDiscreteScheduler()
    scheduler.set_timesteps(12)
    scheduler.sigmas = sigmas.clone()
    generator = torch.Generator().manual_seed(7)

    def eps(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x - model(x, sigma.view(1).expand(x.shape[0]))) / sigma

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, t in enumerate(scheduler.timesteps):
            x_in = x
            x = scheduler.step(eps(x_in, sigmas[k]), t, x_in, generator=generator).prev_sample
    ours_gen = torch.Generator().manual_seed(7)
    ctx = SamplingContext(model=model, noise=lambda: torch.randn(SHAPE, generator=ours_gen))
    ours = SAMPLERS["Euler a"](_start(sigmas), sigmas, ctx)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_heun_matches_diffusers(diffusers_schedulers) -> None:
    sigmas = sigma_schedule("Heun", "Karras", 8).sigmas
    x = _start(sigmas)
    model = gaussian_denoiser(MU, S)
    scheduler = diffusers_schedulers.HeunDiscreteScheduler(prediction_type="sample")
    scheduler.set_timesteps(8)
    scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    theirs = _diffusers_loop(scheduler, sigmas, x, lambda x, s: model(x, s.view(1).expand(x.shape[0])))
    ours = SAMPLERS["Heun"](x, sigmas, SamplingContext(model=model, noise=lambda: torch.zeros_like(x)))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lms_matches_diffusers(diffusers_schedulers) -> None:
    sigmas = sigma_schedule("LMS", "Automatic", 10).sigmas
    x = _start(sigmas)
    model = gaussian_denoiser(MU, S)
    scheduler = diffusers_schedulers.LMSDiscreteScheduler(prediction_type="sample")
    scheduler.set_timesteps(10)
    scheduler.sigmas = sigmas.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _diffusers_loop(scheduler, sigmas, x, lambda x, s: model(x, s.view(1).expand(x.shape[0])))
    ours = SAMPLERS["LMS"](x, sigmas, SamplingContext(model=model, noise=lambda: torch.zeros_like(x)))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _dpm_multistep(diffusers_schedulers, sigmas: torch.Tensor, x: torch.Tensor, noises=None, **config):
    """diffusers' DPM-Solver++ runs in VP space: x_vp = x/√(1+σ²), with x0 predictions."""
    model = gaussian_denoiser(MU, S)
    scheduler = diffusers_schedulers.DPMSolverMultistepScheduler(
        prediction_type="sample", final_sigmas_type="zero", **config
    )
    steps = len(sigmas) - 1
    scheduler.set_timesteps(steps)
    scheduler.sigmas = sigmas.clone()
    sample = x / (1 + sigmas[0] ** 2) ** 0.5
    for k, t in enumerate(scheduler.timesteps):
        sigma = sigmas[k]
        x_ve = sample * (1 + sigma**2) ** 0.5
        variance = None if noises is None or k >= len(noises) else noises[k]
        if noises is not None and variance is None:
            variance = torch.zeros_like(sample)
        sample = scheduler.step(
            model(x_ve, sigma.view(1).expand(x.shape[0])), t, sample, variance_noise=variance
        )
        sample = sample.prev_sample
    return sample


def test_dpmpp_2m_matches_diffusers(diffusers_schedulers) -> None:
    sigmas = sigma_schedule("DPM++ 2M", "Karras", 10).sigmas
    x = _start(sigmas)
    theirs = _dpm_multistep(diffusers_schedulers, sigmas, x, algorithm_type="dpmsolver++", solver_order=2)
    ours = SAMPLERS["DPM++ 2M"](x, sigmas, SamplingContext(model=gaussian_denoiser(MU, S)))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(diffusers_schedulers, solver: str) -> None:
    sigmas = sigma_schedule("DPM++ 2M SDE", "Automatic", 10).sigmas
    x = _start(sigmas)
    gen = torch.Generator().manual_seed(3)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(len(sigmas) - 2)]
    theirs = _dpm_multistep(
        diffusers_schedulers, sigmas, x, noises, algorithm_type="sde-dpmsolver++", solver_type=solver
    )
    queue = list(noises)
    ours = kdiffusion.sample_dpmpp_2m_sde(
        x,
        sigmas,
        SamplingContext(model=gaussian_denoiser(MU, S), solver_type=solver),
        noise_sampler=lambda sigma, sigma_next: queue.pop(0),
    )
    assert not queue
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

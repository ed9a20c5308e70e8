"""Tests for pipeline.kdiffusion: k-diffusion's sampler loops: accuracy, algorithm details, errors (§9).

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

from pipeline import kdiffusion, kdiffusion_restart
from pipeline.kdiffusion import SAMPLERS, get_ancestral_step
from pipeline.samplers import list_samplers, sigma_schedule
from pipeline.sampling import SamplingContext

MU = 0.3
S = 0.5
SHAPE = (2, 4, 8, 8)
SIGMA_MIN = 0.0291675

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

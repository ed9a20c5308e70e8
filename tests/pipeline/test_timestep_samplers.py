"""Tests for pipeline.timestep_samplers: A1111's DDIM, DDIM CFG++, PLMS and UniPC loops (§9.4).

Toy ε-models with known answers stand in for the UNet:

* a single data point x0*: ε(x, t) = (x − √ᾱ_t·x0*)/√(1 − ᾱ_t) makes every x̂0 exact, so
  each sampler lands on √ᾱ_end·x0* + √(1 − ᾱ_end)·e in closed form;
* Gaussian data N(μ, s²): the probability-flow ODE is solved exactly by keeping
  (x − α_t·μ)/√(α_t²s² + σ_t²) constant, which measures each sampler's accuracy.

diffusers' schedulers (with our ᾱ table swapped in) are independent references where
§9.4 says the algorithms agree: DDIMScheduler ("leading", steps_offset 1), PNDMScheduler
(skip_prk_steps) and UniPCMultistepScheduler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler

from pipeline import samplers
from pipeline.sampling import SamplingContext
from pipeline.timestep_samplers import SAMPLERS, ddim, ddim_cfgpp, plms, unipc

NAMES = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")
LOOP_SAMPLERS = ("DDIM", "DDIM CFG++", "PLMS")
SHAPE = (2, 4, 8, 8)


def sd_alphas() -> torch.Tensor:
    """The SD ᾱ table built independently: β in float64, ᾱ stored as float32 (§9.2)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas).astype(np.float32))


ALPHAS = sd_alphas()
LOG_ALPHAS = np.log(ALPHAS.double().numpy())


def alpha_at(t: torch.Tensor) -> torch.Tensor:
    """ᾱ at a possibly fractional UNet timestep: log ᾱ interpolated linearly (UniPC's schedule)."""
    values = np.exp(np.interp(t.double().cpu().numpy(), np.arange(1000), LOG_ALPHAS))
    return torch.from_numpy(values).view(-1, 1, 1, 1)


def start_noise(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def wavy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, timestep-dependent ε so that any wrong coefficient shows."""
    return 0.5 * x * torch.cos(t.view(-1, 1, 1, 1) / 300) + 0.3 * torch.sin(x)


class Recorder:
    """An ε-model that records the timestep of every call (one value per batch)."""

    def __init__(self, eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = wavy_eps) -> None:
        self.eps = eps
        self.calls: list[float] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        assert t.dtype == torch.float32
        assert torch.all(t == t[0])
        self.calls.append(float(t[0]))
        self.shape = x.shape
        return self.eps(x, t)

    def cfgpp(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self(x, t)
        return eps, eps


def context(
    model: Recorder | None = None,
    *,
    extra: dict[str, object] | None = None,
    eta: float | None = None,
    noise: Callable[[], torch.Tensor] | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> SamplingContext:
    """A context over ``model`` (a fresh :class:`Recorder` by default) and the SD ᾱ table."""
    model = model or Recorder()
    settings: dict[str, object] = {"eps_model_cfgpp": model.cfgpp, **(extra or {})}
    if noise is None:  # DDIM draws at any eta; a fixed stream keeps runs comparable
        gen = torch.Generator().manual_seed(1234)
        noise = lambda: torch.randn(model.shape, generator=gen)  # noqa: E731
    return SamplingContext(
        eps_model=model,
        alphas_cumprod=ALPHAS.clone(),
        noise=noise,
        eta=eta,
        callback=callback,
        extra=settings,
    )


# --------------------------------------------------------------------------------------
# Registry and call sequences


def test_registry_holds_the_four_timestep_samplers() -> None:
    assert list(SAMPLERS) == list(NAMES)
    assert SAMPLERS["DDIM"] is ddim and SAMPLERS["DDIM CFG++"] is ddim_cfgpp
    assert SAMPLERS["PLMS"] is plms and SAMPLERS["UniPC"] is unipc
    assert set(SAMPLERS) <= set(samplers.sampler_names())


@pytest.mark.parametrize("name", LOOP_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 20, 30, 50, 334, 1000])
def test_calls_are_exactly_unet_call_timesteps(name: str, steps: int) -> None:
    model = Recorder()
    SAMPLERS[name](start_noise(shape=(1, 1, 2, 2)), samplers.timesteps(name, steps), context(model))
    assert model.calls == [float(t) for t in samplers.unet_call_timesteps(name, steps)]


def test_ddim_at_20_steps_calls_19_times_from_951_to_51() -> None:
    model = Recorder()
    ddim(start_noise(), samplers.timesteps("DDIM", 20), context(model))
    assert model.calls == [float(t) for t in range(951, 50, -50)]
    assert len(model.calls) == 19


def test_plms_call_order_at_20_steps() -> None:
    model = Recorder()
    plms(start_noise(), samplers.timesteps("PLMS", 20), context(model))
    assert model.calls[:4] == [951.0, 901.0, 901.0, 851.0]
    assert model.calls[-1] == 51.0
    assert len(model.calls) == 20


def test_ddim_at_30_steps_uses_31_timesteps() -> None:
    model = Recorder()
    ddim(start_noise(), samplers.timesteps("DDIM", 30), context(model))
    assert model.calls[0] == 991.0 and model.calls[-1] == 34.0
    assert len(model.calls) == 30


@pytest.mark.parametrize("name", NAMES)
def test_one_step_ddim_like_samplers_return_the_noise(name: str) -> None:
    x = start_noise()
    model = Recorder()
    draws: list[torch.Tensor] = []
    steps: list[tuple[int, int]] = []
    ctx = context(model, eta=1.0, noise=lambda: draws.append(start_noise(9)) or draws[-1])
    ctx.callback = lambda i, n: steps.append((i, n))
    out = SAMPLERS[name](x, samplers.timesteps(name, 1), ctx)
    if name == "UniPC":  # UniPC runs its own single step from t = 999 down to 0
        assert model.calls == [pytest.approx(999.0, abs=1e-3)]
        assert steps == [(0, 1)]
        assert not torch.equal(out, x)
    else:
        assert out is x
        assert model.calls == [] and draws == [] and steps == []


def test_plms_at_2_steps_calls_501_then_1() -> None:
    x = start_noise()
    model = Recorder()
    out = plms(x, samplers.timesteps("PLMS", 2), context(model))
    assert model.calls == [501.0, 1.0]
    a_t, a_1 = ALPHAS[501].double(), ALPHAS[1].double()
    xd = x.double()

    def step(eps: torch.Tensor) -> torch.Tensor:
        pred = (xd - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_1.sqrt() * pred + (1 - a_1).sqrt() * eps

    t = torch.full((2,), 501.0)
    e501 = wavy_eps(xd, t)
    e1 = wavy_eps(step(e501), torch.full((2,), 1.0))
    torch.testing.assert_close(out.double(), step((e501 + e1) / 2), atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Exact answers on toy data


def point_eps(x0: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """ε of the one-point data set {x0}: x̂0 is always exactly x0."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_at(t)
        return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x.dtype)

    return eps


def point_answer(x: torch.Tensor, x0: torch.Tensor, a_start: float, a_end: float) -> torch.Tensor:
    e = (x.double() - a_start**0.5 * x0.double()) / (1 - a_start) ** 0.5
    return a_end**0.5 * x0.double() + (1 - a_end) ** 0.5 * e


@pytest.mark.parametrize("name", LOOP_SAMPLERS)
@pytest.mark.parametrize("steps", [2, 10, 20, 30])
def test_single_point_data_lands_on_the_closed_form_at_alpha_1(name: str, steps: int) -> None:
    x0 = start_noise(3) * 0.7 + 0.2
    x = start_noise()
    ts = samplers.timesteps(name, steps)
    out = SAMPLERS[name](x, ts, context(Recorder(point_eps(x0))))
    expected = point_answer(x, x0, float(ALPHAS[ts[-1]]), float(ALPHAS[1]))
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "order"), [("bh1", 3), ("bh2", 3), ("bh1", 2), ("bh1", 1)])
def test_unipc_single_point_data_lands_on_the_closed_form_at_alpha_0(variant: str, order: int) -> None:
    x0 = start_noise(3) * 0.7 + 0.2
    x = start_noise()
    ctx = context(Recorder(point_eps(x0)), extra={"uni_pc_variant": variant, "uni_pc_order": order})
    out = unipc(x, samplers.timesteps("UniPC", 20), ctx)
    expected = point_answer(x, x0, float(ALPHAS[999]), float(ALPHAS[0]))
    torch.testing.assert_close(out.double(), expected, atol=5e-5, rtol=1e-5)


MU, S2 = 0.3, 1.0


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact ε of data N(MU, S2): σ·(x − α·MU)/(α²·S2 + σ²)."""
    a = alpha_at(t)
    xd = x.double()
    return ((1 - a).sqrt() * (xd - a.sqrt() * MU) / (a * S2 + 1 - a)).to(x.dtype)


def gaussian_answer(x: torch.Tensor, a_start: float, a_end: float) -> torch.Tensor:
    def spread(a: float) -> float:
        return (a * S2 + 1 - a) ** 0.5

    z = (x.double() - a_start**0.5 * MU) / spread(a_start)
    return a_end**0.5 * MU + spread(a_end) * z


def gaussian_error(name: str, steps: int, **extra: object) -> float:
    x = start_noise()
    ts = samplers.timesteps(name, steps)
    out = SAMPLERS[name](x, ts, context(Recorder(gaussian_eps), extra=extra))
    if name == "UniPC":
        expected = gaussian_answer(x, float(ALPHAS[999]), float(ALPHAS[0]))
    else:
        expected = gaussian_answer(x, float(ALPHAS[ts[-1]]), float(ALPHAS[1]))
    return float((out.double() - expected).abs().max())


def test_gaussian_data_is_solved_and_higher_order_samplers_are_more_accurate() -> None:
    errors = {name: gaussian_error(name, 20) for name in ("DDIM", "PLMS", "UniPC")}
    assert errors["DDIM"] < 0.3
    assert errors["PLMS"] < errors["DDIM"] / 4
    assert errors["UniPC"] < errors["DDIM"] / 4
    # DDIM is first order: 5 times the steps, about a fifth of the error.
    assert gaussian_error("DDIM", 100) < errors["DDIM"] / 4


def test_unipc_is_high_order_on_a_log_snr_grid() -> None:
    # Time-uniform steps take one big λ jump at the end (ᾱ is steep near t = 0), which
    # limits every sampler; on a logSNR grid UniPC's order shows.
    coarse = gaussian_error("UniPC", 10, uni_pc_skip_type="logSNR")
    fine = gaussian_error("UniPC", 20, uni_pc_skip_type="logSNR")
    assert fine < 1e-3
    assert fine < coarse / 8


# --------------------------------------------------------------------------------------
# DDIM against diffusers' DDIMScheduler


def diffusers_ddim(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    scheduler.alphas_cumprod = ALPHAS.clone()
    scheduler.final_alpha_cumprod = ALPHAS[0].clone()
    scheduler.set_timesteps(steps)
    return scheduler


def run_diffusers(scheduler: DDIMScheduler, x: torch.Tensor, count: int, **kwargs: object) -> torch.Tensor:
    for t in scheduler.timesteps[:count]:
        eps = wavy_eps(x, t.float().expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def test_ddim_20_steps_equals_diffusers_first_19_steps() -> None:
    x = start_noise()
    scheduler = diffusers_ddim(20)
    assert scheduler.timesteps.tolist() == samplers.timesteps("DDIM", 20)[::-1]
    out = ddim(x, samplers.timesteps("DDIM", 20), context())
    torch.testing.assert_close(out, run_diffusers(scheduler, x, 19), atol=1e-6, rtol=1e-6)
    # diffusers also evaluates t = 1 and steps on to ᾱ_0: one call more, another result.
    full = run_diffusers(diffusers_ddim(20), x, 20)
    assert (full - out).abs().max() > 1e-3


def test_ddim_30_steps_differs_from_diffusers_in_its_top_timestep() -> None:
    ours = samplers.timesteps("DDIM", 30)
    scheduler = diffusers_ddim(30)
    assert ours[-1] == 991 and int(scheduler.timesteps[0]) == 958
    assert scheduler.timesteps.tolist() == ours[:30][::-1]
    x = start_noise()
    # From 958 down both walk the same grid: our loop on the lower 30 timesteps matches.
    out = ddim(x, ours[:30], context())
    torch.testing.assert_close(out, run_diffusers(scheduler, x, 29), atol=1e-6, rtol=1e-6)
    assert (ddim(x, ours, context()) - out).abs().max() > 1e-3


def test_ddim_eta_matches_diffusers_with_the_same_noise() -> None:
    x = start_noise()
    draws = [start_noise(100 + i) for i in range(19)]
    queue = list(draws)
    out = ddim(x, samplers.timesteps("DDIM", 20), context(eta=0.7, noise=lambda: queue.pop(0)))
    assert queue == []
    y = x
    scheduler = diffusers_ddim(20)
    for t, z in zip(scheduler.timesteps[:19], draws, strict=True):
        eps = wavy_eps(y, t.float().expand(y.shape[0]))
        y = scheduler.step(eps, t, y, eta=0.7, variance_noise=z).prev_sample
    torch.testing.assert_close(out, y, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["DDIM", "DDIM CFG++"])
@pytest.mark.parametrize(("eta", "draws"), [(None, 19), (0.0, 19), (0.5, 19), (1.0, 19)])
def test_eta_draws_one_noise_per_iteration(name: str, eta: float | None, draws: int) -> None:
    count = 0

    def noise() -> torch.Tensor:
        nonlocal count
        count += 1
        return start_noise(count)

    SAMPLERS[name](start_noise(), samplers.timesteps(name, 20), context(eta=eta, noise=noise))
    assert count == draws


def test_eta_noise_changes_the_result_and_zero_eta_is_deterministic() -> None:
    x = start_noise()
    ts = samplers.timesteps("DDIM", 10)
    base = ddim(x, ts, context())
    assert torch.equal(ddim(x, ts, context(eta=0.0)), base)
    noisy = ddim(x, ts, context(eta=1.0, noise=lambda: start_noise(5)))
    assert (noisy - base).abs().max() > 1e-2


def test_plms_and_unipc_draw_no_noise_even_with_eta() -> None:
    def fail() -> torch.Tensor:
        raise AssertionError("no per-step noise expected")

    for name in ("PLMS", "UniPC"):
        SAMPLERS[name](start_noise(), samplers.timesteps(name, 10), context(eta=1.0, noise=fail))


# --------------------------------------------------------------------------------------
# PLMS against diffusers' PNDMScheduler (skip_prk_steps)


def test_plms_equals_pndm_first_20_calls() -> None:
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    scheduler.alphas_cumprod = ALPHAS.clone()
    scheduler.final_alpha_cumprod = ALPHAS[0].clone()
    scheduler.set_timesteps(20)
    model = Recorder()
    x = start_noise()
    out = plms(x, samplers.timesteps("PLMS", 20), context(model))
    # PNDM calls 951, 901, 901, …, 51, 1: A1111 stops before the last one.
    assert [float(t) for t in scheduler.timesteps[:20]] == model.calls
    assert len(scheduler.timesteps) == 21
    torch.testing.assert_close(out, run_diffusers(scheduler, x, 20), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# DDIM CFG++


def test_cfgpp_uses_the_guided_eps_for_x0_and_the_uncond_eps_for_the_direction() -> None:
    x = start_noise()
    calls: list[float] = []

    def cfgpp(latent: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(float(t[0]))
        return wavy_eps(latent, t), 0.4 * torch.tanh(latent)

    def no_plain_model(latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("CFG++ must not call ctx.eps_model")

    ctx = SamplingContext(
        eps_model=no_plain_model,
        alphas_cumprod=ALPHAS.clone(),
        noise=lambda: torch.ones_like(x),  # drawn at eta 0 too, scaled by σ_t = 0
        extra={"eps_model_cfgpp": cfgpp},
    )
    out = ddim_cfgpp(x, samplers.timesteps("DDIM CFG++", 2), ctx)
    assert calls == [501.0]
    a_t, a_1 = ALPHAS[501].double(), ALPHAS[1].double()
    xd = x.double()
    pred = (xd - (1 - a_t).sqrt() * wavy_eps(xd, torch.full((2,), 501.0))) / a_t.sqrt()
    expected = a_1.sqrt() * pred + (1 - a_1).sqrt() * 0.4 * torch.tanh(xd)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_cfgpp_with_equal_eps_is_ddim() -> None:
    x = start_noise()
    ts = samplers.timesteps("DDIM", 20)
    assert torch.equal(ddim_cfgpp(x, ts, context()), ddim(x, ts, context()))


def test_cfgpp_eta_adds_sigma_noise_like_ddim() -> None:
    x = start_noise()
    ts = samplers.timesteps("DDIM", 8)
    a = ddim_cfgpp(x, ts, context(eta=0.6, noise=lambda: start_noise(7)))
    b = ddim(x, ts, context(eta=0.6, noise=lambda: start_noise(7)))
    assert torch.equal(a, b)


def test_cfgpp_without_its_model_raises() -> None:
    ctx = SamplingContext(eps_model=Recorder(), alphas_cumprod=ALPHAS.clone())
    with pytest.raises(ValueError, match="eps_model_cfgpp"):
        ddim_cfgpp(start_noise(), samplers.timesteps("DDIM CFG++", 5), ctx)


# --------------------------------------------------------------------------------------
# UniPC


def diffusers_unipc_run(x: torch.Tensor, order: int, variant: str) -> torch.Tensor:
    """diffusers' UniPC on the same 27 whole timesteps 999, 962, …, 37 and then σ at t = 0."""
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=order,
        solver_type=variant,
        final_sigmas_type="sigma_min",
    )
    scheduler.set_timesteps(27)
    grid = torch.arange(999, 0, -37)
    sigmas = ((1 - ALPHAS) / ALPHAS) ** 0.5
    scheduler.timesteps = grid
    scheduler.sigmas = torch.cat([sigmas[grid], sigmas[:1]])
    for t in grid:
        x = scheduler.step(wavy_eps(x, t.float().expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize(("variant", "order"), [("bh1", 3), ("bh2", 3), ("bh1", 2), ("bh2", 2), ("bh1", 1)])
def test_unipc_equals_diffusers_on_a_whole_timestep_grid(variant: str, order: int) -> None:
    # 26 steps give 27 timesteps, and time-uniform spacing of 27 steps hits whole UNet timesteps.
    ts = samplers.timesteps("UniPC", 26)
    assert len(ts) == 27
    model = Recorder()
    x = start_noise()
    ctx = context(model, extra={"uni_pc_variant": variant, "uni_pc_order": order})
    out = unipc(x, ts, ctx)
    assert model.calls == pytest.approx([999.0 - 37 * k for k in range(27)], abs=2e-3)
    torch.testing.assert_close(out, diffusers_unipc_run(x, order, variant), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("steps", "calls"), [(20, 20), (30, 31), (2, 2), (3, 4), (6, 7), (7, 8)])
def test_unipc_calls_once_per_timestep_on_its_own_time_grid(steps: int, calls: int) -> None:
    model = Recorder()
    unipc(start_noise(), samplers.timesteps("UniPC", steps), context(model))
    n = len(samplers.timesteps("UniPC", steps))
    assert len(model.calls) == n == calls
    expected = [999.0 * (1 - k / n) for k in range(n)]
    assert model.calls == pytest.approx(expected, abs=2e-3)


def test_unipc_img2img_starts_at_the_slice_top() -> None:
    ts = samplers.timesteps("UniPC", 20)[:15]  # top timestep 701
    model = Recorder()
    unipc(start_noise(), ts, context(model, extra={"is_img2img": True}))
    assert len(model.calls) == 15
    assert model.calls[0] == pytest.approx(701.0, abs=2e-3)
    step = 701 / 15
    assert model.calls == pytest.approx([701.0 - k * step for k in range(15)], abs=2e-3)


@pytest.mark.parametrize("skip_type", ["time_quadratic", "logSNR"])
def test_unipc_other_skip_types_descend_from_999_towards_0(skip_type: str) -> None:
    model = Recorder()
    out = unipc(
        start_noise(), samplers.timesteps("UniPC", 10), context(model, extra={"uni_pc_skip_type": skip_type})
    )
    assert torch.isfinite(out).all()
    assert len(model.calls) == 10
    assert model.calls[0] == pytest.approx(999.0, abs=2e-2)
    assert all(a > b for a, b in zip(model.calls, model.calls[1:], strict=False))
    uniform = [999.0 * (1 - k / 10) for k in range(10)]
    # Both skip types crowd the steps towards low noise, below the uniform grid.
    assert all(c < u for c, u in zip(model.calls[1:], uniform[1:], strict=True))


def test_unipc_settings_change_the_result() -> None:
    x = start_noise()
    ts = samplers.timesteps("UniPC", 10)
    base = unipc(x, ts, context())
    assert torch.equal(unipc(x, ts, context(extra={"uni_pc_variant": "bh1", "uni_pc_order": 3})), base)
    for extra in ({"uni_pc_variant": "bh2"}, {"uni_pc_order": 2}, {"uni_pc_lower_order_final": False}):
        assert (unipc(x, ts, context(extra=extra)) - base).abs().max() > 1e-6


@pytest.mark.parametrize("order", [3, 5])
def test_unipc_order_above_the_step_count_is_lowered(order: int) -> None:
    model = Recorder()
    ts = samplers.timesteps("UniPC", 2)
    out = unipc(start_noise(), ts, context(model, extra={"uni_pc_order": order}))
    assert torch.isfinite(out).all() and len(model.calls) == 2
    torch.testing.assert_close(out, unipc(start_noise(), ts, context(extra={"uni_pc_order": 2})))


@pytest.mark.parametrize(
    "extra",
    [{"uni_pc_variant": "vary_coeff"}, {"uni_pc_skip_type": "karras"}, {"uni_pc_order": 0}],
)
def test_unipc_rejects_unknown_settings(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        unipc(start_noise(), samplers.timesteps("UniPC", 5), context(extra=extra))


# --------------------------------------------------------------------------------------
# Step callback, validation, edge cases


@pytest.mark.parametrize(("name", "steps", "total"), [(n, 20, 20 if n == "UniPC" else 19) for n in NAMES])
def test_step_callback_runs_once_per_sampler_step(name: str, steps: int, total: int) -> None:
    seen: list[tuple[int, int]] = []
    ctx = context(callback=lambda i, n: seen.append((i, n)))
    SAMPLERS[name](start_noise(), samplers.timesteps(name, steps), ctx)
    assert seen == [(i, total) for i in range(total)]


@pytest.mark.parametrize("name", NAMES)
def test_invalid_inputs_raise_value_error(name: str) -> None:
    x = start_noise()
    ts = samplers.timesteps(name, 5)
    with pytest.raises(ValueError):
        SAMPLERS[name](x, [], context())
    with pytest.raises(ValueError):
        SAMPLERS[name](x, ts[::-1], context())
    with pytest.raises(ValueError):
        SAMPLERS[name](x, [1, 1000], context())
    with pytest.raises(ValueError):
        SAMPLERS[name](
            x, ts, SamplingContext(eps_model=Recorder(), extra={"eps_model_cfgpp": Recorder().cfgpp})
        )


@pytest.mark.parametrize("name", ["DDIM", "PLMS"])
def test_missing_eps_model_raises(name: str) -> None:
    with pytest.raises(ValueError, match="eps_model"):
        SAMPLERS[name](start_noise(), samplers.timesteps(name, 5), SamplingContext(alphas_cumprod=ALPHAS))


@pytest.mark.parametrize("eta", [None, 0.0, 1.0])
def test_ddim_without_noise_source_raises_at_any_eta(eta: float | None) -> None:
    ctx = context(eta=eta)
    ctx.noise = None
    with pytest.raises(ValueError, match="noise"):
        ddim(start_noise(), samplers.timesteps("DDIM", 5), ctx)


@pytest.mark.parametrize("name", LOOP_SAMPLERS)
def test_repeated_top_timestep_above_500_steps_is_harmless(name: str) -> None:
    ts = samplers.timesteps(name, 600)
    assert ts[-2:] == [999, 999]
    out = SAMPLERS[name](
        start_noise(shape=(1, 1, 2, 2)), ts, context(eta=0.5, noise=lambda: start_noise(1, (1, 1, 2, 2)))
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_latent_dtype_is_kept(name: str) -> None:
    x = start_noise().double()
    out = SAMPLERS[name](x, samplers.timesteps(name, 5), context())
    assert out.dtype == torch.float64 and out.shape == x.shape

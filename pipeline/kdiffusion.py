"""k-diffusion's sampler loops, as A1111 v1.10.1 drives them (A1111-SEMANTICS.md §8.3, §8.5, §9).

A1111 runs the samplers of k-diffusion (release 0.0.16) over its own σ schedule, CFG
denoiser and noise stream; an image only reproduces when every loop takes the same steps
in the same floating-point order and draws the same noise at the same moments. So these
are our own implementations of those algorithms, written to follow k-diffusion's update
formulas operation by operation, over the contract in :mod:`pipeline.sampling`:

* ``fn(x, sigmas, ctx) -> x``; ``sigmas`` come from :func:`pipeline.samplers.sigma_schedule`
  (trailing 0 included, except for KL Optimal) and the loop runs ``len(sigmas) - 1`` steps;
* ``ctx.model(x, sigma[B])`` is one CFG-denoiser call returning the denoised latent;
* ``ctx.noise()`` stands for every ``torch.randn_like(x)`` k-diffusion makes, which A1111
  redirects to its per-image ImageRNG (§8.3): each is called exactly where and as often as
  k-diffusion draws;
* ``ctx.step(i, total)`` reports progress once after each sampler step.

The Brownian samplers (DPM++ SDE, 2M SDE, 2M SDE Heun, 3M SDE) take their noise from
one torchsde Brownian tree per image seeded with ``ctx.seeds`` instead (§8.5); see
:class:`BrownianNoiseSampler` for how the tree's normal draws follow ``ctx.rng_source``.

This module holds Euler, Heun, DPM2, LMS and the DPM-Solver++ family, and the
:data:`SAMPLERS` registry of every loop. The rest lives in:

* :mod:`pipeline.kdiffusion_steps`: shared step helpers (σ schedule and its host copy,
  denoiser call, noise, ``to_d``, ``get_ancestral_step``, churn, keyword defaults);
* :mod:`pipeline.kdiffusion_dpm`: "DPM fast" and "DPM adaptive" with their DPM-Solver and
  PID step-size controller;
* :mod:`pipeline.kdiffusion_restart`: A1111's Restart and LCM loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.brownian import BrownianNoiseSampler
from pipeline.kdiffusion_dpm import sample_dpm_adaptive, sample_dpm_fast
from pipeline.kdiffusion_restart import sample_lcm, sample_restart
from pipeline.kdiffusion_steps import (
    _LMS_ORDER,
    NoiseSampler,
    _ancestral_setup,
    _ancestral_steps,
    _Churn,
    _denoise,
    _eta,
    _extra,
    _noise_between,
    _schedule,
    _sigma_fn,
    _t_fn,
    _with_host,
    get_ancestral_step,
    to_d,
)
from pipeline.sampling import SamplingContext, host_values

Sampler = Callable[[torch.Tensor, torch.Tensor, SamplingContext], torch.Tensor]

# torchsde draws its normals through one module-level function; swapping it is the only
# hook it offers, so swaps are serialised (see BrownianNoiseSampler).


# --------------------------------------------------------------------------------------
# Euler, Heun, DPM2 (their churn is :class:`pipeline.kdiffusion_steps._Churn`)


@torch.no_grad()
def sample_euler(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """Euler steps along the probability-flow ODE, with optional churn."""
    sched = _schedule(x, sigmas)
    steps, sigmas = sched.steps, sched.dev
    churn = _Churn.from_ctx(ctx, steps)
    for i, (gamma, sigma_hat, level) in enumerate(churn.plan(sched)):
        x = churn.apply(x, sigmas[i], gamma, sigma_hat, ctx)
        denoised = _denoise(ctx, x, sigma_hat, level)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
        ctx.step(i, steps)
    return x


@torch.no_grad()
def sample_euler_ancestral(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """Euler step down to σ_down, then fresh noise up to σ_next (none after a step to 0)."""
    sched, eta, s_noise, noise_sampler = _ancestral_setup(x, sigmas, ctx)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        dt = sigma_down - sigmas[i]
        x = x + d * dt
        if host[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        ctx.step(i, steps)
    return x


@torch.no_grad()
def sample_heun(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, algorithm 2); an Euler step where σ_next = 0."""
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    churn = _Churn.from_ctx(ctx, steps)
    for i, (gamma, sigma_hat, level) in enumerate(churn.plan(sched)):
        x = churn.apply(x, sigmas[i], gamma, sigma_hat, ctx)
        denoised = _denoise(ctx, x, sigma_hat, level)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if host[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = _denoise(ctx, x_2, sigmas[i + 1], host[i + 1])
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
        ctx.step(i, steps)
    return x


def _log_midpoint(sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2's midpoint of σ → σ_to in log σ."""
    return sigma.log().lerp(sigma_to.log(), 0.5).exp()


def _dpm2_midpoint(
    ctx: SamplingContext,
    x: torch.Tensor,
    d: torch.Tensor,
    sigma: Any,
    sigma_to: Any,
    sigma_mid: torch.Tensor,
    level: float,
) -> torch.Tensor:
    """DPM-Solver-2: evaluate at the log-space midpoint σ_mid of σ → σ_to (its host value
    ``level``, from :func:`_log_midpoint`) and step with that slope."""
    dt_1 = sigma_mid - sigma
    dt_2 = sigma_to - sigma
    x_2 = x + d * dt_1
    denoised_2 = _denoise(ctx, x_2, sigma_mid, level)
    d_2 = to_d(x_2, sigma_mid, denoised_2)
    return x + d_2 * dt_2


@torch.no_grad()
def sample_dpm_2(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """DPM-Solver-2 steps with churn (A1111's "DPM2"); an Euler step where σ_next = 0."""
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    churn = _Churn.from_ctx(ctx, steps)
    plan = churn.plan(sched)
    mids = _with_host(
        {
            i: _log_midpoint(sigma_hat, sigmas[i + 1])
            for i, (_, sigma_hat, _) in enumerate(plan)
            if host[i + 1] != 0
        }
    )
    for i, (gamma, sigma_hat, level) in enumerate(plan):
        x = churn.apply(x, sigmas[i], gamma, sigma_hat, ctx)
        denoised = _denoise(ctx, x, sigma_hat, level)
        d = to_d(x, sigma_hat, denoised)
        if host[i + 1] == 0:
            dt = sigmas[i + 1] - sigma_hat
            x = x + d * dt
        else:
            x = _dpm2_midpoint(ctx, x, d, sigma_hat, sigmas[i + 1], *mids[i])
        ctx.step(i, steps)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """DPM-Solver-2 down to σ_down plus ancestral noise.

    k-diffusion adds this sampler's noise only after a DPM-Solver-2 step, so a step whose
    σ_down is 0 (the final step to σ = 0) is a plain Euler step and draws nothing.
    """
    sched, eta, s_noise, noise_sampler = _ancestral_setup(x, sigmas, ctx)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    ancestral, downs = _ancestral_steps(sched, eta)
    mids = _with_host({i: _log_midpoint(sigmas[i], ancestral[i][0]) for i in range(steps) if downs[i] != 0})
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        sigma_down, sigma_up = ancestral[i]
        d = to_d(x, sigmas[i], denoised)
        if downs[i] == 0:
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            x = _dpm2_midpoint(ctx, x, d, sigmas[i], sigma_down, *mids[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        ctx.step(i, steps)
    return x


# --------------------------------------------------------------------------------------
# LMS


def _lms_coefficient(order: int, t: Any, i: int, j: int) -> float:
    """∫ of the j-th Lagrange basis polynomial over [σ_i, σ_{i+1}], by scipy's quad.

    Arithmetic as k-diffusion gets it under numpy 1.x (A1111's pin): the σ differences in
    the denominators are float32 (σ's are a float32 array), everything else float64.
    """
    from scipy import integrate  # imported here: only LMS needs scipy

    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - float(t[i - k])) / float(t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, float(t[i]), float(t[i + 1]), epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """Linear multistep over the last ``order`` (default 4) ODE derivatives."""
    sched = _schedule(x, sigmas)
    order = int(_extra(ctx, "order", _LMS_ORDER))
    sigmas_cpu = sigmas.detach().cpu().numpy()
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    ds: list[torch.Tensor] = []
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=True))
        ctx.step(i, steps)
    return x


# --------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022), in k-diffusion's t = −log σ form


@dataclass(frozen=True)
class _SinglestepPoints:
    """A singlestep DPM-Solver++ step from σ to σ_to in t = −log σ: t, t_next, h = t_next − t,
    the intermediate s = t + r·h and σ_s = exp(−s) (the second model call's σ)."""

    t: torch.Tensor
    t_next: torch.Tensor
    h: torch.Tensor
    s: torch.Tensor
    sigma_s: torch.Tensor

    @classmethod
    def between(cls, sigma: torch.Tensor, sigma_to: torch.Tensor, r: float) -> _SinglestepPoints:
        t, t_next = _t_fn(sigma), _t_fn(sigma_to)
        h = t_next - t
        s = t + r * h
        return cls(t=t, t_next=t_next, h=h, s=s, sigma_s=_sigma_fn(s))


@torch.no_grad()
def sample_dpmpp_2s_ancestral(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """DPM-Solver++(2S) single-step second order down to σ_down, plus ancestral noise."""
    sched, eta, s_noise, noise_sampler = _ancestral_setup(x, sigmas, ctx)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    r = 1 / 2
    ancestral, downs = _ancestral_steps(sched, eta)
    points = {
        i: _SinglestepPoints.between(sigmas[i], ancestral[i][0], r) for i in range(steps) if downs[i] != 0
    }
    levels = dict(zip(points, host_values([p.sigma_s for p in points.values()]), strict=True))
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        sigma_down, sigma_up = ancestral[i]
        if downs[i] == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            p = points[i]
            x_2 = (p.sigma_s / _sigma_fn(p.t)) * x - (-p.h * r).expm1() * denoised
            denoised_2 = _denoise(ctx, x_2, p.sigma_s, levels[i])
            x = (_sigma_fn(p.t_next) / _sigma_fn(p.t)) * x - (-p.h).expm1() * denoised_2
        if host[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        ctx.step(i, steps)
    return x


@torch.no_grad()
def sample_dpmpp_2m(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """DPM-Solver++(2M): one model call per step, second order from the previous denoised.

    The first step, and any step to σ = 0, is first order; a step to 0 returns exactly
    the denoised prediction (σ_next/σ = 0 and −expm1(−∞) = 1).
    """
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    old_denoised: torch.Tensor | None = None
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or host[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        ctx.step(i, steps)
    return x


@dataclass(frozen=True)
class _SdeStep:
    """The σ arithmetic of one DPM++ SDE step (r = ½) that does not end at 0: its
    intermediate point, both ancestral splits, and the host values of the σ's the
    Brownian tree is asked about (σ_t, σ_s, σ_t_next; σ_s is also the second call's)."""

    t: torch.Tensor
    sigma_t: torch.Tensor
    sigma_s: torch.Tensor
    sigma_t_next: torch.Tensor
    s_: torch.Tensor
    su_1: Any
    t_next_: torch.Tensor
    su_2: Any

    @classmethod
    def between(cls, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float, r: float) -> _SdeStep:
        t, t_next = _t_fn(sigma), _t_fn(sigma_next)
        h = t_next - t
        s = t + h * r
        sigma_t, sigma_s, sigma_t_next = _sigma_fn(t), _sigma_fn(s), _sigma_fn(t_next)
        sd, su_1 = get_ancestral_step(sigma_t, sigma_s, eta)
        s_ = _t_fn(sd)
        sd, su_2 = get_ancestral_step(sigma_t, sigma_t_next, eta)
        return cls(t, sigma_t, sigma_s, sigma_t_next, s_, su_1, _t_fn(sd), su_2)


@torch.no_grad()
def sample_dpmpp_sde(
    x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext, *, noise_sampler: NoiseSampler | None = None
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, r = 1/2): two model calls per step, Brownian noise twice."""
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    eta = _eta(ctx)
    s_noise = _extra(ctx, "s_noise", 1.0)
    r = 1 / 2
    fac = 1 / (2 * r)
    if noise_sampler is None:
        noise_sampler = BrownianNoiseSampler.from_context(x, sigmas, ctx)
    plan = {i: _SdeStep.between(sigmas[i], sigmas[i + 1], eta, r) for i in range(steps) if host[i + 1] != 0}
    queried = host_values([v for p in plan.values() for v in (p.sigma_t, p.sigma_s, p.sigma_t_next)])
    hosts = dict(zip(plan, zip(queried[::3], queried[1::3], queried[2::3], strict=True), strict=True))
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        if host[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:
            p, (at_t, at_s, at_t_next) = plan[i], hosts[i]
            x_2 = (_sigma_fn(p.s_) / p.sigma_t) * x - (p.t - p.s_).expm1() * denoised
            x_2 = x_2 + _noise_between(noise_sampler, p.sigma_t, p.sigma_s, (at_t, at_s)) * s_noise * p.su_1
            denoised_2 = _denoise(ctx, x_2, p.sigma_s, at_s)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma_fn(p.t_next_) / p.sigma_t) * x - (p.t - p.t_next_).expm1() * denoised_d
            x = (
                x
                + _noise_between(noise_sampler, p.sigma_t, p.sigma_t_next, (at_t, at_t_next))
                * s_noise
                * p.su_2
            )
        ctx.step(i, steps)
    return x


def _solver_type(ctx: SamplingContext, default: str) -> str:
    solver = ctx.solver_type or default
    if solver not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver!r}")
    return solver


@torch.no_grad()
def sample_dpmpp_2m_sde(
    x: torch.Tensor,
    sigmas: torch.Tensor,
    ctx: SamplingContext,
    *,
    noise_sampler: NoiseSampler | None = None,
    default_solver: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; ``ctx.solver_type`` picks the midpoint or Heun correction.

    A step to σ = 0 returns the denoised prediction. With η = 0 it draws no noise and
    is an ODE solver.
    """
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    solver = _solver_type(ctx, default_solver)
    eta = _eta(ctx)
    s_noise = _extra(ctx, "s_noise", 1.0)
    if noise_sampler is None:
        noise_sampler = BrownianNoiseSampler.from_context(x, sigmas, ctx)
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    h: torch.Tensor | None = None
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        if host[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = _noise_between(noise_sampler, sigmas[i], sigmas[i + 1], (host[i], host[i + 1]))
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
        ctx.step(i, steps)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext, *, noise_sampler: NoiseSampler | None = None
) -> torch.Tensor:
    """A1111's "DPM++ 2M SDE Heun": the same loop registered with solver_type "heun"."""
    return sample_dpmpp_2m_sde(x, sigmas, ctx, noise_sampler=noise_sampler, default_solver="heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(
    x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext, *, noise_sampler: NoiseSampler | None = None
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third order from the two previous denoised predictions.

    A step to σ = 0 returns the denoised prediction. k-diffusion would fail on a first
    step straight to 0 (its step size is still unset there); we carry "no step size" on.
    """
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    eta = _eta(ctx)
    s_noise = _extra(ctx, "s_noise", 1.0)
    if noise_sampler is None:
        noise_sampler = BrownianNoiseSampler.from_context(x, sigmas, ctx)
    denoised_1: torch.Tensor | None = None
    denoised_2: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_1: torch.Tensor | None = None
    h_2: torch.Tensor | None = None
    for i in range(steps):
        denoised = _denoise(ctx, x, sigmas[i], host[i])
        if host[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                assert denoised_1 is not None and denoised_2 is not None and h_1 is not None
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                assert denoised_1 is not None
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                noise = _noise_between(noise_sampler, sigmas[i], sigmas[i + 1], (host[i], host[i + 1]))
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        ctx.step(i, steps)
    return x


# --------------------------------------------------------------------------------------
# Registry, keyed by A1111's sampler names (§9.1)

SAMPLERS: dict[str, Sampler] = {
    "DPM++ 2M": sample_dpmpp_2m,
    "DPM++ SDE": sample_dpmpp_sde,
    "DPM++ 2M SDE": sample_dpmpp_2m_sde,
    "DPM++ 2M SDE Heun": sample_dpmpp_2m_sde_heun,
    "DPM++ 2S a": sample_dpmpp_2s_ancestral,
    "DPM++ 3M SDE": sample_dpmpp_3m_sde,
    "Euler a": sample_euler_ancestral,
    "Euler": sample_euler,
    "LMS": sample_lms,
    "Heun": sample_heun,
    "DPM2": sample_dpm_2,
    "DPM2 a": sample_dpm_2_ancestral,
    "DPM fast": sample_dpm_fast,
    "DPM adaptive": sample_dpm_adaptive,
    "Restart": sample_restart,
    "LCM": sample_lcm,
}

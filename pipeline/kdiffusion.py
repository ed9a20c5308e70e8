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

``sigmas`` are moved to ``x``'s device first, as A1111 keeps them on the compute device:
the σ arithmetic (logs, exps) then runs where A1111 runs it. ``ctx.extra`` carries the
sampler keyword arguments (s_churn, s_tmin, s_tmax, s_noise, order, sigma_min, ...), each
defaulting to k-diffusion's value; the engine should put there only what A1111 passes to
that sampler, since A1111 passes its sigma settings to some samplers and not others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.brownian import BrownianNoiseSampler
from pipeline.sampling import SamplingContext, host_values

logger = logging.getLogger(__name__)

Sampler = Callable[[torch.Tensor, torch.Tensor, SamplingContext], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> noise

# k-diffusion's defaults for the sampler keyword arguments A1111 may override via ctx.extra.
_DEFAULT_ETA = 1.0  # "Eta for k-diffusion samplers"
_LMS_ORDER = 4
_ADAPTIVE_DEFAULTS = {
    "order": 3,
    "rtol": 0.05,
    "atol": 0.0078,
    "h_init": 0.05,
    "pcoeff": 0.0,
    "icoeff": 1.0,
    "dcoeff": 0.0,
    "accept_safety": 0.81,
}

# torchsde draws its normals through one module-level function; swapping it is the only
# hook it offers, so swaps are serialised (see BrownianNoiseSampler).


# --------------------------------------------------------------------------------------
# Shared pieces


def _steps(sigmas: torch.Tensor) -> int:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}"
        )
    return sigmas.shape[0] - 1


@dataclass(frozen=True)
class _Schedule:
    """The σ's on x's device, where their arithmetic runs (A1111 keeps them there), and
    their host copy, made once before the first step. What a loop decides on the host
    ("is σ_next 0", the levels it announces to the denoiser, the Brownian tree's query
    points) reads the copy, so no step waits for the device to report a value."""

    dev: torch.Tensor
    host: list[float]

    @property
    def steps(self) -> int:
        return len(self.host) - 1


def _schedule(x: torch.Tensor, sigmas: torch.Tensor) -> _Schedule:
    _steps(sigmas)
    return _Schedule(dev=sigmas.to(x.device), host=sigmas.detach().tolist())


def _with_host(values: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, float]]:
    """Each step's 0-d tensor with its host value, all read back at once."""
    hosts = host_values(list(values.values()))
    return {i: (value, host) for (i, value), host in zip(values.items(), hosts, strict=True)}


def _denoise(ctx: SamplingContext, x: torch.Tensor, sigma: torch.Tensor, level: float | None) -> torch.Tensor:
    """One CFG-denoiser call with σ broadcast over the batch (k-diffusion's ``sigma * s_in``);
    ``level`` is σ's host value, announced to the denoiser first."""
    if ctx.model is None:
        raise ValueError("SamplingContext.model is required by the k-diffusion samplers")
    ctx.announce(level)
    return ctx.model(x, sigma * x.new_ones([x.shape[0]]))


def _randn_like(ctx: SamplingContext) -> torch.Tensor:
    """Stands for k-diffusion's ``torch.randn_like(x)``, which A1111 sends to ImageRNG."""
    if ctx.noise is None:
        raise ValueError("SamplingContext.noise is required by samplers that draw per-step noise")
    return ctx.noise()


def _noise_between(
    noise_sampler: NoiseSampler, sigma: torch.Tensor, sigma_next: torch.Tensor, host: tuple[float, float]
) -> torch.Tensor:
    """A noise draw for the step σ → σ_next. A Brownian tree also gets the two σ's host
    values (it is walked on the host); other noise samplers take the tensors only."""
    if isinstance(noise_sampler, BrownianNoiseSampler):
        return noise_sampler(sigma, sigma_next, host=host)
    return noise_sampler(sigma, sigma_next)


def _eta(ctx: SamplingContext) -> float:
    return _DEFAULT_ETA if ctx.eta is None else float(ctx.eta)


def _extra(ctx: SamplingContext, key: str, default: float) -> float:
    value = ctx.extra.get(key)
    return default if value is None else float(value)  # type: ignore[arg-type]


def _append_dims(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma[(...,) + (None,) * (ndim - sigma.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dσ = (x − D(x; σ)) / σ."""
    return (x - denoised) / _append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: Any, sigma_to: Any, eta: float = 1.0) -> tuple[Any, Any]:
    """Split a step σ_from → σ_to into a deterministic step down to σ_down plus fresh noise σ_up.

    σ_up = min(σ_to, η·√(σ_to²·(σ_from² − σ_to²)/σ_from²)) and σ_down = √(σ_to² − σ_up²), so
    the variance at σ_to is kept. With η = 0 the step is deterministic: (σ_to, 0). On
    tensors the min is taken on the device (``fmin``, which like ``min`` keeps σ_to where
    the other value is NaN), not by reading both back.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    if isinstance(sigma_to, torch.Tensor):
        sigma_up = torch.fmin(sigma_to, sigma_up)
    else:
        sigma_up = min(sigma_to, sigma_up)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _ancestral_noise(ctx: SamplingContext) -> NoiseSampler:
    """k-diffusion's default noise sampler: a fresh ``randn_like`` whatever the σ's."""
    return lambda sigma, sigma_next: _randn_like(ctx)


def _ancestral_setup(
    x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext
) -> tuple[_Schedule, float, float, NoiseSampler]:
    """What every ancestral loop starts from: the schedule, eta, s_noise, noise."""
    return (_schedule(x, sigmas), _eta(ctx), _extra(ctx, "s_noise", 1.0), _ancestral_noise(ctx))


def _ancestral_steps(sched: _Schedule, eta: float) -> tuple[list[tuple[Any, Any]], list[float]]:
    """Every step's (σ_down, σ_up) on the device, and σ_down's host values."""
    steps = [get_ancestral_step(sched.dev[i], sched.dev[i + 1], eta=eta) for i in range(sched.steps)]
    return steps, host_values([down for down, _ in steps])


# --------------------------------------------------------------------------------------
# Euler, Heun, DPM2 and their "churn" (Karras et al. 2022, algorithm 2)


@dataclass(frozen=True)
class _Churn:
    """The s_churn/s_tmin/s_tmax/s_noise settings of Euler, Heun and DPM2."""

    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float
    steps: int

    @classmethod
    def from_ctx(cls, ctx: SamplingContext, steps: int) -> _Churn:
        return cls(
            s_churn=_extra(ctx, "s_churn", 0.0),
            s_tmin=_extra(ctx, "s_tmin", 0.0),
            s_tmax=_extra(ctx, "s_tmax", math.inf),
            s_noise=_extra(ctx, "s_noise", 1.0),
            steps=steps,
        )

    def plan(self, sched: _Schedule) -> list[tuple[float, torch.Tensor, float]]:
        """Each step's γ, σ̂ = σ_i·(γ + 1) on the device, and σ̂'s host value.

        γ = min(s_churn / steps, √2 − 1) where s_tmin ≤ σ_i ≤ s_tmax, else 0. The range is
        checked on the σ tensor, as k-diffusion checks it (the bounds in σ's dtype), for
        every step at once.
        """
        sigmas = sched.dev[:-1]
        gamma_max = min(self.s_churn / self.steps, 2**0.5 - 1)
        in_range = [False] * self.steps
        if gamma_max != 0:
            in_range = ((sigmas >= self.s_tmin) & (sigmas <= self.s_tmax)).tolist()
        gammas = [gamma_max if inside else 0.0 for inside in in_range]
        sigma_hats = [sigmas[i] * (gamma + 1) for i, gamma in enumerate(gammas)]
        levels = sched.host[:-1]  # σ̂ = σ·1 where γ = 0
        churned = _with_host({i: sigma_hats[i] for i, gamma in enumerate(gammas) if gamma != 0})
        levels = [churned[i][1] if i in churned else level for i, level in enumerate(levels)]
        return list(zip(gammas, sigma_hats, levels, strict=True))

    def apply(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        gamma: float,
        sigma_hat: torch.Tensor,
        ctx: SamplingContext,
    ) -> torch.Tensor:
        """Raise the noise level from σ to σ̂ (from :meth:`plan`) by adding noise.

        As in k-diffusion, the noise is drawn at the start of every step whatever γ is, and
        added only when γ > 0: every step advances the per-image stream by one draw, so a
        churned step later in the schedule gets the same noise as in A1111.
        """
        eps = _randn_like(ctx) * self.s_noise
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        return x


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
# DPM-Solver (Lu et al. 2022): "DPM fast" and "DPM adaptive"


class _PIDStepSize:
    """The PID step-size controller of DPM adaptive; h is a step in t = −log σ."""

    def __init__(
        self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, safety: float
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = safety
        self.eps = 1e-8
        self.errs: list[float] = []

    @staticmethod
    def _limiter(x: float) -> float:
        return 1 + math.atan(x - 1)

    def propose_step(self, error: torch.Tensor) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self._limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


_EpsCache = dict[str, torch.Tensor]

_EpsCache = dict[str, torch.Tensor]
# The host σ's of a step's model calls, in call order (None: not known on the host).
_Levels = Sequence[float | None]
_NO_LEVELS: _Levels = (None, None, None)
# The intermediate points r·h of DPM-Solver-k's stages (r1, r2), by order.
_STAGE_RATIOS = {1: (), 2: (1 / 2,), 3: (1 / 3, 2 / 3)}


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps in eps form, with k-diffusion's per-step eps cache.

    Each step takes the host σ's of its model calls (``levels``: at t, then at each stage's
    t + r·h), which are announced to the denoiser."""

    def __init__(self, ctx: SamplingContext) -> None:
        self.ctx = ctx

    @staticmethod
    def t(sigma: torch.Tensor) -> torch.Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def stage_sigmas(self, t: torch.Tensor, t_next: torch.Tensor, order: int) -> list[torch.Tensor]:
        """The σ's an order-``order`` step from t to t_next calls the model at, computed as
        the step computes them."""
        h = t_next - t
        return [self.sigma(t), *(self.sigma(t + r * h) for r in _STAGE_RATIOS[order])]

    def eps(
        self, cache: _EpsCache, key: str, x: torch.Tensor, t: torch.Tensor, level: float | None = None
    ) -> torch.Tensor:
        if key in cache:
            return cache[key]
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self._model(x, sigma, level)) / self.sigma(t)
        cache[key] = eps
        return eps

    def _model(self, x: torch.Tensor, sigma: torch.Tensor, level: float | None) -> torch.Tensor:
        if self.ctx.model is None:
            raise ValueError("SamplingContext.model is required by the k-diffusion samplers")
        self.ctx.announce(level)
        return self.ctx.model(x, sigma)

    def step_1(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        cache: _EpsCache,
        levels: _Levels = _NO_LEVELS,
    ) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t, levels[0])
        return x - self.sigma(t_next) * h.expm1() * eps

    def step_2(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        cache: _EpsCache,
        r1: float = 1 / 2,
        levels: _Levels = _NO_LEVELS,
    ) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t, levels[0])
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1, levels[1])
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        )

    def step_3(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        cache: _EpsCache,
        r1: float = 1 / 3,
        r2: float = 2 / 3,
        levels: _Levels = _NO_LEVELS,
    ) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t, levels[0])
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1, levels[1])
        u2 = (
            x
            - self.sigma(s2) * (r2 * h).expm1() * eps
            - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2, levels[2])
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )

    def ancestral_target(
        self, t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor, eta: float
    ) -> tuple[torch.Tensor, Any]:
        """Where the deterministic part of a step ends, and the noise that tops it up to t_next."""
        if not eta:
            return t_next, 0.0
        sd, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_next_ = torch.minimum(t_end, self.t(sd))
        su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
        return t_next_, su


def _sigma_range(sigmas: torch.Tensor, ctx: SamplingContext) -> tuple[float, float]:
    """σ_min/σ_max for DPM fast/adaptive: ``ctx.extra`` overrides, else the schedule's ends.

    A1111's img2img uses the schedule's smallest non-zero and its first σ, which is the
    default here. Its txt2img passes the model's table ends instead (``model_wrap.sigmas``);
    the default schedule starts and ends there too, but as exp(log σ), which can be an ulp
    off, so for bit-exact txt2img the engine passes ``extra["sigma_min"]`` and
    ``extra["sigma_max"]`` (and needs to for 1 step, where the schedule has no range).
    """
    positive = sigmas[sigmas > 0]
    lowest = float(positive.min()) if positive.numel() else 0.0
    sigma_min = _extra(ctx, "sigma_min", lowest)
    sigma_max = _extra(ctx, "sigma_max", float(sigmas.max()))
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if sigma_min >= sigma_max:
        raise ValueError(
            f"DPM fast/adaptive need sigma_min < sigma_max, got {sigma_min} and {sigma_max}; "
            "pass the model's range as ctx.extra['sigma_min'] / ['sigma_max']"
        )
    return sigma_min, sigma_max


def _fast_orders(nfe: int) -> list[int]:
    """Solver orders of DPM fast: third-order steps, then whatever makes the calls add up to nfe."""
    m = math.floor(nfe / 3) + 1
    if nfe % 3 == 0:
        return [3] * (m - 2) + [2, 1]
    return [3] * (m - 1) + [nfe % 3]


@torch.no_grad()
def sample_dpm_fast(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """DPM-Solver-fast: exactly n model calls (n = ``len(sigmas) - 1`` or ``ctx.extra["n"]``)
    spread over steps uniform in t = −log σ from σ_max to σ_min.

    The result is left at σ_min (not denoised to 0), as k-diffusion does. With η > 0 (A1111
    passes 1) each step ends early at σ_down and noise is drawn after every step.
    """
    steps = _steps(sigmas)
    nfe = int(_extra(ctx, "n", steps))
    if nfe < 1:
        raise ValueError(f"DPM fast needs n >= 1, got {nfe}")
    sigma_min, sigma_max = _sigma_range(sigmas, ctx)
    eta = _eta(ctx)
    s_noise = _extra(ctx, "s_noise", 1.0)
    noise_sampler = _ancestral_noise(ctx)
    solver = _DPMSolver(ctx)
    t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
    orders = _fast_orders(nfe)
    ts = torch.linspace(t_start, t_end, math.floor(nfe / 3) + 2, device=x.device)
    targets = [solver.ancestral_target(ts[i], ts[i + 1], t_end, eta) for i in range(len(orders))]
    stages = [solver.stage_sigmas(ts[i], targets[i][0], order) for i, order in enumerate(orders)]
    flat = iter(host_values([sigma for sigmas_of_step in stages for sigma in sigmas_of_step]))
    levels = [[next(flat) for _ in sigmas_of_step] for sigmas_of_step in stages]
    for i, order in enumerate(orders):
        cache: _EpsCache = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = targets[i]
        solver.eps(cache, "eps", x, t, levels[i][0])
        if order == 1:
            x = solver.step_1(x, t, t_next_, cache, levels=levels[i])
        elif order == 2:
            x = solver.step_2(x, t, t_next_, cache, levels=levels[i])
        else:
            x = solver.step_3(x, t, t_next_, cache, levels=levels[i])
        x = x + su * s_noise * noise_sampler(solver.sigma(t), solver.sigma(t_next))
        ctx.step(i, len(orders))
    return x


@torch.no_grad()
def sample_dpm_adaptive(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """DPM-Solver-12/23 with a PID step-size controller from σ_max to σ_min (steps ignored).

    Every attempt (accepted or not) evaluates the model afresh: 3 calls at order 3, 2 at
    order 2. Noise (η > 0) is drawn after each accepted step. The result is left at σ_min.
    Progress reports attempt ``i`` out of an estimate: attempts so far plus the remaining
    t-range divided by the current step size.

    Its step size follows each attempt's error, so every attempt reads that error back
    from the device: the one sampler whose loop waits for the device at every step. The
    t's it steps through are CPU tensors, as in k-diffusion.
    """
    _steps(sigmas)
    sigma_min, sigma_max = _sigma_range(sigmas, ctx)
    settings = {key: _extra(ctx, key, value) for key, value in _ADAPTIVE_DEFAULTS.items()}
    order = int(settings["order"])
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    eta = _eta(ctx)
    s_noise = _extra(ctx, "s_noise", 1.0)
    noise_sampler = _ancestral_noise(ctx)
    solver = _DPMSolver(ctx)
    t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
    h_init = abs(settings["h_init"])  # forward in t: _sigma_range guarantees σ_min < σ_max
    atol = torch.tensor(settings["atol"])
    rtol = torch.tensor(settings["rtol"])
    s = t_start
    x_prev = x
    pid = _PIDStepSize(
        h_init,
        settings["pcoeff"],
        settings["icoeff"],
        settings["dcoeff"],
        1.5 if eta else order,
        settings["accept_safety"],
    )
    attempt = 0
    while s < t_end - 1e-5:
        cache: _EpsCache = {}
        t = torch.minimum(t_end, s + pid.h)
        t_, su = solver.ancestral_target(s, t, t_end, eta)
        solver.eps(cache, "eps", x, s)
        if order == 2:
            x_low = solver.step_1(x, s, t_, cache)
            x_high = solver.step_2(x, s, t_, cache)
        else:
            x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, cache)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise_sampler(solver.sigma(s), solver.sigma(t))
            s = t
        remaining = max(0, math.ceil(float(abs(t_end - s)) / abs(pid.h) - 1e-9)) if pid.h else 0
        ctx.step(attempt, attempt + 1 + remaining)
        attempt += 1
    logger.debug("DPM adaptive: %d attempts", attempt)
    return x


# --------------------------------------------------------------------------------------
# Restart (A1111's own sampler) and LCM


def _karras(
    n: int, sigma_min: float, sigma_max: float, device: torch.device, rho: float = 7.0
) -> torch.Tensor:
    """k-diffusion's Karras schedule with a trailing 0, as the Restart sampler rebuilds it."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _nearest_index(sigmas: torch.Tensor, value: float) -> int:
    return int(torch.argmin(abs(sigmas - value), dim=0))


# Restart plan: restart from the schedule's σ nearest 0.1 back up to the one nearest 2.
_RESTART_MIN_SIGMA = 0.1
_RESTART_MAX_SIGMA = 2.0


def _restart_plan(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (σ, σ_next) Heun steps of A1111's Restart sampler, restart segments included.

    With n = len(sigmas) − 1 < 20 steps it is plain Heun over ``sigmas``. Otherwise a
    restart segment of k = 9 Heun steps is repeated m = 1 times (n ≥ 36: k = n // 4, m = 2),
    and the main schedule is rebuilt as Karras with n − k·m steps between the given
    schedule's ``sigmas[-2]`` and ``sigmas[0]``, so there are n Heun steps in all. After the
    main step that lands on the σ nearest 0.1, each repetition jumps back to the main σ
    nearest 2 and walks down again on a Karras schedule of k + 1 points between those two
    σ's. (The restart is skipped if the σ nearest 2 does not come before the one nearest
    0.1.)
    """
    steps = sigmas.shape[0] - 1
    if steps < 20:
        return [(sigmas[i], sigmas[i + 1]) for i in range(steps)]
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    sigmas = _karras(
        steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(), device=sigmas.device
    )
    min_idx = _nearest_index(sigmas, _RESTART_MIN_SIGMA)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 != min_idx:
            continue
        max_idx = _nearest_index(sigmas, _RESTART_MAX_SIGMA)
        if max_idx < min_idx:
            segment = _karras(
                restart_steps + 1, sigmas[min_idx].item(), sigmas[max_idx].item(), device=sigmas.device
            )[:-1]
            for _ in range(restart_times):
                plan.extend(zip(segment[:-1], segment[1:], strict=True))
    return plan


@torch.no_grad()
def sample_restart(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """A1111's Restart sampler (Xu et al. 2023, "Restart Sampling"), default restart plan.

    Runs Heun steps (an Euler step where σ_next = 0) over :func:`_restart_plan`. Whenever a
    step starts above where the previous one ended, i.e. at the start of each restart
    segment, fresh noise lifts x from σ_last to σ: ``x += randn_like(x)·s_noise·√(σ² −
    σ_last²)``. That is the only noise drawn, so Restart uses ``ctx.noise()`` once per
    restart (0 below 20 steps, 1 for 20–35, 2 from 36) and is ENSD-affected (§8.5).
    Progress counts Heun steps out of ``len(plan)``.
    """
    sched = _schedule(x, sigmas)
    s_noise = _extra(ctx, "s_noise", 1.0)
    plan = _restart_plan(sched.dev)
    flat = host_values([sigma for pair in plan for sigma in pair])
    hosts = list(zip(flat[::2], flat[1::2], strict=True))
    last: tuple[torch.Tensor, float] | None = None
    for step_id, ((old_sigma, new_sigma), (old_host, new_host)) in enumerate(zip(plan, hosts, strict=True)):
        if last is not None and last[1] < old_host:
            x = x + _randn_like(ctx) * s_noise * (old_sigma**2 - last[0] ** 2) ** 0.5
        x = _restart_heun_step(ctx, x, (old_sigma, old_host), (new_sigma, new_host))
        last = (new_sigma, new_host)
        ctx.step(step_id, len(plan))
    return x


def _restart_heun_step(
    ctx: SamplingContext, x: torch.Tensor, old: tuple[torch.Tensor, float], new: tuple[torch.Tensor, float]
) -> torch.Tensor:
    """One Heun step from σ to σ_next, each given as (device tensor, host value)."""
    (old_sigma, old_host), (new_sigma, new_host) = old, new
    denoised = _denoise(ctx, x, old_sigma, old_host)
    d = to_d(x, old_sigma, denoised)
    dt = new_sigma - old_sigma
    if new_host == 0:
        return x + d * dt
    x_2 = x + d * dt
    denoised_2 = _denoise(ctx, x_2, new_sigma, new_host)
    d_2 = to_d(x_2, new_sigma, denoised_2)
    d_prime = (d + d_2) / 2
    return x + d_prime * dt


@torch.no_grad()
def sample_lcm(x: torch.Tensor, sigmas: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
    """A1111's LCM sampler: jump to the denoised prediction, then re-noise to σ_next.

    ``x = D(x; σ_i) + σ_{i+1}·randn_like(x)``, with no noise after a step to 0. The LCM
    consistency scalings (c_skip/c_out on the 50-timestep table) belong to the denoiser
    in ``ctx.model``, not to this loop.
    """
    sched = _schedule(x, sigmas)
    steps, sigmas, host = sched.steps, sched.dev, sched.host
    noise_sampler = _ancestral_noise(ctx)
    for i in range(steps):
        x = _denoise(ctx, x, sigmas[i], host[i])
        if host[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
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

"""Shared step helpers of the k-diffusion sampler loops (:mod:`pipeline.kdiffusion`).

The σ schedule with its host copy, the CFG-denoiser call, the noise draws and noise
samplers, ``to_d``, ``get_ancestral_step``, the Euler/Heun/DPM2 churn and k-diffusion's
defaults for the sampler keyword arguments.

``sigmas`` are moved to ``x``'s device first, as A1111 keeps them on the compute device:
the σ arithmetic (logs, exps) then runs where A1111 runs it. ``ctx.extra`` carries the
sampler keyword arguments (s_churn, s_tmin, s_tmax, s_noise, order, sigma_min, ...), each
defaulting to k-diffusion's value; the engine should put there only what A1111 passes to
that sampler, since A1111 passes its sigma settings to some samplers and not others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.brownian import BrownianNoiseSampler
from pipeline.sampling import SamplingContext, host_values

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


# The "churn" of Euler, Heun and DPM2 (Karras et al. 2022, algorithm 2)


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

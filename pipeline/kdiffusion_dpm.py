"""DPM-Solver (Lu et al. 2022) as k-diffusion runs it: A1111's "DPM fast" and "DPM adaptive".

The DPM-Solver-1/2/3 single steps in eps form, the PID step-size controller of DPM
adaptive, the σ range both samplers integrate over and DPM fast's solver orders. The loops
are registered in :data:`pipeline.kdiffusion.SAMPLERS`; the shared step helpers are in
:mod:`pipeline.kdiffusion_steps`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.kdiffusion_steps import (
    _ADAPTIVE_DEFAULTS,
    _ancestral_noise,
    _eta,
    _extra,
    _steps,
    get_ancestral_step,
)
from pipeline.sampling import SamplingContext, host_values

logger = logging.getLogger(__name__)


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

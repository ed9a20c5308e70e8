"""A1111's own sampler loops over k-diffusion's σ schedule: Restart and LCM.

Restart's plan (Heun steps with restart segments on rebuilt Karras schedules) and its
Heun step, and the LCM loop. Both are registered in :data:`pipeline.kdiffusion.SAMPLERS`;
the shared step helpers are in :mod:`pipeline.kdiffusion_steps`.
"""

from __future__ import annotations

import torch

from pipeline.kdiffusion_steps import _ancestral_noise, _denoise, _extra, _randn_like, _schedule, to_d
from pipeline.sampling import SamplingContext, host_values


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

"""A1111's timestep samplers: DDIM, DDIM CFG++, PLMS and UniPC (A1111-SEMANTICS.md §9.4).

These four walk the model's integer training timesteps (ᾱ table) rather than a σ
schedule, and A1111's loops differ from diffusers' in ways that change the image: DDIM
and PLMS stop *above* the lowest timestep and use it only as the last update's target
(19 UNet calls at 20 steps, ending at ᾱ_1), PLMS starts with a provisional DDIM step
and an extra call, and UniPC ignores the integer timesteps apart from their count.
Each sampler is ``fn(x, timesteps, ctx) -> x`` over :class:`pipeline.sampling.SamplingContext`:

* ``x`` is the start latent: the unscaled noise for txt2img (DDIM at 1 step returns it
  unchanged), the noised init latent for img2img (built by the engine).
* ``timesteps`` is the ascending list of :func:`pipeline.samplers.timesteps` (or the
  img2img slice of it).
* ``ctx.eps_model(x, t)`` is one CFG-denoiser call returning ε; ``t`` is a float32
  tensor of shape ``[batch]`` (whole numbers for DDIM/PLMS, fractional for UniPC).
* ``ctx.alphas_cumprod`` is the model's (1000,) float32 ᾱ; ``ctx.noise()`` one per-step
  noise draw (DDIM/DDIM CFG++: one per update, whatever eta is); ``ctx.step(i, total)`` follows every
  sampler step, ``total`` being the number of steps the loop makes.

Settings read from ``ctx.extra`` (A1111's option names and defaults):

* ``"eps_model_cfgpp"`` — DDIM CFG++ only, required: ``(x, t) -> (ε_guided, ε_uncond)``
  where ε_guided is the CFG combination with the scale multiplied by 1/12.5.
* ``"uni_pc_variant"`` ``"bh1"`` (or ``"bh2"``), ``"uni_pc_order"`` 3,
  ``"uni_pc_skip_type"`` ``"time_uniform"`` (or ``"time_quadratic"``, ``"logSNR"``),
  ``"uni_pc_lower_order_final"`` True, and ``"is_img2img"`` False (UniPC then starts at
  the top timestep of the slice instead of at t = 999).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline import rng
from pipeline.sampling import SamplingContext

logger = logging.getLogger(__name__)

TimestepSampler = Callable[[torch.Tensor, Sequence[int], SamplingContext], torch.Tensor]
EpsPair = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# DDIM CFG++ divides the CFG scale by this, so the usual 1-12.5 range becomes CFG++'s λ ∈ [0, 1].
CFGPP_SCALE_DIVISOR = 12.5

_UNIPC_VARIANTS = ("bh1", "bh2")
_UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")


# --------------------------------------------------------------------------------------
# Shared helpers


def _alphas(ctx: SamplingContext) -> torch.Tensor:
    """ᾱ as a CPU float32 vector: every coefficient is read from it as a Python scalar, as A1111 does."""
    if ctx.alphas_cumprod is None:
        raise ValueError("timestep samplers need ctx.alphas_cumprod (the model's ᾱ table)")
    alphas = ctx.alphas_cumprod.detach().to("cpu", torch.float32).reshape(-1)
    if alphas.numel() < 2:
        raise ValueError(f"alphas_cumprod needs at least 2 entries, got {alphas.numel()}")
    return alphas


def _check_timesteps(timesteps: Sequence[int], size: int) -> list[int]:
    """Whole, non-decreasing timesteps inside the ᾱ table (501+ steps repeat 999 at the end)."""
    values = [operator.index(t) for t in timesteps]
    if not values:
        raise ValueError("timesteps must not be empty")
    if any(t < 0 or t >= size for t in values):
        raise ValueError(f"timesteps must lie in 0..{size - 1}, got {values[0]}..{values[-1]}")
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("timesteps must be in ascending order")
    return values


def _eps_model(ctx: SamplingContext) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if ctx.eps_model is None:
        raise ValueError("timestep samplers need ctx.eps_model")
    return ctx.eps_model


def _eps_call(
    ctx: SamplingContext,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: float,
) -> torch.Tensor:
    """One CFG-denoiser call at UNet timestep ``t`` (a host value, announced first)."""
    ctx.announce(float(t))
    return model(x, _t_batch(t, x))


def _t_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    """The UNet timestep for every image of the batch, as A1111 passes it (a float vector)."""
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A coefficient rounded to the latent's dtype, so the arithmetic stays in that dtype.

    Filled on the device (``torch.full``) rather than copied there from the host
    (``torch.tensor(value, device=...)``), which would wait for the device's queue."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------
# DDIM and DDIM CFG++


@dataclass(frozen=True)
class _DdimStep:
    """The ᾱ-derived scalars of one update from timestep t to the next lower one."""

    alpha: float  # ᾱ_t
    alpha_prev: float  # ᾱ of the target timestep
    sqrt_one_minus_alpha: float  # √(1 − ᾱ_t), computed in float32
    sigma: float  # the eta-scaled stochastic σ_t, computed in float64

    @classmethod
    def plan(cls, alphas: torch.Tensor, ts: list[int], eta: float) -> list[_DdimStep]:
        """The updates from ``ts[-1]`` down to ``ts[0]``, in the order the loop makes them,
        from host copies of the table read once (√(1 − ᾱ) in float32, as the table is)."""
        alpha = alphas.tolist()
        root = torch.sqrt(1 - alphas).tolist()
        steps = []
        for i in range(len(ts) - 1, 0, -1):
            a_t, a_prev = alpha[ts[i]], alpha[ts[i - 1]]
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            steps.append(
                cls(
                    alpha=a_t,
                    alpha_prev=a_prev,
                    sqrt_one_minus_alpha=root[ts[i]],
                    sigma=eta * max(variance, 0.0) ** 0.5,
                )
            )
        return steps


def _ddim_update(
    x: torch.Tensor, eps_x0: torch.Tensor, eps_dir: torch.Tensor, step: _DdimStep
) -> torch.Tensor:
    """DDIM's deterministic part: estimate x0 with ``eps_x0``, renoise to ᾱ_prev along ``eps_dir``.

    x̂0 = (x − √(1−ᾱ_t)·ε_x0)/√ᾱ_t;  x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_t²)·ε_dir
    """
    a_t = _scalar(step.alpha, x)
    a_prev = _scalar(step.alpha_prev, x)
    sigma = _scalar(step.sigma, x)
    pred_x0 = (x - _scalar(step.sqrt_one_minus_alpha, x) * eps_x0) / a_t.sqrt()
    direction = (1.0 - a_prev - sigma**2).sqrt() * eps_dir
    return a_prev.sqrt() * pred_x0 + direction


def _draw_noise(ctx: SamplingContext) -> torch.Tensor:
    if ctx.noise is None:
        raise ValueError("DDIM needs ctx.noise")
    return ctx.noise()


def _ddim_loop(
    x: torch.Tensor, timesteps: Sequence[int], ctx: SamplingContext, eps_pair: EpsPair
) -> torch.Tensor:
    """A1111's DDIM loop: len(timesteps) − 1 updates, the lowest timestep only a target (§9.4).

    Every update draws exactly one noise tensor whatever eta is (A1111 adds σ_t·z, which
    is 0 at eta 0 but still advances the per-image stream, §8.5).
    """
    alphas = _alphas(ctx)
    ts = _check_timesteps(timesteps, alphas.numel())
    eta = 0.0 if ctx.eta is None else float(ctx.eta)
    total = len(ts) - 1
    plan = _DdimStep.plan(alphas, ts, eta)
    for index, (i, step) in enumerate(zip(range(total, 0, -1), plan, strict=True)):
        ctx.announce(float(ts[i]))
        eps_x0, eps_dir = eps_pair(x, _t_batch(ts[i], x))
        x = _ddim_update(x, eps_x0, eps_dir, step)
        x = x + _scalar(step.sigma, x) * _draw_noise(ctx)
        ctx.step(index, total)
    return x


def ddim(x: torch.Tensor, timesteps: Sequence[int], ctx: SamplingContext) -> torch.Tensor:
    """A1111's DDIM ("Eta for DDIM" via ``ctx.eta``, default 0)."""
    model = _eps_model(ctx)

    def eps_pair(latent: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = model(latent, t)
        return eps, eps

    return _ddim_loop(x, timesteps, ctx, eps_pair)


def ddim_cfgpp(x: torch.Tensor, timesteps: Sequence[int], ctx: SamplingContext) -> torch.Tensor:
    """A1111's DDIM CFG++: DDIM with a weak guided ε for x̂0 and the unconditional ε to renoise.

    CFG++ (Chung et al., 2024) keeps the sample on the data manifold by renoising with the
    *unconditional* ε instead of the guided one. A1111 runs its CFG denoiser with the scale
    multiplied by 1/12.5 (cfg 7 → λ = 0.56) and also returns the uncond ε of that call:

        ε_λ   = ε_u + (cfg/12.5)·(ε_c − ε_u)          (ctx.extra["eps_model_cfgpp"], first)
        x̂0    = (x − √(1−ᾱ_t)·ε_λ) / √ᾱ_t
        x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_t²)·ε_u + σ_t·z   (ε_u: second; z drawn at any eta)

    Same timesteps, calls and noise draws as :func:`ddim`.
    """
    model = ctx.extra.get("eps_model_cfgpp")
    if not callable(model):
        raise ValueError(
            "DDIM CFG++ needs ctx.extra['eps_model_cfgpp'](x, t) -> (eps_guided_cfg_over_12_5, eps_uncond)"
        )

    def eps_pair(latent: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guided, uncond = model(latent, t)
        return guided, uncond

    return _ddim_loop(x, timesteps, ctx, eps_pair)


# --------------------------------------------------------------------------------------
# PLMS


def _adams_bashforth(eps: torch.Tensor, previous: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep combination of the current ε with up to 3 earlier ones (§9.4)."""
    if len(previous) == 1:
        return (3 * eps - previous[-1]) / 2
    if len(previous) == 2:
        return (23 * eps - 16 * previous[-1] + 5 * previous[-2]) / 12
    return (55 * eps - 59 * previous[-1] + 37 * previous[-2] - 9 * previous[-3]) / 24


def plms(x: torch.Tensor, timesteps: Sequence[int], ctx: SamplingContext) -> torch.Tensor:
    """A1111's PLMS: pseudo improved Euler first, then Adams–Bashforth on ε (eta is ignored).

    The first update averages ε at the top timestep with ε of a provisional DDIM step,
    evaluated at the next lower timestep; that extra ε is not kept. At 2 steps the extra
    call is at timestep 1, the final target, which DDIM never evaluates.
    """
    model = _eps_model(ctx)
    alphas = _alphas(ctx)
    ts = _check_timesteps(timesteps, alphas.numel())
    total = len(ts) - 1
    previous: list[torch.Tensor] = []
    plan = _DdimStep.plan(alphas, ts, 0.0)
    for index, (i, step) in enumerate(zip(range(total, 0, -1), plan, strict=True)):
        eps = _eps_call(ctx, model, x, ts[i])
        if previous:
            eps_prime = _adams_bashforth(eps, previous)
        else:
            provisional = _ddim_update(x, eps, eps, step)
            eps_next = _eps_call(ctx, model, provisional, ts[i - 1])
            eps_prime = (eps + eps_next) / 2
        x = _ddim_update(x, eps_prime, eps_prime, step)
        previous = [*previous, eps][-3:]
        ctx.step(index, total)
    return x


# --------------------------------------------------------------------------------------
# UniPC (Zhao et al., 2023), multistep, data prediction, B(h) variants


@dataclass(frozen=True)
class _UniPCSettings:
    variant: str = "bh1"
    order: int = 3
    skip_type: str = "time_uniform"
    lower_order_final: bool = True
    is_img2img: bool = False

    @classmethod
    def from_ctx(cls, ctx: SamplingContext) -> _UniPCSettings:
        extra = ctx.extra
        settings = cls(
            variant=str(extra.get("uni_pc_variant", cls.variant)),
            order=operator.index(extra.get("uni_pc_order", cls.order)),
            skip_type=str(extra.get("uni_pc_skip_type", cls.skip_type)),
            lower_order_final=bool(extra.get("uni_pc_lower_order_final", cls.lower_order_final)),
            is_img2img=bool(extra.get("is_img2img", cls.is_img2img)),
        )
        if settings.variant not in _UNIPC_VARIANTS:
            raise ValueError(
                f"UniPC variant must be one of {', '.join(_UNIPC_VARIANTS)}, got {settings.variant!r}"
            )
        if settings.skip_type not in _UNIPC_SKIP_TYPES:
            raise ValueError(
                f"UniPC skip type must be one of {', '.join(_UNIPC_SKIP_TYPES)}, got {settings.skip_type!r}"
            )
        if settings.order < 1:
            raise ValueError(f"UniPC order must be >= 1, got {settings.order}")
        return settings


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, fp), xp ascending, extended linearly past both ends."""
    flat = x.reshape(-1)
    upper = torch.searchsorted(xp, flat).clamp(1, xp.numel() - 1)
    x0, x1 = xp[upper - 1], xp[upper]
    y0, y1 = fp[upper - 1], fp[upper]
    return (y0 + (flat - x0) * (y1 - y0) / (x1 - x0)).reshape(x.shape)


@dataclass(frozen=True)
class _VPSchedule:
    """The discrete VP noise schedule as a function of continuous time t ∈ (0, 1].

    Training timestep k sits at t = (k + 1)/N, and log α_t = ½·log ᾱ is interpolated
    linearly in t between them; σ_t = √(1 − α_t²) and λ_t = log α_t − log σ_t.
    """

    t_grid: torch.Tensor
    log_alpha: torch.Tensor

    @classmethod
    def from_alphas(cls, alphas: torch.Tensor) -> _VPSchedule:
        n = alphas.numel()
        return cls(t_grid=torch.linspace(0.0, 1.0, n + 1)[1:], log_alpha=0.5 * torch.log(alphas))

    @property
    def size(self) -> int:
        return self.t_grid.numel()

    def log_mean(self, t: torch.Tensor) -> torch.Tensor:
        return _interpolate(t, self.t_grid, self.log_alpha)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mean(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        log_mean = self.log_mean(t)
        return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return _interpolate(log_alpha, self.log_alpha.flip(0), self.t_grid.flip(0))

    def unet_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) UNet timestep of continuous time t: t = 1/N ↔ 0, t = 1 ↔ N − 1."""
        return (t - 1.0 / self.size) * 1000.0


def _unipc_times(vp: _VPSchedule, steps: int, t_start: float, skip_type: str) -> torch.Tensor:
    """``steps + 1`` continuous times from ``t_start`` down to 1/N (the model's timestep 0)."""
    t_end = 1.0 / vp.size
    if skip_type == "logSNR":
        ends = vp.lam(torch.tensor([t_start, t_end], dtype=torch.float32))
        return vp.inverse_lambda(torch.linspace(float(ends[0]), float(ends[1]), steps + 1))
    if skip_type == "time_quadratic":
        return torch.linspace(t_start**0.5, t_end**0.5, steps + 1) ** 2
    return torch.linspace(t_start, t_end, steps + 1)


def _unipc_start(timesteps: list[int], settings: _UniPCSettings) -> float:
    """t_T: 1 for txt2img; for img2img the slice's top timestep k as (k + 1)/1000, in float32."""
    if not settings.is_img2img:
        return 1.0
    return float(torch.tensor(timesteps[-1]) / 1000 + 1 / 1000)


@dataclass(frozen=True)
class _UniPCCoefficients:
    """Scalars of one UniPC-p / UniC-p update from the latest history time s0 to t."""

    sigma_ratio: torch.Tensor  # σ_t / σ_s0
    alpha_t: torch.Tensor
    h_phi_1: torch.Tensor  # e^{−h} − 1
    b_h: torch.Tensor  # B(h): −h (bh1) or e^{−h} − 1 (bh2)
    rks: torch.Tensor  # (order,) r_k = (λ_sk − λ_s0)/h, then 1
    r: torch.Tensor  # (order, order) Vandermonde rows r_k^(i−1)
    b: torch.Tensor  # (order,)


def _unipc_coefficients(
    vp: _VPSchedule, times: list[torch.Tensor], t: torch.Tensor, order: int, variant: str
) -> _UniPCCoefficients:
    """The φ-function coefficients of UniPC's B(h) family for the last ``order`` history times."""
    s0 = times[-1]
    lambda_s0 = vp.lam(s0)
    h = vp.lam(t) - lambda_s0
    ratios = [(vp.lam(times[-(k + 1)]) - lambda_s0) / h for k in range(1, order)]
    rks = torch.stack([*ratios, torch.ones((), dtype=h.dtype)])
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return _UniPCCoefficients(
        sigma_ratio=vp.std(t) / vp.std(s0),
        alpha_t=vp.alpha(t),
        h_phi_1=h_phi_1,
        b_h=b_h,
        rks=rks,
        r=torch.stack(rows),
        b=torch.stack(b),
    )


def _weighted(
    weights: torch.Tensor | None, diffs: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor | int:
    """Σ_k w_k·D_k over the stacked differences (dim 1), or 0 when there are none."""
    if weights is None or diffs is None:
        return 0
    return torch.einsum("k,bk...->b...", rng.to_device(weights, like.device, like.dtype), diffs)


@dataclass(frozen=True)
class _UniPCEnv:
    vp: _VPSchedule
    variant: str
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ctx: SamplingContext

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor, unet_t: float) -> torch.Tensor:
        """x̂0 = (x − σ_t·ε)/α_t with ε from one CFG-denoiser call at t's UNet timestep
        ``unet_t`` (its host value, from :meth:`_VPSchedule.unet_timestep`)."""
        eps = _eps_call(self.ctx, self.model, x, unet_t)
        return (x - self.vp.std(t) * eps) / self.vp.alpha(t)


def _predictor_weights(c: _UniPCCoefficients, order: int) -> torch.Tensor | None:
    """UniP's ρ: none at order 1, ½ at order 2 (UniPC's simplified choice), else solved."""
    if order == 1:
        return None
    if order == 2:
        return torch.tensor([0.5])
    return torch.linalg.solve(c.r[:-1, :-1], c.b[:-1])


def _corrector_weights(c: _UniPCCoefficients, order: int) -> torch.Tensor:
    """UniC's ρ, the last one weighting the new model output: ½ at order 1, else solved."""
    if order == 1:
        return torch.tensor([0.5])
    return torch.linalg.solve(c.r, c.b)


def _unipc_update(
    x: torch.Tensor,
    history: list[tuple[torch.Tensor, torch.Tensor]],
    t: tuple[torch.Tensor, float],
    order: int,
    use_corrector: bool,
    env: _UniPCEnv,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniP-p predictor step to t, then (unless last) the UniC corrector with the model at t.

    Returns the new latent and the data prediction evaluated on the *predicted* latent,
    which is what the history keeps. ``t`` is the time with its UNet timestep's host value.
    """
    t, unet_t = t
    times = [s for s, _ in history]
    c = _unipc_coefficients(env.vp, times, t, order, env.variant)
    m0 = history[-1][1]
    diffs = None
    if order > 1:
        models = [history[-(k + 1)][1] for k in range(1, order)]
        diffs = torch.stack([(m - m0) / rk for m, rk in zip(models, c.rks[:-1], strict=True)], dim=1)
    base = c.sigma_ratio * x - c.alpha_t * c.h_phi_1 * m0
    x_t = base - c.alpha_t * c.b_h * _weighted(_predictor_weights(c, order), diffs, x)
    if not use_corrector:
        return x_t, None
    rhos_c = _corrector_weights(c, order)
    model_t = env.data_prediction(x_t, t, unet_t)
    correction = _weighted(rhos_c[:-1], diffs, x) + rhos_c[-1] * (model_t - m0)
    return base - c.alpha_t * c.b_h * correction, model_t


def _unipc_step_order(step: int, steps: int, settings_order: int, lower_order_final: bool) -> int:
    """Warm-up at orders 1 … order−1, then ``order``; with lower_order_final the last steps drop to 1."""
    if step < settings_order:
        return step
    if lower_order_final:
        return min(settings_order, steps + 1 - step)
    return settings_order


def unipc(x: torch.Tensor, timesteps: Sequence[int], ctx: SamplingContext) -> torch.Tensor:
    """A1111's UniPC: multistep predictor–corrector on ``len(timesteps)`` steps of its own times.

    Only the number of timesteps (and, for img2img, the top one) is used: the steps are
    spaced in continuous time (skip type) from t = 1 (UNet timestep 999) down to 1/N
    (timestep 0), so the UNet sees fractional timesteps. Every step but the last is
    corrected with the model evaluated at its new time; the model is called once per
    step. An order above the step count is lowered to it (A1111 asserts instead).
    """
    settings = _UniPCSettings.from_ctx(ctx)
    alphas = _alphas(ctx)
    ts = _check_timesteps(timesteps, alphas.numel())
    env = _UniPCEnv(
        vp=_VPSchedule.from_alphas(alphas), variant=settings.variant, model=_eps_model(ctx), ctx=ctx
    )
    steps = len(ts)
    order = min(settings.order, steps)
    if order < settings.order:
        logger.debug("UniPC order %d lowered to the %d steps", settings.order, steps)
    times = _unipc_times(env.vp, steps, _unipc_start(ts, settings), settings.skip_type)
    unet_ts = env.vp.unet_timestep(times).tolist()  # the UNet timesteps' host values, once
    history = [(times[0], env.data_prediction(x, times[0], unet_ts[0]))]
    for step in range(1, steps + 1):
        step_order = _unipc_step_order(step, steps, order, settings.lower_order_final)
        x, model_x = _unipc_update(x, history, (times[step], unet_ts[step]), step_order, step < steps, env)
        if model_x is not None:
            history = [*history, (times[step], model_x)][-order:]
        ctx.step(step - 1, steps)
    return x


SAMPLERS: dict[str, TimestepSampler] = {
    "DDIM": ddim,
    "DDIM CFG++": ddim_cfgpp,
    "PLMS": plms,
    "UniPC": unipc,
}

"""The model's discrete noise table and the σ formulas of A1111's Schedule types (§9.2, §9.3).

The SD1/SD2/SDXL training schedule (ᾱ and σ per training timestep, in float32 or, with
"Downcast alphas_cumprod", float16), LCM's 50-timestep subset of it, k-diffusion's log-σ
interpolation between the table's entries, and one function per Schedule type (Uniform,
Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple,
Normal, DDIM, Beta) that turns a step count and a σ range into a descending σ list.
Choosing the sampler, the schedule and the overrides happens in :mod:`pipeline.samplers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# The SD1/SD2/SDXL training schedule ("scaled_linear" in diffusers' words).
_BETA_START = 0.00085
_BETA_END = 0.012
_TRAIN_TIMESTEPS = 1000

# LCM runs on 50 of the 1000 training timesteps (every 20th, ending at 999).
_LCM_ORIGINAL_STEPS = 50

# "Beta scheduler - alpha/beta" settings at their A1111 defaults.
_BETA_DIST_ALPHA = 0.6
_BETA_DIST_BETA = 0.6

# Align Your Steps σ tables, descending (§9.2).
_AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
_AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


# --------------------------------------------------------------------------------------
# The model's discrete noise table (§9.2, §9.3)


@dataclass(frozen=True)
class _NoiseTable:
    """σ of each training timestep, ascending, with k-diffusion's log-σ interpolation."""

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> _NoiseTable:
        return cls(sigmas=sigmas, log_sigmas=sigmas.log())

    def to(self, device: str | torch.device) -> _NoiseTable:
        return _NoiseTable(sigmas=self.sigmas.to(device), log_sigmas=self.log_sigmas.to(device))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t): geometric interpolation between the two neighbouring table entries."""
        t = t.float()
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ): the inverse of :meth:`t_to_sigma`, clamped to the table's ends."""
        log_sigma = sigma.log()
        dtype = torch.promote_types(log_sigma.dtype, self.log_sigmas.dtype)
        log_sigma = log_sigma.to(dtype)
        table = self.log_sigmas.to(dtype)
        flat = log_sigma.reshape(-1)
        # Index of the last entry <= log σ, kept inside [0, len-2] so there is always a
        # right neighbour; below the table this is 0 and w clamps to 0, above it w clamps to 1.
        count = torch.searchsorted(table, flat, right=True)
        low = (count - 1).clamp(0, table.shape[0] - 2)
        high = low + 1
        low_value = table[low]
        # the neighbours' difference in the table's own precision (float16 when downcast)
        step = (self.log_sigmas[low] - self.log_sigmas[high]).to(dtype)
        w = ((low_value - flat) / step).clamp(0, 1)
        t = (1 - w) * low.to(dtype) + w * high.to(dtype)
        return t.reshape(sigma.shape)

    def default_sigmas(self, n: int) -> torch.Tensor:
        """k-diffusion's own schedule: n timesteps evenly spaced from the top of the table to 0."""
        t = torch.linspace(self.sigmas.shape[0] - 1, 0, n, dtype=torch.float32)
        return _append_zero(self.t_to_sigma(t))


def sd_alphas_cumprod(*, downcast: bool = False) -> torch.Tensor:
    """The SD1/SD2/SDXL ᾱ table as A1111 keeps it: β and the product in float64, stored as
    float32; ``downcast`` ("Downcast alphas_cumprod") casts it to float16."""
    betas = torch.linspace(_BETA_START**0.5, _BETA_END**0.5, _TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    return alphas_cumprod.half() if downcast else alphas_cumprod


def _sd_table(downcast: bool = False) -> _NoiseTable:
    """The SD1/SD2/SDXL table: σ = √((1−ᾱ)/ᾱ) in ᾱ's precision (float32, or float16 downcast).

    Rebuilt per call (it takes microseconds) so no module-level tensor can be mutated.
    """
    alphas_cumprod = sd_alphas_cumprod(downcast=downcast)
    return _NoiseTable.from_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def _lcm_table(downcast: bool = False) -> _NoiseTable:
    """LCM's denoiser only knows the 50 timesteps 19, 39, …, 999 of the full table."""
    skip = _TRAIN_TIMESTEPS // _LCM_ORIGINAL_STEPS
    return _NoiseTable.from_sigmas(_sd_table(downcast).sigmas[skip - 1 :: skip].clone())


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# --------------------------------------------------------------------------------------
# Schedules (§9.2)


@dataclass(frozen=True)
class _ScheduleInput:
    n: int
    table: _NoiseTable
    sigma_lo: float
    sigma_hi: float
    sdxl: bool


def _uniform(p: _ScheduleInput) -> torch.Tensor:
    return p.table.default_sigmas(p.n)


def _karras(p: _ScheduleInput, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, p.n, dtype=torch.float32)
    lo_root = p.sigma_lo ** (1 / rho)
    hi_root = p.sigma_hi ** (1 / rho)
    return _append_zero((hi_root + ramp * (lo_root - hi_root)) ** rho)


def _exponential(p: _ScheduleInput) -> torch.Tensor:
    return _append_zero(
        torch.linspace(math.log(p.sigma_hi), math.log(p.sigma_lo), p.n, dtype=torch.float32).exp()
    )


def _polyexponential(p: _ScheduleInput, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, p.n, dtype=torch.float32) ** rho
    log_lo = math.log(p.sigma_lo)
    return _append_zero(torch.exp(ramp * (math.log(p.sigma_hi) - log_lo) + log_lo))


def _timestep_range(p: _ScheduleInput) -> tuple[float, float]:
    """t(σ_hi), t(σ_lo) as float32 values, the way the table-walking schedules start and end."""
    ends = torch.tensor([p.sigma_hi, p.sigma_lo], dtype=torch.float32)
    start, end = p.table.sigma_to_t(ends).tolist()
    return start, end


def _sgm_uniform(p: _ScheduleInput) -> torch.Tensor:
    start, end = _timestep_range(p)
    t = torch.linspace(start, end, p.n + 1, dtype=torch.float32)[:-1]
    return _append_zero(p.table.t_to_sigma(t))


def _normal(p: _ScheduleInput) -> torch.Tensor:
    start, end = _timestep_range(p)
    return _append_zero(p.table.t_to_sigma(torch.linspace(start, end, p.n, dtype=torch.float32)))


def _kl_optimal(p: _ScheduleInput) -> torch.Tensor:
    """n + 1 entries from σ_hi to σ_lo, deliberately without a trailing 0."""
    atan_lo = torch.atan(torch.tensor(p.sigma_lo, dtype=torch.float32))
    atan_hi = torch.atan(torch.tensor(p.sigma_hi, dtype=torch.float32))
    frac = torch.arange(p.n + 1, dtype=torch.float32) / p.n
    return torch.tan(frac * atan_lo + (1.0 - frac) * atan_hi)


def _align_your_steps(p: _ScheduleInput) -> torch.Tensor:
    table = _AYS_SDXL if p.sdxl else _AYS_SD15
    if p.n == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    xs = np.linspace(0, 1, len(table))
    log_ascending = np.log(np.array(table[::-1], dtype=np.float64))
    interpolated = np.exp(np.interp(np.linspace(0, 1, p.n), xs, log_ascending))[::-1]
    return torch.tensor(np.append(interpolated, [0.0]), dtype=torch.float32)


def _simple(p: _ScheduleInput) -> torch.Tensor:
    descending = p.table.sigmas.flip(0)
    stride = descending.shape[0] / p.n
    picked = descending[[int(i * stride) for i in range(p.n)]]
    return _append_zero(picked)


def _ddim(p: _ScheduleInput) -> torch.Tensor:
    """Every ``size // n``-th table entry from index 1: can give more than n + 1 entries."""
    size = p.table.sigmas.shape[0]
    stride = max(size // p.n, 1)
    return _append_zero(p.table.sigmas[1:size:stride].flip(0))


def _beta(p: _ScheduleInput) -> torch.Tensor:
    """Linear in σ between the ends, spaced by the Beta(0.6, 0.6) quantiles (double precision)."""
    from scipy import stats  # imported here: scipy.stats is slow to import and rarely needed

    u = 1 - np.linspace(0, 1, p.n)
    q = stats.beta.ppf(u, _BETA_DIST_ALPHA, _BETA_DIST_BETA)
    sigmas = p.sigma_lo + q * (p.sigma_hi - p.sigma_lo)
    return torch.tensor(np.append(sigmas, [0.0]), dtype=torch.float32)


_SCHEDULE_FUNCTIONS = {
    "uniform": _uniform,
    "karras": _karras,
    "exponential": _exponential,
    "polyexponential": _polyexponential,
    "sgm_uniform": _sgm_uniform,
    "kl_optimal": _kl_optimal,
    "align_your_steps": _align_your_steps,
    "simple": _simple,
    "normal": _normal,
    "ddim": _ddim,
    "beta": _beta,
}

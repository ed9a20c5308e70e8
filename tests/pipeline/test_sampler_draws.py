"""Noise draws and denoiser calls of every sampler loop, as PARITY-API.md "Sampler loops" states.

Each loop runs over a counting stub: ``ctx.noise()`` counts draws (every
``torch.randn_like(x)`` k-diffusion 0.0.16 or A1111 makes, used or not, rule 4) and
``ctx.model`` / ``ctx.eps_model`` count denoiser calls (rule 3). The churn cases compare
Euler, Heun and DPM2 with k-diffusion's published update formulas, written out below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from pipeline import kdiffusion, kdiffusion_dpm, samplers, timestep_samplers
from pipeline.samplers import sigma_schedule
from pipeline.sampling import SamplingContext
from tests.pipeline.test_timestep_samplers import ALPHAS

SHAPE = (1, 4, 4, 4)
SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Posterior mean of N(0.3, 0.5²) data: smooth and deterministic."""
    s2 = sigma.view(-1, 1, 1, 1) ** 2
    return (x * 0.25 + 0.3 * s2) / (s2 + 0.25)


@dataclass
class Counts:
    draws: int = 0
    calls: int = 0
    out: torch.Tensor | None = None


def stream(seed: int = 7) -> Callable[[], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(SHAPE, generator=gen)


def counting_context(
    counts: Counts, *, eta: float | None = None, extra: dict | None = None
) -> SamplingContext:
    draw = stream()

    def noise() -> torch.Tensor:
        counts.draws += 1
        return draw()

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        counts.calls += 1
        return toy_denoiser(x, sigma)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        counts.calls += 1
        return 0.5 * x * torch.cos(t.view(-1, 1, 1, 1) / 300)

    def cfgpp(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = eps_model(x, t)
        return eps, eps

    return SamplingContext(
        model=model,
        eps_model=eps_model,
        alphas_cumprod=ALPHAS.clone(),
        noise=noise,
        seeds=[11],
        eta=eta,
        extra={"eps_model_cfgpp": cfgpp, **(extra or {})},
    )


def run_k(name: str, steps: int, *, eta: float | None = None, extra: dict | None = None) -> Counts:
    counts = Counts()
    sigmas = sigma_schedule(name, "Automatic", steps).sigmas
    settings = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, **(extra or {})}
    ctx = counting_context(counts, eta=eta, extra=settings)
    x = stream(1)() * sigmas[0]
    counts.out = kdiffusion.SAMPLERS[name](x, sigmas, ctx)
    return counts


def run_t(name: str, steps: int, *, eta: float | None = None) -> Counts:
    counts = Counts()
    ctx = counting_context(counts, eta=eta)
    counts.out = timestep_samplers.SAMPLERS[name](stream(1)(), samplers.timesteps(name, steps), ctx)
    return counts


def k_steps(name: str, steps: int) -> int:
    return len(sigma_schedule(name, "Automatic", steps).sigmas) - 1


def test_every_contract_sampler_is_counted_here() -> None:
    counted = set(K_EXPECTED) | set(T_EXPECTED)
    assert counted == set(kdiffusion.SAMPLERS) | set(timestep_samplers.SAMPLERS)


# name -> (draws, calls) for n = len(sigmas) - 1 steps ending at σ = 0 (eta 1, churn 0).
K_EXPECTED: dict[str, tuple[Callable[[int], int], Callable[[int], int]]] = {
    # rule 4: "Euler, Heun, DPM2: one draw at the start of every step, unconditionally"
    "Euler": (lambda n: n, lambda n: n),
    "Heun": (lambda n: n, lambda n: 2 * n - 1),  # the step to 0 is an Euler step
    "DPM2": (lambda n: n, lambda n: 2 * n - 1),
    # rule 4: "Euler a, DPM++ 2S a, LCM: one draw per step whose σ_{i+1} > 0"
    "Euler a": (lambda n: n - 1, lambda n: n),
    "DPM++ 2S a": (lambda n: n - 1, lambda n: 2 * n - 1),
    "LCM": (lambda n: n - 1, lambda n: n),
    # rule 4: "DPM2 a: one draw per step whose σ_down ≠ 0 ... none on the final step to 0"
    "DPM2 a": (lambda n: n - 1, lambda n: 2 * n - 1),
    # rule 4: "DPM fast: one draw after every solver step"; n model calls in all
    "DPM fast": (lambda n: len(kdiffusion_dpm._fast_orders(n)), lambda n: n),
    # rule 4: "LMS, DPM++ 2M ... and the four Brownian samplers: none"
    "LMS": (lambda n: 0, lambda n: n),
    "DPM++ 2M": (lambda n: 0, lambda n: n),
    "DPM++ SDE": (lambda n: 0, lambda n: 2 * n - 1),
    "DPM++ 2M SDE": (lambda n: 0, lambda n: n),
    "DPM++ 2M SDE Heun": (lambda n: 0, lambda n: n),
    "DPM++ 3M SDE": (lambda n: 0, lambda n: n),
    # rule 4: "Restart: one draw at the start of each restart segment" (none below 20 steps)
    "Restart": (lambda n: 0, lambda n: 2 * n - 1),
    # rule 4: "DPM adaptive: one after every accepted step"; counted in its own test below
    "DPM adaptive": (lambda n: -1, lambda n: -1),
}


@pytest.mark.parametrize("name", [n for n in K_EXPECTED if n != "DPM adaptive"])
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_k_diffusion_draw_and_call_counts(name: str, steps: int) -> None:
    if name == "DPM fast" and steps == 1:
        pytest.skip("one step has no σ range in the schedule; covered at 5 and 12")
    draws, calls = K_EXPECTED[name]
    n = k_steps(name, steps)
    counts = run_k(name, steps)
    assert (counts.draws, counts.calls) == (draws(n), calls(n))


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_samplers_draw_every_step_with_churn_off_or_out_of_range(name: str) -> None:
    """Rule 4: drawn "even when s_churn is 0 or σ_i lies outside [s_tmin, s_tmax]"."""
    n = k_steps(name, 8)
    assert run_k(name, 8).draws == n
    assert run_k(name, 8, extra={"s_churn": 0.5, "s_tmin": 100.0, "s_tmax": 200.0}).draws == n
    assert run_k(name, 8, extra={"s_churn": 0.5, "s_tmin": 0.0, "s_tmax": 1.0}).draws == n


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast"])
def test_ancestral_draws_do_not_depend_on_eta(name: str) -> None:
    """Rule 4: draws "whose value is unused or multiplied by 0" count too (eta 0: σ_up = 0)."""
    assert run_k(name, 7, eta=0.0).draws == run_k(name, 7).draws


def test_dpm2_a_draws_nothing_on_the_final_step_to_zero() -> None:
    """Rule 4: DPM2 a draws "none on the final step to 0" (σ_down = 0 there)."""
    for steps in (2, 6, 10):
        assert run_k("DPM2 a", steps).draws == k_steps("DPM2 a", steps) - 1


@pytest.mark.parametrize("eta", [None, 0.0])
def test_dpm_adaptive_draws_once_per_accepted_step(
    monkeypatch: pytest.MonkeyPatch, eta: float | None
) -> None:
    """Rule 4: "DPM adaptive: one after every accepted step", at eta 0 too; 3 calls an attempt."""
    decisions: list[bool] = []
    propose = kdiffusion_dpm._PIDStepSize.propose_step

    def recording(self: kdiffusion_dpm._PIDStepSize, error: torch.Tensor) -> bool:
        decisions.append(propose(self, error))
        return decisions[-1]

    monkeypatch.setattr(kdiffusion_dpm._PIDStepSize, "propose_step", recording)
    counts = run_k("DPM adaptive", 10, eta=eta)
    assert counts.draws == sum(decisions) > 0
    assert counts.calls == 3 * len(decisions)


@pytest.mark.parametrize(("steps", "draws"), [(19, 0), (20, 1), (35, 1), (36, 2)])
def test_restart_draws_once_per_restart_segment(steps: int, draws: int) -> None:
    """Rule 4: "Restart: one draw at the start of each restart segment"."""
    assert run_k("Restart", steps).draws == draws


T_EXPECTED: dict[str, Callable[[int, float | None], tuple[int, int]]] = {
    # rule 4: "DDIM and DDIM CFG++: one draw per update whatever eta is"; rule 3: one call each
    "DDIM": lambda n, eta: (n, n),
    "DDIM CFG++": lambda n, eta: (n, n),
    # rule 4: "PLMS, UniPC ...: none"; calls as A1111's loops make them
    "PLMS": lambda n, eta: (0, len(samplers.unet_call_timesteps("PLMS", n))),
    "UniPC": lambda n, eta: (0, n),
}


@pytest.mark.parametrize("name", list(T_EXPECTED))
@pytest.mark.parametrize("eta", [None, 0.0, 0.5])
@pytest.mark.parametrize("steps", [2, 10, 20])
def test_timestep_sampler_draw_and_call_counts(name: str, eta: float | None, steps: int) -> None:
    counts = run_t(name, steps, eta=eta)
    updates = len(samplers.timesteps(name, steps)) - (0 if name == "UniPC" else 1)
    expected = T_EXPECTED[name](updates if name in ("DDIM", "DDIM CFG++") else steps, eta)
    if name == "UniPC":
        expected = (0, len(samplers.timesteps(name, steps)))
    assert (counts.draws, counts.calls) == expected


def test_ddim_at_eta_zero_is_unchanged_by_its_draws() -> None:
    """The eta-0 draw is multiplied by σ_t = 0: the image stays the deterministic DDIM one."""
    first = run_t("DDIM", 10, eta=0.0).out
    ctx = counting_context(Counts(), eta=0.0)
    ctx.noise = lambda: torch.full(SHAPE, 1e3)
    other = timestep_samplers.SAMPLERS["DDIM"](stream(1)(), samplers.timesteps("DDIM", 10), ctx)
    assert torch.equal(first, other)


# --------------------------------------------------------------------------------------
# Churn: k-diffusion's published update formulas as the oracle (Karras et al. 2022, alg. 2)


def churn_oracle(
    name: str,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise: Callable[[], torch.Tensor],
    *,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    draw_every_step: bool = True,
) -> torch.Tensor:
    """Euler / Heun / DPM2 with churn, from k-diffusion 0.0.16's documented updates.

    Per step i of N = len(σ) − 1:
        γ = min(s_churn / N, √2 − 1) if s_tmin ≤ σ_i ≤ s_tmax else 0
        ε = randn · s_noise                              (drawn every step)
        σ̂ = σ_i (γ + 1);  if γ > 0: x ← x + ε √(σ̂² − σ_i²)
        d = (x − D(x, σ̂)) / σ̂
    Euler:  x ← x + d (σ_{i+1} − σ̂)
    Heun:   σ_{i+1} = 0: Euler; else x₂ = x + d (σ_{i+1} − σ̂), d₂ = (x₂ − D(x₂, σ_{i+1})) / σ_{i+1},
            x ← x + (d + d₂)/2 · (σ_{i+1} − σ̂)
    DPM2:   σ_{i+1} = 0: Euler; else σ_m = exp((log σ̂ + log σ_{i+1}) / 2), x₂ = x + d (σ_m − σ̂),
            d₂ = (x₂ − D(x₂, σ_m)) / σ_m, x ← x + d₂ (σ_{i+1} − σ̂)

    ``draw_every_step=False`` is the variant that draws ε only when γ > 0 (what the loops did
    before this was fixed); it shows each case is sensitive to where the draws happen.
    """
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        eps = noise() * s_noise if draw_every_step or gamma > 0 else None
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            assert eps is not None
            x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
        d = (x - toy_denoiser(x, torch.tensor([sigma_hat], dtype=x.dtype))) / sigma_hat
        if name == "Euler" or sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        elif name == "Heun":
            x_2 = x + d * (sigma_next - sigma_hat)
            d_2 = (x_2 - toy_denoiser(x_2, torch.tensor([sigma_next], dtype=x.dtype))) / sigma_next
            x = x + (d + d_2) / 2 * (sigma_next - sigma_hat)
        else:
            sigma_mid = math.exp((math.log(sigma_hat) + math.log(sigma_next)) / 2)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - toy_denoiser(x_2, torch.tensor([sigma_mid], dtype=x.dtype))) / sigma_mid
            x = x + d_2 * (sigma_next - sigma_hat)
    return x


CHURN = {"s_churn": 0.8, "s_tmin": 0.05, "s_tmax": 2.0, "s_noise": 1.003}


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_over_part_of_the_schedule_matches_k_diffusion(name: str) -> None:
    """With [s_tmin, s_tmax] covering only the later steps, the churned steps use the draws
    k-diffusion gives them (one per step from the first), not the first draws of the stream."""
    sigmas = sigma_schedule(name, "Karras", 10).sigmas.double()
    assert float(sigmas[0]) > CHURN["s_tmax"] > float(sigmas[-2])
    x = stream(1)().double() * sigmas[0]
    loop_draws, oracle_draws, old_draws = stream(), stream(), stream()
    ctx = SamplingContext(model=toy_denoiser, noise=lambda: loop_draws().double(), extra=dict(CHURN))
    got = kdiffusion.SAMPLERS[name](x.clone(), sigmas, ctx)
    oracle = churn_oracle(name, x.clone(), sigmas, lambda: oracle_draws().double(), **CHURN)
    before_fix = churn_oracle(
        name, x.clone(), sigmas, lambda: old_draws().double(), **CHURN, draw_every_step=False
    )
    torch.testing.assert_close(got, oracle, rtol=1e-10, atol=1e-10)
    assert (before_fix - oracle).abs().max() > 1e-3

"""Tests for pipeline.kdiffusion's bookkeeping: model calls, noise draws, progress, seeds (§8.3, §8.5)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch

from pipeline import kdiffusion_dpm
from pipeline.kdiffusion import SAMPLERS, BrownianNoiseSampler
from pipeline.rng import ImageRNG
from pipeline.samplers import sigma_schedule
from pipeline.sampling import SamplingContext
from tests.pipeline.test_kdiffusion import MU, S, gaussian_denoiser, run

BROWNIAN = ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")


# --------------------------------------------------------------------------------------
# Model calls, noise draws and progress


def _expected_calls(name: str, n: int) -> int:
    second_order = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}
    return 2 * n - 1 if name in second_order else n


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "DPM adaptive"])
def test_model_call_counts(name: str, steps: int) -> None:
    result = run(name, steps, "Karras")
    assert len(result.sigmas) - 1 == steps
    assert len(result.model_sigmas) == _expected_calls(name, steps)


@pytest.mark.parametrize("steps", [20, 40])
def test_restart_calls_two_per_heun_step_at_any_length(steps: int) -> None:
    assert len(run("Restart", steps, "Karras").model_sigmas) == 2 * steps - 1


def test_second_order_samplers_call_twice_on_a_last_step_that_ends_above_zero() -> None:
    """KL Optimal has no trailing 0 (§9.2), so there is no Euler step at the end."""
    sigmas = sigma_schedule("Heun", "KL Optimal", 5).sigmas
    assert float(sigmas[-1]) > 0
    assert len(run("Heun", sigmas=sigmas).model_sigmas) == 10
    assert len(run("DPM++ 2M", sigmas=sigmas).model_sigmas) == 5


def test_model_sigmas_of_heun_and_dpm2() -> None:
    heun = run("Heun", 3, "Karras")
    s = heun.sigmas
    assert [float(v[0]) for v in heun.model_sigmas] == pytest.approx(
        [float(s[0]), float(s[1]), float(s[1]), float(s[2]), float(s[2])]
    )
    dpm2 = run("DPM2", 3, "Karras")
    s = dpm2.sigmas
    mids = [math.sqrt(float(s[i]) * float(s[i + 1])) for i in range(2)]  # log-space midpoints
    assert [float(v[0]) for v in dpm2.model_sigmas] == pytest.approx(
        [float(s[0]), mids[0], float(s[1]), mids[1], float(s[2])], rel=1e-5
    )


def test_dpm_adaptive_calls_in_whole_attempts() -> None:
    third = run("DPM adaptive", 10)
    assert len(third.model_sigmas) % 3 == 0 and len(third.model_sigmas) >= 3
    second = run("DPM adaptive", 10, extra={"order": 2})
    assert len(second.model_sigmas) % 2 == 0
    # Adaptive: the request's step count plays no part.
    assert len(run("DPM adaptive", 30).model_sigmas) == len(third.model_sigmas)


def test_dpm_fast_spends_exactly_n_calls_from_sigma_max_to_sigma_min() -> None:
    for n in (1, 2, 3, 4, 5, 6, 10, 20):
        result = run("DPM fast", n)
        assert len(result.model_sigmas) == n
        assert float(result.model_sigmas[0][0]) == pytest.approx(float(result.sigmas[0]), rel=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Euler a", lambda n: n - 1),  # none after the step to σ = 0
        ("DPM++ 2S a", lambda n: n - 1),
        ("LCM", lambda n: n - 1),
        ("DPM2 a", lambda n: n - 1),  # none on the final step to σ = 0 (σ_down = 0)
        ("DPM fast", lambda n: len(kdiffusion_dpm._fast_orders(n))),  # after every solver step
        ("Euler", lambda n: n),  # one at the start of every step, churn or not
        ("Heun", lambda n: n),
        ("DPM2", lambda n: n),
        ("LMS", lambda n: 0),
        ("DPM++ 2M", lambda n: 0),
        ("Restart", lambda n: 0),  # below 20 steps it is plain Heun
    ],
)
@pytest.mark.parametrize("steps", [1, 6, 11])
def test_noise_draw_counts(name: str, expected: Callable[[int], int], steps: int) -> None:
    assert run(name, steps, "Karras").draws == expected(steps)


def test_ancestral_samplers_draw_even_at_eta_zero() -> None:
    """The draw happens whatever σ_up is, so η does not shift the noise stream."""
    assert run("Euler a", 8, eta=0.0).draws == 7
    assert run("DPM2 a", 8, "Karras", eta=0.0).draws == 7
    assert run("DPM fast", 8, eta=0.0).draws == len(kdiffusion_dpm._fast_orders(8))


def test_euler_a_draws_on_the_last_step_when_the_schedule_ends_above_zero() -> None:
    sigmas = sigma_schedule("Euler a", "KL Optimal", 6).sigmas
    assert run("Euler a", sigmas=sigmas).draws == 6


@pytest.mark.parametrize("steps", [20, 35, 36, 50])
def test_restart_draws_once_per_restart(steps: int) -> None:
    assert run("Restart", steps, "Karras").draws == (1 if steps < 36 else 2)


def test_dpm_adaptive_draws_once_per_accepted_step() -> None:
    result = run("DPM adaptive", 10)
    assert 1 <= result.draws <= len(result.model_sigmas) // 3
    assert run("DPM adaptive", 10, eta=0.0).draws >= 1


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_adds_noise_and_raises_sigma(name: str) -> None:
    steps = 6
    extra = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0}
    result = run(name, steps, "Karras", extra=extra)
    sigmas = result.sigmas[:-1]
    in_range = [0.5 <= float(s) <= 10.0 for s in sigmas]
    assert result.draws == steps  # drawn every step, added only where churned
    gamma = min(1.0 / steps, 2**0.5 - 1)
    first_calls = result.model_sigmas[:: 1 if name == "Euler" else 2]
    for sigma, churned, call in zip(sigmas, in_range, first_calls, strict=False):
        expected = float(sigma) * (1 + gamma) if churned else float(sigma)
        assert float(call[0]) == pytest.approx(expected, rel=1e-6)
    assert not torch.equal(result.out, run(name, steps, "Karras").out)


def test_churn_zero_is_deterministic_whatever_it_draws() -> None:
    result = run("Euler", 6, extra={"s_churn": 0.0, "s_noise": 2.0})
    assert result.draws == 6
    # churn 0 and no churn run different branches of the loop: compared with a tolerance
    torch.testing.assert_close(result.out, run("Euler", 6).out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_progress_is_reported_once_per_sampler_step(name: str) -> None:
    steps = 7
    result = run(name, steps, "Karras")
    if name == "DPM adaptive":
        attempts = len(result.model_sigmas) // 3
        assert [i for i, _ in result.steps] == list(range(attempts))
        assert all(total > i for i, total in result.steps)
        assert result.steps[-1][1] == attempts
    elif name == "DPM fast":
        total = len(kdiffusion_dpm._fast_orders(steps))
        assert result.steps == [(i, total) for i in range(total)]
    else:
        assert result.steps == [(i, steps) for i in range(steps)]


def test_restart_progress_counts_the_restart_steps_too() -> None:
    result = run("Restart", 24, "Karras")
    assert result.steps == [(i, 24) for i in range(24)]


# --------------------------------------------------------------------------------------
# Reproducibility and per-image noise


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seeds_same_result(name: str) -> None:
    a = run(name, 6, "Karras", seed=5, seeds=[11, 12])
    b = run(name, 6, "Karras", seed=5, seeds=[11, 12])
    assert torch.equal(a.out, b.out)


@pytest.mark.parametrize("name", BROWNIAN)
def test_brownian_noise_depends_on_the_seeds_only(name: str) -> None:
    a = run(name, 6, "Karras", seeds=[11, 12])
    b = run(name, 6, "Karras", seeds=[11, 13])
    assert torch.equal(a.out[0], b.out[0])
    assert not torch.allclose(a.out[1], b.out[1])


@pytest.mark.parametrize("name", BROWNIAN)
def test_brownian_samplers_are_independent_of_batch_composition(name: str) -> None:
    sigmas = sigma_schedule(name, "Automatic", 8).sigmas
    start = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(9)) * sigmas[0]
    model = gaussian_denoiser(MU, S)

    def never() -> torch.Tensor:
        raise AssertionError("Brownian samplers must not use the ImageRNG stream (no ENSD, §8.5)")

    batch = SAMPLERS[name](start, sigmas, SamplingContext(model=model, noise=never, seeds=[7, 8, 9]))
    for i, seed in enumerate([7, 8, 9]):
        solo = SAMPLERS[name](
            start[i : i + 1], sigmas, SamplingContext(model=model, noise=never, seeds=[seed])
        )
        torch.testing.assert_close(solo[0], batch[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a", "LCM", "Restart"])
def test_image_rng_noise_makes_ancestral_samplers_batch_independent(name: str) -> None:
    """With A1111's ImageRNG behind ctx.noise (§8.3), image i is the same alone or batched."""
    steps = 20 if name == "Restart" else 6
    sigmas = sigma_schedule(name, "Automatic", steps).sigmas
    model = gaussian_denoiser(MU, S)

    def sample(seeds: list[int]) -> torch.Tensor:
        image_rng = ImageRNG((4, 8, 8), seeds, source="CPU", ensd=31337)
        start = image_rng.next() * sigmas[0]
        return SAMPLERS[name](start, sigmas, SamplingContext(model=model, noise=image_rng.next, seeds=seeds))

    batch = sample([21, 22])
    torch.testing.assert_close(sample([22])[0], batch[1], rtol=0, atol=1e-6)


def test_brownian_sampler_needs_one_seed_per_image() -> None:
    with pytest.raises(ValueError, match="one seed per image"):
        run("DPM++ 2M SDE", 4, seeds=[1])


def test_brownian_increments_are_normalised_and_signed() -> None:
    x = torch.zeros((2, 4, 16, 16))
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.0])
    sampler = BrownianNoiseSampler(x, sigmas, [1, 2], "CPU")
    down = sampler(torch.tensor(5.0), torch.tensor(1.0))
    up = sampler(torch.tensor(1.0), torch.tensor(5.0))
    torch.testing.assert_close(down, -up)
    assert down.shape == x.shape
    assert abs(float(down.std()) - 1.0) < 0.1
    # Increments over disjoint intervals are independent; over one interval they add up.
    a = sampler(torch.tensor(10.0), torch.tensor(5.0)) * math.sqrt(5.0)
    b = sampler(torch.tensor(5.0), torch.tensor(1.0)) * math.sqrt(4.0)
    whole = sampler(torch.tensor(10.0), torch.tensor(1.0)) * math.sqrt(9.0)
    torch.testing.assert_close(a + b, whole, rtol=1e-4, atol=1e-4)


def test_brownian_cpu_source_equals_torchsdes_own_draws() -> None:
    import torchsde

    x = torch.zeros((2, 3, 4, 4))
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    sampler = BrownianNoiseSampler(x, sigmas, [123, 456], "CPU")
    ours = sampler(sigmas[1], sigmas[2])
    for i, seed in enumerate([123, 456]):
        tree = torchsde.BrownianTree(sigmas[3], torch.zeros_like(x[0]), sigmas[0], entropy=seed)
        native = -tree(sigmas[2], sigmas[1]) / (sigmas[2] - sigmas[1]).abs().sqrt()
        # two computations of one draw (ours, and torchsde's own): equal up to float rounding
        torch.testing.assert_close(ours[i], native, rtol=1e-6, atol=1e-6)


def test_brownian_draws_follow_the_rng_source_and_restore_torchsde() -> None:
    from torchsde._brownian import brownian_interval

    original = brownian_interval._randn
    x = torch.zeros((1, 4, 8, 8))
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    cpu = BrownianNoiseSampler(x, sigmas, [5], "CPU")(sigmas[1], sigmas[2])
    nv = BrownianNoiseSampler(x, sigmas, [5], "NV")(sigmas[1], sigmas[2])
    nv_again = BrownianNoiseSampler(x, sigmas, [5], "NV")(sigmas[1], sigmas[2])
    assert torch.equal(nv, nv_again)
    assert not torch.allclose(cpu, nv)
    assert abs(float(nv.std()) - 1.0) < 0.3
    # "GPU" on a CPU device draws like "CPU", as A1111's randn_local does.
    if not torch.cuda.is_available():
        gpu = BrownianNoiseSampler(x, sigmas, [5], "GPU")(sigmas[1], sigmas[2])
        assert torch.equal(gpu, cpu)
    assert brownian_interval._randn is original
    with pytest.raises(ValueError, match="RNG source"):
        BrownianNoiseSampler(x, sigmas, [5], "XYZ")


def test_brownian_samplers_use_the_rng_source() -> None:
    sigmas = sigma_schedule("DPM++ 2M SDE", "Automatic", 6).sigmas
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * sigmas[0]
    model = gaussian_denoiser(MU, S)
    outs = {
        source: SAMPLERS["DPM++ 2M SDE"](
            start, sigmas, SamplingContext(model=model, seeds=[3], rng_source=source)
        )
        for source in ("CPU", "NV")
    }
    assert not torch.allclose(outs["CPU"], outs["NV"])


def test_no_torchsde_range_warnings_escape() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("DPM++ SDE", 6, "Automatic")

"""Tests for pipeline.samplers' schedules: the σ table, t(σ), sigma schedules and timesteps (§9.2-§9.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.samplers import (
    SigmaSchedule,
    effective_scheduler,
    get_sampler,
    list_schedulers,
    sigma_schedule,
    sigma_to_timestep,
    timesteps,
    unet_call_timesteps,
)
from tests.pipeline.test_samplers import SAMPLER_NAMES, SCHEDULER_LABELS

SIGMA_MIN = 0.0291675
SIGMA_MAX = 14.614642
DISCARDING = {"DPM++ 3M SDE", "DPM2", "DPM2 a"}


def sd_table() -> np.ndarray:
    """The SD1 σ table built independently of the module (numpy instead of torch).

    numpy's float32 sqrt is correctly rounded and torch's CPU one is not always, so entries
    can differ from the module's (and A1111's) by one ulp: compare with ``rel=1e-6``.
    """
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def values(schedule: SigmaSchedule) -> list[float]:
    return schedule.sigmas.tolist()


def assert_close_4(actual: list[float], expected: list[float]) -> None:
    """Spec check values are rounded to 4 significant digits."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, rel=6e-4, abs=1e-12)


# --------------------------------------------------------------------------------------
# The model table and t(σ) (§9.2, §9.3)


def test_model_sigma_range_matches_spec() -> None:
    table = sd_table()
    assert table[0] == pytest.approx(SIGMA_MIN, rel=2e-6)
    assert table[-1] == pytest.approx(SIGMA_MAX, rel=1e-7)


def test_sigma_to_timestep_end_points_and_clamping() -> None:
    table = torch.from_numpy(sd_table())
    t = sigma_to_timestep(torch.stack([table[-1], table[0], torch.tensor(0.0), torch.tensor(100.0)]))
    assert t.tolist() == [999.0, 0.0, 0.0, 999.0]
    assert sigma_to_timestep(torch.tensor([1e-6])).tolist() == [0.0]


def test_sigma_to_timestep_hits_integer_timesteps_on_table_values() -> None:
    table = torch.from_numpy(sd_table())
    t = sigma_to_timestep(table)
    assert torch.allclose(t, torch.arange(1000, dtype=torch.float32), atol=1e-3, rtol=0)


def test_sigma_to_timestep_is_log_interpolation_inverse() -> None:
    table = sd_table().astype(np.float64)
    for t in (0.25, 17.5, 500.125, 998.75):
        low, high = math.floor(t), math.ceil(t)
        f = t - low
        sigma = math.exp((1 - f) * math.log(table[low]) + f * math.log(table[high]))
        got = sigma_to_timestep(torch.tensor([sigma], dtype=torch.float64)).item()
        assert got == pytest.approx(t, rel=1e-5)


def test_sigma_to_timestep_keeps_shape_and_dtype() -> None:
    sigmas = torch.tensor([[14.0, 1.0], [0.5, 0.03]])
    t = sigma_to_timestep(sigmas)
    assert t.shape == (2, 2)
    assert t.dtype == torch.float32
    assert sigma_to_timestep(torch.tensor(1.0)).shape == ()
    assert sigma_to_timestep(sigmas.double()).dtype == torch.float64


def test_sigma_to_timestep_of_a_schedule_is_its_timesteps() -> None:
    sigmas = sigma_schedule("Euler", "Automatic", 10).sigmas[:-1]
    expected = torch.linspace(999, 0, 10)
    assert torch.allclose(sigma_to_timestep(sigmas), expected, atol=2e-3, rtol=1e-5)
    assert sigma_to_timestep(sigmas).is_floating_point()


def test_sigma_to_timestep_is_monotonic() -> None:
    sigmas = torch.logspace(-2, 1.3, 500)
    t = sigma_to_timestep(sigmas)
    assert bool((t[1:] >= t[:-1]).all())


# --------------------------------------------------------------------------------------
# Schedules (§9.2): spec check values


def test_euler_automatic_example() -> None:
    schedule = sigma_schedule("Euler", "Automatic", 20)
    sigmas = values(schedule)
    assert len(sigmas) == 21
    assert sigmas[0] == pytest.approx(14.614642, rel=1e-6)
    assert sigmas[-2] == pytest.approx(0.0291675, rel=2e-6)
    assert sigmas[-1] == 0.0
    assert schedule.sigmas.dtype == torch.float32
    assert schedule.sigmas.dim() == 1
    assert schedule.infotext_fields == {}


CHECK_VALUES_N6 = {
    "Uniform": [14.61, 5.092, 2.28, 1.163, 0.5712, 0.02917, 0],
    "Normal": [14.61, 5.092, 2.28, 1.163, 0.5712, 0.02917, 0],
    "Automatic": [14.61, 5.092, 2.28, 1.163, 0.5712, 0.02917, 0],
    "Karras": [14.61, 6.082, 2.232, 0.6926, 0.1698, 0.02917, 0],
    "Exponential": [14.61, 4.215, 1.216, 0.3506, 0.1011, 0.02917, 0],
    "Polyexponential": [14.61, 4.215, 1.216, 0.3506, 0.1011, 0.02917, 0],
    "SGM Uniform": [14.61, 5.949, 2.918, 1.616, 0.9324, 0.4936, 0],
    "Simple": [14.61, 5.963, 2.918, 1.613, 0.9324, 0.4924, 0],
    "DDIM": [14.44, 5.906, 2.907, 1.613, 0.9324, 0.4947, 0.04131, 0],
    "KL Optimal": [14.61, 3.081, 1.597, 0.9616, 0.5729, 0.2818, 0.02917],
    "Beta": [14.61, 12.82, 9.324, 5.319, 1.822, 0.02917, 0],
    "Align Your Steps": [14.615, 3.861, 1.886, 0.963, 0.399, 0.029, 0],
}


@pytest.mark.parametrize("label", list(CHECK_VALUES_N6))
def test_check_values_six_steps(label: str) -> None:
    assert_close_4(values(sigma_schedule("Euler", label, 6)), CHECK_VALUES_N6[label])


@pytest.mark.parametrize("label", list(CHECK_VALUES_N6))
def test_internal_names_give_the_same_schedule(label: str) -> None:
    name = next(s.name for s in list_schedulers() if s.label == label)
    by_label = sigma_schedule("Euler", label, 9)
    by_name = sigma_schedule("Euler", name, 9)
    assert torch.equal(by_label.sigmas, by_name.sigmas)
    assert by_label.infotext_fields == by_name.infotext_fields


def test_uniform_normal_and_default_agree_exactly() -> None:
    for n in (1, 7, 20, 50):
        default = sigma_schedule("Euler", "Automatic", n).sigmas
        assert torch.equal(default, sigma_schedule("Euler", "Uniform", n).sigmas)
        assert torch.equal(default, sigma_schedule("Euler", "Normal", n).sigmas)


def test_first_entry_of_interpolated_schedules_is_sigma_max() -> None:
    for label in ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "Beta"):
        first = values(sigma_schedule("Euler", label, 20))[0]
        assert first == pytest.approx(SIGMA_MAX, rel=1e-6), label


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Uniform", [SIGMA_MAX, 0.0]),
        ("Karras", [SIGMA_MAX, 0.0]),
        ("Exponential", [SIGMA_MAX, 0.0]),
        ("Polyexponential", [SIGMA_MAX, 0.0]),
        ("SGM Uniform", [SIGMA_MAX, 0.0]),
        ("Normal", [SIGMA_MAX, 0.0]),
        ("Simple", [SIGMA_MAX, 0.0]),
        ("Beta", [SIGMA_MAX, 0.0]),
        ("KL Optimal", [SIGMA_MAX, SIGMA_MIN]),
        ("Align Your Steps", [0.029, 0.0]),
        ("DDIM", [0.04131, 0.0]),
    ],
)
def test_edge_values_one_step(label: str, expected: list[float]) -> None:
    got = values(sigma_schedule("Euler", label, 1))
    assert len(got) == 2
    for a, e in zip(got, expected, strict=True):
        assert a == pytest.approx(e, rel=2e-4, abs=0)


def test_karras_formula() -> None:
    n, rho = 10, 7.0
    hi, lo = float(np.float32(SIGMA_MAX)), float(sd_table()[0])
    expected = [
        (hi ** (1 / rho) + (i / (n - 1)) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)
    ]
    got = values(sigma_schedule("Euler", "Karras", n))
    assert got[:-1] == pytest.approx(expected, rel=1e-5)
    assert got[-1] == 0.0


def test_exponential_and_polyexponential_agree_up_to_rounding() -> None:
    exp = sigma_schedule("Euler", "Exponential", 15).sigmas
    poly = sigma_schedule("Euler", "Polyexponential", 15).sigmas
    assert torch.allclose(exp, poly, rtol=1e-5, atol=0)
    ratios = exp[1:-1] / exp[:-2]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)


def test_sgm_uniform_timesteps() -> None:
    n = 8
    sigmas = sigma_schedule("Euler", "SGM Uniform", n).sigmas
    t = sigma_to_timestep(sigmas[:-1])
    expected = torch.tensor([999 * (1 - i / n) for i in range(n)])
    assert torch.allclose(t, expected, atol=2e-3, rtol=0)
    assert sigmas[-1].item() == 0.0


def test_simple_picks_table_entries() -> None:
    table = sd_table()
    for n in (3, 6, 7, 13, 1000, 1500):
        got = values(sigma_schedule("Euler", "Simple", n))
        expected = [float(table[999 - int(i * (1000 / n))]) for i in range(n)] + [0.0]
        assert got == pytest.approx(expected, rel=1e-6, abs=0)


def test_ddim_schedule_entries_and_length() -> None:
    table = sd_table()
    for n, length in ((6, 8), (30, 32), (4, 5), (1, 2), (334, 501), (2000, 1000)):
        got = values(sigma_schedule("Euler", "DDIM", n))
        assert len(got) == length
        s = max(1000 // n, 1)
        assert got == pytest.approx([float(table[i]) for i in range(1, 1000, s)][::-1] + [0.0], rel=1e-6)
    assert values(sigma_schedule("Euler", "DDIM", 4))[0] == pytest.approx(4.117, rel=1e-3)
    assert values(sigma_schedule("Euler", "DDIM", 334))[0] == pytest.approx(SIGMA_MAX, rel=1e-7)


def test_kl_optimal_has_no_trailing_zero() -> None:
    got = values(sigma_schedule("Euler", "KL Optimal", 12))
    assert len(got) == 13
    assert got[-1] == pytest.approx(SIGMA_MIN, rel=2e-6)
    assert got[0] == pytest.approx(14.6146, rel=1e-5)
    assert 0.0 not in got


def test_align_your_steps_tables() -> None:
    sd15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0]
    sdxl = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029, 0.0]
    assert values(sigma_schedule("Euler", "Align Your Steps", 11)) == [float(np.float32(x)) for x in sd15]
    got_xl = values(sigma_schedule("Euler", "Align Your Steps", 11, sdxl=True))
    assert got_xl == [float(np.float32(x)) for x in sdxl]
    xl6 = values(sigma_schedule("Euler", "Align Your Steps", 6, sdxl=True))
    assert xl6 == [float(np.float32(x)) for x in (14.615, 3.771, 1.342, 0.555, 0.234, 0.029, 0.0)]


def test_align_your_steps_interpolation_formula() -> None:
    table = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    for n in (2, 5, 8, 20, 37):
        got = values(sigma_schedule("Euler", "Align Your Steps", n))
        assert len(got) == n + 1
        for k in range(n):
            p = 10 * k / (n - 1)
            i = min(math.floor(p), 9)
            f = p - i
            expected = math.exp((1 - f) * math.log(table[i]) + f * math.log(table[i + 1]))
            assert got[k] == pytest.approx(expected, rel=1e-6)
        assert got[0] == float(np.float32(14.615))
        assert got[-2] == float(np.float32(0.029))
        assert got[-1] == 0.0


def test_align_your_steps_ignores_sampler_default() -> None:
    a = sigma_schedule("DPM++ 2M", "Align Your Steps", 10).sigmas
    b = sigma_schedule("Euler", "Align Your Steps", 10).sigmas
    assert torch.equal(a, b)


def test_beta_schedule_and_fields() -> None:
    from scipy import stats

    n = 9
    schedule = sigma_schedule("Euler", "Beta", n)
    lo, hi = float(sd_table()[0]), float(np.float32(SIGMA_MAX))
    u = 1 - np.linspace(0, 1, n)
    expected = [lo + float(stats.beta.ppf(x, 0.6, 0.6)) * (hi - lo) for x in u]
    assert values(schedule)[:-1] == pytest.approx(expected, rel=1e-6)
    assert schedule.infotext_fields == {
        "Schedule type": "Beta",
        "Beta schedule alpha": 0.6,
        "Beta schedule beta": 0.6,
    }
    assert list(schedule.infotext_fields) == ["Schedule type", "Beta schedule alpha", "Beta schedule beta"]
    assert type(schedule.infotext_fields["Beta schedule alpha"]) is float
    assert type(schedule.infotext_fields["Beta schedule beta"]) is float


# --------------------------------------------------------------------------------------
# Infotext fields and resolution inside sigma_schedule


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("Euler", "Automatic", {}),
        ("Euler a", "Automatic", {}),
        ("LMS", "garbage", {}),
        ("DPM fast", "Automatic", {}),
        ("LCM", "Automatic", {}),
        ("DPM++ 2M", "Automatic", {"Schedule type": "Karras"}),
        ("DPM++ 2M", "Karras", {"Schedule type": "Karras"}),
        ("DPM++ 2M SDE", "Automatic", {"Schedule type": "Exponential"}),
        ("DPM++ 3M SDE", "Automatic", {"Schedule type": "Exponential"}),
        ("Euler", "Uniform", {"Schedule type": "Uniform"}),
        ("Euler", "sgm_uniform", {"Schedule type": "SGM Uniform"}),
        ("Euler", "SGMUniform", {}),
        ("Euler Karras", "Automatic", {"Schedule type": "Karras"}),
        ("unknown sampler", "Automatic", {"Schedule type": "Karras"}),
    ],
)
def test_infotext_fields(sampler: str, scheduler: str, expected: dict) -> None:
    assert sigma_schedule(sampler, scheduler, 10).infotext_fields == expected


def test_dpmpp_2m_automatic_is_karras() -> None:
    a = sigma_schedule("DPM++ 2M", "Automatic", 20).sigmas
    b = sigma_schedule("Euler", "Karras", 20).sigmas
    assert torch.equal(a, b)


def test_unknown_sampler_is_dpmpp_2m() -> None:
    assert torch.equal(
        sigma_schedule("k_euler", "Automatic", 12).sigmas, sigma_schedule("DPM++ 2M", "", 12).sigmas
    )


@pytest.mark.parametrize("sampler", sorted(DISCARDING))
@pytest.mark.parametrize(
    "label", ["Automatic", "Karras", "Uniform", "Exponential", "KL Optimal", "DDIM", "Beta"]
)
def test_discard_penultimate_sigma(sampler: str, label: str) -> None:
    reference_label = label if label != "Automatic" else get_sampler(sampler).default_scheduler
    for steps in (1, 5, 20):
        full = sigma_schedule("Euler", reference_label, steps + 1).sigmas
        expected = torch.cat([full[:-2], full[-1:]])
        assert torch.equal(sigma_schedule(sampler, label, steps).sigmas, expected)


def test_dpm2_example_lengths() -> None:
    assert len(sigma_schedule("DPM2", "Automatic", 20).sigmas) == 21
    kl = values(sigma_schedule("DPM2 a", "KL Optimal", 5))
    assert len(kl) == 6
    assert kl[-1] == pytest.approx(SIGMA_MIN, rel=2e-6)


def test_sdxl_flag_only_changes_align_your_steps() -> None:
    for label in SCHEDULER_LABELS:
        a = sigma_schedule("DPM++ 2M", label, 8).sigmas
        b = sigma_schedule("DPM++ 2M", label, 8, sdxl=True).sigmas
        assert torch.equal(a, b) is (label != "Align Your Steps"), label


def test_lcm_uses_its_fifty_timestep_table() -> None:
    table = sd_table()[19::20]
    sigmas = values(sigma_schedule("LCM", "Automatic", 4))
    assert len(sigmas) == 5
    assert sigmas[0] == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert sigmas[-2] == pytest.approx(float(table[0]), rel=1e-6)
    karras = values(sigma_schedule("LCM", "Karras", 4))
    assert karras[-2] == pytest.approx(float(table[0]), rel=1e-6)
    simple = values(sigma_schedule("LCM", "Simple", 50))
    assert simple[:-1] == pytest.approx([float(x) for x in table[::-1]], rel=1e-6)
    # The DDIM schedule walks LCM's 50 entries: stride max(50 // 3, 1) = 16 gives 4 of them.
    assert len(sigma_schedule("LCM", "DDIM", 3).sigmas) == 5


@pytest.mark.parametrize("steps", [0, -1])
def test_sigma_schedule_rejects_non_positive_steps(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        sigma_schedule("Euler", "Automatic", steps)


# --------------------------------------------------------------------------------------
# Every sampler x scheduler combination


def expected_length(sampler: str, scheduler_name: str, steps: int) -> int:
    n = steps + 1 if sampler in DISCARDING else steps
    size = 50 if sampler == "LCM" else 1000
    if scheduler_name == "ddim":
        entries = math.ceil((size - 1) / max(size // n, 1)) + 1
    else:
        entries = n + 1
    return entries - 1 if sampler in DISCARDING else entries


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("scheduler", SCHEDULER_LABELS)
def test_every_combination_length_and_monotonic(sampler: str, scheduler: str) -> None:
    effective = effective_scheduler(sampler, scheduler).name
    for steps in (1, 2, 3, 6, 10, 20, 30, 51):
        sigmas = sigma_schedule(sampler, scheduler, steps).sigmas
        assert sigmas.dtype == torch.float32
        assert sigmas.dim() == 1
        assert len(sigmas) == expected_length(sampler, effective, steps), steps
        assert bool(torch.isfinite(sigmas).all())
        assert bool((sigmas[1:] <= sigmas[:-1]).all()), (steps, sigmas)
        assert bool((sigmas >= 0).all())
        if effective == "kl_optimal":
            assert sigmas[-1].item() > 0
        else:
            assert sigmas[-1].item() == 0.0


# --------------------------------------------------------------------------------------
# Timestep samplers (§9.4)


def test_ddim_timesteps_examples() -> None:
    ts = timesteps("DDIM", 30)
    assert len(ts) == 31
    assert ts[:3] == [1, 34, 67]
    assert ts[-1] == 991
    assert timesteps("DDIM", 20) == list(range(1, 1000, 50))
    assert timesteps("DDIM", 1) == [1]
    assert timesteps("DDIM", 2) == [1, 501]
    assert all(type(t) is int for t in ts)


def test_timesteps_clipped_to_999() -> None:
    ts = timesteps("DDIM", 1000)
    assert len(ts) == 1000
    assert ts[-2:] == [999, 999]
    assert max(ts) == 999
    assert timesteps("PLMS", 501) == ts
    assert timesteps("DDIM", 500) == list(range(1, 1000, 2))


@pytest.mark.parametrize("steps", [1, 3, 6, 7, 20, 30, 33, 100, 334, 999])
def test_timesteps_length_and_order(steps: int) -> None:
    ts = timesteps("UniPC", steps)
    assert len(ts) == math.ceil(1000 / (1000 // steps))
    assert len(ts) >= steps
    assert ts == sorted(ts)
    for name in ("DDIM", "DDIM CFG++", "PLMS"):
        assert timesteps(name, steps) == ts


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "LCM", "ddim", "k_euler", "DDIM Karras", ""])
def test_timesteps_rejects_other_samplers(sampler: str) -> None:
    with pytest.raises(ValueError):
        timesteps(sampler, 20)
    with pytest.raises(ValueError):
        unet_call_timesteps(sampler, 20)


@pytest.mark.parametrize("steps", [0, -5, 1001])
def test_timesteps_rejects_out_of_range_steps(steps: int) -> None:
    with pytest.raises(ValueError):
        timesteps("DDIM", steps)


def test_unipc_has_no_unet_call_list() -> None:
    with pytest.raises(ValueError):
        unet_call_timesteps("UniPC", 20)


def test_ddim_unet_calls_example() -> None:
    calls = unet_call_timesteps("DDIM", 20)
    assert len(calls) == 19
    assert calls[0] == 951 and calls[-1] == 51
    assert calls == list(range(951, 50, -50))
    assert unet_call_timesteps("DDIM CFG++", 20) == calls
    assert all(type(t) is int for t in calls)


def test_ddim_one_step_evaluates_nothing() -> None:
    assert unet_call_timesteps("DDIM", 1) == []
    assert unet_call_timesteps("PLMS", 1) == []


def test_plms_unet_calls() -> None:
    calls = unet_call_timesteps("PLMS", 20)
    assert len(calls) == 20
    assert calls[:4] == [951, 901, 901, 851]
    assert calls[-1] == 51
    assert unet_call_timesteps("PLMS", 2) == [501, 1]


@pytest.mark.parametrize("steps", [2, 3, 7, 30, 250, 600])
def test_call_counts(steps: int) -> None:
    ts = timesteps("DDIM", steps)
    assert len(unet_call_timesteps("DDIM", steps)) == len(ts) - 1
    assert unet_call_timesteps("DDIM", steps) == ts[:0:-1]
    plms = unet_call_timesteps("PLMS", steps)
    assert len(plms) == len(ts)
    assert plms[0] == ts[-1] and plms[1] == ts[-2] and plms[2:] == ts[-2:0:-1]

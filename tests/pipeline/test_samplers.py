"""Tests for pipeline.samplers: A1111's sampler tables, name resolution and schedules (§9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UnknownSampler
from pipeline.samplers import (
    DEFAULT_SAMPLER,
    SamplerInfo,
    SchedulerInfo,
    SigmaSchedule,
    effective_scheduler,
    ensd_in_infotext,
    get_sampler,
    list_samplers,
    list_schedulers,
    resolve,
    sigma_schedule,
    sigma_to_timestep,
    timesteps,
    unet_call_timesteps,
)
from tests.conftest import fuzz_examples

SIGMA_MIN = 0.0291675
SIGMA_MAX = 14.614642

# (name, aliases, default_scheduler, second_order, uses_ensd, discard, brownian, solver_type), §9.1.
SAMPLER_ROWS = [
    ("DPM++ 2M", ("k_dpmpp_2m",), "karras", False, False, False, False, None),
    ("DPM++ SDE", ("k_dpmpp_sde",), "karras", True, False, False, True, None),
    ("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "exponential", False, False, False, True, None),
    ("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "exponential", False, False, False, True, "heun"),
    ("DPM++ 2S a", ("k_dpmpp_2s_a",), "karras", True, True, False, False, None),
    ("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "exponential", False, False, True, True, None),
    ("Euler a", ("k_euler_a", "k_euler_ancestral"), None, False, True, False, False, None),
    ("Euler", ("k_euler",), None, False, False, False, False, None),
    ("LMS", ("k_lms",), None, False, False, False, False, None),
    ("Heun", ("k_heun",), None, True, False, False, False, None),
    ("DPM2", ("k_dpm_2",), "karras", True, False, True, False, None),
    ("DPM2 a", ("k_dpm_2_a",), "karras", True, True, True, False, None),
    ("DPM fast", ("k_dpm_fast",), None, False, True, False, False, None),
    ("DPM adaptive", ("k_dpm_ad",), None, False, True, False, False, None),
    ("Restart", ("restart",), "karras", True, False, False, False, None),
    ("DDIM", ("ddim",), None, False, False, False, False, None),
    ("DDIM CFG++", ("ddim_cfgpp",), None, False, False, False, False, None),
    ("PLMS", ("plms",), None, False, False, False, False, None),
    ("UniPC", ("unipc",), None, False, False, False, False, None),
    ("LCM", ("k_lcm",), None, False, False, False, False, None),
]

SCHEDULER_ROWS = [
    ("automatic", "Automatic", (), None),
    ("uniform", "Uniform", (), None),
    ("karras", "Karras", (), 7.0),
    ("exponential", "Exponential", (), None),
    ("polyexponential", "Polyexponential", (), 1.0),
    ("sgm_uniform", "SGM Uniform", ("SGMUniform",), None),
    ("kl_optimal", "KL Optimal", (), None),
    ("align_your_steps", "Align Your Steps", (), None),
    ("simple", "Simple", (), None),
    ("normal", "Normal", (), None),
    ("ddim", "DDIM", (), None),
    ("beta", "Beta", (), None),
]

SAMPLER_NAMES = [row[0] for row in SAMPLER_ROWS]
SCHEDULER_LABELS = [row[1] for row in SCHEDULER_ROWS]
SCHEDULER_NAMES = [row[0] for row in SCHEDULER_ROWS]
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
# Tables


def test_list_samplers_is_a1111_table_in_ui_order() -> None:
    samplers = list_samplers()
    assert len(samplers) == 20
    assert all(isinstance(s, SamplerInfo) for s in samplers)
    got = [
        (
            s.name,
            s.aliases,
            s.default_scheduler,
            s.second_order,
            s.uses_ensd,
            s.discard_penultimate_sigma,
            s.brownian_noise,
            s.solver_type,
        )
        for s in samplers
    ]
    assert got == SAMPLER_ROWS
    for s in samplers:
        assert type(s.aliases) is tuple
        for flag in (s.second_order, s.uses_ensd, s.discard_penultimate_sigma, s.brownian_noise):
            assert type(flag) is bool


def test_list_schedulers_is_a1111_table_in_list_order() -> None:
    schedulers = list_schedulers()
    assert len(schedulers) == 12
    assert all(isinstance(s, SchedulerInfo) for s in schedulers)
    assert [(s.name, s.label, s.aliases, s.default_rho) for s in schedulers] == SCHEDULER_ROWS
    rhos = {s.name: s.default_rho for s in schedulers}
    assert type(rhos["karras"]) is float and type(rhos["polyexponential"]) is float


def test_lists_are_fresh_copies() -> None:
    first = list_samplers()
    first.clear()
    assert len(list_samplers()) == 20
    schedulers = list_schedulers()
    schedulers.pop()
    assert len(list_schedulers()) == 12


def test_infos_are_frozen() -> None:
    with pytest.raises(AttributeError):
        list_samplers()[0].name = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        list_schedulers()[0].label = "x"  # type: ignore[misc]


@pytest.mark.parametrize("row", SAMPLER_ROWS, ids=SAMPLER_NAMES)
def test_total_steps_multiplier(row: tuple) -> None:
    info = get_sampler(row[0])
    assert type(info.total_steps_multiplier) is int
    assert info.total_steps_multiplier == (2 if row[3] else 1)


def test_second_order_samplers_are_the_documented_six() -> None:
    assert {s.name for s in list_samplers() if s.second_order} == {
        "Heun",
        "DPM2",
        "DPM2 a",
        "DPM++ 2S a",
        "DPM++ SDE",
        "Restart",
    }


def test_default_sampler_is_first_and_dpmpp_2m() -> None:
    assert DEFAULT_SAMPLER == "DPM++ 2M"
    assert list_samplers()[0].name == DEFAULT_SAMPLER


# --------------------------------------------------------------------------------------
# get_sampler (engine helper)


def test_get_sampler_exact_alias_and_case() -> None:
    assert get_sampler("Euler a").name == "Euler a"
    assert get_sampler("k_euler_ancestral").name == "Euler a"
    assert get_sampler("k_euler_a").name == "Euler a"
    assert get_sampler("K_DPMPP_2M").name == "DPM++ 2M"
    assert get_sampler("euler A").name == "Euler a"
    assert get_sampler("DDIM CFG++").name == "DDIM CFG++"


@pytest.mark.parametrize("name", ["", "Euler Karras", "DPM++ 2M Karras", "nope", "Euler  a"])
def test_get_sampler_unknown_raises(name: str) -> None:
    with pytest.raises(UnknownSampler) as info:
        get_sampler(name)
    assert "DPM++ 2M" in str(info.value)


# --------------------------------------------------------------------------------------
# resolve (§9.1)


@pytest.mark.parametrize(
    ("sampler", "scheduler", "convert", "expected"),
    [
        # Spec examples and quirks.
        ("Euler SGM Uniform", None, False, ("DPM++ 2M", "Uniform")),
        ("Euler a Karras Uniform", None, False, ("Euler a", "Karras")),
        ("DPM++ 2M Karras", None, False, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M Karras", None, True, ("DPM++ 2M", "Automatic")),
        ("DPM++ SDE Karras", None, False, ("DPM++ SDE", "Karras")),
        ("DPM++ 2M SDE Exponential", None, False, ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SDE Exponential", None, True, ("DPM++ 2M SDE", "Automatic")),
        ("LMS Karras", None, False, ("LMS", "Karras")),
        ("LMS Karras", None, True, ("LMS", "Karras")),
        ("DPM2 a Karras", None, False, ("DPM2 a", "Karras")),
        ("Euler a", None, False, ("Euler a", "Automatic")),
        # Empty / missing sampler name.
        (None, None, False, ("DPM++ 2M", "Automatic")),
        ("", None, False, ("DPM++ 2M", "Automatic")),
        ("", "Karras", True, ("DPM++ 2M", "Automatic")),
        # Exact names only: aliases, other case and unknown text fall back silently.
        ("k_euler_a", None, False, ("DPM++ 2M", "Automatic")),
        ("euler a", None, False, ("DPM++ 2M", "Automatic")),
        ("EULER", "Karras", False, ("DPM++ 2M", "Karras")),
        ("nonsense", "Uniform", False, ("DPM++ 2M", "Uniform")),
        # Suffixes: internal names and the SGM Uniform alias count, case-sensitively.
        ("Euler karras", None, False, ("Euler", "Karras")),
        ("Euler sgm_uniform", None, False, ("Euler", "SGM Uniform")),
        ("Euler SGMUniform", None, False, ("Euler", "SGM Uniform")),
        ("Euler KARRAS", None, False, ("DPM++ 2M", "Automatic")),
        ("Euler Automatic", "Karras", False, ("Euler", "Automatic")),
        ("Euler DDIM", None, False, ("Euler", "DDIM")),
        ("Euler Align Your Steps", None, False, ("Euler", "Align Your Steps")),
        ("Euler KL Optimal", None, False, ("Euler", "KL Optimal")),
        ("Euler Beta", None, False, ("Euler", "Beta")),
        (" Karras", None, False, ("DPM++ 2M", "Karras")),
        ("Karras", None, False, ("DPM++ 2M", "Automatic")),
        # A suffix beats the explicit Schedule type; several suffixes, the last cut wins.
        ("Euler Karras", "Exponential", False, ("Euler", "Karras")),
        ("Euler Beta Karras", None, False, ("Euler", "Beta")),
        ("Euler Karras Karras", None, False, ("DPM++ 2M", "Karras")),
        # Explicit scheduler: label or internal name; alias or unknown text means Automatic.
        ("Euler", "Karras", False, ("Euler", "Karras")),
        ("Euler", "karras", False, ("Euler", "Karras")),
        ("Euler", "sgm_uniform", False, ("Euler", "SGM Uniform")),
        ("Euler", "SGMUniform", False, ("Euler", "Automatic")),
        ("Euler", "KARRAS", False, ("Euler", "Automatic")),
        ("Euler", "", False, ("Euler", "Automatic")),
        ("Euler", None, False, ("Euler", "Automatic")),
        # convert_automatic only when the schedule equals the sampler's default.
        ("DPM++ 2M", "Karras", True, ("DPM++ 2M", "Automatic")),
        ("DPM++ 2M", "karras", True, ("DPM++ 2M", "Automatic")),
        ("DPM++ 2M", "Karras", False, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "Exponential", True, ("DPM++ 2M", "Exponential")),
        ("DPM++ 3M SDE", "Exponential", True, ("DPM++ 3M SDE", "Automatic")),
        ("Euler", "Uniform", True, ("Euler", "Uniform")),
        ("DDIM", "DDIM", True, ("DDIM", "DDIM")),
        # A sampler name that contains no schedule suffix is kept intact.
        ("DPM++ 2M SDE Heun", None, False, ("DPM++ 2M SDE Heun", "Automatic")),
        ("DDIM CFG++", None, False, ("DDIM CFG++", "Automatic")),
        ("DPM++ 2M SDE Heun Exponential", None, True, ("DPM++ 2M SDE Heun", "Automatic")),
    ],
)
def test_resolve(sampler: str | None, scheduler: str | None, convert: bool, expected: tuple) -> None:
    result = resolve(sampler, scheduler, convert_automatic=convert)
    assert result == expected
    assert type(result[0]) is str and type(result[1]) is str


def test_resolve_scheduler_default_argument() -> None:
    assert resolve("Euler SGM Uniform") == ("DPM++ 2M", "Uniform")
    assert resolve("Heun") == ("Heun", "Automatic")


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("label", SCHEDULER_LABELS)
def test_resolve_every_exact_pair_round_trips(name: str, label: str) -> None:
    assert resolve(name, label) == (name, label)
    # The legacy spelling "<name> <label>" gives the same pair, except for the suffix-scan quirk.
    if label != "SGM Uniform":
        assert resolve(f"{name} {label}", "Automatic") == (name, label)


# --------------------------------------------------------------------------------------
# effective_scheduler (the schedule generation computes)


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("DPM++ 2M", "Automatic", "karras"),
        ("DPM++ 2M SDE", None, "exponential"),
        ("DPM++ 2M", "Uniform", "uniform"),
        ("Euler", "Automatic", "automatic"),
        ("Euler a Karras", None, "karras"),
        ("nonsense", "garbage", "karras"),
        ("LCM", None, "automatic"),
    ],
)
def test_effective_scheduler(sampler: str, scheduler: str | None, expected: str) -> None:
    info = effective_scheduler(sampler, scheduler)
    assert isinstance(info, SchedulerInfo)
    assert info.name == expected


# --------------------------------------------------------------------------------------
# ensd_in_infotext (§8.5)


@pytest.mark.parametrize(
    ("sampler", "eta", "expected"),
    [
        ("Euler a", 0.0, False),
        ("Euler a", None, True),
        ("Euler a", 1.0, True),
        ("Euler a", 0.5, True),
        ("Euler a", -0.0, False),
        ("Euler a", 0, False),
        ("DPM2 a", None, True),
        ("DPM++ 2S a", None, True),
        ("DPM fast", None, True),
        ("DPM adaptive", 0.3, True),
        # Affected by ENSD but never showing it.
        ("Restart", None, False),
        ("LCM", None, False),
        ("DDIM", 0.5, False),
        ("DDIM", None, False),
        ("Euler", 1.0, False),
        ("DPM++ 2M", None, False),
        ("DPM++ SDE", None, False),
        ("DPM++ 2M SDE", 1.0, False),
        # Names resolve as in generation.
        ("Euler a Karras", None, True),
        ("k_euler_a", None, False),
        ("unknown", 1.0, False),
    ],
)
def test_ensd_in_infotext(sampler: str, eta: float | None, expected: bool) -> None:
    result = ensd_in_infotext(sampler, eta)
    assert type(result) is bool
    assert result is expected


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


# --------------------------------------------------------------------------------------
# Fuzz: name resolution must never raise


SUFFIX_OPTIONS = [o for row in SCHEDULER_ROWS for o in (row[0], row[1], *row[2])]
name_like = st.one_of(
    st.text(),
    st.sampled_from(SAMPLER_NAMES + [a for row in SAMPLER_ROWS for a in row[1]]),
    st.builds(
        lambda base, suffixes: " ".join([base, *suffixes]),
        st.one_of(st.sampled_from(SAMPLER_NAMES), st.text(max_size=8)),
        st.lists(st.sampled_from(SUFFIX_OPTIONS), max_size=3),
    ),
)
scheduler_like = st.one_of(st.none(), st.text(), st.sampled_from(SUFFIX_OPTIONS))


@settings(max_examples=fuzz_examples(10_000), deadline=None)
@given(sampler=st.one_of(st.none(), name_like), scheduler=scheduler_like, convert=st.booleans())
def test_fuzz_name_resolution_never_raises(sampler: str | None, scheduler: str | None, convert: bool) -> None:
    """`resolve` and the scheduler resolution behind `sigma_schedule` accept any text."""
    name, label = resolve(sampler, scheduler, convert_automatic=convert)
    assert name in SAMPLER_NAMES
    assert label in SCHEDULER_LABELS
    assert get_sampler(name).name == name
    assert isinstance(ensd_in_infotext(sampler or "", None), bool)
    effective = effective_scheduler(sampler, scheduler)
    assert effective.name in SCHEDULER_NAMES
    requested = resolve(sampler, scheduler)[1]
    if requested != "Automatic":
        assert effective.label == requested
    elif get_sampler(name).default_scheduler is not None:
        assert effective.name == get_sampler(name).default_scheduler
    else:
        assert effective.name == "automatic"


@settings(max_examples=1_000, deadline=None)
@given(sampler=name_like, scheduler=scheduler_like, steps=st.integers(1, 40), sdxl=st.booleans())
def test_fuzz_sigma_schedule_accepts_any_names(sampler: str, scheduler: str, steps: int, sdxl: bool) -> None:
    schedule = sigma_schedule(sampler, scheduler, steps, sdxl=sdxl)
    assert schedule.sigmas.dtype == torch.float32
    assert bool((schedule.sigmas[1:] <= schedule.sigmas[:-1]).all())
    fields = schedule.infotext_fields
    assert set(fields) <= {"Schedule type", "Beta schedule alpha", "Beta schedule beta"}
    if "Schedule type" in fields:
        assert fields["Schedule type"] == effective_scheduler(sampler, scheduler).label


# --------------------------------------------------------------------------------------
# The engine's exact lookup; canonical names for stored rows


def test_exact_selection_takes_canonical_names_only() -> None:
    from pipeline.errors import UnknownScheduler
    from pipeline.samplers import exact_selection, select_sampler

    for info in list_samplers():
        for schedule in list_schedulers():
            assert exact_selection(info.name, schedule.label) == select_sampler(info.name, schedule.label)
    for alias in ("k_euler_a", "euler a", "DPM++ 2M Karras", "Euler b"):
        with pytest.raises(UnknownSampler) as refused:
            exact_selection(alias, "Automatic")
        assert "Euler a" in refused.value.params["available"]
    with pytest.raises(UnknownScheduler) as refused:
        exact_selection("Euler", "karras")
    assert refused.value.key == "error.unknown_scheduler" and "Karras" in refused.value.params["available"]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (("Euler a", "Automatic"), ("Euler a", "Automatic")),
        (("k_euler_a", "Automatic"), ("Euler a", "Automatic")),
        (("euler A", "karras"), ("Euler a", "Karras")),
        (("DPM++ 2M Karras", "Automatic"), ("DPM++ 2M", "Karras")),
        (("Euler", "sgmuniform"), ("Euler", "SGM Uniform")),
        (("no such sampler", "Automatic"), ("no such sampler", "Automatic")),  # for the engine to refuse
    ],
)
def test_canonical_names_read_an_older_rows_names(stored, expected) -> None:
    from pipeline.samplers import canonical_names

    assert canonical_names(*stored) == expected


def test_canonical_names_of_a_canonical_pair_resolve_nothing(monkeypatch) -> None:
    from pipeline import samplers

    calls = []
    for name in ("select_sampler", "get_sampler", "_cut_legacy_suffixes", "read_schedule"):
        original = getattr(samplers, name)
        monkeypatch.setattr(
            samplers, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k)
        )
    for info in samplers.list_samplers():
        for schedule in samplers.list_schedulers():
            assert samplers.canonical_names(info.name, schedule.label) == (info.name, schedule.label)
    assert calls == []


def test_with_canonical_names_keeps_a_canonical_request_and_mends_an_older_one() -> None:
    from pipeline.request import GenerationRequest
    from pipeline.samplers import with_canonical_names

    request = GenerationRequest(
        prompt="", seed=1, sampler_name="DPM++ 2M", scheduler="Karras", enable_hr=True
    )
    assert with_canonical_names(request) is request
    hires = request.replace(hr_sampler_name="Euler", hr_scheduler=None)
    assert with_canonical_names(hires) is hires  # None: the first pass's schedule, kept
    old = request.replace(sampler_name="k_euler_a", scheduler="karras", hr_sampler_name="DPM++ 2M Karras")
    mended = with_canonical_names(old)
    assert (mended.sampler_name, mended.scheduler) == ("Euler a", "Karras")
    assert (mended.hr_sampler_name, mended.hr_scheduler) == ("DPM++ 2M", "Karras")
    assert with_canonical_names(request.replace(hr_scheduler="exponential")).hr_scheduler == "Exponential"

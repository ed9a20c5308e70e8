"""Tests for pipeline.samplers: A1111's sampler and scheduler tables and name resolution (§9.1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UnknownSampler
from pipeline.samplers import (
    DEFAULT_SAMPLER,
    SamplerInfo,
    SchedulerInfo,
    effective_scheduler,
    ensd_in_infotext,
    get_sampler,
    list_samplers,
    list_schedulers,
    resolve,
    sigma_schedule,
)
from tests.conftest import fuzz_examples

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

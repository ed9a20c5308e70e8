"""X/Y/Z text-mode axis values and labels (A1111-SEMANTICS.md §14.1, §14.2)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import AxisValueError
from plugins.xy_grid import (
    _FLOAT_COUNT,
    _FLOAT_RANGE,
    _INT_COUNT,
    _INT_RANGE,
    AXES,
    axis_labels,
    parse_axis_values,
)
from tests.conftest import fuzz_examples

LISTED_AXES = [
    "Steps",
    "Seed",
    "CFG Scale",
    "Var. strength",
    "Prompt S/R",
    "Sampler",
    "Schedule type",
    "Size",
    "Styles",
    "Face restore",
    "Always discard next-to-last sigma",
    "VAE",
    "Prompt order",
    "Var. seed",
    "Clip skip",
    "Denoising",
    "Checkpoint name",
    "Nothing",
]


def _exact(values: list[Any]) -> list[tuple[type, Any]]:
    """Values with their exact type, so 1 and 1.0 (or True) never compare equal."""
    return [(type(v), v) for v in values]


def test_every_listed_axis_is_in_the_table() -> None:
    assert set(LISTED_AXES) <= set(AXES)


# ------------------------------------------------------------------------------ int axes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1-10 [5]", [1, 3, 5, 7, 10]),
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-5 (+2)", [1, 3, 5]),
        ("10-5 (-3)", [10, 7]),
        # The end is always B+1, even for negative steps.
        ("5-1 (-1)", [5, 4, 3]),
        ("5-1", []),
        ("-5--1", [-5, -4, -3, -2, -1]),
        ("+1-+3", [1, 2, 3]),
        ("1 - 3", [1, 2, 3]),
        ("1-3 (+2 )", [1, 3]),
        ("10-1 [4]", [10, 7, 4, 1]),
        ("-10--1 [4]", [-10, -7, -4, -1]),
        ("1-2 [0]", []),
        ("1-1 [3]", [1, 1, 1]),
        ("20", [20]),
        ("10, 20,30", [10, 20, 30]),
        ("1-3, 7, 9-10", [1, 2, 3, 7, 9, 10]),
        # Empty values are skipped on numeric axes.
        ("1,, 2, ,", [1, 2]),
        ("", []),
        ('"1-3"', [1, 2, 3]),
        ("1\n2", [1, 2]),
        ("+7", [7]),
    ],
)
def test_steps_values(text: str, expected: list[int]) -> None:
    assert _exact(parse_axis_values("Steps", text)) == _exact(expected)


def test_seed_minus_one_stays() -> None:
    assert _exact(parse_axis_values("Seed", "-1, 5")) == _exact([-1, 5])


@pytest.mark.parametrize("axis", ["Var. seed", "Clip skip", "UniPC Order"])
def test_other_int_axes(axis: str) -> None:
    assert _exact(parse_axis_values(axis, "1-3")) == _exact([1, 2, 3])


@pytest.mark.parametrize(
    "text",
    [
        "1-5 (2)",  # the step sign is mandatory
        "1.5",
        "abc",
        "1-5 (+0)",  # zero step
        "1-5 (0)",
        "1-5 (+1.5)",
        "1.5-3",
        "1-3 [2.0]",
        "1-3 [-2]",
        "1-3 ( +1)",
        "5e3",
        "- 5",
        "1-2-3",
    ],
)
def test_int_axis_rejects(text: str) -> None:
    with pytest.raises(AxisValueError):
        parse_axis_values("Steps", text)


# ---------------------------------------------------------------------------- float axes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Overshoots the end and keeps float noise, as numpy.arange(A, B+S, S) does.
        ("0-1 (+0.3)", [0.0, 0.3, 0.6, 0.8999999999999999, 1.2]),
        ("0.1-0.3 (+0.1)", [0.1, 0.2, 0.30000000000000004, 0.4]),
        ("0.0-1.0 [6]", [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]),
        ("0-1 [4]", [0.0, 0.3333333333333333, 0.6666666666666666, 1.0]),
        ("1-3", [1.0, 2.0, 3.0]),
        ("3-1", []),
        ("3-1 (-1)", [3.0, 2.0, 1.0]),
        ("1.0-3.0 (+0.5)", [1.0, 1.5, 2.0, 2.5, 3.0]),
        ("7, 7.5, 12", [7.0, 7.5, 12.0]),
        ("-5 - -1", [-5.0, -4.0, -3.0, -2.0, -1.0]),
        ("5.", [5.0]),
        ("1.5-2.5 [3]", [1.5, 2.0, 2.5]),
        ("1,,", [1.0]),
    ],
)
def test_cfg_scale_values(text: str, expected: list[float]) -> None:
    assert _exact(parse_axis_values("CFG Scale", text)) == _exact(expected)


@pytest.mark.parametrize(
    "axis",
    [
        "Var. strength",
        "Denoising",
        "Image CFG Scale",
        "Eta",
        "Sigma Churn",
        "Sigma min",
        "Sigma max",
        "Sigma noise",
        "Schedule min sigma",
        "Schedule max sigma",
        "Schedule rho",
    ],
)
def test_other_float_axes(axis: str) -> None:
    assert _exact(parse_axis_values(axis, "0-1 [3]")) == _exact([0.0, 0.5, 1.0])


@pytest.mark.parametrize(
    "text",
    [
        "0-1 (+.5)",  # the step needs a digit after the sign
        "0-1 (0.5)",
        "0-1 (+0)",
        "abc",
        # The decimal point of the number pattern is any character: "1x5" reaches float().
        "1x5-10",
        # ... and "1e-5" is read as the range "1e" to "5", and fails the same way.
        "1e-5",
        # ... and in "-5--1" the first number swallows the dash ("-5-"), so it fails too.
        "-5--1",
        "0-1 [2.5]",
    ],
)
def test_float_axis_rejects(text: str) -> None:
    with pytest.raises(AxisValueError):
        parse_axis_values("CFG Scale", text)


def test_float_axis_accepts_python_float_literals_outside_range_shapes() -> None:
    assert _exact(parse_axis_values("CFG Scale", "1e5, inf")) == _exact([1e5, float("inf")])


# ------------------------------------------------------------------------------ str axes


def test_csv_quotes_protect_commas_and_values_are_stripped() -> None:
    assert parse_axis_values("Prompt S/R", '"a, b", c') == ["a, b", "c"]
    assert parse_axis_values("Prompt S/R", ' cat ,  "dog" ,bird ') == ["cat", "dog", "bird"]


def test_newlines_start_new_records_that_are_flattened() -> None:
    assert parse_axis_values("Styles", "a, b\nc\n\nd") == ["a", "b", "c", "d"]


def test_str_axis_keeps_quoted_quotes() -> None:
    assert parse_axis_values("Prompt S/R", '"say ""hi"""') == ['say "hi"']


def test_str_axis_range_text_is_not_expanded() -> None:
    assert parse_axis_values("Size", "512x512, 768x512, 1-3") == ["512x512", "768x512", "1-3"]


def test_str_axis_keeps_empty_values() -> None:
    assert parse_axis_values("Styles", "a,,b") == ["a", "", "b"]


@pytest.mark.parametrize(
    "axis", ["Face restore", "Always discard next-to-last sigma", "VAE", "Checkpoint name", "Nothing"]
)
def test_plain_str_axes(axis: str) -> None:
    assert parse_axis_values(axis, "True, False") == ["True", "False"]


def test_prompt_order_gives_all_permutations_as_lists() -> None:
    assert parse_axis_values("Prompt order", "a, b, c") == [
        ["a", "b", "c"],
        ["a", "c", "b"],
        ["b", "a", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["c", "b", "a"],
    ]
    assert parse_axis_values("Prompt order", "cat") == [["cat"]]


def test_sampler_names_and_aliases_pass_in_any_case_and_stay_as_typed() -> None:
    assert parse_axis_values("Sampler", "Euler a, euler A, k_euler_ancestral, K_LMS, DPM++ 2M") == [
        "Euler a",
        "euler A",
        "k_euler_ancestral",
        "K_LMS",
        "DPM++ 2M",
    ]


@pytest.mark.parametrize("text", ["Foo", "Euler, Foo", "DPM++ 2M Karras", "Euler,,DDIM", "Eulerr"])
def test_sampler_confirm_rejects_unknown_names(text: str) -> None:
    with pytest.raises(AxisValueError):
        parse_axis_values("Sampler", text)


def test_schedule_type_has_no_confirm_step() -> None:
    assert parse_axis_values("Schedule type", "Karras, sgm_uniform, anything") == [
        "Karras",
        "sgm_uniform",
        "anything",
    ]


def test_choices_come_from_the_sampler_registry() -> None:
    sampler_choices = AXES["Sampler"].choices
    schedule_choices = AXES["Schedule type"].choices
    assert sampler_choices is not None and schedule_choices is not None
    assert sampler_choices()[0] == "DPM++ 2M"
    assert "SGM Uniform" in schedule_choices()


def test_checkpoint_confirm_only_with_known_checkpoints() -> None:
    known = ["sd15/v1-5-pruned.safetensors", "sdxl.safetensors"]
    assert parse_axis_values("Checkpoint name", "v1-5-pruned, sdxl.safetensors", checkpoints=known) == [
        "v1-5-pruned",
        "sdxl.safetensors",
    ]
    with pytest.raises(AxisValueError):
        parse_axis_values("Checkpoint name", "missing", checkpoints=known)


def test_axis_label_is_exact_and_case_sensitive() -> None:
    with pytest.raises(AxisValueError):
        parse_axis_values("steps", "1")
    with pytest.raises(AxisValueError):
        axis_labels("cfg scale", [1.0])


def test_expansion_limit() -> None:
    assert len(parse_axis_values("Steps", "1-10", max_values=10)) == 10
    for text in ["1-11", "1-5, 1-6", "1-10 [11]", "1-5, 6, 7, 8, 9, 10, 11"]:
        with pytest.raises(AxisValueError):
            parse_axis_values("Steps", text, max_values=10)
    with pytest.raises(AxisValueError):
        parse_axis_values("CFG Scale", "0-100 (+0.001)", max_values=1000)
    with pytest.raises(AxisValueError):
        parse_axis_values("Prompt order", "a,b,c,d", max_values=23)
    with pytest.raises(AxisValueError):
        parse_axis_values("Steps", "1-99999999999999999999999")


def test_unsplittable_csv_is_rejected() -> None:
    with pytest.raises(AxisValueError):
        parse_axis_values("Styles", "a\rb")


# -------------------------------------------------------------------------------- labels


def test_labels_round_floats_to_8_decimals() -> None:
    assert axis_labels("CFG Scale", [40 / 3]) == ["CFG Scale: 13.33333333"]
    assert axis_labels("CFG Scale", [0.8999999999999999, 7.0, 0.30000000000000004]) == [
        "CFG Scale: 0.9",
        "CFG Scale: 7.0",
        "CFG Scale: 0.3",
    ]


def test_default_labels_carry_the_axis_name() -> None:
    assert axis_labels("Steps", [20, 30]) == ["Steps: 20", "Steps: 30"]
    assert axis_labels("Seed", [-1]) == ["Seed: -1"]
    assert axis_labels("Size", ["512x768"]) == ["Size: 512x768"]
    assert axis_labels("Schedule type", ["Karras"]) == ["Schedule type: Karras"]
    assert axis_labels("VAE", ["None"]) == ["VAE: None"]


def test_bare_value_labels() -> None:
    assert axis_labels("Prompt S/R", ["cat", "dog"]) == ["cat", "dog"]
    assert axis_labels("Sampler", ["Euler a"]) == ["Euler a"]
    assert axis_labels("Face restore", ["True"]) == ["True"]


def test_prompt_order_label_joins_values() -> None:
    values = parse_axis_values("Prompt order", "a, b")
    assert axis_labels("Prompt order", values) == ["a, b", "b, a"]


def test_checkpoint_label_is_the_base_name_and_nothing_is_empty() -> None:
    assert axis_labels("Checkpoint name", ["sd15/v1-5.safetensors"]) == ["v1-5.safetensors"]
    assert axis_labels("Nothing", ["x"]) == [""]


# ------------------------------------------------------------------------ range matcher

# The range shapes of §14.1 written as regular expressions: the float number's decimal
# point is "any character". The linear-time matcher must capture exactly what these do.
_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:.\d*)?"
_ORACLES = [
    (_INT_RANGE, re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")),
    (_INT_COUNT, re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*\])?\s*")),
    (_FLOAT_RANGE, re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")),
    (_FLOAT_COUNT, re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+)\s*\])?\s*")),
]
_SHAPE_ALPHABET = list("0123456789-+()[]. xe\n\t") + ["\u0661", "\u2003", "\u00b2"]


@given(text=st.text(alphabet=st.sampled_from(_SHAPE_ALPHABET), max_size=14))
@settings(max_examples=fuzz_examples(3000), deadline=None)
def test_range_matcher_captures_what_the_regular_expressions_capture(text: str) -> None:
    for shape, oracle in _ORACLES:
        found = oracle.fullmatch(text)
        assert shape.match(text) == (found.groups() if found else None)


@pytest.mark.parametrize(
    ("text", "captures"),
    [
        ("0-1 (+0.3)", ("0", "1 ", "+0.3")),
        ("1e-5", ("1e", "5", None)),
        ("-5--1", ("-5-", "1", None)),
        ("-5 - -1", ("-5 ", "-1", None)),
        ("1-2 (+1))", ("1", "2 ", "+1)")),
    ],
)
def test_float_range_captures(text: str, captures: tuple[str, str, str | None]) -> None:
    assert _FLOAT_RANGE.match(text) == captures


def test_long_digit_runs_are_matched_in_linear_time() -> None:
    # The regular expressions backtrack cubically here (minutes); the matcher does not.
    text = "9" * 3000 + "-" + "9" * 3000 + " (+1"
    with pytest.raises(AxisValueError):
        parse_axis_values("CFG Scale", text)
    with pytest.raises(AxisValueError):
        parse_axis_values("Steps", text)


# ---------------------------------------------------------------------------------- fuzz

_BIASED_ALPHABET = list("0123456789-+()[].,' \"e\n") + ["1-10", "(+", "(-", "[5]", "0.3", "9999"]
_axis_text = st.one_of(
    st.lists(st.sampled_from(_BIASED_ALPHABET), max_size=16).map("".join),
    st.text(alphabet=st.sampled_from(list("0123456789-+()[].,' \"e")), max_size=24),
    st.text(max_size=16),
)


@given(text=_axis_text)
@settings(max_examples=fuzz_examples(10_000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_only_axis_value_error_escapes(text: str) -> None:
    for axis in LISTED_AXES:
        try:
            values = parse_axis_values(axis, text)
        except AxisValueError:
            continue
        kind = AXES[axis].kind
        if kind == "permutations":
            assert all(type(v) is list and all(type(s) is str for s in v) for v in values)
        else:
            assert all(type(v) is {"int": int, "float": float, "str": str}[kind] for v in values)
        assert len(axis_labels(axis, values)) == len(values)

"""Tests for pipeline.infotext: quoting, the writer (format) and format -> parse round trips (§12.1)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import infotext
from pipeline.infotext import InfotextParams, parse, quote, unquote

SPEC_EXAMPLE = (
    "a cat\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
    "Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def assert_same(actual: Any, expected: Any) -> None:
    """Equal and of exactly the same type (the parity check is strict about int/str/bool)."""
    assert actual == expected
    assert type(actual) is type(expected), (actual, expected)


def params(**overrides: Any) -> InfotextParams:
    values: dict[str, Any] = dict(
        prompt="a cat", steps=20, sampler="DPM++ 2M", cfg_scale=7, seed=1234, width=512, height=512
    )
    values.update(overrides)
    return InfotextParams(**values)


def param_line(text: str) -> str:
    return text.split("\n")[-1]


# ---------------------------------------------------------------------------------------
# quote / unquote


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x: y", '"x: y"'),
        ("plain", "plain"),
        ("", ""),
        ("a, b", '"a, b"'),
        ("a\nb", '"a\\nb"'),
        ('say "hi"', 'say "hi"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("back\\slash: x", '"back\\\\slash: x"'),
        ("猫, 犬", '"猫, 犬"'),
        ("tab\there", "tab\there"),
    ],
)
def test_quote(value: str, expected: str) -> None:
    assert_same(quote(value), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"x: y"', "x: y"),
        ('"a\\nb"', "a\nb"),
        ('"猫, 犬"', "猫, 犬"),
        ('""', ""),
        ("plain", "plain"),
        ("", ""),
        ('"', '"'),
        ('"bad \\q escape"', '"bad \\q escape"'),
        ('"a" "b"', '"a" "b"'),
        ('"no end', '"no end'),
    ],
)
def test_unquote(text: str, expected: str) -> None:
    assert_same(unquote(text), expected)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_quote_unquote_round_trip(value: str) -> None:
    quoted = quote(value)
    if quoted != value:
        assert unquote(quoted) == value


# ---------------------------------------------------------------------------------------
# format


def test_format_spec_example() -> None:
    p = params(
        negative_prompt="lowres",
        model_hash="6ce0161689",
        model_name="v1-5-pruned-emaonly",
        extra={"Schedule type": "Karras"},
        version="v1.10.1",
    )
    assert_same(infotext.format(p), SPEC_EXAMPLE)


def test_format_minimal_uses_requested_schedule_type() -> None:
    assert infotext.format(params()) == (
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512"
    )


def test_format_cfg_scale_keeps_number_type() -> None:
    assert "CFG scale: 7.0," in infotext.format(params(cfg_scale=7.0))
    assert "CFG scale: 7.5," in infotext.format(params(cfg_scale=7.5))


def test_format_full_field_order() -> None:
    p = params(
        negative_prompt="bad",
        face_restoration="CodeFormer",
        model_hash="6ce0161689",
        model_name="model",
        vae_hash="735e4c3a44",
        vae_name="vae.pt",
        subseed=99,
        subseed_strength=0.25,
        seed_resize_from_w=640,
        seed_resize_from_h=448,
        clip_skip=2,
        sampler="Euler a",
        ensd=31337,
        token_merging_ratio=0.5,
        rng="CPU",
        tiling=True,
        extra={"Denoising strength": 0.7, "Hires upscale": 2, "Eta": 0.5},
        version="v1.10.1",
        user="alice",
    )
    assert param_line(infotext.format(p)) == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, "
        "Face restoration: CodeFormer, Size: 512x512, Model hash: 6ce0161689, Model: model, "
        "VAE hash: 735e4c3a44, VAE: vae.pt, Variation seed: 99, Variation seed strength: 0.25, "
        "Seed resize from: 640x448, Denoising strength: 0.7, Clip skip: 2, ENSD: 31337, "
        "Token merging ratio: 0.5, RNG: CPU, Tiling: True, Hires upscale: 2, Eta: 0.5, "
        "Version: v1.10.1, User: alice"
    )


@pytest.mark.parametrize(
    ("overrides", "absent"),
    [
        ({"subseed": 5, "subseed_strength": 0.0}, "Variation seed"),
        ({"seed_resize_from_w": 640, "seed_resize_from_h": 0}, "Seed resize from"),
        ({"seed_resize_from_w": -1, "seed_resize_from_h": 512}, "Seed resize from"),
        ({"clip_skip": 1}, "Clip skip"),
        ({"token_merging_ratio": 0.0}, "Token merging ratio"),
        ({"rng": "GPU"}, "RNG"),
        ({"tiling": False}, "Tiling"),
        ({}, "Denoising strength"),
        ({}, "Model hash"),
        ({}, "Version"),
        ({}, "User"),
        ({}, "Negative prompt"),
    ],
)
def test_format_omits_fields_whose_condition_fails(overrides: dict[str, Any], absent: str) -> None:
    assert absent not in infotext.format(params(**overrides))


@pytest.mark.parametrize(
    ("sampler", "ensd", "eta", "shown"),
    [
        ("Euler a", 31337, None, True),
        ("Euler a", 31337, 0.0, False),
        ("Euler a", 31337, 0.5, True),
        ("Euler a", 0, None, False),
        ("DPM2 a", 31337, None, True),
        ("DPM++ 2M", 31337, None, False),
        ("DPM++ SDE", 31337, None, False),
        ("Restart", 31337, None, False),
    ],
)
def test_format_ensd_only_where_a1111_shows_it(
    sampler: str, ensd: int, eta: float | None, shown: bool
) -> None:
    text = infotext.format(params(sampler=sampler, ensd=ensd, eta=eta))
    assert (f"ENSD: {ensd}" in text) is shown


def test_format_extra_overwrites_in_place_omits_none_and_writes_bare_keys() -> None:
    p = params(
        clip_skip=2,
        extra={"Steps": 30, "Clip skip": None, "Dummy": "Dummy", "Skip": None, "After": "x"},
    )
    assert param_line(infotext.format(p)) == (
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 1234, "
        "Size: 512x512, Dummy, After: x"
    )


def test_format_extra_for_a1111_fixed_fields_lands_in_their_slot() -> None:
    p = params(extra={"Init image hash": "abc", "Image CFG scale": 1.5, "Denoising strength": 0.75})
    assert param_line(infotext.format(p)) == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Image CFG scale: 1.5, "
        "Seed: 1234, Size: 512x512, Denoising strength: 0.75, Init image hash: abc"
    )


def test_format_version_and_user_override_extra_in_place() -> None:
    # As in A1111's dict literal: Version/User written after ``extra`` replace its values.
    p = params(extra={"Version": "x", "Eta": 1}, version="v1.10.1", user="u")
    assert param_line(infotext.format(p)).endswith("Size: 512x512, Version: v1.10.1, Eta: 1, User: u")
    assert "Version" not in infotext.format(params(extra={"Version": "x"}))


def test_format_quotes_values() -> None:
    p = params(
        model_name="sd: xl",
        extra={"Lora hashes": "a: 0123456789ab, b: ba9876543210", "Note": "line1\nline2", "Tuple": (1, 2)},
    )
    line = param_line(infotext.format(p))
    assert 'Model: "sd: xl"' in line
    assert 'Lora hashes: "a: 0123456789ab, b: ba9876543210"' in line
    assert 'Note: "line1\\nline2"' in line
    assert "Tuple: [1, 2]" in line


def test_format_empty_prompt_starts_with_parameter_line() -> None:
    assert infotext.format(params(prompt="")).startswith("Steps: 20,")
    assert infotext.format(params(prompt="", negative_prompt="bad")).startswith("Negative prompt: bad\nSteps")


def test_format_strips_prompt_whitespace() -> None:
    assert infotext.format(params(prompt="  a cat ")).startswith("a cat \nSteps")


def test_format_empty_string_value_is_written_and_dropped_by_reader() -> None:
    text = infotext.format(params(model_hash="", model_name="m"))
    assert "Model hash: , Model: m" in text
    assert "Model hash" not in parse(text)


# ---------------------------------------------------------------------------------------
# Round trips: format -> parse


def expected_fields(p: InfotextParams) -> dict[str, str]:
    """What parse() must give back, as strings, for the fields format() wrote."""
    out = {"Steps": str(p.steps), "Sampler": p.sampler, "CFG scale": str(p.cfg_scale), "Seed": str(p.seed)}
    out |= {"Size-1": str(p.width), "Size-2": str(p.height), "Schedule type": p.schedule_type}
    optional = {"Model hash": p.model_hash, "Model": p.model_name, "VAE": p.vae_name, "User": p.user}
    out |= {k: v for k, v in optional.items() if v is not None}
    if p.clip_skip > 1:
        out["Clip skip"] = str(p.clip_skip)
    if p.subseed_strength:
        out |= {"Variation seed": str(p.subseed), "Variation seed strength": str(p.subseed_strength)}
    out |= {k: str(v) for k, v in p.extra.items()}
    return out


ROUND_TRIP_CASES = [
    params(),
    params(prompt="", negative_prompt=""),
    params(prompt="a, b: c\nd (e:1.2) [f]", negative_prompt="x, y\nz: w"),
    params(prompt="一只猫, 杰作", negative_prompt="低质量", model_name="模型: v1"),
    params(prompt='quote "it", and \\ back', cfg_scale=7.5, sampler="Euler a", clip_skip=2),
    params(subseed=77, subseed_strength=0.3, schedule_type="Karras", width=768, height=1024),
    params(model_hash="6ce0161689", model_name="v1-5, pruned", vae_name="a:b", user="bob, the builder"),
    params(
        extra={
            "Lora hashes": "lora1: 0123456789ab, lora2: ba9876543210",
            "TI hashes": 'emb: "x", other: y',
            "Hires upscaler": "R-ESRGAN 4x+",
            "Hires upscale": 2.0,
            "Eta": 0.67,
            "Note": "multi\nline: text, with \\ slash",
        }
    ),
]


@pytest.mark.parametrize("p", ROUND_TRIP_CASES)
def test_format_parse_round_trip(p: InfotextParams) -> None:
    res = parse(infotext.format(p))
    assert res["Prompt"] == p.prompt
    assert res["Negative prompt"] == p.negative_prompt
    for key, value in expected_fields(p).items():
        assert_same(res[key], value)


def clean_text(lines: list[str]) -> str:
    return "\n".join(lines)


_PROMPT_LINE = (
    st.lists(
        st.sampled_from([*"abc xyz,:()[]\\\"'-_.0123456789猫é€", "BREAK", " BREAK ", "(a:1.2.3)"]),
        max_size=12,
    )
    .map("".join)
    .filter(lambda line: line == line.strip())
)
_VALUE = st.text(alphabet=st.sampled_from(list('ab 1,:\n"\\é猫-x')), min_size=1, max_size=20).filter(
    lambda v: (
        v == v.strip()
        and not re.match(r"^\d+x\d+$", v)
        # a raw value that opens with a quote is read as the start of a quoted value (as in A1111)
        and not (v[0] == '"' and quote(v) == v)
    )
)


@st.composite
def infotext_params(draw: st.DrawFn) -> InfotextParams:
    prompt_lines = draw(st.lists(_PROMPT_LINE, max_size=3))
    negative_lines = draw(st.lists(_PROMPT_LINE, max_size=3))
    # The reader drops leading blank lines (and the writer strips the whole text).
    while prompt_lines and not prompt_lines[0]:
        prompt_lines.pop(0)
    while negative_lines and not negative_lines[0]:
        negative_lines.pop(0)
    keys = ["Hires upscaler", "Lora hashes", "My key", "Other-key/x"]
    return InfotextParams(
        prompt=clean_text(prompt_lines),
        negative_prompt=clean_text(negative_lines),
        steps=draw(st.integers(1, 150)),
        sampler=draw(st.sampled_from(["DPM++ 2M", "Euler a", "DDIM", "DPM++ 2M SDE Heun"])),
        cfg_scale=draw(st.one_of(st.integers(1, 30), st.floats(1, 30, allow_nan=False))),
        seed=draw(st.integers(0, 2**32)),
        width=draw(st.integers(64, 2048)),
        height=draw(st.integers(64, 2048)),
        schedule_type=draw(st.sampled_from(["Automatic", "Karras", "SGM Uniform"])),
        clip_skip=draw(st.integers(1, 4)),
        model_name=draw(st.none() | _VALUE),
        extra={key: draw(_VALUE) for key in keys if draw(st.booleans())},
    )


@given(infotext_params())
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
def test_format_parse_round_trip_property(p: InfotextParams) -> None:
    text = infotext.format(p)
    res = parse(text)
    assert res["Prompt"] == p.prompt
    assert res["Negative prompt"] == p.negative_prompt
    for key, value in expected_fields(p).items():
        assert_same(res[key], value)

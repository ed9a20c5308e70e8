from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import infotext
from pipeline.infotext import InfotextParams, StyleExtractor, parse, quote, unquote
from tests.conftest import fuzz_examples

SPEC_EXAMPLE = (
    "a cat\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
    "Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)

# Every default parse() injects into a minimal infotext, with A1111's exact types.
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


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


class ListStyles:
    """A small style database with §6 "Apply if any" extraction (suffix styles only)."""

    def __init__(self, styles: list[tuple[str, str, str]]) -> None:
        self.styles = styles

    @staticmethod
    def _extract_text(style_text: str, prompt: str) -> tuple[bool, str]:
        bare, suffix = prompt.strip(), style_text.strip()
        if not bare.endswith(suffix):
            return False, prompt
        rest = bare[: len(bare) - len(suffix)]
        return True, rest[:-2] if rest.endswith(", ") else rest

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        found: list[str] = []
        candidates = [s for s in self.styles if s[1] or s[2]]
        while True:
            for style in candidates:
                ok_prompt, new_prompt = self._extract_text(style[1], prompt)
                ok_negative, new_negative = self._extract_text(style[2], negative_prompt)
                if ok_prompt and ok_negative:
                    prompt, negative_prompt = new_prompt, new_negative
                    candidates.remove(style)
                    found.append(style[0])
                    break
            else:
                return list(reversed(found)), prompt, negative_prompt


STYLES: StyleExtractor = ListStyles([("quality", "masterpiece", "lowres"), ("anime", "anime style", "")])


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
# parse: sections and values


def test_parse_spec_example_with_all_defaults() -> None:
    res = parse("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7")
    expected = {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Prompt": "a cat",
        "Negative prompt": "",
        **DEFAULTS,
    }
    assert res == expected
    for key, value in expected.items():
        assert_same(res[key], value)


def test_parse_full_infotext() -> None:
    res = parse(SPEC_EXAMPLE)
    assert res["Prompt"] == "a cat"
    assert res["Negative prompt"] == "lowres"
    assert res["Size-1"] == "512" and res["Size-2"] == "512"
    assert "Size" not in res
    assert res["Schedule type"] == "Karras"
    assert res["Model hash"] == "6ce0161689"
    assert res["Version"] == "v1.10.1"
    assert "Downcast alphas_cumprod" not in res
    assert "Styles array" not in res


def test_parse_needs_three_parameters_on_the_last_line() -> None:
    res = parse("a cat\nSteps: 20, Sampler: Euler a")
    assert res["Prompt"] == "a cat\nSteps: 20, Sampler: Euler a"
    assert "Steps" not in res


def test_parse_parameter_line_only() -> None:
    res = parse("Steps: 20, Sampler: Euler a, CFG scale: 7")
    assert res["Prompt"] == "" and res["Steps"] == "20"


def test_parse_empty_and_whitespace() -> None:
    for text in ("", "   ", "\n\n"):
        res = parse(text)
        assert res["Prompt"] == "" and res["Negative prompt"] == ""
        assert res["Clip skip"] == "1"


def test_parse_multiline_prompt_and_negative() -> None:
    text = "  line one \n line two\n\nline four\nNegative prompt:  neg one \nneg two\nSteps: 1, Seed: 2, Size: 3x4"
    res = parse(text)
    assert res["Prompt"] == "line one\nline two\n\nline four"
    assert res["Negative prompt"] == "neg one\nneg two"


def test_parse_leading_blank_negative_lines_are_dropped() -> None:
    res = parse("p\nNegative prompt:\n\nneg\nSteps: 1, Seed: 2, Size: 3x4")
    assert res["Negative prompt"] == "neg"


def test_parse_repeated_negative_prefix_is_removed_too() -> None:
    res = parse("p\nNegative prompt: a\nNegative prompt: b\nSteps: 1, Seed: 2, Size: 3x4")
    assert res["Negative prompt"] == "a\nb"


def test_parse_negative_only() -> None:
    res = parse("Negative prompt: bad\nSteps: 1, Seed: 2, Size: 3x4")
    assert res["Prompt"] == "" and res["Negative prompt"] == "bad"


def test_parse_quoted_sizes_and_odd_values() -> None:
    line = (
        'Steps: 20, Lora hashes: "a: 1, b: 2", Note: "x\\ny", Bad: "a\\q", Empty: , '
        'Blank: "", Seed resize from: 640x448, Hires resize: 1024x768, Odd: 12x, T: 1, '
        "Key with-dash/slash: v, Trailing : w"
    )
    res = parse("p\n" + line)
    assert res["Lora hashes"] == "a: 1, b: 2"
    assert res["Note"] == "x\ny"
    assert res["Bad"] == '"a\\q"'
    assert "Empty" not in res
    assert_same(res["Blank"], "")
    assert (res["Seed resize from-1"], res["Seed resize from-2"]) == ("640", "448")
    assert (res["Hires resize-1"], res["Hires resize-2"]) == ("1024", "768")
    assert res["Odd"] == "12x"
    assert "T" not in res  # single-character keys never match
    assert res["Key with-dash/slash"] == "v"
    assert res["Trailing "] == "w"


def test_parse_quoted_size_is_split_too() -> None:
    res = parse('p\nSteps: 1, Seed: 2, Size: "512x768"')
    assert (res["Size-1"], res["Size-2"]) == ("512", "768")


def test_parse_hires_resize_default_only_fills_when_first_is_missing() -> None:
    res = parse("p\nSteps: 1, Seed: 2, Hires resize-2: 5")
    assert_same(res["Hires resize-1"], 0)
    assert_same(res["Hires resize-2"], 0)
    res = parse("p\nSteps: 1, Seed: 2, Hires resize-1: 5")
    assert_same(res["Hires resize-1"], "5")
    assert "Hires resize-2" not in res


def test_parse_keeps_given_values_over_defaults() -> None:
    res = parse(
        "p\nSteps: 1, Clip skip: 2, RNG: CPU, Schedule type: Karras, Schedule rho: 5, Masked area padding: 8"
    )
    assert_same(res["Clip skip"], "2")
    assert_same(res["RNG"], "CPU")
    assert_same(res["Schedule type"], "Karras")
    assert_same(res["Schedule rho"], "5")
    assert_same(res["Masked area padding"], "8")


def test_parse_fp8_weight_adds_cache_default() -> None:
    res = parse("p\nSteps: 1, Seed: 2, FP8 weight: Enable for SDXL")
    assert_same(res["Cache FP16 weight for LoRA"], False)
    assert "Cache FP16 weight for LoRA" not in parse("p\nSteps: 1, Seed: 2, Size: 3x4")
    res = parse("p\nSteps: 1, FP8 weight: Enable, Cache FP16 weight for LoRA: True")
    assert_same(res["Cache FP16 weight for LoRA"], "True")


# ---------------------------------------------------------------------------------------
# parse: emphasis, hypernet, old hires fix


@pytest.mark.parametrize(
    ("prompt", "negative", "emphasis"),
    [
        ("a (cat:1.2)", "", True),
        ("a cat", "[lowres]", True),
        ("a (cat)", "", True),
        ("a cat BREAK a dog", "", False),
        ("a ([cat])", "", False),  # weights multiply back to exactly 1.0
        ("a cat", "", False),
        ("(a:1.2.3)", "", False),  # A1111 crashes; we skip the check
        ("(a:1.2.3)", "(b:1.5)", True),
        ("(a:.)", "", False),
    ],
)
def test_parse_emphasis_default(prompt: str, negative: str, emphasis: bool) -> None:
    res = parse(f"{prompt}\nNegative prompt: {negative}\nSteps: 1, Seed: 2, Size: 3x4")
    assert res["Prompt"] == prompt
    assert ("Emphasis" in res) is emphasis
    if emphasis:
        assert_same(res["Emphasis"], "Original")


def test_parse_given_emphasis_is_kept() -> None:
    assert parse("(a:1.5)\nSteps: 1, Seed: 2, Emphasis: No norm")["Emphasis"] == "No norm"


def test_parse_emphasis_is_judged_on_the_destyled_prompt() -> None:
    styles = ListStyles([("weighted", "(shiny:1.3)", "")])
    res = parse("a cat, (shiny:1.3)\nSteps: 1, Seed: 2, Size: 3x4", styles=styles)
    assert res["Prompt"] == "a cat"
    assert res["Styles array"] == ["weighted"]
    assert "Emphasis" not in res


def test_parse_hypernet_is_appended_to_prompt() -> None:
    res = parse("a cat\nSteps: 1, Seed: 2, Hypernet: anime")
    assert res["Prompt"] == "a cat<hypernet:anime:1.0>"
    res = parse("a cat\nSteps: 1, Hypernet: anime, Hypernet strength: 0.5")
    assert res["Prompt"] == "a cat<hypernet:anime:0.5>"


@pytest.mark.parametrize(
    ("fields", "size", "hires"),
    [
        ("Size: 1024x1024, First pass size: 0x0", (512, 512), (1024, 1024)),
        ("Size: 768x512, First pass size: 0x0", (640, 448), (768, 512)),
        ("Size: 512x512, First pass size: 0x0, Hires resize: 1024x1024", (512, 512), (512, 512)),
        ("Size: 1024x768, First pass size: 512x384", (512, 384), (1024, 768)),
        ("Size: 1024x1024, First pass size: 0x256", (512, 512), (1024, 1024)),
        ("First pass size: 0x0, Steps: 1", (512, 512), (512, 512)),
        ("Size: 0x512, First pass size: 256x256", (256, 256), (0, 512)),
    ],
)
def test_parse_old_first_pass_size(fields: str, size: tuple[int, int], hires: tuple[int, int]) -> None:
    res = parse(f"p\nSteps: 20, {fields}")
    assert_same(res["Size-1"], size[0])
    assert_same(res["Size-2"], size[1])
    assert_same(res["Hires resize-1"], hires[0])
    assert_same(res["Hires resize-2"], hires[1])
    assert isinstance(res["First pass size-1"], str)


def test_parse_first_pass_size_that_is_not_a_size_changes_nothing() -> None:
    res = parse("p\nSteps: 20, Size: 1024x1024, First pass size: big")
    assert res["First pass size"] == "big"
    assert (res["Size-1"], res["Size-2"]) == ("1024", "1024")
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (0, 0)


@pytest.mark.parametrize(
    "fields",
    [
        "Size: 0x512, First pass size: 0x0",  # A1111 divides by zero
        "Size: 512x0, First pass size: 512x0",
        "Size-1: wide, First pass size: 0x0",  # A1111: int() of a non-number
        "Size: 1x" + "9" * 5000 + ", First pass size: 0x0",  # int() digit limit
        "Size: 1x" + "9" * 400 + ", First pass size: 0x0",  # float overflow
        "Size-1: -5, First pass size: 0x0",  # sqrt of a negative
    ],
)
def test_parse_first_pass_size_failures_leave_fields_as_written(fields: str) -> None:
    res = parse(f"p\nSteps: 20, Seed: 1, {fields}")
    assert res["Prompt"] == "p"
    assert_same(res["Hires resize-1"], 0)
    assert_same(res["Hires resize-2"], 0)
    assert all(isinstance(res[k], str) for k in ("Size-1", "First pass size-1", "First pass size-2"))
    assert res["RNG"] == "GPU" and res["Refiner switch by sampling steps"] is False


# ---------------------------------------------------------------------------------------
# parse: back-compat by Version


@pytest.mark.parametrize(
    ("prompt", "fields", "flags"),
    [
        (
            "[a:b:5]",
            "Sampler: DDIM, Version: v1.5.2",
            {"Old prompt editing timelines", "Pad conds v0", "Downcast"},
        ),
        ("a", "Sampler: PLMS, Version: 1.5.1", {"Pad conds v0", "Downcast"}),
        ("[a]", "Sampler: Euler, Version: v1.6.0", {"Downcast"}),
        ("a", "Sampler: Euler, Version: v1.7.0", {"Downcast"}),
        ("a", "Sampler: Euler, Version: v1.7.0-224-g1234abc", {"Downcast"}),
        ("a", "Sampler: Euler, Version: v1.7.0-225-g1234abc", set()),
        ("a", "Sampler: Euler, Version: v1.7.0-RC-5-gf92d6149", {"Downcast"}),
        ("a", "Sampler: Euler, Version: v1.10.1", set()),
        ("a", "Sampler: Euler, Version: garbage", set()),
        ("[a]", "Sampler: DDIM", set()),
        ("a", "Sampler: Euler, Refiner: sdxl_refiner, Version: v1.7.0", {"Downcast", "Refiner"}),
        ("a", "Sampler: Euler, Refiner: sdxl_refiner, Version: v1.8.0", set()),
        ("a", 'Sampler: Euler, Refiner: "", Version: v1.7.0', {"Downcast"}),
    ],
)
def test_parse_backcompat(prompt: str, fields: str, flags: set[str]) -> None:
    res = parse(f"{prompt}\nSteps: 20, Seed: 1, {fields}")
    assert ("Old prompt editing timelines" in res) is ("Old prompt editing timelines" in flags)
    assert ("Pad conds v0" in res) is ("Pad conds v0" in flags)
    assert ("Downcast alphas_cumprod" in res) is ("Downcast" in flags)
    for key in ("Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"):
        if key in res:
            assert_same(res[key], True)
    assert_same(res["Refiner switch by sampling steps"], "Refiner" in flags)


# ---------------------------------------------------------------------------------------
# parse: styles ("Apply if any")


def test_parse_extracts_styles() -> None:
    text = "a cat, anime style, masterpiece\nNegative prompt: blurry, lowres\nSteps: 1, Seed: 2, Size: 3x4"
    res = parse(text, styles=STYLES)
    assert res["Prompt"] == "a cat"
    assert res["Negative prompt"] == "blurry"
    assert res["Styles array"] == ["anime", "quality"]


def test_parse_without_style_match_has_no_styles_array() -> None:
    res = parse("a dog\nSteps: 1, Seed: 2, Size: 3x4", styles=STYLES)
    assert res["Prompt"] == "a dog" and "Styles array" not in res
    res = parse("a cat, masterpiece\nSteps: 1, Seed: 2, Size: 3x4")  # styles=None: empty database
    assert res["Prompt"] == "a cat, masterpiece" and "Styles array" not in res


def test_parse_hires_prompts_with_same_styles_are_destyled() -> None:
    text = (
        "a cat, masterpiece\nNegative prompt: blurry, lowres\nSteps: 1, Seed: 2, "
        'Hires prompt: "a cat, masterpiece", Hires negative prompt: "grainy, lowres", Version: v1.10.1'
    )
    res = parse(text, styles=STYLES)
    assert res["Styles array"] == ["quality"]
    assert res["Prompt"] == "a cat"
    assert res["Hires prompt"] == ""  # equals the de-styled main prompt
    assert res["Hires negative prompt"] == "grainy"


def test_parse_hires_prompt_with_other_styles_prevents_destyling() -> None:
    text = (
        "a cat, masterpiece\nNegative prompt: blurry, lowres\nSteps: 1, Seed: 2, "
        'Hires prompt: "a cat, anime style, masterpiece", Version: v1.10.1'
    )
    res = parse(text, styles=STYLES)
    assert res["Prompt"] == "a cat, masterpiece"
    assert res["Negative prompt"] == "blurry, lowres"
    assert res["Hires prompt"] == "a cat, anime style, masterpiece"
    assert "Styles array" not in res


@pytest.mark.parametrize("version", ["v1.8.0-139", "v1.8.0", "1.7.0"])
def test_parse_old_versions_ignore_hires_prompts_for_styles(version: str) -> None:
    text = (
        "a cat, masterpiece\nNegative prompt: blurry, lowres\nSteps: 1, Seed: 2, "
        f'Hires prompt: "a cat, anime style, masterpiece", Version: {version}'
    )
    res = parse(text, styles=STYLES)
    assert res["Prompt"] == "a cat"
    assert res["Styles array"] == ["quality"]
    assert res["Hires prompt"] == "a cat, anime style, masterpiece"


@pytest.mark.parametrize("version", ["", ", Version: v1.8.0-140", ", Version: nonsense"])
def test_parse_new_or_unknown_versions_use_hires_prompts(version: str) -> None:
    text = f'a cat, masterpiece\nSteps: 1, Seed: 2, Hires prompt: "a cat, anime style, masterpiece"{version}'
    res = parse(text, styles=STYLES)
    assert res["Prompt"] == "a cat, masterpiece" and "Styles array" not in res


def test_parse_hires_prompt_equal_to_prompt_becomes_empty_without_styles() -> None:
    res = parse("a cat\nNegative prompt: bad\nSteps: 1, Seed: 2, Hires prompt: a cat")
    assert_same(res["Hires prompt"], "")
    assert_same(res["Hires negative prompt"], "")
    res = parse("a cat\nSteps: 1, Seed: 2, Hires prompt: a dog")
    assert res["Hires prompt"] == "a dog"


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


# ---------------------------------------------------------------------------------------
# Fuzz: the reader never raises


_FUZZ_TOKENS = [
    "Steps",
    "Sampler",
    "Size",
    "Seed",
    "CFG scale",
    "Hires prompt",
    "Hires negative prompt",
    "Hypernet",
    "Refiner",
    "Emphasis",
    "FP8 weight",
    "Size-1",
    "First pass size-2",
    ": ",
    ":",
    ", ",
    ",",
    '"',
    '\\"',
    "\\",
    "\n",
    " ",
    "x",
    "0",
    "7",
    "512",
    "0x0",
    "512x0",
    "Negative prompt:",
    "Size: 0x0",
    "Size: 0x512",
    "First pass size:",
    "First pass size: 0x0",
    "Hires resize: 1024x1024",
    "Version: ",
    "v1.5.2",
    "1.8.0-139",
    "v1.7.0-225-gabc",
    "(",
    ")",
    "[",
    "]",
    "(a:1.2.3)",
    "(a:.)",
    "(a:1.5)",
    ":1.5)",
    "[a:b:5]",
    "BREAK",
    "masterpiece",
    "lowres",
    "<hypernet:x:1>",
    "猫",
    "\u2028",
    "\r",
]
# Single characters the tokens are mixed with: ASCII, whitespace str.strip() knows, non-BMP,
# a lone surrogate and NUL.
_FUZZ_CHARS = [chr(c) for c in range(32, 127)] + list("\t\x0b\x0c\x1c\x85\xa0é€\U0001f600\ud800\x00")
# Tokens twice, so about half the pieces are infotext-like.
_FUZZ_TABLE = _FUZZ_TOKENS * 2 + _FUZZ_CHARS
# One binary draw per example, mapped through the table: ten thousand examples in a few
# seconds, where a list of one_of(...) draws costs several times that.
_FUZZ_TEXT = st.binary(max_size=48).map(lambda raw: "".join(_FUZZ_TABLE[b % len(_FUZZ_TABLE)] for b in raw))


@given(_FUZZ_TEXT, st.booleans())
@settings(max_examples=fuzz_examples(10_000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_never_raises(text: str, with_styles: bool) -> None:
    res = parse(text, styles=STYLES if with_styles else None)
    assert isinstance(res["Prompt"], str)
    assert isinstance(res["Negative prompt"], str)
    assert all(isinstance(key, str) for key in res)
    assert res["Clip skip"] is not None and "RNG" in res


@given(st.text(), st.booleans())
@settings(max_examples=500, deadline=None)
def test_parse_never_raises_on_arbitrary_text(text: str, with_styles: bool) -> None:
    res = parse(text, styles=STYLES if with_styles else None)
    assert isinstance(res["Prompt"], str)


@given(st.one_of(_FUZZ_TEXT, st.text()))
@settings(max_examples=fuzz_examples(2000), deadline=None)
def test_linear_parameter_scan_equals_findall(text: str) -> None:
    line = text.replace("\n", " ")
    assert infotext._find_params(line) == infotext._PARAM_RE.findall(line)


def test_parse_is_fast_on_long_lines() -> None:
    # A plain findall is quadratic here: well over a minute for this input.
    started = time.perf_counter()
    res = parse("p\n" + "word " * 20_000 + "\t-/x" * 5_000 + ", Steps: 1, Seed: 2, Size: 3x4")
    assert res["Steps"] == "1"
    assert time.perf_counter() - started < 5

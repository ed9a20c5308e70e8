"""Tests for pipeline.infotext's reader (parse): sections, values, back-compat, styles, fuzz (§12.2)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import infotext
from pipeline.infotext import _PARAM_RE, StyleExtractor, parse
from tests.conftest import fuzz_examples
from tests.pipeline.test_infotext import SPEC_EXAMPLE, assert_same

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


class _Attempts:
    """``_PARAM_RE`` recording where each match is attempted."""

    def __init__(self) -> None:
        self.starts: list[int] = []

    def match(self, line: str, pos: int) -> re.Match[str] | None:
        self.starts.append(pos)
        return _PARAM_RE.match(line, pos)


def test_parse_scans_a_long_line_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each attempt scans from its start to the end of the key run there (or of its match),
    so the attempts' spans add up to a multiple of the line's length. A plain findall
    attempts at every position and scans to the run's end each time: quadratic, well over
    a minute for this line."""
    line = "word " * 20_000 + "\t-/x" * 5_000 + ", Steps: 1, Seed: 2, Size: 3x4"
    attempts = _Attempts()
    monkeypatch.setattr(infotext, "_PARAM_RE", attempts)
    res = parse("p\n" + line)
    assert res["Steps"] == "1" and res["Size-2"] == "4"
    scanned = 0
    for start in attempts.starts:
        found = _PARAM_RE.match(line, start)
        scanned += (found or infotext._KEY_RUN_RE.match(line, start)).end() - start + 1
    assert len(line) <= scanned <= 3 * len(line)

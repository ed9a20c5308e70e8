from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.commands import parse_args, split_command
from bot.errors import CommandSyntaxError, UserError
from bot.governance import parse_duration
from bot.i18n import default_translator
from bot.options import convert_value, draw_options, parse_int
from bot.settings import LimitsSettings


def test_the_full_example() -> None:
    parsed = parse_args(
        'a cat, masterpiece --negative "lowres" --steps 28 --cfg 7 --size 512x768 --seed 5 '
        '--sampler "Euler a" --batch 2 --count 2 --checkpoint tiny'
    )
    assert parsed.text == "a cat, masterpiece"
    assert parsed.options == [
        ("negative", "lowres"),
        ("steps", "28"),
        ("cfg", "7"),
        ("size", "512x768"),
        ("seed", "5"),
        ("sampler", "Euler a"),
        ("batch", "2"),
        ("count", "2"),
        ("checkpoint", "tiny"),
    ]


@pytest.mark.parametrize(
    ("text", "prompt", "options"),
    [
        ("(masterpiece:1.2), [cat:dog:10]", "(masterpiece:1.2), [cat:dog:10]", []),
        ('"a cat --steps 4" --steps 5', "a cat --steps 4", [("steps", "5")]),
        ('a "cute" cat', 'a "cute" cat', []),
        ("a cat --neg lowres, bad hands --seed -1", "a cat", [("neg", "lowres, bad hands"), ("seed", "-1")]),
        ("a cat --seed=7", "a cat", [("seed", "7")]),
        ('a --negative "say \\"hi\\"" --steps 3', "a", [("negative", 'say "hi"'), ("steps", "3")]),
        (
            "一只猫 --negative “低质量, 水印” --steps 4",
            "一只猫",
            [("negative", "低质量, 水印"), ("steps", "4")],
        ),
        ("a cat --private", "a cat", [("private", None)]),
        ("well-known --x", "well-known", [("x", None)]),
        ("", "", []),
    ],
)
def test_grammar(text: str, prompt: str, options: list) -> None:
    parsed = parse_args(text)
    assert parsed.text == prompt
    assert parsed.options == options


@pytest.mark.parametrize("text", ['a cat --negative "lowres', '"a cat', "a --neg “x"])
def test_unclosed_quote_is_an_error(text: str) -> None:
    with pytest.raises(CommandSyntaxError) as info:
        parse_args(text)
    assert info.value.key == "error.unclosed_quote"


def test_text_after_a_quoted_value_is_an_error() -> None:
    with pytest.raises(CommandSyntaxError) as info:
        parse_args('a --negative "lowres" bad hands')
    assert info.value.key == "error.text_after_quote"


def test_split_command() -> None:
    assert split_command("/draw a cat") == ("draw", "a cat")
    assert split_command("/Draw@AtelierBot a cat") == ("draw", "a cat")
    assert split_command("/help") == ("help", "")
    assert split_command("a cat") is None


def test_argv_words_round_trip_through_the_grammar() -> None:
    from bot.commands import join_words

    words = ['a "cute" cat, (x:1.2)', "--negative", "low res\\", "--steps", "4", "--sampler", "Euler a"]
    parsed = parse_args(join_words(words))
    assert parsed.text == 'a "cute" cat, (x:1.2)'
    assert parsed.options == [("negative", "low res\\"), ("steps", "4"), ("sampler", "Euler a")]


# option values: one bounded integer parser, range messages ----------------------------------------

LIMITS = LimitsSettings()
OPTIONS = draw_options().lookup()


def refusal(name: str, raw: str) -> UserError:
    with pytest.raises(UserError) as info:
        convert_value(OPTIONS[name], raw, LIMITS)
    return info.value


@pytest.mark.parametrize(
    ("name", "raw", "key", "english", "chinese"),
    [
        ("steps", "9" * 100_000, "error.out_of_range", "--steps must be from 1 to 150, got 999", "1 到 150"),
        ("steps", "-" + "9" * 100_000, "error.out_of_range", "--steps must be from 1 to 150", "1 到 150"),
        ("seed", "9" * 5_000, "error.seed_range", "from 0 to 9223372036854775807", "-1（随机）"),
        ("batch", "1" + "0" * 4_400, "error.out_of_range", "--batch must be from 1 to 8", "1 到 8"),
        ("cfg", "7" * 50_000, "error.out_of_range", "--cfg must be from 1.0 to 30.0", "1.0 到 30.0"),
        ("cfg", "1e999", "error.out_of_range", "--cfg must be from 1.0 to 30.0, got inf", "1.0 到 30.0"),
        ("size", "8" * 5_000 + "x512", "error.bad_size", "each from 64 to 2048", "64 到 2048"),
        ("hr-resize", "512x" + "8" * 5_000, "error.bad_pair", "each side from 0 to 2048", "0 到 2048"),
        ("ensd", "nan", "error.not_an_integer", "whole number from 0 to 2147483647", "0 到 2147483647"),
    ],
)
def test_huge_and_odd_numbers_get_the_range_message(
    name: str, raw: str, key: str, english: str, chinese: str
) -> None:
    error = refusal(name, raw)
    assert error.key == key
    translator = default_translator()
    en, zh = (translator.t(locale, error.key, **error.params) for locale in ("en", "zh-CN"))
    assert english in en and chinese in zh
    assert len(en) < 200 and len(zh) < 200  # the value is named, not pasted back whole


def test_the_integer_parser_refuses_long_numbers_without_converting_them() -> None:
    assert parse_int("0" * 5_000 + "20") == 20  # leading zeros are no magnitude
    assert parse_int(" -7 ") == -7 and parse_int("１２") == 12 and parse_int("1_0") is None
    assert parse_int("9" * 100_000) == 10**24 and parse_int("-" + "9" * 100_000) == -(10**24)
    assert convert_value(OPTIONS["steps"], "0" * 5_000 + "20", LIMITS) == 20
    assert convert_value(OPTIONS["seed"], str(2**63 - 1), LIMITS) == 2**63 - 1


@pytest.mark.parametrize("text", ["9999999999d", "99999999w", "3651d", "0h", "9" * 100_000 + "m"])
def test_durations_past_ten_years_get_the_range_message(text: str) -> None:
    with pytest.raises(UserError) as info:
        parse_duration(text, "since")
    assert info.value.key == "error.duration_range"
    rendered = default_translator().t("en", info.value.key, **info.value.params)
    assert rendered.startswith("--since must be a duration from 1m to 3650d")
    assert parse_duration("3650d") == timedelta(days=3650) and parse_duration("2w") == timedelta(weeks=2)


NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(10**4000), max_value=10**4000).map(str),
    st.builds(lambda digit, n: digit * n, st.sampled_from("0179"), st.integers(1, 60_000)),
    st.floats().map(repr),
    st.from_regex(r"[0-9]{1,5000}[xX×*][0-9]{1,5000}", fullmatch=True),
    st.sampled_from(["", " ", "-", "+", "1e999", "-1e999", "nan", "inf", "٣", "１２", "0x10", "1_000"]),
    st.text(max_size=60),
)


@settings(max_examples=300, deadline=None)
@given(spec=st.sampled_from(draw_options().specs), raw=NUMBERS)
def test_every_option_converter_answers_any_value_with_a_value_or_a_user_error(spec, raw: str) -> None:
    try:
        value = convert_value(spec, raw, LIMITS)
    except UserError as error:
        for locale in ("en", "zh-CN"):
            assert len(default_translator().t(locale, error.key, **error.params)) < 1000
        return
    if spec.kind in ("int", "seed"):
        assert isinstance(value, int) and abs(value) <= 2**63


@pytest.mark.parametrize("dash", ["\u2014", "\u2013", "\u2014\u2014", "--"])
def test_phone_dashes_start_options(dash: str) -> None:
    parsed = parse_args(f"a cat {dash}steps 4 {dash}seed -1")
    assert parsed.text == "a cat"
    assert parsed.options == [("steps", "4"), ("seed", "-1")]


def test_a_single_dash_option_is_refused_naming_the_right_spelling() -> None:
    with pytest.raises(CommandSyntaxError) as caught:
        parse_args("a cat -steps 4")
    assert caught.value.key == "error.single_dash" and caught.value.params == {"name": "steps"}
    # numbers and dashes inside words are no options
    assert parse_args("a half-elf --seed -1 --cfg -2.5").options == [("seed", "-1"), ("cfg", "-2.5")]
    assert parse_args('"a cat -steps 4"').text == "a cat -steps 4"

from __future__ import annotations

import pytest

from bot.commands import parse_args, split_command
from bot.errors import CommandSyntaxError


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

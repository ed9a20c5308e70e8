"""A1111 prompt syntax: emphasis weights (§2) and composable ``AND`` prompts (§4).

Everything here is a pure function of its arguments (A1111-SEMANTICS.md §2-§4): the
infotext reader and the conditioning code call these on every prompt, so they keep no
state and run in time linear in the prompt.

Prompt editing and alternation (§3) live in :mod:`pipeline.prompt_editing`; its
``prompt_schedules`` and ``scheduled_at`` are imported here, so the whole prompt syntax
imports from this module.
"""

from __future__ import annotations

import re

from pipeline.errors import PromptSyntaxError
from pipeline.prompt_editing import prompt_schedules, scheduled_at

__all__ = ["parse_attention", "prompt_schedules", "scheduled_at", "split_and"]

# ---------------------------------------------------------------------------------------
# Emphasis (§2)

# One alternative per lexing rule of §2, in the same priority order. ``\d`` and ``\s`` are
# Unicode-aware on purpose: A1111's pattern uses them, so a weight written in, say,
# Arabic-Indic digits is a weight there too.
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                           # escaped bracket or backslash: that character
    | \\                                     # lone backslash: an empty literal
    | [(\[]                                  # openers
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)       # weight close
    | [)\]]                                  # plain closers
    | [^\\()\[\]:]+                          # a run of text
    | :                                      # a lone colon
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND_MULTIPLIER = 1.1
# Computed once and multiplied, never divided: the products must match A1111's bits.
_SQUARE_MULTIPLIER = 1 / 1.1
_BREAK_WEIGHT = -1.0


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs the way A1111's emphasis does.

    Raises ``PromptSyntaxError`` where A1111 crashes: a weight close such as ``:1.2.3)``
    that matches the lexer but that Python's ``float`` refuses.
    """
    fragments: list[list] = []  # [text, weight] pairs, mutated in place as brackets close
    round_opens: list[int] = []
    square_opens: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_opens.append(len(fragments))
        elif token == "[":
            square_opens.append(len(fragments))
        elif weight is not None and round_opens:
            _scale_from(fragments, round_opens.pop(), _parse_weight(weight, text))
        elif token == ")" and round_opens:
            _scale_from(fragments, round_opens.pop(), _ROUND_MULTIPLIER)
        elif token == "]" and square_opens:
            _scale_from(fragments, square_opens.pop(), _SQUARE_MULTIPLIER)
        else:
            _append_text(fragments, token)
    for start in round_opens:
        _scale_from(fragments, start, _ROUND_MULTIPLIER)
    for start in square_opens:
        _scale_from(fragments, start, _SQUARE_MULTIPLIER)
    if not fragments:
        return [("", 1.0)]
    return _merge_equal_weights(fragments)


def _parse_weight(number: str, text: str) -> float:
    """The lexer admits strings like ``1.2.3`` or ``.``; A1111 then fails the whole job."""
    try:
        return float(number)
    except ValueError:
        raise PromptSyntaxError(f"invalid emphasis weight {number!r} in prompt {text!r}") from None


def _scale_from(fragments: list[list], start: int, multiplier: float) -> None:
    for fragment in fragments[start:]:
        fragment[1] *= multiplier


def _append_text(fragments: list[list], token: str) -> None:
    """Text is where BREAK lives; its marker carries a weight so enclosing brackets can
    scale it (and thereby turn it back into a plain word, §16.5)."""
    for index, piece in enumerate(_BREAK.split(token)):
        if index:
            fragments.append(["BREAK", _BREAK_WEIGHT])
        fragments.append([piece, 1.0])


def _merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for piece, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, merged[-1][1])
        else:
            merged.append((piece, weight))
    return merged


# ---------------------------------------------------------------------------------------
# Composable prompts (§4)

_AND = re.compile(r"\bAND\b")
# A lazy text, an optional ``: weight`` and trailing whitespace. Trailing whitespace is
# therefore always trimmed, leading whitespace never.
_SUBPROMPT_WEIGHT = re.compile(r"^(?P<text>.*?)(?:\s*:\s*(?P<weight>[-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a positive prompt on ``AND`` into ``(sub_prompt, weight)`` pairs, in order."""
    result: list[tuple[str, float]] = []
    for sub_prompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.match(sub_prompt)
        assert match is not None  # the pattern matches every string
        weight = match.group("weight")
        result.append((match.group("text"), float(weight) if weight is not None else 1.0))
    return result

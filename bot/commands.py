"""One text grammar for every command and adapter.

    /draw a cat, (masterpiece:1.2) --negative "lowres, bad hands" --steps 28 --size 512x768

The free text before the first option is the command's argument (the prompt). An
option is ``--name`` at the start of a word, followed by a value: a quoted string
(``"..."`` or ``“...”``, backslash escapes allowed) or everything up to the next option.
``--name=value`` works too. Options that take no value are flags. Inside a quoted
stretch of the prompt, ``--`` starts no option.

Phones turn a typed ``--`` into a long dash, so ``—steps`` and ``–steps`` are ``--steps``.
A single dash before a name (``-steps 4``) is refused, saying how to write it, rather than
left in the prompt where it would silently change nothing; ``--seed -1`` is a number.

This module only splits text; converting and range-checking values is ``bot.options``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bot.errors import CommandSyntaxError

QUOTES = {'"': '"', "\u201c": "\u201d"}
DASHES = "-\u2014\u2013"  # "-", em dash, en dash
_OPTION = re.compile(r"(?:--|\u2014\u2014?|\u2013\u2013?)([A-Za-z][A-Za-z0-9_-]*)")
_SINGLE_DASH = re.compile(r"-([A-Za-z][A-Za-z0-9_-]+)")
_COMMAND = re.compile(r"^/([A-Za-z][\w-]*)(?:@\w+)?(?:\s+|$)")


@dataclass
class ParsedArgs:
    text: str
    options: list[tuple[str, str | None]] = field(default_factory=list)  # (name, raw value or None)


def split_command(line: str) -> tuple[str, str] | None:
    """``"/draw@AtelierBot a cat"`` -> ``("draw", "a cat")``; None when the line is no command."""
    match = _COMMAND.match(line.strip())
    if not match:
        return None
    return match.group(1).lower(), line.strip()[match.end() :]


def parse_args(text: str) -> ParsedArgs:
    """Split command text into its free text and its options, in the order given."""
    text = text.strip()
    start = _next_option(text, 0)
    positional = _unquote_whole(text[:start].strip())
    parsed = ParsedArgs(positional)
    pos = start
    while pos < len(text):
        match = _OPTION.match(text, pos)
        assert match is not None  # _next_option only stops at an option or the end
        name = match.group(1).lower()
        pos = match.end()
        value, pos = _read_value(text, pos, name)
        parsed.options.append((name, value))
    return parsed


def _is_word_start(text: str, pos: int) -> bool:
    return pos == 0 or text[pos - 1].isspace()


def _next_option(text: str, pos: int) -> int:
    """Index of the next option marker outside quotes, or len(text)."""
    quote_close: str | None = None
    quote_open = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if quote_close is not None:
            if ch == "\\" and i + 1 < len(text):
                i += 2
                continue
            if ch == quote_close:
                quote_close = None
        elif ch in QUOTES and _is_word_start(text, i):
            quote_close, quote_open = QUOTES[ch], i
        elif ch in DASHES and _is_word_start(text, i):
            if _OPTION.match(text, i):
                return i
            single = _SINGLE_DASH.match(text, i)
            if single:
                raise CommandSyntaxError("error.single_dash", name=single.group(1).lower())
        i += 1
    if quote_close is not None:
        raise CommandSyntaxError("error.unclosed_quote", quote=text[quote_open], text=text[quote_open:][:60])
    return len(text)


def _read_value(text: str, pos: int, name: str) -> tuple[str | None, int]:
    if pos < len(text) and text[pos] == "=":
        pos += 1
    elif pos < len(text) and not text[pos].isspace():
        # "--steps4": the marker regex stopped inside a word; treat the rest as the value
        pass
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos < len(text) and text[pos] in QUOTES:
        value, pos = _read_quoted(text, pos)
        rest_end = _next_option(text, pos)
        leftover = text[pos:rest_end].strip()
        if leftover:
            raise CommandSyntaxError("error.text_after_quote", name=name, text=leftover[:60])
        return value, rest_end
    end = _next_option(text, pos)
    value = text[pos:end].strip()
    return (value or None), end


def _read_quoted(text: str, pos: int) -> tuple[str, int]:
    close = QUOTES[text[pos]]
    out: list[str] = []
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in (close, "\\", '"'):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == close:
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise CommandSyntaxError("error.unclosed_quote", quote=text[pos], text=text[pos:][:60])


def _unquote_whole(text: str) -> str:
    """A prompt given entirely in quotes loses them; quotes inside a prompt stay as typed."""
    if text and text[0] in QUOTES:
        try:
            value, end = _read_quoted(text, 0)
        except CommandSyntaxError:
            raise
        if end == len(text):
            return value
    return text


def quote_value(word: str) -> str:
    """Quote one word for this grammar (used to rebuild a command line from argv)."""
    if word and not any(ch.isspace() or ch in QUOTES or ch == "\\" for ch in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join_words(words: list[str]) -> str:
    """argv-style words -> one command text: every word quoted as needed, options left bare."""
    return " ".join(word if _OPTION.fullmatch(word) else quote_value(word) for word in words)

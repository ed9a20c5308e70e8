"""A1111 prompt syntax: emphasis weights, prompt editing, alternation and ``AND``.

Everything here is a pure function of its arguments (A1111-SEMANTICS.md §2-§4): the
infotext reader and the conditioning code call these on every prompt, so they keep no
state and, but for the rare prompts described below, run in time linear in the prompt
(rendering a schedule adds a factor of its number of boundary steps).

Prompt editing is parsed by a hand-written scanner instead of lark, with the grammar of
§3.1. That grammar is ambiguous at the top level: a bracket may open a construct or be a
stray character. Lark resolves such ties by the order of its Earley forest; the lark that
A1111 pins (1.1.2) orders ties by Python's hash seed, so a construct followed directly by
stray characters (``[a:b:5]]``) can go either way from one process to the next. We follow
lark 1.3.1, whose ordered sets make the choice stable: such prompts are settled by
replaying lark's Earley loop (``_Replay``), quadratic in bracket depth, up to 1000
characters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pipeline.errors import PromptSyntaxError

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


# ---------------------------------------------------------------------------------------
# Prompt editing and alternation (§3)


@dataclass(frozen=True, slots=True, eq=False)
class _Scheduled:
    """``[before:after:number]``; ``before`` is ``None`` for ``[after:number]``."""

    before: tuple | None
    after: tuple
    number: str


@dataclass(frozen=True, slots=True, eq=False)
class _Alternate:
    options: tuple[tuple, ...]


# The lexer's NUMBER (lark's SIGNED_NUMBER). Alternatives are tried in order and the
# lexer takes the first match, never a shorter one.
_SIGNED_NUMBER = r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)"
# The end of ``[… : N]``: optional whitespace, the number (atomic, as the lexer does not
# backtrack into a token), optional whitespace and the closing bracket.
_NUMBER_CLOSE = re.compile(rf"\s*(?P<number>(?>{_SIGNED_NUMBER}))\s*\]")
# Plain text: anything but the syntax characters, or a backslash escaping any character
# except a newline (lark's ``.`` does not match one).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_SPECIAL = "[]():|"
_STRAY = "[]():"


class _Rejected(Exception):
    """The grammar has no parse for the prompt; A1111 then uses the text unchanged."""


class _Frame:
    """An opened ``(`` or ``[`` whose construct is still being read.

    ``segments`` holds the parts between separators; ``separator`` is the one seen so far
    (``:`` or ``|``; a bracket never mixes them).
    """

    __slots__ = ("opener", "start", "segments", "separator")

    def __init__(self, opener: str, start: int) -> None:
        self.opener = opener
        self.start = start
        self.segments: list[list] = [[]]
        self.separator: str | None = None


class _Failed(Exception):
    """The innermost open construct cannot be completed."""


def _parse_editing(text: str) -> list:
    """Parse ``text`` into parts: strings (kept verbatim) and editing nodes."""
    constructs = _find_constructs(text)
    if not any(
        isinstance(part, _Scheduled | _Alternate) for parts, _ in constructs.values() for part in parts
    ):
        return [text]  # every reading renders the text verbatim
    return _assemble(text, constructs, _kept_constructs(text, constructs))


def _find_constructs(text: str) -> dict[int, tuple[list, int]]:
    """Every valid construct, by the position of its opener: ``(parts, end)``.

    Constructs are context-free: whether ``[`` or ``(`` at a position opens a valid
    construct, and where it ends, does not depend on what surrounds it. So when the
    innermost open construct fails, every enclosing one fails as well; they are marked,
    and scanning resumes after the outermost one's opener. Finished constructs are
    remembered, which keeps the rescan linear.

    Raises ``_Rejected`` for a bar outside every alternation or a dangling backslash:
    because constructs nest and never overlap, a bar the greedy scan meets at the top
    level lies in no construct of any parse.
    """
    finished: dict[int, tuple[list, int]] = {}
    failed: set[int] = set()
    stack: list[_Frame] = []
    position = 0
    length = len(text)
    while True:
        try:
            if position >= length:
                if not stack:
                    return finished
                raise _Failed
            position = _step(text, position, stack, finished, failed)
        except _Failed:
            outermost = stack[0].start
            failed.update(frame.start for frame in stack)
            stack.clear()
            position = outermost + 1


def _step(text: str, position: int, stack: list[_Frame], finished: dict, failed: set) -> int:
    """Consume one token at ``position`` and return the next position."""
    char = text[position]
    parts = stack[-1].segments[-1] if stack else []  # top-level text is assembled later
    if char not in _SPECIAL:
        match = _PLAIN.match(text, position)
        if match is None:  # a backslash at the end or before a newline: no token fits
            raise _Rejected
        parts.append(match.group(0))
        return match.end()
    if char in "([":
        if position in finished:
            spliced, end = finished[position]
            parts.extend(spliced)
            return end
        if position in failed:
            if stack:
                raise _Failed
            return position + 1
        stack.append(_Frame(char, position))
        return position + 1
    if not stack:
        if char == "|":  # only an alternation may hold a bar
            raise _Rejected
        return position + 1  # a stray ``] ) :``
    frame = stack[-1]
    if frame.opener == "(":
        closed = _feed_round(frame, char, position)
    else:
        closed = _feed_square(frame, char, text, position)
    if closed is None:
        return position + 1
    spliced, end = closed
    finished[frame.start] = (spliced, end)
    stack.pop()
    if stack:
        stack[-1].segments[-1].extend(spliced)
    return end


def _feed_round(frame: _Frame, char: str, position: int) -> tuple[list, int] | None:
    """``( P )`` or ``( P : P )``: kept verbatim, so the result is the text around its parts."""
    if char == ")":
        spliced: list = ["("]
        spliced.extend(frame.segments[0])
        if frame.separator == ":":
            spliced.append(":")
            spliced.extend(frame.segments[1])
        spliced.append(")")
        return spliced, position + 1
    if char == ":" and frame.separator is None:
        frame.separator = ":"
        frame.segments.append([])
        return None
    raise _Failed


def _feed_square(frame: _Frame, char: str, text: str, position: int) -> tuple[list, int] | None:
    """``[ P ]``, ``[ P | P … ]``, ``[ P : N ]`` or ``[ P : P : N ]``."""
    if char == "]":
        if frame.separator is None:
            return ["[", *frame.segments[0], "]"], position + 1
        if frame.separator == "|":
            return [_Alternate(tuple(tuple(option) for option in frame.segments))], position + 1
        raise _Failed
    if char == "|" and frame.separator != ":":
        frame.separator = "|"
        frame.segments.append([])
        return None
    if char == ":" and frame.separator != "|":
        close = _NUMBER_CLOSE.match(text, position + 1)
        if close is not None:
            if frame.separator is None:
                node = _Scheduled(None, tuple(frame.segments[0]), close.group("number"))
            else:
                node = _Scheduled(tuple(frame.segments[0]), tuple(frame.segments[1]), close.group("number"))
            return [node], close.end()
        if frame.separator is None:
            frame.separator = ":"
            frame.segments.append([])
            return None
    raise _Failed


def _kept_constructs(text: str, constructs: dict[int, tuple[list, int]]) -> list[int]:
    """The openers of the constructs lark's parse keeps at the top level, in text order.

    The top level is a sequence of prompts and stray characters, and a construct's
    characters may also be read as strays. Lark picks among such readings from the end of
    the text backwards, preferring a prompt that ends at the current point over a stray.
    Only a run of strays that has a construct ending inside it is a real choice; there
    the order of lark's Earley forest decides, so the parse is replayed (``_replay``).
    """
    ends = {end: opener for opener, (_, end) in constructs.items()}
    valid, plain_start = _valid_prefixes(text, ends)
    if not valid[len(text)]:
        raise _Rejected
    kept: list[int] = []
    end = len(text)
    while end > 0:
        opener = ends.get(end)
        if opener is not None and valid[opener]:
            kept.append(opener)
            end = opener
        elif end in plain_start:
            end = plain_start[end]
        else:
            start = end - 1
            while start > 0 and text[start - 1] in _STRAY:
                start -= 1
            while not valid[start]:
                start += 1
            if not any(valid[ends[inner]] for inner in range(start + 1, end) if inner in ends):
                end = start
            elif len(text) <= _REPLAY_LIMIT:
                return _kept_by_replay(text, constructs)
            else:
                # What lark does for a run without inner constructs: an odd run is read
                # whole, an even one after a one-character prefix.
                end = start if (end - start) % 2 else start + 1
    kept.reverse()
    return kept


def _valid_prefixes(text: str, ends: dict[int, int]) -> tuple[list[bool], dict[int, int]]:
    """Which prefixes parse as a top-level sequence, and where each plain run starts.

    Tokens never split a plain run, so a prefix can end only at a special character or
    at the end of a run.
    """
    length = len(text)
    valid = [False] * (length + 1)
    valid[0] = True
    plain_start: dict[int, int] = {}
    position = 0
    while position < length:
        if text[position] in _SPECIAL:
            after = position + 1
            valid[after] = text[position] != "|" and valid[position]
        else:
            match = _PLAIN.match(text, position)
            assert match is not None  # _find_constructs rejected dangling backslashes
            after = match.end()
            plain_start[after] = position
            valid[after] = valid[position]
        opener = ends.get(after)
        if opener is not None and valid[opener]:
            valid[after] = True
        position = after
    return valid, plain_start


def _kept_by_replay(text: str, constructs: dict[int, tuple[list, int]]) -> list[int]:
    elements = _replay(text)
    if elements is None:
        raise _Rejected
    kept: list[int] = []
    for kind, start, end in elements:
        position = start
        while kind == "prompt" and position < end:
            match = None if text[position] in "([" else _PLAIN.match(text, position)
            if match is not None:
                position = match.end()
            elif position in constructs:
                kept.append(position)
                position = constructs[position][1]
            else:  # the replay disagrees with the scanner: a bug, but never raise for a prompt
                logger.warning("prompt-editing replay kept an unknown construct in %r", text)
                raise _Rejected
    return kept


# ---------------------------------------------------------------------------------------
# Replaying lark's Earley parse, for the top-level ties only.
#
# Lark's resolved tree takes, at every node, the first derivation in creation order among
# those of the best rule alternative. Creation order follows its Earley loop exactly: a
# LIFO work list per column, ordered sets, predictions in breadth-first rule order, held
# completions for empty rules and a regex lexer that matches each expected terminal at
# each position. The replay below re-runs that loop on the §3.1 grammar (as lark expands
# it, alternatives in lark's order) and records only the derivations of ``star`` nodes,
# the top-level sequence; everything inside a prompt is unambiguous and left to
# ``_find_constructs``.

_REPLAY_LIMIT = 1000  # characters; the replay is quadratic in bracket depth (0.4 s at worst)

_TERMINAL_PATTERNS = {
    "STRAY": re.compile(r"[\[\]():]"),
    "PLAIN": _PLAIN,
    "LPAR": re.compile(r"\("),
    "RPAR": re.compile(r"\)"),
    "LSQB": re.compile(r"\["),
    "RSQB": re.compile(r"\]"),
    "COLON": re.compile(r":"),
    "VBAR": re.compile(r"\|"),
    "WS": re.compile(r"\s+"),
    "NUMBER": re.compile(_SIGNED_NUMBER),
}
# ``[prompt ":"]``, ``[WS]`` and ``[WS]`` of a schedule expand to eight alternatives.
_NUMBER_TAILS = (("WS", "NUMBER", "WS"), ("WS", "NUMBER"), ("NUMBER", "WS"), ("NUMBER",))
_ITEM_KINDS = ("emphasized", "scheduled", "alternate", "plain", "WS")
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("start", ("star",)),
    ("start", ()),
    ("prompt", ("items",)),
    ("prompt", ()),
    ("emphasized", ("LPAR", "prompt", "RPAR")),
    ("emphasized", ("LPAR", "prompt", "COLON", "prompt", "RPAR")),
    ("emphasized", ("LSQB", "prompt", "RSQB")),
    *(("scheduled", ("LSQB", "prompt", "COLON", "prompt", "COLON", *tail, "RSQB")) for tail in _NUMBER_TAILS),
    *(("scheduled", ("LSQB", "prompt", "COLON", *tail, "RSQB")) for tail in _NUMBER_TAILS),
    ("alternate", ("LSQB", "prompt", "options", "RSQB")),
    ("plain", ("PLAIN",)),
    ("strays", ("STRAY",)),
    ("strays", ("strays", "STRAY")),
    ("star", ("prompt",)),
    ("star", ("strays",)),
    ("star", ("star", "prompt")),
    ("star", ("star", "strays")),
    *(("items", (kind,)) for kind in _ITEM_KINDS),
    *(("items", ("items", kind)) for kind in _ITEM_KINDS),
    ("options", ("VBAR", "prompt")),
    ("options", ("VBAR",)),
    ("options", ("options", "VBAR", "prompt")),
    ("options", ("options", "VBAR")),
)
_RULE_ORDER = tuple(
    sum(1 for other, _ in _RULES[:index] if other == origin) for index, (origin, _) in enumerate(_RULES)
)
_STAR_PROMPT_AFTER_STAR = 2  # rule order of ``star: star prompt``
_Item = tuple[int, int, int]  # (rule index, dot position, start column)


def _prediction_table() -> dict[str, tuple[int, ...]]:
    """Rules to predict for each non-terminal: its own, then breadth-first those of every
    non-terminal that can start it, each rule once (lark's ``expand_rule``)."""
    by_origin: dict[str, list[int]] = {}
    for index, (origin, _) in enumerate(_RULES):
        by_origin.setdefault(origin, []).append(index)
    table: dict[str, tuple[int, ...]] = {}
    for origin in by_origin:
        rules: dict[int, None] = {}
        queue, seen = [origin], {origin}
        while queue:
            for index in by_origin[queue.pop(0)]:
                rules[index] = None
                expansion = _RULES[index][1]
                if expansion and expansion[0] in by_origin and expansion[0] not in seen:
                    seen.add(expansion[0])
                    queue.append(expansion[0])
        table[origin] = tuple(rules)
    return table


_PREDICTIONS = _prediction_table()


def _expected(item: _Item) -> str | None:
    expansion = _RULES[item[0]][1]
    return expansion[item[1]] if item[1] < len(expansion) else None


class _Replay:
    """One run of the Earley loop; ``star[end]`` lists ``(rule order, split)`` of every
    derivation of the top-level sequence ``text[:end]``, in creation order."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.columns: list[dict[_Item, None]] = []
        self.waiting: list[dict[str, list[_Item]]] = []  # per column: symbol -> items before it
        self.star: dict[int, dict[tuple[int, int], None]] = {}

    def run(self) -> bool:
        """Parse the whole text; False when lark would reject it."""
        text = self.text
        self._new_column()
        to_scan: dict[_Item, None] = {}
        for rule in _PREDICTIONS["start"]:
            self._put((rule, 0, 0), 0, to_scan, None)
        pending: dict[int, list[_Item]] = {}  # tokens by the column they end in
        for position in range(len(text) + 1):
            self._complete(position, to_scan)
            if position == len(text):
                break
            for item in list(to_scan):
                match = _TERMINAL_PATTERNS[_expected(item)].match(text, position)
                if match:
                    pending.setdefault(match.end(), []).append(item)
            to_scan = {}
            self._new_column()
            for item in pending.pop(position + 1, ()):
                self._put((item[0], item[1] + 1, item[2]), position + 1, to_scan, None)
            if not self.columns[-1] and not to_scan and not pending:
                return False
        return any(
            _RULES[rule][0] == "start" and start == 0 and _expected((rule, dot, start)) is None
            for rule, dot, start in self.columns[-1]
        )

    def _new_column(self) -> None:
        self.columns.append({})
        self.waiting.append({})

    def _put(self, item: _Item, column: int, to_scan: dict, work: list | None) -> None:
        """File a new item: for the scanner when it expects a terminal, else in the column
        (and on the work list) unless already there."""
        symbol = _expected(item)
        if symbol in _TERMINAL_PATTERNS:
            to_scan[item] = None
        elif item not in self.columns[column]:
            self.columns[column][item] = None
            if symbol is not None:
                self.waiting[column].setdefault(symbol, []).append(item)
            if work is not None:
                work.append(item)

    def _complete(self, column: int, to_scan: dict) -> None:
        """Lark's predictor/completer for one column."""
        held: set[str] = set()  # non-terminals completed empty in this column
        work = list(self.columns[column])
        while work:
            rule, dot, start = item = work.pop()
            symbol = _expected(item)
            if symbol is None:
                origin = _RULES[rule][0]
                if start == column:
                    held.add(origin)
                for waiting in list(self.waiting[start].get(origin, ())):
                    advanced = (waiting[0], waiting[1] + 1, waiting[2])
                    self._record(advanced, start, column)
                    self._put(advanced, column, to_scan, work)
            elif symbol not in _TERMINAL_PATTERNS:
                new_items = [(predicted, 0, column) for predicted in _PREDICTIONS[symbol]]
                if symbol in held:
                    advanced = (rule, dot + 1, start)
                    self._record(advanced, column, column)
                    new_items.append(advanced)
                for new_item in new_items:
                    self._put(new_item, column, to_scan, work)

    def _record(self, item: _Item, split: int, end: int) -> None:
        rule, dot, _ = item
        origin, expansion = _RULES[rule]
        if origin == "star" and dot == len(expansion):
            self.star.setdefault(end, {})[(_RULE_ORDER[rule], split)] = None


def _replay(text: str) -> list[tuple[str, int, int]] | None:
    """Lark's top-level sequence for ``text``: ``(kind, start, end)`` with kind
    ``"prompt"`` or ``"strays"``; ``None`` when lark rejects the text."""
    replay = _Replay(text)
    if not replay.run():
        return None
    elements: list[tuple[str, int, int]] = []
    end = len(text)
    while end > 0:
        # Stable sort: the best alternative first, then creation order. The derivation
        # ``star: star prompt`` with an empty prompt loops back to this node; lark's
        # forest walk drops it as a cycle.
        derivations = sorted(replay.star.get(end, ()), key=lambda derivation: derivation[0])
        chosen = next(
            (
                (order, split)
                for order, split in derivations
                if not (order == _STAR_PROMPT_AFTER_STAR and split == end)
            ),
            None,
        )
        if chosen is None:  # cannot happen for text lark accepts; never raise for a prompt
            logger.warning("prompt-editing replay found no derivation for %r", text)
            return None
        order, split = chosen
        elements.append(("prompt" if order % 2 == 0 else "strays", split, end))
        if order < _STAR_PROMPT_AFTER_STAR:
            break
        end = split
    elements.reverse()
    return elements


def _assemble(text: str, constructs: dict[int, tuple[list, int]], kept: list[int]) -> list:
    parts: list = []
    position = 0
    for opener in kept:
        spliced, end = constructs[opener]
        if opener > position:
            parts.append(text[position:opener])
        parts.extend(spliced)
        position = end
    if position < len(text):
        parts.append(text[position:])
    return parts


def _nodes(parts: Sequence) -> Iterator[_Scheduled | _Alternate]:
    """Every editing node, nested ones included (iterative: nesting depth is unbounded)."""
    pending = [parts]
    while pending:
        for item in pending.pop():
            if isinstance(item, _Scheduled):
                yield item
                pending.append(item.after)
                if item.before is not None:
                    pending.append(item.before)
            elif isinstance(item, _Alternate):
                yield item
                pending.extend(item.options)


@dataclass(frozen=True, slots=True)
class _Timeline:
    """How a number in ``[a:b:N]`` becomes a step for one pass (§3.2)."""

    steps: int
    int_offset: int
    flt_offset: float
    old: bool

    def when(self, number: str) -> int:
        value = float(number)
        if self.old:
            value = value * self.steps if value < 1 else value
        elif "." in number:
            value = (value - self.flt_offset) * self.steps
        else:
            value = value - self.int_offset
        return min(self.steps, _truncate(value, self.steps))


def _truncate(value: float, steps: int) -> int:
    """``int(value)``, extended to the infinities A1111 would crash on (``1e999``)."""
    if math.isfinite(value):
        return int(value)
    if value > 0:
        return steps
    return min(steps, 0) - 1  # below every boundary: the "to" text throughout


def _render(parts: Sequence, step: int, whens: dict) -> str:
    out: list[str] = []
    pending: list[Iterator] = [iter(parts)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, str):
                out.append(item)
                continue
            if isinstance(item, _Scheduled):
                chosen = (item.before or ()) if step <= whens[item] else item.after
            else:
                chosen = item.options[(step - 1) % len(item.options)]
            pending.append(iter(chosen))
            break
        else:
            pending.pop()
    return "".join(out)


def _schedule(prompt: str, timeline: _Timeline) -> list[tuple[int, str]]:
    steps = timeline.steps
    try:
        parts = _parse_editing(prompt)
    except _Rejected:
        return [(steps, prompt)]
    boundaries = {steps}
    whens: dict[_Scheduled, int] = {}
    for node in _nodes(parts):
        if isinstance(node, _Scheduled):
            when = whens[node] = timeline.when(node.number)
            if when >= 1:
                boundaries.add(when)
        else:
            boundaries.update(range(1, steps + 1))
    return [(step, _render(parts, step, whens)) for step in sorted(boundaries)]


def prompt_schedules(
    prompts: Sequence[str],
    steps: int,
    *,
    hires_steps: int | None = None,
    old_timelines: bool = False,
) -> list[list[tuple[int, str]]]:
    """The ``[(end_at_step, text), …]`` schedule of each prompt, for the first pass or,
    with ``hires_steps``, for the hires pass.

    ``steps`` is already doubled for second-order samplers; that doubling belongs to the
    caller because the denoiser's call counter, not the sampler's step, selects the text.
    """
    if hires_steps is None or old_timelines:
        timeline = _Timeline(steps=steps, int_offset=0, flt_offset=0.0, old=old_timelines)
    else:
        timeline = _Timeline(steps=hires_steps, int_offset=steps, flt_offset=1.0, old=False)
    return [_schedule(prompt, timeline) for prompt in prompts]


def scheduled_at(schedule: Sequence[tuple[int, T]], call: int) -> T:
    """The item in force at 0-based denoiser call ``call``.

    Boundaries are inclusive and a call past the last one falls back to the *first*
    entry, exactly as A1111's CFG denoiser does (§3.4).
    """
    if not schedule:
        raise ValueError("scheduled_at needs a non-empty schedule")
    for end, item in schedule:
        if end >= call:
            return item
    return schedule[0][1]

"""A1111 prompt editing and alternation (A1111-SEMANTICS.md §3): ``[from:to:when]``,
``[a|b]`` and the schedules of prompt texts they make.

``prompt_schedules`` gives each prompt's ``[(end_at_step, text), …]`` schedule for a
pass and ``scheduled_at`` picks the entry in force at a denoiser call; callers import
both from :mod:`pipeline.prompts`. Both are pure functions of their arguments and, but
for the rare prompts described below, run in time linear in the prompt (rendering a
schedule adds a factor of its number of boundary steps).

Prompt editing is parsed by a hand-written scanner instead of lark, with the grammar of
§3.1. That grammar is ambiguous at the top level: a bracket may open a construct or be a
stray character. Lark resolves such ties by the order of its Earley forest; the lark that
A1111 pins (1.1.2) orders ties by Python's hash seed, so a construct followed directly by
stray characters (``[a:b:5]]``) can go either way from one process to the next. We follow
lark 1.3.1, whose ordered sets make the choice stable: such prompts are settled by
replaying lark's Earley loop (:mod:`pipeline.prompt_editing_grammar`), quadratic in
bracket depth, up to 1000 characters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pipeline.prompt_editing_grammar import _PLAIN, _REPLAY_LIMIT, _SIGNED_NUMBER, _replay

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["prompt_schedules", "scheduled_at"]


@dataclass(frozen=True, slots=True, eq=False)
class _Scheduled:
    """``[before:after:number]``; ``before`` is ``None`` for ``[after:number]``."""

    before: tuple | None
    after: tuple
    number: str


@dataclass(frozen=True, slots=True, eq=False)
class _Alternate:
    options: tuple[tuple, ...]


# The end of ``[… : N]``: optional whitespace, the number (atomic, as the lexer does not
# backtrack into a token), optional whitespace and the closing bracket.
_NUMBER_CLOSE = re.compile(rf"\s*(?P<number>(?>{_SIGNED_NUMBER}))\s*\]")
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

"""The prompt-editing grammar of A1111-SEMANTICS.md §3.1 as lark runs it: its terminals,
its rules as lark expands them, and a replay of lark's Earley loop that settles the
top-level ties of :mod:`pipeline.prompt_editing` (whose scanner reads the same terminals).

Lark's resolved tree takes, at every node, the first derivation in creation order among
those of the best rule alternative. Creation order follows its Earley loop exactly: a
LIFO work list per column, ordered sets, predictions in breadth-first rule order, held
completions for empty rules and a regex lexer that matches each expected terminal at
each position. The replay below re-runs that loop on the §3.1 grammar (as lark expands
it, alternatives in lark's order) and records only the derivations of ``star`` nodes,
the top-level sequence; everything inside a prompt is unambiguous and left to the
scanner of :mod:`pipeline.prompt_editing`.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

# The lexer's NUMBER (lark's SIGNED_NUMBER). Alternatives are tried in order and the
# lexer takes the first match, never a shorter one.
_SIGNED_NUMBER = r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)"
# Plain text: anything but the syntax characters, or a backslash escaping any character
# except a newline (lark's ``.`` does not match one).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")


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

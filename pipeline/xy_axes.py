"""X/Y/Z plot axis values and legend labels with A1111's text-mode rules (§14.1, §14.2).

Users paste axis text from A1111 ("1-10 [5]", "0-1 (+0.3)", quoted CSV), so the
expansion reproduces A1111's results exactly, float noise and quirks included, and
rejects with ``AxisValueError`` wherever A1111 rejects. Everything here is pure; the
grid plugin (``plugins.xy_grid``, which re-exports these names) builds on it. Errors
are ``AxisTextError`` (an ``AxisValueError``) with a ``reason`` the plugin translates.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import AxisValueError

logger = logging.getLogger(__name__)

# Far beyond any usable plot; stops a typo like "1-99999999" from exhausting memory,
# where A1111 would try to build the list anyway.
DEFAULT_MAX_VALUES = 100_000

# Range shapes ("A-B", "A-B (+S)", "A-B [N]") are matched the way A1111's regular
# expressions match them, backtracking order included, because the captured text decides
# the result: the float number's decimal point is an unescaped "any character", so
# "1x5-10" captures "1x5" and fails in float(), "1e-5" is the range "1e" to "5", and in
# "-5--1" the first number swallows a dash. Run through ``re``, those patterns take cubic
# time on long digit runs; the matcher below reaches the same captures in linear time.


@dataclass(frozen=True)
class _Number:
    """One number of a range shape: ``[+-]?\\s*\\d+(?:.\\d*)?`` and its narrower variants."""

    sign: Literal["optional", "required", "none"]
    space_after_sign: bool = False
    any_char_fraction: bool = False

    def ends(self, text: str, start: int) -> range:
        """End positions a match from ``start`` can have, in the order a regex tries them.

        Greedy backtracking over digits and the optional "any character + digits" part
        tries every end once, longest first, and which split produced an end never
        matters to what follows, so a descending range is the whole search.
        """
        pos = start
        if pos < len(text) and text[pos] in "+-" and self.sign != "none":
            pos += 1
        elif self.sign == "required":
            return range(0)
        if self.space_after_sign:
            pos = _skip_space(text, pos)
        digits_end = _skip_decimal(text, pos)
        if digits_end == pos:
            return range(0)
        top = digits_end
        if self.any_char_fraction and digits_end < len(text) and text[digits_end] != "\n":
            top = _skip_decimal(text, digits_end + 1)
        return range(top, pos, -1)


def _skip_space(text: str, pos: int) -> int:
    """Past a run of ``\\s`` (``str.isspace`` is the same class as ``re``'s)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _skip_decimal(text: str, pos: int) -> int:
    """Past a run of ``\\d`` (``str.isdecimal`` is the same class as ``re``'s)."""
    while pos < len(text) and text[pos].isdecimal():
        pos += 1
    return pos


@dataclass(frozen=True)
class _RangeShape:
    """``\\s*(A)\\s*-\\s*(B)(?:\\s*<open>(X)\\s*<close>)?\\s*`` matched in full."""

    number: _Number
    open: str
    close: str
    extra: _Number

    def match(self, text: str) -> tuple[str, str, str | None] | None:
        """The captured ``(A, B, X or None)`` of the first match a regex would find."""
        a_start = _skip_space(text, 0)
        for a_end in self.number.ends(text, a_start):
            dash = _skip_space(text, a_end)
            if dash >= len(text) or text[dash] != "-":
                continue
            b_start = _skip_space(text, dash + 1)
            for b_end in self.number.ends(text, b_start):
                matched, extra = self._tail(text, b_end)
                if matched:
                    return text[a_start:a_end], text[b_start:b_end], extra
        return None

    def _tail(self, text: str, pos: int) -> tuple[bool, str | None]:
        """Whether the optional bracket part and trailing space finish the text from ``pos``."""
        opening = _skip_space(text, pos)
        if opening < len(text) and text[opening] == self.open:
            for extra_end in self.extra.ends(text, opening + 1):
                closing = _skip_space(text, extra_end)
                if closing < len(text) and text[closing] == self.close:
                    if _skip_space(text, closing + 1) == len(text):
                        return True, text[opening + 1 : extra_end]
        return _skip_space(text, pos) == len(text), None


_INT_NUMBER = _Number("optional", space_after_sign=True)
_FLOAT_NUMBER = _Number("optional", space_after_sign=True, any_char_fraction=True)
_COUNT = _Number("none")
_INT_RANGE = _RangeShape(_INT_NUMBER, "(", ")", _Number("required"))
_INT_COUNT = _RangeShape(_INT_NUMBER, "[", "]", _COUNT)
_FLOAT_RANGE = _RangeShape(_FLOAT_NUMBER, "(", ")", _Number("required", any_char_fraction=True))
_FLOAT_COUNT = _RangeShape(_FLOAT_NUMBER, "[", "]", _COUNT)

# Exceptions numeric conversion and numpy raise on text A1111 also fails on.
_NUMERIC_ERRORS = (ValueError, TypeError, ArithmeticError, MemoryError)

AxisKind = Literal["int", "float", "str", "permutations"]


class AxisTextError(AxisValueError):
    """Why an axis text was refused: ``reason`` is one of "bad_number" (``value``,
    ``kind``), "zero_step", "too_many" (``max``), "too_long", "csv" (``detail``),
    "unknown_sampler" / "unknown_checkpoint" (``value``), "unknown_axis" (``axis``)."""

    def __init__(self, message: str, reason: str, **params: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.params = params


@dataclass(frozen=True)
class AxisContext:
    """What confirm checks may look at besides the values (known checkpoints, ...)."""

    checkpoints: Collection[str] | None = None


def _rounded(value: Any) -> Any:
    """Floats rounded to 8 decimals as the legend shows them; only exact floats, like A1111."""
    return round(value, 8) if type(value) is float else value


def format_with_label(label: str, value: Any) -> str:
    return f"{label}: {_rounded(value)}"


def format_bare(label: str, value: Any) -> str:
    return str(_rounded(value))


def format_joined(label: str, value: Any) -> str:
    return ", ".join(value)


def format_base_name(label: str, value: Any) -> str:
    return os.path.basename(value)


def format_nothing(label: str, value: Any) -> str:
    return ""


@dataclass(frozen=True)
class AxisSpec:
    """One X/Y/Z axis: how its text is parsed, checked and shown in the legend.

    ``cost`` orders the plot loops (expensive axes outermost, §14.3); ``choices`` lists
    the values offered in a picker, ``None`` for free text.
    """

    label: str
    kind: AxisKind
    format_value: Callable[[str, Any], str] = format_with_label
    confirm: Callable[[Sequence[Any], AxisContext], None] | None = None
    cost: float = 0.0
    choices: Callable[[], list[str]] | None = None


def confirm_samplers(values: Sequence[Any], context: AxisContext) -> None:
    """Every value must name a sampler or alias, in any case (A1111's X/Y/Z lookup).

    The value itself is kept as typed; generation resolves it by exact name later.
    """
    from pipeline.samplers import list_samplers

    known: set[str] = set()
    for sampler in list_samplers():
        known.add(sampler.name.lower())
        known.update(alias.lower() for alias in sampler.aliases)
    for value in values:
        if str(value).lower() not in known:
            raise AxisTextError(f"Unknown sampler: {value}", "unknown_sampler", value=str(value))


def _matches_checkpoint(value: str, checkpoints: Collection[str]) -> bool:
    return value in checkpoints or any(value in name for name in checkpoints)


def confirm_checkpoints(values: Sequence[Any], context: AxisContext) -> None:
    """Every value must find a checkpoint (exact or part of a name); skipped without a list."""
    if context.checkpoints is None:
        return
    for value in values:
        if not _matches_checkpoint(str(value), context.checkpoints):
            raise AxisTextError(f"Unknown checkpoint: {value}", "unknown_checkpoint", value=str(value))


def sampler_choices() -> list[str]:
    from pipeline.samplers import list_samplers

    return [sampler.name for sampler in list_samplers()]


def scheduler_choices() -> list[str]:
    from pipeline.samplers import list_schedulers

    return [scheduler.label for scheduler in list_schedulers()]


# A1111 axis label -> spec. Add axes here; labels are matched exactly, case included.
AXES: dict[str, AxisSpec] = {
    spec.label: spec
    for spec in (
        AxisSpec("Nothing", "str", format_nothing),
        AxisSpec("Seed", "int"),
        AxisSpec("Var. seed", "int"),
        AxisSpec("Var. strength", "float"),
        AxisSpec("Steps", "int"),
        AxisSpec("CFG Scale", "float"),
        AxisSpec("Image CFG Scale", "float"),
        AxisSpec("Prompt S/R", "str", format_bare),
        AxisSpec("Prompt order", "permutations", format_joined),
        AxisSpec("Sampler", "str", format_bare, confirm=confirm_samplers, choices=sampler_choices),
        AxisSpec("Checkpoint name", "str", format_base_name, confirm=confirm_checkpoints, cost=1.0),
        AxisSpec("Schedule type", "str", choices=scheduler_choices),
        AxisSpec("Clip skip", "int"),
        AxisSpec("Denoising", "float"),
        AxisSpec("VAE", "str", cost=0.7),
        AxisSpec("Styles", "str"),
        AxisSpec("Face restore", "str", format_bare),
        AxisSpec("Always discard next-to-last sigma", "str"),
        AxisSpec("Size", "str"),
        AxisSpec("Eta", "float"),
        AxisSpec("Sigma Churn", "float"),
        AxisSpec("Sigma min", "float"),
        AxisSpec("Sigma max", "float"),
        AxisSpec("Sigma noise", "float"),
        AxisSpec("Schedule min sigma", "float"),
        AxisSpec("Schedule max sigma", "float"),
        AxisSpec("Schedule rho", "float"),
        AxisSpec("UniPC Order", "int", cost=0.5),
    )
}


def axis_spec(axis: str) -> AxisSpec:
    """The spec of an A1111 axis label; ``AxisValueError`` for a label A1111 lacks here."""
    try:
        return AXES[axis]
    except KeyError:
        raise AxisTextError(f"unknown X/Y/Z axis {axis!r}", "unknown_axis", axis=axis) from None


def split_axis_text(text: str) -> list[str]:
    """Axis text as A1111 splits it: CSV records (initial spaces skipped), flattened, stripped."""
    try:
        records = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error as exc:
        raise AxisTextError(f"cannot split axis values: {exc}", "csv", detail=str(exc)) from exc
    return [value.strip() for value in itertools.chain.from_iterable(records)]


class _Collector:
    """Expanded values with a running size limit, checked before anything is built."""

    def __init__(self, max_values: int) -> None:
        self.values: list[Any] = []
        self.max_values = max_values

    def reserve(self, count: int) -> None:
        if count > self.max_values - len(self.values):
            raise _too_many(self.max_values)

    def extend(self, values: list[Any]) -> None:
        self.reserve(len(values))
        self.values.extend(values)


_Captures = tuple[str, str, str | None]


def _too_many(max_values: int) -> AxisTextError:
    return AxisTextError(f"axis expands to more than {max_values} values", "too_many", max=max_values)


def _int_range(captures: _Captures, out: _Collector) -> None:
    """``A-B (±S)`` on an int axis: the end is always B+1, whatever the step's sign."""
    start, end = int(captures[0]), int(captures[1]) + 1
    step = int(captures[2]) if captures[2] is not None else 1
    if step == 0:  # range() refuses it, as A1111 does
        raise AxisTextError("axis step must not be zero", "zero_step")
    span = range(start, end, step)
    try:
        count = len(span)
    except OverflowError:
        raise AxisTextError("axis range is too long", "too_long") from None
    out.reserve(count)
    out.extend(list(span))


def _linspace_count(group: str | None, out: _Collector) -> int:
    count = int(group) if group is not None else 1
    out.reserve(count)
    return count


def _int_count(captures: _Captures, out: _Collector) -> None:
    """``A-B [N]`` on an int axis: N evenly spaced points, truncated toward zero."""
    start, end = int(captures[0]), int(captures[1])
    count = _linspace_count(captures[2], out)
    import numpy as np  # only ranges need numpy (the bot imports this module at start)

    out.extend([int(x) for x in np.linspace(start=start, stop=end, num=count).tolist()])


def _float_range(captures: _Captures, out: _Collector) -> None:
    """``A-B (±S)`` on a float axis: numpy's arange up to B+S, so it can overshoot B."""
    start, end = float(captures[0]), float(captures[1])
    step = float(captures[2]) if captures[2] is not None else 1.0
    stop = end + step
    if step == 0:
        raise AxisTextError("axis step must not be zero", "zero_step")
    length = (stop - start) / step
    if not math.isfinite(length):
        raise AxisTextError("axis range is too long", "too_long")
    out.reserve(max(0, math.ceil(length)))
    import numpy as np

    out.extend(np.arange(start, stop, step).tolist())


def _float_count(captures: _Captures, out: _Collector) -> None:
    start, end = float(captures[0]), float(captures[1])
    count = _linspace_count(captures[2], out)
    import numpy as np

    out.extend(np.linspace(start=start, stop=end, num=count).tolist())


# Tried in order: a value both shapes accept ("1-5") is a step range.
_NUMERIC_SHAPES: dict[AxisKind, tuple[tuple[_RangeShape, Callable[[_Captures, _Collector], None]], ...]] = {
    "int": ((_INT_RANGE, _int_range), (_INT_COUNT, _int_count)),
    "float": ((_FLOAT_RANGE, _float_range), (_FLOAT_COUNT, _float_count)),
}


def _expand_numeric(kind: AxisKind, values: list[str], max_values: int) -> list[Any]:
    """Ranges expanded, empty values dropped, other values kept as text for conversion."""
    out = _Collector(max_values)
    for value in values:
        if not value.strip():
            continue
        for shape, expand in _NUMERIC_SHAPES[kind]:
            captures = shape.match(value)
            if captures is not None:
                import numpy as np

                # Overflowing ranges give inf/nan values in A1111 too; keep them quiet here.
                try:
                    with np.errstate(all="ignore"):
                        expand(captures, out)
                except AxisValueError:
                    raise
                except _NUMERIC_ERRORS as exc:
                    raise _bad_number(kind, value, exc) from exc
                break
        else:
            out.extend([value])
    return out.values


def _permutations(values: list[str], max_values: int) -> list[list[str]]:
    if math.perm(len(values)) > max_values:
        raise _too_many(max_values)
    return [list(order) for order in itertools.permutations(values)]


def _bad_number(kind: AxisKind, value: Any, exc: BaseException) -> AxisTextError:
    return AxisTextError(f"invalid {kind} value {value!r}: {exc}", "bad_number", value=str(value), kind=kind)


def _convert(kind: AxisKind, values: list[Any]) -> list[Any]:
    convert: Callable[[Any], Any] = {"int": int, "float": float, "str": str}.get(kind, lambda value: value)
    out = []
    for value in values:
        try:
            out.append(convert(value))
        except _NUMERIC_ERRORS as exc:
            raise _bad_number(kind, value, exc) from exc
    return out


def parse_axis_values(
    axis: str,
    text: str,
    *,
    max_values: int = DEFAULT_MAX_VALUES,
    checkpoints: Collection[str] | None = None,
) -> list[int | float | str | list[str]]:
    """Values of a text-mode axis, typed like the axis, after A1111's confirm step.

    ``AxisValueError`` wherever A1111 rejects the text (unconvertible value, zero step,
    unknown sampler), for an unknown axis label, and for an expansion beyond
    ``max_values``. ``checkpoints`` enables the Checkpoint name check. Seed ``-1`` is
    kept; randomising it is a later step.
    """
    return parse_values(axis_spec(axis), text, max_values=max_values, checkpoints=checkpoints)


def parse_values(
    spec: AxisSpec,
    text: str,
    *,
    max_values: int = DEFAULT_MAX_VALUES,
    checkpoints: Collection[str] | None = None,
) -> list[Any]:
    """``parse_axis_values`` for any spec, also one that is not in A1111's table."""
    values = split_axis_text(text)
    try:
        if spec.kind in _NUMERIC_SHAPES:
            parsed = _convert(spec.kind, _expand_numeric(spec.kind, values, max_values))
        elif spec.kind == "permutations":
            parsed = _permutations(values, max_values)
        else:
            parsed = _convert(spec.kind, values)
    except AxisValueError:
        raise
    except _NUMERIC_ERRORS as exc:
        raise AxisTextError(
            f"invalid {spec.label} value in {text!r}: {exc}", "bad_number", value=text, kind=spec.kind
        ) from exc
    if spec.confirm is not None:
        spec.confirm(parsed, AxisContext(checkpoints=checkpoints))
    return parsed


def axis_labels(axis: str, values: Sequence[Any]) -> list[str]:
    """Legend labels as A1111 draws them (§14.2)."""
    spec = axis_spec(axis)
    return [spec.format_value(spec.label, value) for value in values]

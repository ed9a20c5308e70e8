"""X/Y/Z grid axes: what each axis is called, how its text is read, what a value does to
a cell, and the grid's shape (its cells and the order A1111 runs them in).

A ``GridAxis`` is the unit third-party plugins register through ``register_grid_axes``;
the built-in ones below cover the A1111 axes Atelier supports. A value changes a
``GridCell`` (the request's prompts and /draw options); the cell is then frozen through
the same checks as /draw, so an axis can never produce a request /draw would refuse.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bot.draw import random_seed
from bot.errors import UserError
from bot.i18n import Msg
from bot.options import convert_value
from pipeline.xy_axes import (
    AXES,
    AxisContext,
    AxisKind,
    AxisSpec,
    AxisTextError,
    confirm_samplers,
    format_bare,
    format_with_label,
    parse_values,
)

# The most values one axis may expand to; the cell cap refuses big grids long before.
MAX_AXIS_VALUES = 10_000
HARD_MAX_CELLS = 1000  # no cap, configured or set by a moderator, goes beyond this
AXIS_OPTIONS = ("x", "y", "z")  # the /draw options of the three axes
SCRIPT = "X/Y/Z plot"  # A1111's script title in the infotext


@dataclass
class GridCell:
    """One cell being built: the final prompts and the /draw options, by canonical name."""

    prompt: str
    negative_prompt: str
    options: dict[str, Any]
    app: Any

    def set(self, option: str, value: Any) -> None:
        """Set a /draw option from an axis value, checked like the option typed by hand
        (``cell.set("steps", 30)`` fails as ``--steps 300`` would)."""
        spec = self.app.service.options.lookup()[option]
        self.options[spec.name] = convert_value(spec, str(value), self.app.settings.limits)

    def require(self, axis: str, needs: str, *options: str) -> None:
        """Refuse an axis that changes nothing unless one of ``options`` is on; ``needs``
        is the catalog key of what to add."""
        if not any(self.options.get(option) for option in options):
            raise UserError("error.grid.needs_option", axis=axis, needs=Msg(needs))


Apply = Callable[[GridCell, Any, Sequence[Any]], None]  # (cell, value, all values of the axis)


@dataclass(frozen=True)
class GridAxis:
    """An axis of the X/Y/Z grid.

    ``name`` is the legend's label and the name users type (any case; ``aliases`` too).
    ``kind`` says how the text is read (A1111's range syntax for "int"/"float").
    ``apply(cell, value, values)`` changes one cell. ``format_value(name, value)`` is the
    legend label. ``cost`` puts expensive axes in the outer loop; ``random_seed`` turns
    -1 values into one random seed each, as A1111's Seed axes do.
    """

    name: str
    kind: AxisKind
    apply: Apply
    aliases: tuple[str, ...] = ()
    format_value: Callable[[str, Any], str] = format_with_label
    confirm: Callable[[Sequence[Any], AxisContext], None] | None = None
    cost: float = 0.0
    choices: Callable[[], list[str]] | None = None
    random_seed: bool = False

    @property
    def spec(self) -> AxisSpec:
        return AxisSpec(self.name, self.kind, self.format_value, self.confirm, self.cost, self.choices)

    def label(self, value: Any) -> str:
        return self.format_value(self.name, value)


def normalize(name: str) -> str:
    """Axis names match ignoring case, spaces and punctuation: "CFG Scale" = "cfg-scale"."""
    return re.sub(r"[\W_]+", "", name.casefold())


def find_axis(app: Any, name: str) -> GridAxis:
    """The axis called ``name`` (or an alias); an error listing every axis otherwise."""
    axes = [axis for axis in app.grid_axes.items.values() if isinstance(axis, GridAxis)]
    wanted = normalize(name)
    for axis in axes:
        if normalize(axis.name) == wanted:
            return axis
    for axis in axes:
        if wanted in (normalize(alias) for alias in axis.aliases):
            return axis
    raise UserError(
        "error.grid.unknown_axis", name=name.strip(), allowed=", ".join(sorted(a.name for a in axes))
    )


def read_values(app: Any, axis: GridAxis, text: str) -> list[Any]:
    """The axis's values from its text; a translated error naming the axis otherwise."""
    if normalize(axis.name) == "nothing":
        return [""]
    try:
        values = parse_values(axis.spec, text, max_values=MAX_AXIS_VALUES, checkpoints=app.library.names())
    except AxisTextError as exc:
        key = exc.reason
        if key == "bad_number":
            key = {"int": "bad_int", "float": "bad_float"}.get(exc.params.get("kind"), "bad_value")
        reason = Msg(f"grid.reason.{key}", dict(exc.params))
        raise UserError("error.grid.bad_values", axis=axis.name, values=text, detail=reason) from None
    if not values:
        raise UserError("error.grid.empty_axis", axis=axis.name, values=text)
    if axis.random_seed:
        values = [random_seed() if value == -1 else value for value in values]
    return values


# a grid's shape ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisChoice:
    axis: GridAxis
    text: str  # the values as typed
    values: list[Any]

    @property
    def labels(self) -> list[str]:
        return [self.axis.label(value) for value in self.values]

    @property
    def is_nothing(self) -> bool:
        return normalize(self.axis.name) == "nothing"


@dataclass(frozen=True)
class GridSpec:
    axes: tuple[AxisChoice, AxisChoice, AxisChoice]  # X, Y, Z

    @property
    def shape(self) -> tuple[int, int, int]:
        x, y, z = (len(choice.values) for choice in self.axes)
        return x, y, z

    @property
    def cells(self) -> int:
        x, y, z = self.shape
        return x * y * z

    def shape_text(self) -> str:
        """``3 × 2``; a one-axis grid's shape is its axis's name (``Seed``), since its count
        would only repeat the number of cells."""
        used = [(n, c) for n, c in zip(self.shape, self.axes, strict=True) if not c.is_nothing]
        if len(used) == 1:
            return used[0][1].axis.name
        return " × ".join(str(n) for n, _ in used)

    def index(self, position: tuple[int, int, int]) -> int:
        """A1111's image index of a cell: x + y*|X| + z*|X|*|Y|."""
        x_count, y_count, _ = self.shape
        return position[0] + position[1] * x_count + position[2] * x_count * y_count

    def processing_order(self) -> list[tuple[int, int, int]]:
        """Cell positions in the order A1111 runs them: the dearest axis outermost."""
        loops = loop_order(tuple(choice.axis.cost for choice in self.axes))  # type: ignore[arg-type]
        ranges = [range(len(self.axes[axis].values)) for axis in loops]
        order = []
        for indices in itertools.product(*ranges):
            position = [0, 0, 0]
            for axis, index in zip(loops, indices, strict=True):
                position[axis] = index
            order.append((position[0], position[1], position[2]))
        return order

    def cell_label(self, position: tuple[int, int, int]) -> str | None:
        labels = [c.labels[i] for c, i in zip(self.axes, position, strict=True) if c.labels[i]]
        return " | ".join(labels) or None

    def infotext_fields(self) -> dict[str, str]:
        """What A1111 adds to the first cell's infotext (and so to the grid's)."""
        fields = {"Script": SCRIPT}
        for letter, choice in zip("XYZ", self.axes, strict=True):
            if choice.is_nothing:
                continue
            fields[f"{letter} Type"] = choice.axis.name
            fields[f"{letter} Values"] = choice.text
            if choice.axis.random_seed:
                fields[f"Fixed {letter} Values"] = ", ".join(str(value) for value in choice.values)
        return fields


def loop_order(costs: tuple[float, float, float]) -> tuple[int, int, int]:
    """Axes (0 = X, 1 = Y, 2 = Z) from the outer loop in: the strictly dearest axis first,
    then the dearer of the other two; with no strictly dearest axis, Z, then Y, then X."""
    x, y, z = costs
    if x > y and x > z:
        return (0, 1, 2) if y > z else (0, 2, 1)
    if y > x and y > z:
        return (1, 0, 2) if x > z else (1, 2, 0)
    if z > x and z > y:
        return (2, 0, 1) if x > y else (2, 1, 0)
    return (2, 1, 0)


def read_axis(app: Any, option: str, raw: str | None) -> AxisChoice:
    """``--x "steps: 1-5"`` -> the Steps axis and its values; no option -> Nothing. The axis
    name ends at the first colon, full-width colon (``steps：1-5``, typed with a Chinese
    keyboard) or ``=`` (``steps=1-5``); numbers may be listed with full-width commas
    (``cfg：5，7``)."""
    if raw is None:
        return AxisChoice(find_axis(app, "Nothing"), "", [""])
    name, colon, text = _axis_parts(raw)
    if not colon and normalize(name) not in ("nothing", "none"):
        raise UserError("error.grid.bad_axis_option", option=option, value=raw)
    axis = find_axis(app, name)
    text = text.strip()
    if axis.kind in ("int", "float"):  # numbers listed with a Chinese keyboard's commas
        text = text.replace("\uff0c", ",")
    return AxisChoice(axis, text, read_values(app, axis, text))


def _axis_parts(raw: str) -> tuple[str, str, str]:
    """``raw`` cut at its first separator (no axis name has one) into the axis name, the
    separator ("" when there is none) and the values."""
    found = [index for index in (raw.find(":"), raw.find("\uff1a"), raw.find("=")) if index >= 0]
    if not found:
        return raw, "", ""
    at = min(found)
    return raw[:at], raw[at], raw[at + 1 :]


def read_grid(app: Any, texts: dict[str, str | None]) -> GridSpec:
    x, y, z = (read_axis(app, option, texts.get(option)) for option in AXIS_OPTIONS)
    spec = GridSpec((x, y, z))
    if spec.cells > HARD_MAX_CELLS:
        raise UserError(
            "error.grid.too_many_cells", cells=spec.cells, shape=spec.shape_text(), max=HARD_MAX_CELLS
        )
    return spec


def grid_from_infotext_fields(app: Any, fields: dict[str, Any]) -> GridSpec:
    """The grid a first cell's ``Script`` fields describe (seeds as they were fixed)."""
    texts: dict[str, str | None] = {}
    for option, letter in zip(AXIS_OPTIONS, "XYZ", strict=True):
        name = fields.get(f"{letter} Type")
        values = fields.get(f"Fixed {letter} Values", fields.get(f"{letter} Values", ""))
        texts[option] = None if name is None else f"{name}: {values}"
    return read_grid(app, texts)


# built-in axes ---------------------------------------------------------------------------------


def _set(option: str) -> Apply:
    def apply(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
        cell.set(option, value)

    return apply


def _hires(axis: str, option: str) -> Apply:
    def apply(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
        cell.require(axis, "grid.needs.hires", "hires")
        cell.set(option, value)

    return apply


def _nothing(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    return None


def _seed(option: str) -> Apply:
    def apply(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
        if value < 0:  # -1 became a random seed already; other negatives are typos
            raise UserError("error.seed_range", name=option, value=value, max=2**63 - 1)
        cell.set(option, value)

    return apply


def _denoise(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    cell.require("Denoising", "grid.needs.hires_or_image", "hires", "init-image")
    cell.set("denoise", value)


def _missing(search: str, *texts: str) -> bool:
    return not any(search in text for text in texts)


def _prompt_sr(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    """A1111: the first value is searched in both prompts and every occurrence replaced."""
    search = str(values[0])
    if _missing(search, cell.prompt, cell.negative_prompt):
        raise UserError("error.grid.sr_missing", search=search, where=Msg("grid.where.prompts"))
    cell.prompt = cell.prompt.replace(search, value)
    cell.negative_prompt = cell.negative_prompt.replace(search, value)


def _negative_sr(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    search = str(values[0])
    if _missing(search, cell.negative_prompt):
        raise UserError("error.grid.sr_missing", search=search, where=Msg("grid.where.negative"))
    cell.negative_prompt = cell.negative_prompt.replace(search, value)


def _prompt_order(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    """The tokens (each found in the prompt) swapped into the order ``value`` lists them."""
    for token in value:
        if _missing(token, cell.prompt):
            raise UserError("error.grid.sr_missing", search=token, where=Msg("grid.where.prompt"))
    rest = cell.prompt
    pieces = []  # the text before each token, tokens taken in prompt order
    for token in sorted(value, key=cell.prompt.find):
        at = rest.find(token)
        pieces.append(rest[:at])
        rest = rest[at + len(token) :]
    cell.prompt = "".join(piece + token for piece, token in zip(pieces, value, strict=True)) + rest


def _checkpoint(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    found = cell.app.library.lookup(str(value))
    if found is None:
        raise UserError("error.unknown_checkpoint", name=value, available=", ".join(cell.app.library.names()))
    cell.options["checkpoint"] = found.name


def _vae(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    if str(value).strip().casefold() in ("none", "automatic"):
        cell.options["vae"] = None
    else:
        cell.set("vae", value)


def _side(index: int) -> Apply:
    def apply(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
        size = list(cell.options["size"])
        size[index] = value
        cell.set("size", f"{size[0]}x{size[1]}")

    return apply


_NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet):([^>]+)>")


def _network_strength(cell: GridCell, value: Any, values: Sequence[Any]) -> None:
    """Every LoRA / hypernetwork tag of the prompt at this strength (text encoder and UNet)."""

    def retag(match: re.Match[str]) -> str:
        items = match.group(2).split(":")
        kept = [item for item in items[1:] if "=" in item and item.split("=", 1)[0] not in ("te", "unet")]
        return f"<{match.group(1)}:{':'.join([items[0], str(value), *kept])}>"

    prompt, count = _NETWORK_TAG.subn(retag, cell.prompt)
    if not count:
        raise UserError("error.grid.no_networks")
    cell.prompt = prompt


def _from_a1111(label: str, apply: Apply, *aliases: str, **changes: Any) -> GridAxis:
    spec = AXES[label]
    fields = {
        "format_value": spec.format_value,
        "confirm": spec.confirm,
        "cost": spec.cost,
        "choices": spec.choices,
        **changes,
    }
    return GridAxis(label, spec.kind, apply, aliases, **fields)


def builtin_axes() -> list[GridAxis]:
    """A1111's axes that Atelier supports, plus a few of its own (Width, Height, ENSD ...)."""
    return [
        _from_a1111("Nothing", _nothing, "none"),
        _from_a1111("Seed", _seed("seed"), random_seed=True),
        _from_a1111("Var. seed", _seed("subseed"), "variation seed", "subseed", random_seed=True),
        _from_a1111("Var. strength", _set("subseed-strength"), "variation strength", "subseed strength"),
        _from_a1111("Steps", _set("steps")),
        _from_a1111("CFG Scale", _set("cfg"), "cfg", "guidance"),
        _from_a1111("Prompt S/R", _prompt_sr, "sr", "search replace"),
        GridAxis("Negative prompt S/R", "str", _negative_sr, ("negative sr", "neg sr"), format_bare),
        _from_a1111("Prompt order", _prompt_order, "order"),
        _from_a1111("Sampler", _set("sampler"), "sampler name"),
        _from_a1111("Schedule type", _set("scheduler"), "scheduler", "schedule"),
        _from_a1111("Checkpoint name", _checkpoint, "checkpoint", "model", "ckpt"),
        _from_a1111("Clip skip", _set("clip-skip")),
        _from_a1111("Denoising", _denoise, "denoising strength", "denoise", "strength"),
        _from_a1111("Size", _set("size"), "wxh"),
        GridAxis("Width", "int", _side(0)),
        GridAxis("Height", "int", _side(1)),
        _from_a1111("VAE", _vae, "sd vae"),
        GridAxis("Hires steps", "int", _hires("Hires steps", "hr-steps"), ("hr steps",)),
        GridAxis(
            "Hires upscaler", "str", _hires("Hires upscaler", "hr-upscaler"), ("hr upscaler", "upscaler")
        ),
        GridAxis("Hires upscale", "float", _hires("Hires upscale", "hr-scale"), ("hires scale", "hr scale")),
        GridAxis(
            "Hires sampler",
            "str",
            _hires("Hires sampler", "hr-sampler"),
            ("hr sampler",),
            confirm=confirm_samplers,
        ),
        _from_a1111("Image CFG Scale", _set("image-cfg"), "image cfg"),
        _from_a1111("Eta", _set("eta")),
        _from_a1111("Sigma Churn", _set("s-churn"), "s churn"),
        _from_a1111("Sigma min", _set("s-tmin"), "sigma tmin", "s tmin"),
        _from_a1111("Sigma max", _set("s-tmax"), "sigma tmax", "s tmax"),
        _from_a1111("Sigma noise", _set("s-noise"), "s noise"),
        _from_a1111("Schedule min sigma", _set("schedule-sigma-min")),
        _from_a1111("Schedule max sigma", _set("schedule-sigma-max")),
        _from_a1111("Schedule rho", _set("schedule-rho"), "rho"),
        _from_a1111("UniPC Order", _set("unipc-order"), "unipc-order"),
        GridAxis("ENSD", "int", _set("ensd"), ("eta noise seed delta",)),
        GridAxis("RNG source", "str", _set("rng"), ("rng",), choices=lambda: ["CPU", "GPU", "NV"]),
        GridAxis("Network strength", "float", _network_strength, ("lora strength", "lora weight")),
    ]

"""The options of /draw: names, conversion and range checks.

Every error names the allowed range or values, in the user's language, and nothing is
clamped silently. Limits come from ``[limits]`` in the settings.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bot.commands import ParsedArgs
from bot.errors import CommandSyntaxError, OptionValueError
from bot.i18n import Msg, clipped
from bot.settings import LimitsSettings
from pipeline.request import HIRES_UPSCALERS

MAX_SEED = 2**63 - 1
RNG_CHOICES = ("CPU", "GPU", "NV")
# No option's range needs more digits than this (2**63 has 19). A longer number is out of
# range without being converted: int() of a long string is slow and refuses 4,300 digits.
MAX_DIGITS = 24
# Echoed values are cut to this many characters, so a pasted megabyte is not sent back.
SHOWN_CHARS = 40
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_SIZE = re.compile(r"^(\d+)\s*[xX×*]\s*(\d+)$")


@dataclass(frozen=True)
class OptionSpec:
    """One ``--name value`` option. ``kind`` decides the conversion: "int", "number",
    "seed", "size", "pair", "choice" and "flag" are converted and range-checked here;
    the others ("str", "names", "axis", "id", "duration", "since") stay text for the
    handler, and only say how /help and the platforms show the value.

    ``description`` is a ``bot.schema.Text`` (a catalog key, or the text per locale).
    ``autocomplete`` names a source of ``bot.autocomplete``. ``advanced`` options are
    typed in one free-text field on platforms that limit a command's fields (Discord: 25).
    """

    name: str
    kind: str
    aliases: tuple[str, ...] = ()
    bounds: Callable[[LimitsSettings], tuple[Any, Any]] | None = None
    choices: Callable[[], list[str]] | None = None
    description: Any = ""  # bot.schema.Text
    autocomplete: str | None = None
    advanced: bool = False


@dataclass
class OptionTable:
    specs: list[OptionSpec] = field(default_factory=list)

    def add(self, spec: OptionSpec) -> None:
        self.specs.append(spec)

    def lookup(self) -> dict[str, OptionSpec]:
        table: dict[str, OptionSpec] = {}
        for spec in self.specs:
            for name in (spec.name, *spec.aliases):
                table[name] = spec
        return table

    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def convert(self, parsed: ParsedArgs, limits: LimitsSettings) -> dict[str, Any]:
        """Typed values by canonical name; raises UserError on unknown or bad options."""
        lookup = self.lookup()
        values: dict[str, Any] = {}
        for raw_name, raw in parsed.options:
            spec = lookup.get(raw_name)
            if spec is None:
                raise _unknown_option(raw_name, self.names(), list(lookup))
            if spec.name in values:
                raise CommandSyntaxError("error.duplicate_option", name=spec.name)
            values[spec.name] = convert_value(spec, raw, limits)
        return values

    def check(self, values: dict[str, Any], limits: LimitsSettings) -> dict[str, Any]:
        """Typed values from elsewhere than typed text (an infotext's fields) through the same
        converters and limits as typed options; empty values are left out."""
        lookup = self.lookup()
        checked: dict[str, Any] = {}
        for name, value in values.items():
            spec = lookup[name]
            if value is None or value == "" or value is False:
                continue
            if spec.kind == "flag":
                checked[spec.name] = True
            elif spec.kind in ("int", "seed", "number", "size", "pair"):
                raw = f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)
                checked[spec.name] = convert_value(spec, raw, limits)
            elif spec.kind == "choice":
                checked[spec.name] = convert_value(spec, str(value), limits)
            else:
                checked[spec.name] = value  # text as it is: never re-tokenized
        return checked


def _unknown_option(name: str, canonical: list[str], every: list[str]) -> CommandSyntaxError:
    close = difflib.get_close_matches(name, every, n=1)
    suggestion = Msg("error.unknown_option.suggestion", {"match": close[0]}) if close else ""
    return CommandSyntaxError(
        "error.unknown_option",
        name=shown(name),
        suggestion=suggestion,
        allowed=", ".join("--" + n for n in canonical),
    )


def convert_value(spec: OptionSpec, raw: str | None, limits: LimitsSettings) -> Any:
    if spec.kind == "flag":
        if raw is not None:
            raise CommandSyntaxError("error.unexpected_value", name=spec.name, value=shown(raw))
        return True
    if raw is None:
        raise CommandSyntaxError("error.missing_value", name=spec.name)
    low, high = spec.bounds(limits) if spec.bounds else (None, None)
    if spec.kind == "int":
        return int_in_range(spec.name, raw, low, high)
    if spec.kind == "seed":
        return _seed(spec.name, raw)
    if spec.kind == "number":
        return number_in_range(spec.name, raw, low, high)
    if spec.kind == "size":
        return parse_size(raw, limits)
    if spec.kind == "pair":
        return parse_pair(spec.name, raw, limits)
    if spec.kind == "choice":
        assert spec.choices is not None
        return _choice(spec.name, raw, spec.choices())
    return raw


def shown(raw: str) -> str:
    """A user's value as an error message repeats it: stripped, and cut when long."""
    text = raw.strip()
    return clipped(text, SHOWN_CHARS)


def parse_int(raw: str) -> int | None:
    """The whole number ``raw`` spells (sign and digits), or None when it spells none.

    The one integer parser of every option. A number of more than ``MAX_DIGITS`` digits
    (leading zeros aside) comes back as ±10**MAX_DIGITS, outside every option's range,
    so the caller's range message answers it.
    """
    text = raw.strip()
    if not _INT.match(text):
        return None
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-").lstrip("0") or "0"  # int() counts leading zeros toward its limit
    if len(digits) > MAX_DIGITS:
        return sign * 10**MAX_DIGITS
    return sign * int(digits)


def int_in_range(name: str, raw: str, low: int, high: int) -> int:
    value = parse_int(raw)
    if value is None:
        raise OptionValueError("error.not_an_integer", name=name, value=shown(raw), min=low, max=high)
    if (low is not None and value < low) or (high is not None and value > high):
        raise OptionValueError("error.out_of_range", name=name, value=_echo(raw, value), min=low, max=high)
    return value


def _echo(raw: str, value: int | float) -> int | float | str:
    """The value an out-of-range message names: as parsed, or as typed when that is long."""
    return value if len(raw.strip()) <= SHOWN_CHARS else shown(raw)


def _seed(name: str, raw: str) -> int:
    value = parse_int(raw)
    if value is None or not (value == -1 or 0 <= value <= MAX_SEED):
        raise OptionValueError("error.seed_range", name=name, value=shown(raw), max=MAX_SEED)
    return value


def number_in_range(name: str, raw: str, low: float, high: float) -> int | float:
    """Keeps the type the user typed: "7" is 7, "7.0" is 7.0 (A1111 prints them differently)."""
    text = raw.strip()
    value: int | float | None = parse_int(text)
    if value is None and _FLOAT.match(text):
        value = float(text)  # digits and an exponent only: "inf", "nan" and "1_0" are no numbers here
    if value is None:
        raise OptionValueError("error.not_a_number", name=name, value=shown(raw), min=low, max=high)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise OptionValueError("error.out_of_range", name=name, value=_echo(raw, value), min=low, max=high)
    return value


def parse_size(raw: str, limits: LimitsSettings) -> tuple[int, int]:
    match = _SIZE.match(raw.strip())
    bad = OptionValueError("error.bad_size", value=shown(raw), min=limits.min_size, max=limits.max_size)
    if not match:
        raise bad
    width, height = (parse_int(side) or 0 for side in match.groups())
    for side in (width, height):
        if side % 8 or not limits.min_size <= side <= limits.max_size:
            raise bad
    if width * height > limits.max_pixels:
        raise OptionValueError("error.too_many_pixels", value=shown(raw), max=limits.max_pixels)
    return width, height


def parse_pair(name: str, raw: str, limits: LimitsSettings) -> tuple[int, int]:
    """A WxH pair of pixels where 0 means "unset" (seed resize from, hires resize)."""
    match = _SIZE.match(raw.strip())
    sides = [parse_int(side) or 0 for side in match.groups()] if match else []
    if not sides or any(side > limits.max_size for side in sides):
        raise OptionValueError("error.bad_pair", name=name, value=shown(raw), max=limits.max_size)
    return sides[0], sides[1]


def _choice(name: str, raw: str, allowed: list[str]) -> str:
    folded = {choice.casefold(): choice for choice in allowed}
    value = folded.get(raw.strip().casefold())
    if value is None:
        raise OptionValueError(
            "error.invalid_choice", name=name, value=shown(raw), allowed=", ".join(allowed)
        )
    return value


def check_prompt_length(what: str, text: str, limits: LimitsSettings) -> None:
    if len(text) > limits.max_prompt_length:
        raise OptionValueError(
            "error.prompt_too_long", what=what, length=len(text), max=limits.max_prompt_length
        )


def draw_options() -> OptionTable:
    """The built-in /draw options; plugins add theirs through ``register_options``."""
    table = OptionTable()
    for spec in (
        OptionSpec("negative", "str", ("neg", "negative-prompt"), description="option.negative"),
        OptionSpec(
            "steps", "int", bounds=lambda lim: (lim.min_steps, lim.max_steps), description="option.steps"
        ),
        OptionSpec(
            "cfg",
            "number",
            ("cfg-scale", "guidance"),
            bounds=lambda lim: (lim.min_cfg, lim.max_cfg),
            description="option.cfg",
        ),
        OptionSpec(
            "image-cfg",
            "number",
            ("image-cfg-scale", "icfg"),
            bounds=lambda lim: (0, lim.max_cfg),
            description="option.image-cfg",
            advanced=True,
        ),
        OptionSpec("size", "size", ("wxh",), description="option.size"),
        OptionSpec("seed", "seed", description="option.seed"),
        OptionSpec(
            "subseed", "seed", ("variation-seed", "var-seed"), description="option.subseed", advanced=True
        ),
        OptionSpec(
            "subseed-strength",
            "number",
            ("variation-strength", "var-strength"),
            bounds=lambda _: (0, 1),
            description="option.subseed-strength",
            advanced=True,
        ),
        OptionSpec("sampler", "str", description="option.sampler", autocomplete="samplers"),
        OptionSpec(
            "scheduler",
            "str",
            ("schedule", "schedule-type"),
            description="option.scheduler",
            autocomplete="schedules",
        ),
        OptionSpec(
            "batch",
            "int",
            ("batch-size",),
            bounds=lambda lim: (1, lim.max_batch_size),
            description="option.batch",
        ),
        OptionSpec(
            "count",
            "int",
            ("n-iter", "batch-count"),
            bounds=lambda lim: (1, lim.max_count),
            description="option.count",
        ),
        OptionSpec(
            "checkpoint",
            "str",
            ("model", "ckpt"),
            description="option.checkpoint",
            autocomplete="checkpoints",
        ),
        OptionSpec("vae", "str", ("sd-vae",), description="option.vae", autocomplete="vaes"),
        OptionSpec("lora", "names", ("loras",), description="option.lora", autocomplete="loras"),
        OptionSpec(
            "clip-skip",
            "int",
            ("clipskip",),
            bounds=lambda lim: (1, lim.max_clip_skip),
            description="option.clip-skip",
            advanced=True,
        ),
        OptionSpec(
            "rng", "choice", choices=lambda: list(RNG_CHOICES), description="option.rng", advanced=True
        ),
        OptionSpec(
            "ensd",
            "int",
            ("eta-noise-seed-delta",),
            bounds=lambda _: (0, 2**31 - 1),
            description="option.ensd",
            advanced=True,
        ),
        OptionSpec("eta", "number", bounds=lambda _: (0, 1), description="option.eta", advanced=True),
        OptionSpec(
            "s-churn",
            "number",
            ("sigma-churn",),
            bounds=lambda _: (0, 100),
            description="option.s-churn",
            advanced=True,
        ),
        OptionSpec(
            "s-tmin",
            "number",
            ("sigma-tmin",),
            bounds=lambda _: (0, 10),
            description="option.s-tmin",
            advanced=True,
        ),
        OptionSpec(
            "s-tmax",
            "number",
            ("sigma-tmax",),
            bounds=lambda _: (0, 999),
            description="option.s-tmax",
            advanced=True,
        ),
        OptionSpec(
            "s-noise",
            "number",
            ("sigma-noise",),
            bounds=lambda _: (0, 1.1),
            description="option.s-noise",
            advanced=True,
        ),
        OptionSpec(
            "schedule-sigma-min",
            "number",
            ("schedule-min-sigma",),
            bounds=lambda _: (0, 100),
            description="option.schedule-sigma-min",
            advanced=True,
        ),
        OptionSpec(
            "schedule-sigma-max",
            "number",
            ("schedule-max-sigma",),
            bounds=lambda _: (0, 1000),
            description="option.schedule-sigma-max",
            advanced=True,
        ),
        OptionSpec(
            "schedule-rho",
            "number",
            ("rho",),
            bounds=lambda _: (0, 100),
            description="option.schedule-rho",
            advanced=True,
        ),
        OptionSpec(
            "noise-multiplier",
            "number",
            bounds=lambda _: (0, 1.5),
            description="option.noise-multiplier",
            advanced=True,
        ),
        OptionSpec(
            "extra-noise",
            "number",
            bounds=lambda _: (0, 1),
            description="option.extra-noise",
            advanced=True,
        ),
        OptionSpec(
            "unipc-variant",
            "choice",
            choices=lambda: ["bh1", "bh2"],
            description="option.unipc-variant",
            advanced=True,
        ),
        OptionSpec(
            "unipc-order", "int", bounds=lambda _: (1, 50), description="option.unipc-order", advanced=True
        ),
        OptionSpec(
            "unipc-skip-type",
            "choice",
            choices=lambda: ["time_uniform", "time_quadratic", "logSNR"],
            description="option.unipc-skip-type",
            advanced=True,
        ),
        OptionSpec(
            "ngms",
            "number",
            ("s-min-uncond",),
            bounds=lambda _: (0, 15),
            description="option.ngms",
            advanced=True,
        ),
        OptionSpec(
            "ngms-all-steps",
            "flag",
            ("s-min-uncond-all",),
            description="option.ngms-all-steps",
            advanced=True,
        ),
        OptionSpec(
            "skip-early-cfg",
            "number",
            ("skip-early-cond",),
            bounds=lambda _: (0, 1),
            description="option.skip-early-cfg",
            advanced=True,
        ),
        OptionSpec("pad-conds", "flag", description="option.pad-conds", advanced=True),
        OptionSpec("pad-conds-v0", "flag", description="option.pad-conds-v0", advanced=True),
        OptionSpec(
            "downcast-alphas-cumprod", "flag", description="option.downcast-alphas-cumprod", advanced=True
        ),
        OptionSpec(
            "unipc-lower-order-final",
            "choice",
            choices=lambda: ["True", "False"],
            description="option.unipc-lower-order-final",
            advanced=True,
        ),
        OptionSpec("seed-resize-from", "pair", description="option.seed-resize-from", advanced=True),
        OptionSpec(
            "denoise",
            "number",
            ("denoising-strength", "strength"),
            bounds=lambda _: (0, 1),
            description="option.denoise",
        ),
        OptionSpec("hires", "flag", ("hr", "hires-fix"), description="option.hires"),
        OptionSpec(
            "hr-scale",
            "number",
            ("hires-scale", "upscale"),
            bounds=lambda _: (1, 4),
            description="option.hr-scale",
            advanced=True,
        ),
        OptionSpec(
            "hr-steps",
            "int",
            ("hires-steps",),
            bounds=lambda lim: (0, lim.max_steps),
            description="option.hr-steps",
            advanced=True,
        ),
        OptionSpec(
            "hr-upscaler",
            "choice",
            ("hires-upscaler", "upscaler"),
            choices=lambda: list(HIRES_UPSCALERS),
            description="option.hr-upscaler",
            advanced=True,
        ),
        OptionSpec("hr-resize", "pair", ("hires-resize",), description="option.hr-resize", advanced=True),
        OptionSpec("hr-prompt", "str", ("hires-prompt",), description="option.hr-prompt", advanced=True),
        OptionSpec(
            "hr-negative", "str", ("hires-negative",), description="option.hr-negative", advanced=True
        ),
        OptionSpec(
            "hr-sampler",
            "str",
            ("hires-sampler",),
            description="option.hr-sampler",
            autocomplete="samplers",
            advanced=True,
        ),
        OptionSpec(
            "hr-scheduler",
            "str",
            ("hires-scheduler",),
            description="option.hr-scheduler",
            autocomplete="schedules",
            advanced=True,
        ),
    ):
        table.add(spec)
    return table

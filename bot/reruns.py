"""Requests from A1111 infotexts: a pasted "parameters" text or a PNG's becomes /draw options.

Fields are applied as A1111's paste does (§12.2): the sampler and schedule resolved by
A1111's own rules, CFG scale keeping its printed type ("7" stays an int), sizes from
``Size-1``/``Size-2``. The checkpoint comes from ``Model`` or ``Model hash``; when the
models folder has neither, the user is told which model is missing instead of silently
getting another one (``--checkpoint NAME`` overrides).
"""

from __future__ import annotations

import re
from typing import Any

from bot.commands import quote_value
from bot.errors import UserError
from bot.types import Reply

_INT = re.compile(r"^-?\d+$")


def split_infotext(text: str) -> tuple[str, str] | None:
    """``(infotext, trailing option text)`` when ``text`` is an infotext, else None.

    Option lines (starting with ``--``) may follow the parameter line to override fields.
    """
    lines = text.strip().split("\n")
    options: list[str] = []
    while lines and lines[-1].lstrip().startswith("--"):
        options.insert(0, lines.pop().strip())
    if len(lines) < 1:
        return None
    from pipeline.infotext import parse

    body = "\n".join(lines)
    fields = parse(body)
    if "Steps" not in fields and "Sampler" not in fields and "Seed" not in fields:
        return None
    return body, " ".join(options)


def _flag(value: str) -> bool:
    """A1111's bool fields ("True"); the reader's injected back-compat flags are bools."""
    return value.strip().casefold() == "true"


def _bool_text(value: str) -> str:
    """A bool field as the "True"/"False" choice of its option."""
    return str(_flag(value))


def _number(value: str) -> int | float:
    value = value.strip()
    return int(value) if _INT.match(value) else float(value)


def options_from_infotext(text: str, library: Any, *, with_model: bool = True) -> tuple[str, dict[str, Any]]:
    """The prompt and /draw option values that reproduce an infotext's image.

    ``with_model=False`` skips the checkpoint (the user named one with --checkpoint)."""
    from pipeline.infotext import parse
    from pipeline.samplers import resolve

    fields = parse(text)
    options: dict[str, Any] = {"negative": fields.get("Negative prompt", "")}
    try:
        for key, name, convert in _FIELDS:
            if key in fields and fields[key] != "" and not (key in _ZERO_UNSET and not fields[key]):
                options[name] = convert(str(fields[key]))
        if "Size-1" in fields and "Size-2" in fields:
            options["size"] = (int(fields["Size-1"]), int(fields["Size-2"]))
        if "Seed resize from-1" in fields and "Seed resize from-2" in fields:
            options["seed-resize-from"] = (
                int(fields["Seed resize from-1"]),
                int(fields["Seed resize from-2"]),
            )
        if "Hires upscale" in fields or "Hires resize-1" in fields and int(fields["Hires resize-1"] or 0):
            options["hires"] = True
            if "Hires resize-1" in fields and int(fields["Hires resize-1"] or 0):
                options["hr-resize"] = (int(fields["Hires resize-1"]), int(fields["Hires resize-2"]))
    except ValueError as exc:
        raise UserError("error.infotext", detail=str(exc)) from None
    if "vae" in options and not _vae_exists(library, options["vae"]):
        # e.g. a checkpoint's own "<name>.vae.pt": it applies again without an override
        del options["vae"]
    sampler, scheduler = resolve(fields.get("Sampler"), fields.get("Schedule type"))
    options["sampler"], options["scheduler"] = sampler, scheduler
    checkpoint = _checkpoint(fields, library) if with_model else None
    if checkpoint is not None:
        options["checkpoint"] = checkpoint
    return str(fields.get("Prompt", "")), options


def _vae_exists(library: Any, name: str) -> bool:
    from pipeline.errors import EngineError
    from pipeline.vae import find_vae

    try:
        find_vae(getattr(library, "models_dir", None), name)
    except EngineError:
        return False
    return True


def _checkpoint(fields: dict[str, Any], library: Any) -> str | None:
    model, model_hash = fields.get("Model"), fields.get("Model hash")
    if not model and not model_hash:
        return None
    for text in (model_hash, model):
        if text:
            found = library.lookup(str(text))
            if found is not None:
                return found.name
    raise UserError(
        "error.model_missing",
        model=model or "?",
        hash=model_hash or "?",
        available=", ".join(library.names()),
    )


def unknown_hash_note(text: str, library: Any, checkpoint: str | None) -> Reply | None:
    """A note when the infotext's ``Model hash`` matches no checkpoint although one was
    found by its ``Model`` name: the user learns that the weights may not be the same."""
    from pipeline.infotext import parse

    model_hash = parse(text).get("Model hash")
    if not model_hash or checkpoint is None or library.lookup(str(model_hash)) is not None:
        return None
    return Reply("note.model_hash_unknown", {"hash": str(model_hash), "checkpoint": checkpoint})


def draw_line(prompt: str, options: dict[str, Any]) -> str:
    """The /draw command that makes the same request (shown by /pnginfo)."""
    parts = ["/draw", quote_value(prompt) if prompt else '""']
    for name, value in options.items():
        if value is None or value == "" or value is False:
            continue
        if value is True:
            parts.append(f"--{name}")
        elif isinstance(value, tuple):
            parts.append(f"--{name} {value[0]}x{value[1]}")
        else:
            parts.append(f"--{name} {quote_value(str(value))}")
    return " ".join(parts)


# fields the reader fills with 0 when absent, which means "not set"
_ZERO_UNSET = frozenset({"Schedule min sigma", "Schedule max sigma", "Schedule rho"})

_FIELDS = (
    ("Steps", "steps", int),
    ("CFG scale", "cfg", _number),
    ("Image CFG scale", "image-cfg", _number),
    ("Seed", "seed", int),
    ("Variation seed", "subseed", int),
    ("Variation seed strength", "subseed-strength", float),
    ("Clip skip", "clip-skip", int),
    ("ENSD", "ensd", int),
    ("RNG", "rng", str),
    ("Eta", "eta", float),
    ("Eta DDIM", "eta", float),
    ("Sigma churn", "s-churn", float),
    ("Sigma tmin", "s-tmin", float),
    ("Sigma tmax", "s-tmax", float),
    ("Sigma noise", "s-noise", float),
    ("Schedule min sigma", "schedule-sigma-min", float),
    ("Schedule max sigma", "schedule-sigma-max", float),
    ("Schedule rho", "schedule-rho", float),
    ("Noise multiplier", "noise-multiplier", float),
    ("Extra noise", "extra-noise", float),
    ("UniPC variant", "unipc-variant", str),
    ("UniPC order", "unipc-order", int),
    ("UniPC skip type", "unipc-skip-type", str),
    ("UniPC lower order final", "unipc-lower-order-final", _bool_text),
    ("NGMS", "ngms", float),
    ("NGMS all steps", "ngms-all-steps", _flag),
    ("Skip Early CFG", "skip-early-cfg", float),
    ("Pad conds", "pad-conds", _flag),
    ("Pad conds v0", "pad-conds-v0", _flag),
    ("Downcast alphas_cumprod", "downcast-alphas-cumprod", _flag),
    ("Denoising strength", "denoise", float),
    ("Hires upscale", "hr-scale", float),
    ("Hires steps", "hr-steps", int),
    ("Hires upscaler", "hr-upscaler", str),
    ("Hires prompt", "hr-prompt", str),
    ("Hires negative prompt", "hr-negative", str),
    ("VAE", "vae", str),
)

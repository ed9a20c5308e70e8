"""A1111 "parameters" infotext: writing (``format``) and reading (``parse``).

The infotext is how images carry their settings between A1111, other tools and this bot,
so both directions follow A1111 v1.10.1 byte for byte (A1111-SEMANTICS.md §12): the writer
so ours open in A1111's PNG Info, the reader so a pasted A1111 infotext reproduces the image.

``format`` shadows the builtin on purpose (it is the public name PARITY-API.md asks for);
nothing in this module calls the builtin ``format``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from packaging.version import Version

from pipeline.errors import PromptSyntaxError

logger = logging.getLogger(__name__)

# key: a word character then word characters, spaces, '-' or '/'; value: a non-empty
# double-quoted string with backslash escapes, or everything up to the next comma.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# Where a failed ``_PARAM_RE`` attempt may resume: past the leading whitespace and, when a
# key could start there, past the whole run of key characters (see ``_find_params``).
_KEY_RUN_RE = re.compile(r"\s*(\w[\w \-/]*)?")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
# Anything after a second '-' in a Version ("v1.7.0-225-gabc") is a git suffix, not version.
_VERSION_PREFIX_RE = re.compile(r"([^-]+-[^-]+)-")
_NEGATIVE_PREFIX = "Negative prompt:"
# A parameter line needs this many ``key: value`` matches, else it is prompt text.
_MIN_PARAMS = 3
# Characters that make the reader split a raw value, so the writer JSON-quotes them.
_SPECIAL_CHARS = (",", ":", "\n")

# Versions at which A1111 changed behaviour that old infotexts rely on (§12.2 step 6).
_V160 = Version("1.6.0")
_V170_TSNR = Version("v1.7.0-225")
_V180 = Version("1.8.0")
_V180_HIRES_STYLES = Version("1.8.0-139")

# Settings A1111 fills in when an infotext lacks them, with A1111's value types (§12.2).
_HIRES_DEFAULTS: dict[str, Any] = {
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
}
_LATE_DEFAULTS: dict[str, Any] = {
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}


def quote(value: str) -> str:
    """JSON-quote a value the reader would otherwise cut at ``,`` / ``:`` / newline."""
    if not any(char in value for char in _SPECIAL_CHARS):
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """Undo ``quote``; text that only looks quoted (invalid JSON) is kept as written."""
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


class StyleExtractor(Protocol):
    """Anything that removes known styles from a prompt pair, like ``StyleDatabase.extract``."""

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]: ...


class _NoStyles:
    """An empty style database: extraction never matches, texts come back unchanged."""

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        return [], prompt, negative_prompt


# ---------------------------------------------------------------------------------------
# Reading


def parse(text: str, *, styles: StyleExtractor | None = None) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters`` with "Apply if any" styles and back-compat on.

    Never raises: where A1111's own reader fails (an unparsable emphasis weight, a zero
    side in both ``First pass size`` and ``Size``) that one step is skipped and the rest
    of the result is returned.
    """
    prompt, negative_prompt, param_line = _split_sections(text)
    res = _read_param_line(param_line)
    prompt, negative_prompt = _remove_styles(res, prompt, negative_prompt, styles or _NoStyles())
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    _add_defaults(res, prompt, negative_prompt)
    _apply_backcompat(res)
    return res


def _split_sections(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, parameter line) of an infotext."""
    *lines, last_line = text.strip().split("\n")
    if len(_find_params(last_line)) < _MIN_PARAMS:
        lines.append(last_line)
        last_line = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    section = prompt_lines
    for raw_line in lines:
        line = raw_line.strip()
        # Every line is tested, so a repeated "Negative prompt:" also loses its prefix.
        if line.startswith(_NEGATIVE_PREFIX):
            section = negative_lines
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        section.append(line)
    return _join_lines(prompt_lines), _join_lines(negative_lines), last_line


def _join_lines(lines: list[str]) -> str:
    """A1111 adds a separator only once the text is non-empty, so leading blank lines vanish."""
    start = 0
    while start < len(lines) and lines[start] == "":
        start += 1
    return "\n".join(lines[start:])


def _find_params(line: str) -> list[tuple[str, str]]:
    """``_PARAM_RE.findall(line)`` in linear time.

    ``findall`` retries at every position, and each failed attempt scans to the end of the
    run of key characters, which is quadratic on long lines (a 32k-character prompt line
    took seconds). An attempt that fails at ``pos`` fails at every later start inside the
    same whitespace + key-character run too (they all reach the same run end, where no
    ``:`` follows), so the scan resumes after that run instead.
    """
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        match = _PARAM_RE.match(line, pos)
        if match is not None:
            found.append((match.group(1), match.group(2)))
            pos = match.end()  # never empty: a key has two characters and a colon
            continue
        run = _KEY_RUN_RE.match(line, pos)
        pos = max(run.end(), pos + 1) if run is not None else pos + 1
    return found


def _read_param_line(line: str) -> dict[str, Any]:
    """``key: value`` pairs as strings; ``WxH`` values split into ``<key>-1``/``<key>-2``."""
    res: dict[str, Any] = {}
    for key, value in _find_params(line):
        if value == "":
            # A1111 fails on the empty value internally and skips the key.
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = _SIZE_RE.match(value)
        if size is None:
            res[key] = value
        else:
            res[f"{key}-1"] = size.group(1)
            res[f"{key}-2"] = size.group(2)
    return res


def _remove_styles(
    res: dict[str, Any], prompt: str, negative_prompt: str, styles: StyleExtractor
) -> tuple[str, str]:
    """De-style the prompts ("Apply if any") unless the hires prompts disagree on the styles."""
    found, bare_prompt, bare_negative = styles.extract(prompt, negative_prompt)
    has_hires_prompts = "Hires prompt" in res or "Hires negative prompt" in res
    if has_hires_prompts and _hires_prompts_carry_styles(res.get("Version")):
        hires_prompt = res.get("Hires prompt", prompt)
        hires_negative = res.get("Hires negative prompt", negative_prompt)
        hires_found, bare_hires, bare_hires_negative = styles.extract(hires_prompt, hires_negative)
        if list(hires_found) != list(found):
            return prompt, negative_prompt
        # An empty hires prompt means "same as the main prompt" to the generator.
        res["Hires prompt"] = "" if bare_hires == bare_prompt else bare_hires
        res["Hires negative prompt"] = "" if bare_hires_negative == bare_negative else bare_hires_negative
    if found:
        res["Styles array"] = list(found)
    return bare_prompt, bare_negative


def _hires_prompts_carry_styles(version_text: Any) -> bool:
    """Hires prompts hold style text only from 1.8.0-139 on; unknown versions are assumed new."""
    version = _parse_version(version_text)
    return version is None or version > _V180_HIRES_STYLES


def _parse_version(text: Any) -> Version | None:
    """The infotext's Version as a PEP 440 version, or None when absent or unparsable."""
    if not isinstance(text, str):
        return None
    prefix = _VERSION_PREFIX_RE.match(text)
    if prefix is not None:
        text = prefix.group(1)
    try:
        return Version(text)
    except ValueError:  # InvalidVersion, or an int too long for int()
        return None


def _add_defaults(res: dict[str, Any], prompt: str, negative_prompt: str) -> None:
    """Fill what older or simpler infotexts leave out, in A1111's order (order matters for
    the First pass size conversion, which reads and overwrites the Hires resize defaults)."""
    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        strength = res.get("Hypernet strength", "1.0")
        res["Prompt"] += f"<hypernet:{hypernet}:{strength}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, value in _HIRES_DEFAULTS.items():
        res.setdefault(key, value)
    _restore_old_hires_fix(res)
    for key, value in _LATE_DEFAULTS.items():
        res.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and (_uses_emphasis(prompt) or _uses_emphasis(negative_prompt)):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)


def _uses_emphasis(text: str) -> bool:
    """Whether a prompt has any weighted fragment (a BREAK marker does not count)."""
    from pipeline.prompts import parse_attention

    try:
        fragments = parse_attention(text)
    except PromptSyntaxError:
        # A1111 crashes here; the prompt's emphasis is unknown, so no Emphasis default.
        return False
    return any(weight != 1.0 and fragment != "BREAK" for fragment, weight in fragments)


def _restore_old_hires_fix(res: dict[str, Any]) -> None:
    """Turn a pre-rework ``First pass size`` into today's Size + Hires resize, as ints."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    try:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
        if first_w == 0 or first_h == 0:
            first_w, first_h = _old_first_pass_size(width, height)
    except (ValueError, ArithmeticError):
        # A1111 raises (zero Size side, non-numeric or oversized numbers); keep as written.
        logger.debug("old First pass size not converted: %r", res, exc_info=True)
        return
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def _old_first_pass_size(width: int, height: int) -> tuple[int, int]:
    """The old hires fix's automatic first pass: about 512x512 pixels, sides in 64s."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _apply_backcompat(res: dict[str, Any]) -> None:
    """Turn on the compatibility options an infotext's Version implies."""
    version = _parse_version(res.get("Version"))
    if version is None:
        return
    if version < _V160 and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if version < _V160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if version < _V170_TSNR:
        res["Downcast alphas_cumprod"] = True
    if version < _V180 and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


# ---------------------------------------------------------------------------------------
# Writing


@dataclass
class InfotextParams:
    """One image's values, as ``create_infotext`` sees them."""

    prompt: str
    steps: int
    sampler: str  # as requested, e.g. "DPM++ 2M"
    cfg_scale: int | float  # printed with str(): 7 -> "7", 7.0 -> "7.0"
    seed: int  # this image's seed
    width: int
    height: int
    negative_prompt: str = ""
    schedule_type: str = "Automatic"  # the requested value; the resolved label comes via `extra`
    subseed: int = -1  # this image's variation seed
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    face_restoration: str | None = None  # model name when face restoration ran
    model_hash: str | None = None  # None = field omitted
    model_name: str | None = None
    vae_hash: str | None = None
    vae_name: str | None = None
    clip_skip: int = 1
    ensd: int = 0  # "Eta noise seed delta" setting
    eta: float | None = None  # the request's eta; None = sampler default
    rng: str = "GPU"  # "GPU" | "CPU" | "NV"
    token_merging_ratio: float = 0.0
    tiling: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # extra generation params, insertion order
    version: str | None = None  # text of the Version field; None = omitted
    user: str | None = None  # None = omitted
    # instruct-pix2pix checkpoints only (A1111 writes it for edit models); None = omitted
    image_cfg_scale: int | float | None = None


def format(params: InfotextParams) -> str:
    """A1111's ``create_infotext`` for one image (§12.1)."""
    fields = _generation_fields(params)
    line = ", ".join(_field_text(key, value) for key, value in fields.items() if value is not None)
    negative = "\nNegative prompt: " + params.negative_prompt if params.negative_prompt else ""
    return (params.prompt + negative + "\n" + line).strip()


def _generation_fields(p: InfotextParams) -> dict[str, Any]:
    """Every field in A1111's fixed order; None marks one that is not written.

    Fields the dataclass has no attribute for (FP8 weight, Conditional mask weight, …) keep a
    None slot, so that supplying them through ``extra`` puts them where A1111 does.
    """
    varied = p.subseed_strength != 0
    resized = p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0
    fields: dict[str, Any] = {
        "Steps": p.steps,
        "Sampler": p.sampler,
        "Schedule type": p.schedule_type,
        "CFG scale": p.cfg_scale,
        "Image CFG scale": p.image_cfg_scale,
        "Seed": p.seed,
        "Face restoration": p.face_restoration,
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.model_hash,
        "Model": p.model_name,
        "FP8 weight": None,
        "Cache FP16 weight for LoRA": None,
        "VAE hash": p.vae_hash,
        "VAE": p.vae_name,
        "Variation seed": p.subseed if varied else None,
        "Variation seed strength": p.subseed_strength if varied else None,
        "Seed resize from": f"{p.seed_resize_from_w}x{p.seed_resize_from_h}" if resized else None,
        "Denoising strength": None,
        "Conditional mask weight": None,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "ENSD": p.ensd if _shows_ensd(p) else None,
        "Token merging ratio": p.token_merging_ratio if p.token_merging_ratio != 0 else None,
        "Token merging ratio hr": None,
        "Init image hash": None,
        "RNG": p.rng if p.rng != "GPU" else None,
        "Tiling": "True" if p.tiling else None,
    }
    fields.update(p.extra)  # existing keys keep their place, new ones are appended
    fields["Version"] = p.version
    fields["User"] = p.user
    return fields


def _shows_ensd(p: InfotextParams) -> bool:
    if p.ensd == 0:
        return False
    from pipeline.samplers import ensd_in_infotext

    return ensd_in_infotext(p.sampler, p.eta)


def _field_text(key: str, value: Any) -> str:
    """``key: value``, or the bare key when the value repeats it."""
    if key == value:
        return key
    return key + ": " + _value_text(value)


def _value_text(value: Any) -> str:
    """``str(value)``, JSON-quoted when needed; non-strings are JSON-encoded as themselves
    (a tuple becomes ``[1, 2]``) like A1111 does, falling back to their ``str``."""
    if isinstance(value, str):
        return quote(value)
    text = str(value)
    if quote(text) == text:
        return text
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return quote(text)

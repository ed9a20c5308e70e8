"""Prompt styles with A1111's ``styles.csv`` semantics (A1111-SEMANTICS.md §6), and the
plugin that saves them per user, chat and guild and applies them with ``--style``.

The text functions are pure and live at module level so the parity check and the
plugin's hook implementations can share them. Styling must round-trip through an
infotext: ``apply`` builds the final prompt, ``extract`` recovers the style names when a
user pastes that infotext back ("Apply if any"), so both follow A1111 to the character.

The plugin: ``/style save|list|show|delete|import|export`` (``--chat``/``--guild`` for
moderators), global styles from ``[plugins.styles]`` and the ``register_styles`` hook,
and ``--style a,b`` on every request that goes through /draw. The names used are stored
on the request (``GenerationRequest.styles``), the styled prompts are what is stored.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    CONFIG_OWNER,
    SCOPE_OPTIONS,
    ConfigError,
    NotFound,
    OptionSpec,
    UserError,
    audit,
    available,
    by_scope,
    check_length,
    check_name,
    find,
    hookimpl,
    labelled,
    list_choices,
    listed,
    listing,
    mirror,
    names_in,
    own_scopes,
    parse_args,
    refill,
    refreshed,
    split_name,
    split_names,
    target_scope,
    valid_name,
    where,
)
from bot.types import (
    Argument,
    Attachment,
    AutocompleteContext,
    AutocompleteSource,
    Choice,
    Command,
    CommandContext,
    FileInput,
    OutgoingFile,
    Reply,
)
from models.style_store import SavedText, Scope, ScopeFull, StyleStore, name_key
from models.styles import NAME_LENGTH

logger = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"
CSV_FIELDS = ("name", "prompt", "negative_prompt")
_BOM = "\ufeff"


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style text applied to ``prompt``.

    A placeholder style wraps the prompt verbatim (whitespace kept, so a style like
    ``"masterpiece, {prompt}"`` stays predictable); any other style is appended after a
    comma, and empty parts are dropped so no dangling ``", "`` appears.
    """
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_style_texts(prompt: str, style_texts: Sequence[str]) -> str:
    """Apply several style texts in order, each to the result of the previous one."""
    for style_text in style_texts:
        prompt = merge_prompt(style_text, prompt)
    return prompt


def extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """Undo one ``merge_prompt``: ``(True, remainder)`` on a match, else ``(False, prompt)``.

    Matching works on stripped texts because applying a style strips the prompt; the
    unmatched prompt is returned untouched so a failed test changes nothing.
    """
    stripped_prompt = prompt.strip()
    stripped_style = style_text.strip()
    if PROMPT_PLACEHOLDER in stripped_style:
        left, right = stripped_style.split(PROMPT_PLACEHOLDER, 1)
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            # Overlapping left/right parts give an empty slice, which is A1111's answer too.
            return True, stripped_prompt[len(left) : len(stripped_prompt) - len(right)]
        return False, prompt
    if stripped_prompt.endswith(stripped_style):
        remainder = stripped_prompt[: len(stripped_prompt) - len(stripped_style)]
        if remainder.endswith(", "):
            remainder = remainder[:-2]
        return True, remainder
    return False, prompt


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def _extract_style(style: Style, prompt: str, negative_prompt: str) -> tuple[str, str] | None:
    """Both remainders if ``style`` explains both texts, else ``None``.

    A style with two empty texts would match every prompt, so it is never extracted;
    only the empty string counts as empty here (a whitespace style is eligible).
    """
    if not style.prompt and not style.negative_prompt:
        return None
    matched, new_prompt = extract_style_text(style.prompt, prompt)
    if not matched:
        return None
    matched, new_negative = extract_style_text(style.negative_prompt, negative_prompt)
    if not matched:
        return None
    return new_prompt, new_negative


def _dedupe(styles: Iterable[Style]) -> list[Style]:
    """Later styles with a known name replace its texts but keep the first position."""
    by_name: dict[str, Style] = {}
    for style in styles:
        by_name[style.name] = style
    return list(by_name.values())


def _row_text(row: dict[str | None, object], key: str) -> str:
    """A cell as text; short rows leave cells as ``None``, which styles treat as empty."""
    value = row.get(key)
    return value if isinstance(value, str) else ""


def _style_from_row(row: dict[str | None, object]) -> Style | None:
    """The style a CSV row defines, or ``None`` for a '#' comment row.

    Like A1111, a header without the needed columns only fails once a row uses it.
    """
    if "name" not in row:
        raise ValueError("styles CSV has no 'name' column")
    name = _row_text(row, "name")
    if name.startswith("#"):
        return None
    # Files written before negative prompts existed use a two-column "name,text" layout.
    prompt_key = "prompt" if "prompt" in row else "text"
    if prompt_key not in row:
        raise ValueError("styles CSV has neither a 'prompt' nor a 'text' column")
    return Style(name, _row_text(row, prompt_key), _row_text(row, "negative_prompt"))


def _needs_full_quoting(values: Sequence[str]) -> bool:
    """Whether minimal quoting would lose text when read back.

    The reader skips spaces after a delimiter, so a value that starts with a space only
    survives inside quotes; ``csv`` quotes minimally otherwise.
    """
    return any(value.startswith(" ") for value in values)


@dataclass
class StyleDatabase:
    """Named styles in file order, as A1111 loads them from ``styles.csv``.

    Duplicate names are merged on construction the way A1111's loader merges rows.
    """

    styles: list[Style] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.styles = _dedupe(self.styles)

    @classmethod
    def from_csv(cls, text: str) -> StyleDatabase:
        """Styles from CSV *content* with A1111's reader quirks.

        A leading BOM is dropped, spaces after delimiters are skipped, quoted cells may
        span lines, '#' rows are comments, a repeated name replaces the earlier texts.
        Raises ``ValueError`` when rows exist but the header lacks ``name`` or both
        ``prompt`` and ``text``.
        """
        if text.startswith(_BOM):
            text = text[len(_BOM) :]
        # newline="" hands line endings to the csv module, as A1111 opens the file.
        reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
        styles = [style for row in reader if (style := _style_from_row(row)) is not None]
        return cls(styles)

    def to_csv(self) -> str:
        """The database as A1111's ``styles.csv`` content (``csv`` excel dialect, CRLF).

        ``from_csv`` reads it back unchanged, except styles whose name starts with '#'
        (A1111 reads those as comments). A1111 saves the file as UTF-8 with a BOM; the
        encoding is left to whoever writes the file.
        """
        buffer = io.StringIO(newline="")
        minimal = csv.writer(buffer)
        quote_all = csv.writer(buffer, quoting=csv.QUOTE_ALL)
        minimal.writerow(CSV_FIELDS)
        for style in self.styles:
            row = (style.name, style.prompt, style.negative_prompt)
            (quote_all if _needs_full_quoting(row) else minimal).writerow(row)
        return buffer.getvalue()

    def apply(self, prompt: str, negative_prompt: str, names: Sequence[str]) -> tuple[str, str]:
        """Both texts styled by ``names`` in order; an unknown name acts as an empty style."""
        by_name = {style.name: style for style in self.styles}
        chosen = [by_name.get(name) for name in names]
        return (
            apply_style_texts(prompt, [style.prompt if style is not None else "" for style in chosen]),
            apply_style_texts(
                negative_prompt, [style.negative_prompt if style is not None else "" for style in chosen]
            ),
        )

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """Style names recovered from styled texts ("Apply if any"), in application order.

        The first matching style in database order is peeled off and the scan restarts
        from the top; outer styles come off first, so the names are returned reversed.
        """
        candidates = list(self.styles)
        extracted: list[str] = []
        while True:
            for index, style in enumerate(candidates):
                remainders = _extract_style(style, prompt, negative_prompt)
                if remainders is not None:
                    prompt, negative_prompt = remainders
                    extracted.append(style.name)
                    del candidates[index]
                    break
            else:
                break
        extracted.reverse()
        return extracted, prompt, negative_prompt


# the plugin: saved styles per user, chat and guild; --style on /draw; /style ------------------

STYLES = "styles"  # mirror kind
EXPORT_NAME = "styles.csv"


class InlineStyle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str = ""
    negative_prompt: str = ""


class StylesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    csv: str = ""
    styles: dict[str, InlineStyle] = {}
    max_name_length: int = Field(64, ge=1, le=NAME_LENGTH)
    max_per_scope: int = Field(200, ge=1)
    max_import_bytes: int = Field(1048576, ge=1)


def config(app: Any) -> StylesConfig:
    return app.settings.plugin_config("styles", StylesConfig)  # type: ignore[return-value]


def config_styles(cfg: StylesConfig) -> list[Style]:
    """The global styles of ``[plugins.styles]``: the ``csv`` file's, then the inline ones.

    Blocking (reads a file); a bad file or name fails naming the key.
    """
    from_file: list[Style] = []
    if cfg.csv:
        path = Path(cfg.csv).expanduser()
        try:
            from_file = StyleDatabase.from_csv(path.read_text(encoding="utf-8")).styles
        except OSError as exc:
            raise ConfigError(f"[plugins.styles] csv: cannot read {path}: {exc.strerror}") from None
        except (UnicodeDecodeError, ValueError, csv.Error) as exc:
            raise ConfigError(f"[plugins.styles] csv: {path} is not an A1111 styles.csv: {exc}") from None
    inline = [Style(name, entry.prompt, entry.negative_prompt) for name, entry in cfg.styles.items()]
    for key, styles in (("csv", from_file), ("styles", inline)):
        for style in styles:
            if not valid_name(style.name, cfg.max_name_length):
                raise ConfigError(
                    f"[plugins.styles] {key}: {style.name!r} cannot be a style name (1-{cfg.max_name_length} "
                    "characters, no commas, quotes or line breaks, not starting with # or -)"
                )
    return from_file + inline


async def load(app: Any, scopes: Sequence[Scope] | None = None) -> None:
    rows = await StyleStore(app.store).styles(scopes)
    refill(app, STYLES, by_scope(rows), scopes)


@hookimpl
async def startup(app: Any) -> None:
    from bot.api import StyleEntry

    for style in await asyncio.to_thread(config_styles, config(app)):
        if app.styles.owners.get(name_key(style.name)) != CONFIG_OWNER:  # a restarted App has them
            app.styles.add(
                style.name, StyleEntry(style.name, style.prompt, style.negative_prompt), CONFIG_OWNER
            )
    await load(app)


@hookimpl
def register_options(register: Any) -> None:
    register(OptionSpec("style", "names", ("styles",), description="option.style", autocomplete=STYLES))


@hookimpl
def register_commands(register: Any) -> None:
    name = Argument("name", "word", "arg.style_name", autocomplete=STYLES)
    new_name = Argument("name", "word", "arg.style_new_name")
    prompt = Argument("prompt", "text", "arg.style_prompt", required=False)
    save_options = (
        OptionSpec("negative", "str", ("neg", "negative-prompt"), description="option.style.negative"),
        OptionSpec("from", "id", description="option.style.from"),
        *SCOPE_OPTIONS,
    )
    subcommands = (
        Command("list", refreshed(load, _list), "cmd.style.list"),
        Command("show", refreshed(load, _show), "cmd.style.show", (name,)),
        Command(
            "save",
            refreshed(load, _save),
            "cmd.style.save",
            (new_name, prompt),
            save_options,
            details="details.style.save",
        ),
        Command("delete", refreshed(load, _delete), "cmd.style.delete", (name,), SCOPE_OPTIONS),
        Command(
            "import",
            refreshed(load, _import),
            "cmd.style.import",
            options=SCOPE_OPTIONS,
            attachment=FileInput("file.style_import", required=True),
        ),
        Command("export", refreshed(load, _export), "cmd.style.export", options=SCOPE_OPTIONS),
    )
    register(Command("style", description="cmd.style", subcommands=subcommands, default="list"))


@hookimpl
def register_autocomplete(register: Any) -> None:
    register(AutocompleteSource(STYLES, complete_styles))


async def complete_styles(ctx: AutocompleteContext) -> list[Choice]:
    """The styles ``ctx.actor`` may use: their own, the chat's, the server's, the global
    ones, each named with where it comes from; in a list, the last name is completed."""
    await load(ctx.app, own_scopes(ctx.actor))
    return list_choices(labelled(ctx.app, STYLES, ctx.actor, ctx.app.styles), ctx.partial)


def find_style(app: Any, actor: Any, name: str) -> Any:
    """Personal, then the chat's, the guild's, the global styles; unknown names are refused."""
    found = find(app, STYLES, own_scopes(actor), name) or app.styles.get(name)
    if found is None:
        raise UserError("style.unknown", name=name, available=available(app, STYLES, actor, app.styles))
    return found


@hookimpl
def modify_request(draft: Any, actor: Any, app: Any) -> None:
    """A1111's order: each style applies to the result of the previous one, the prompt and
    the negative prompt (and the hires prompts the user gave) each with their own text."""
    styles = [find_style(app, actor, name) for name in split_names(draft.options.get("style") or "")]
    if not styles:
        return
    prompts = [style.prompt for style in styles]
    negatives = [style.negative_prompt for style in styles]
    draft.prompt = apply_style_texts(draft.prompt, prompts)
    draft.negative_prompt = apply_style_texts(draft.negative_prompt, negatives)
    for option, texts in (("hr-prompt", prompts), ("hr-negative", negatives)):
        if draft.options.get(option):
            draft.options[option] = apply_style_texts(draft.options[option], texts)
    draft.styles.extend(style.name for style in styles)


# /style ----------------------------------------------------------------------------------------


def _style_data(style: Any, scope: str) -> dict[str, Any]:
    return {
        "name": style.name,
        "scope": scope,
        "prompt": style.prompt,
        "negative_prompt": style.negative_prompt,
    }


async def _store(
    ctx: CommandContext, scope: Scope, entries: list[tuple[str, str, str]], action: str
) -> tuple[int, int]:
    """Save in one transaction, refresh the mirror, audit a chat's or guild's change."""
    app, cfg = ctx.app, config(ctx.app)
    limits = app.settings.limits
    for name, prompt, negative in entries:
        check_length(name, "prompt", prompt, limits)
        check_length(name, "negative", negative, limits)
    try:
        result = await StyleStore(app.store).save_styles(
            scope, entries, by=ctx.actor.key, limit=cfg.max_per_scope
        )
    except ScopeFull as exc:
        raise UserError("style.too_many", count=exc.count, max=exc.limit, where=where(scope)) from None
    await load(app, [scope])
    if scope[0] != "user":
        await audit(ctx, action, target=", ".join(entry[0] for entry in entries)[:128])
    return result


async def _save(ctx: CommandContext) -> Reply:
    options = ctx.options
    name, prompt = split_name(ctx.text)
    scope = await target_scope(ctx, options, "style.save", name)
    check_name(name, config(ctx.app).max_name_length)
    prompt, negative = parse_args(prompt).text, options.get("negative", "")
    if "from" in options:
        if prompt or negative:
            raise UserError("style.from_alone")
        request = (await ctx.app.service.visible(options["from"].strip(), ctx.actor)).request
        prompt, negative = request.prompt, request.negative_prompt
    if not prompt.strip() and not negative.strip():
        raise UserError("style.empty")
    added, _ = await _store(ctx, scope, [(name, prompt, negative)], "style.save")
    style = Style(name, prompt, negative)
    return Reply(
        "style.saved" if added else "style.replaced",
        {"name": name, "where": where(scope)},
        data={"style": _style_data(style, scope[0])},
    )


async def _list(ctx: CommandContext) -> Reply:
    found = listing(ctx.app, STYLES, ctx.actor, ctx.app.styles)
    return Reply("style.list", {kind: listed(names) for kind, names in found.items()}, data={"styles": found})


async def _show(ctx: CommandContext) -> Reply:
    name = ctx.text
    style = find_style(ctx.app, ctx.actor, name)
    scope = style.scope if isinstance(style, SavedText) else "global"
    params = {
        "name": style.name,
        "where": where(scope),
        "prompt": style.prompt or "-",
        "negative": style.negative_prompt or "-",
    }
    return Reply("style.show", params, data={"style": _style_data(style, scope)})


async def _delete(ctx: CommandContext) -> Reply:
    name = ctx.text
    scope = await target_scope(ctx, ctx.options, "style.delete", name)
    removed = await StyleStore(ctx.app.store).delete_style(scope, name)
    await load(ctx.app, [scope])
    if removed is None:
        raise NotFound(
            "style.not_found",
            name=name,
            where=where(scope),
            available=listed(names_in(ctx.app, STYLES, scope)),
        )
    if scope[0] != "user":
        await audit(ctx, "style.delete", target=removed.name)
    return Reply("style.deleted", {"name": removed.name, "where": where(scope)})


def read_upload(attachment: Attachment, max_bytes: int) -> list[Style]:
    """The styles of an uploaded styles.csv, names checked later; refused unless it is one."""
    name = attachment.filename or EXPORT_NAME
    if len(attachment.data) > max_bytes:
        raise UserError("style.import_too_large", file=name, size=len(attachment.data), max=max_bytes)
    try:
        database = StyleDatabase.from_csv(attachment.data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, csv.Error):
        raise UserError("style.import_not_csv", file=name) from None
    styles = [style for style in database.styles if style.name]  # a nameless row selects nothing
    if not styles:
        raise UserError("style.import_empty", file=name)
    return styles


async def _import(ctx: CommandContext) -> Reply:
    scope = await target_scope(ctx, ctx.options, "style.import")
    if not ctx.invocation.attachments:
        raise UserError("style.import_no_file")
    attachment = ctx.invocation.attachments[0]
    cfg = config(ctx.app)
    styles = read_upload(attachment, cfg.max_import_bytes)
    file = attachment.filename or EXPORT_NAME
    merged: dict[str, Style] = {}
    for style in styles:
        check_name(style.name, cfg.max_name_length)
        first = merged.get(name_key(style.name), style)  # a name twice (any case): the later texts win
        merged[name_key(style.name)] = Style(first.name, style.prompt, style.negative_prompt)
    entries = [(s.name, s.prompt, s.negative_prompt) for s in merged.values()]
    added, replaced = await _store(ctx, scope, entries, "style.import")
    params = {
        "count": len(entries),
        "file": file,
        "where": where(scope),
        "added": added,
        "replaced": replaced,
    }
    return Reply("style.imported", params, data={"added": added, "replaced": replaced})


def export_bytes(text: str) -> bytes:
    return text.encode("utf-8-sig")  # A1111 writes its styles.csv with a BOM


async def _export(ctx: CommandContext) -> Reply:
    scope = await target_scope(ctx, ctx.options, "style.export", write=False)
    rows = list(mirror(ctx.app, STYLES).get(scope, {}).values())
    if not rows:
        return Reply("style.export_empty", {"where": where(scope)})
    text = StyleDatabase([Style(row.name, row.prompt, row.negative_prompt) for row in rows]).to_csv()
    return Reply(
        "style.exported",
        {"count": len(rows), "where": where(scope), "file": EXPORT_NAME},
        files=[OutgoingFile(EXPORT_NAME, "document", data=export_bytes(text))],
        data={"file": EXPORT_NAME, "count": len(rows)},
    )

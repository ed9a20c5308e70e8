"""History: /history, /show and /export of one's generations; ``--private`` generations.

Who sees what. A user sees all of their own generations. Moderators see everyone's,
private ones included: they must be able to look at and /delete what was made with the
bot. Anyone else sees a generation only when it is not private: a result posted in a
community channel is public already, so /show of someone else's public result is
allowed (its buttons act for the viewer: a reroll becomes the viewer's own job). A
private generation of someone else answers exactly as an id that does not exist
("not found"), so not even its existence leaks. Children of a private generation
(rerolls, variations) are private too.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import zipfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ulid import ULID

from bot.api import (
    CommandSyntaxError,
    GenerationRecord,
    Msg,
    NotFound,
    OptionSpec,
    UserError,
    audit,
    clipped,
    format_time,
    hookimpl,
    may_see,
    named_user,
    parse_duration,
    parse_int,
    require_moderator,
    shown,
    usage_of,
    user_key,
    whole_number,
)
from bot.types import Argument, Command, CommandContext, OutgoingFile, Reply

_PAGE = re.compile(r"^[+-]?\d+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
PROMPT_CHARS = 48  # of the prompt shown on a /history line


MAX_EXPORT = 5000  # generations in one /export at most, whatever the config says


class HistoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    page_size: int = Field(10, ge=1, le=50)
    export_limit: int = Field(200, ge=1, le=MAX_EXPORT)


def config(app: Any) -> HistoryConfig:
    return app.settings.plugin_config("history", HistoryConfig)  # type: ignore[return-value]


# who sees what -------------------------------------------------------------------------------


# hooks -----------------------------------------------------------------------------------------


@hookimpl
def startup(app: Any) -> None:
    config(app)  # a bad [plugins.history] table fails at startup, naming the key


@hookimpl
def register_options(register: Any) -> None:
    register(OptionSpec("private", "flag", description="option.private"))


@hookimpl
async def check_request(request: Any, actor: Any, app: Any) -> None:
    """A reroll or variation of a private generation stays private."""
    if request.parent_id and not request.options.get("private"):
        parent = await app.store.get(request.parent_id)
        if parent is not None and parent.private:
            request.options["private"] = True


@hookimpl
def register_commands(register: Any) -> None:
    history_arguments = (
        Argument("user", "user", "arg.other_user", required=False),
        Argument("page", "integer", "arg.page", required=False),
    )
    register(Command("history", history_command, "cmd.history", history_arguments, guard=history_guard))
    register(Command("show", show_command, "cmd.show", (Argument("id", "id", "arg.generation"),)))
    export_options = (
        OptionSpec("since", "since", description="option.export.since"),
        OptionSpec("limit", "int", bounds=lambda _: (1, MAX_EXPORT), description="option.export.limit"),
    )
    register(
        Command(
            "export",
            export_command,
            "cmd.export",
            (Argument("user", "user", "arg.other_user", required=False),),
            export_options,
            guard=export_guard,
        )
    )


# /history --------------------------------------------------------------------------------------


def _history_args(ctx: CommandContext) -> tuple[str | None, str | None]:
    """``[@user] [page]`` in any order: a whole number is the page, anything else the user."""
    who = page = None
    for word in ctx.text.split():
        if _PAGE.match(word) and page is None:
            page = word
        elif not _PAGE.match(word) and who is None:
            who = user_key(word, ctx.actor)
        else:
            raise CommandSyntaxError(
                "error.unexpected_text", command="history", value=shown(ctx.text), usage=usage_of(ctx)
            )
    return who, page


async def _others_for_moderators(ctx: CommandContext, action: str, words: list[str]) -> None:
    """A command whose first word names another user is for moderators: checked before
    the rest of the text is read, so a refused attempt is audited however it is written."""
    if not words or words[0].startswith("--"):
        return
    who = named_user(words[0], ctx.actor)
    if who != ctx.actor.key:
        await require_moderator(ctx, action, who)


def _summary(record: GenerationRecord) -> dict[str, Any]:
    request = record.request
    return {
        "id": record.id,
        "status": record.status,
        "private": record.private,
        "parent_id": record.parent_id,
        "prompt": request.prompt,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "checkpoint": request.checkpoint,
        "created": record.created_at.isoformat(),
    }


def _short(text: str, limit: int = PROMPT_CHARS) -> str:
    return clipped(" ".join(text.split()), limit)


def _line(ctx: CommandContext, record: GenerationRecord) -> str:
    request = record.request
    return ctx.app.translator.t(
        ctx.actor.locale,
        "history.line",
        id=record.id,
        status=Msg(f"history.status.{record.status}"),
        private=Msg("history.private") if record.private else "",
        prompt=_short(request.prompt) or '""',
        seed=request.seed,
        size=f"{request.width}x{request.height}",
        checkpoint=request.checkpoint,
        created=format_time(record.created_at),
    )


async def history_guard(ctx: CommandContext) -> None:
    words = [w for w in ctx.text.split() if not _PAGE.match(w)]
    if words and not _names_a_user(words[0]):
        # "/history abc" is a mistyped page, not an attempt on a user called abc
        raise CommandSyntaxError(
            "error.unexpected_text", command="history", value=shown(ctx.text), usage=usage_of(ctx)
        )
    await _others_for_moderators(ctx, "history", words)


def _names_a_user(word: str) -> bool:
    """A user is named the way a chat writes one: @name, a mention, or platform:id."""
    return word.startswith(("@", "<@")) or ":" in word


async def export_guard(ctx: CommandContext) -> None:
    await _others_for_moderators(ctx, "export", ctx.text.split())


async def history_command(ctx: CommandContext) -> Reply:
    """``/history [page]``; moderators: ``/history @user [page]``. Newest first."""
    app = ctx.app
    who, page_text = _history_args(ctx)
    key = who or ctx.actor.key
    platform, _, platform_user_id = key.partition(":")
    user = await app.store.find_user(platform, platform_user_id)
    total = await app.store.count_for_user(user.id) if user else 0
    size = config(app).page_size
    pages = -(-total // size)
    data: dict[str, Any] = {"user": key, "page": 1, "pages": pages, "total": total, "ids": [], "items": []}
    if user is None or total == 0:
        return Reply("history.empty", {"user": key}, data=data)
    page = parse_int(page_text) if page_text else 1
    if page is None or not 1 <= page <= pages:
        raise UserError("history.bad_page", value=shown(page_text or ""), pages=pages)
    records = await app.store.list_for_user(user.id, limit=size, offset=(page - 1) * size)
    data.update(page=page, ids=[r.id for r in records], items=[_summary(r) for r in records])
    lines = "\n".join(_line(ctx, record) for record in records)
    params = {"user": key, "page": page, "pages": pages, "total": total, "list": lines}
    return Reply("history.page", params, data=data)


# /show -----------------------------------------------------------------------------------------


async def show_command(ctx: CommandContext) -> Reply:
    """A generation again: its images, parameters, buttons and lineage (parent, children)."""
    app, actor = ctx.app, ctx.actor
    record = await app.service.visible(ctx.text.strip(), actor)
    parent = await app.store.get(record.parent_id) if record.parent_id else None
    parent_id = parent.id if parent is not None and may_see(parent, actor) else None
    children = [child.id for child in await app.store.children(record.id) if may_see(child, actor)]
    data = {
        **_summary(record),
        "parent_id": parent_id,
        "children": children,
        "spoiler": record.spoiler,
        "params": record.request.to_dict(),
        "images": [
            {
                "id": image.id,
                "seed": image.seed,
                "width": image.width,
                "height": image.height,
                "infotext": image.infotext,
            }
            for image in record.images
        ],
    }
    lineage = Msg("show.lineage", {"parent": parent_id or "-", "children": ", ".join(children) or "-"})
    if record.status != "finished" or not record.images:
        params = {
            "id": record.id,
            "status": Msg(f"history.status.{record.status}"),
            "prompt": record.request.prompt,
            "lineage": lineage,
        }
        return Reply("show.unfinished", params, data=data)
    actions = app.service.result_actions(record, actor)
    params = {"id": record.id, "infotext": record.images[0].infotext, "lineage": lineage}
    files = [OutgoingFile(Path(image.path).name, "image", image_id=image.id) for image in record.images]
    return Reply("show.result", params, files=files, actions=actions, data=data)


# /export ---------------------------------------------------------------------------------------


def _since(text: str) -> datetime:
    """``2024-05-01`` (a UTC date) or a duration back from now (``7d``, ``12h``)."""
    value = text.strip()
    if _DATE.match(value):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise UserError("history.bad_since", value=shown(text)) from None
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        return datetime.now(UTC) - parse_duration(value, "since")
    except UserError as exc:
        if exc.key != "error.bad_duration":
            raise  # a duration past the range: its own message names the range
        raise UserError("history.bad_since", value=shown(text)) from None


async def _newest(app: Any, user_id: int, limit: int, since: datetime | None) -> list[GenerationRecord]:
    """Up to ``limit`` of the user's generations, newest first, none older than ``since``."""
    found: list[GenerationRecord] = []
    while len(found) < limit:
        batch = await app.store.list_for_user(user_id, limit=min(100, limit - len(found)), offset=len(found))
        for record in batch:
            if since is not None and record.created_at < since:
                return found
            found.append(record)
        if not batch:
            break
    return found


def export_index(records: list[GenerationRecord]) -> list[dict[str, Any]]:
    """What index.json holds, one entry per generation (the image files by their zip names)."""
    return [
        {
            "id": record.id,
            "created": record.created_at.isoformat(),
            "finished": record.finished_at.isoformat() if record.finished_at else None,
            "status": record.status,
            "private": record.private,
            "parent": record.parent_id,
            "prompt": record.request.prompt,
            "negative_prompt": record.request.negative_prompt,
            "seed": record.request.seed,
            "params": record.request.to_dict(),
            "images": [
                {
                    "file": Path(image.path).name,
                    "index": image.index,
                    "seed": image.seed,
                    "subseed": image.subseed,
                    "width": image.width,
                    "height": image.height,
                    "infotext": image.infotext,
                }
                for image in record.images
            ],
        }
        for record in records
    ]


async def read_images(app: Any, records: list[GenerationRecord]) -> dict[str, bytes]:
    """The PNGs of ``records`` by image id, through the image store; removed ones are left out."""
    found: dict[str, bytes] = {}
    for record in records:
        for image in record.images:
            try:
                found[image.id] = await app.images.read(image.id)
            except NotFound:
                pass
    return found


def write_export(records: list[GenerationRecord], pngs: dict[str, bytes]) -> bytes:
    """On a worker thread: the zip of the PNGs byte for byte (their infotext intact) and
    index.json; an image removed since is listed with ``"file": null``."""
    index = export_index(records)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for record, entry in zip(records, index, strict=True):
            for image, listed in zip(record.images, entry["images"], strict=True):
                if image.id in pngs:  # PNG is compressed already: stored as is
                    archive.writestr(listed["file"], pngs[image.id], compress_type=zipfile.ZIP_STORED)
                else:
                    listed["file"] = None
        text = json.dumps(index, ensure_ascii=False, indent=1)
        archive.writestr("index.json", text, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


async def export_command(ctx: CommandContext) -> Reply:
    """``/export [--since 7d|YYYY-MM-DD] [--limit N]``: one's own generations as a zip;
    moderators: ``/export @user ...`` (written to the audit log, as it hands over files)."""
    app, actor = ctx.app, ctx.actor
    cfg = config(app)
    owner = actor.key
    if ctx.text:
        owner = user_key(ctx.text, actor)
        if owner != actor.key:
            await require_moderator(ctx, "export", owner)  # quotes can make it differ from the first word
    options = ctx.options
    limit = cfg.export_limit
    if "limit" in options:  # within the configured limit, which the schema cannot know
        limit = whole_number("limit", str(options["limit"]), minimum=1, maximum=cfg.export_limit)
    since = _since(options["since"]) if "since" in options else None
    platform, _, platform_user_id = owner.partition(":")
    user = await app.store.find_user(platform, platform_user_id)
    records = await _newest(app, user.id, limit, since) if user else []
    if owner != actor.key:
        await audit(ctx, "export", target=owner, count=len(records))
    if not records:
        return Reply("history.empty", {"user": owner}, data={"user": owner, "total": 0, "ids": []})
    archive = await asyncio.to_thread(write_export, records, await read_images(app, records))
    name = f"{_UNSAFE.sub('_', owner)}-{ULID()}.zip"
    images = sum(len(record.images) for record in records)
    data = {"ids": [r.id for r in records], "count": len(records), "images": images}
    files = [OutgoingFile(name, "document", data=archive)]
    return Reply("export.done", {"count": len(records), "images": images}, files=files, data=data)

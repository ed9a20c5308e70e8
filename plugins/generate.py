"""The default plan and the basic result actions (reroll, remix with a new prompt).

Built in, but it uses only public hooks: with it disabled /draw still works (the core
falls back to the same one-job-per-batch plan) and results simply have no buttons.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from bot.api import Msg, default_plan, hookimpl, redraw, visible
from bot.types import Action, Admission, Argument, Command, CommandContext, Reply


@hookimpl(trylast=True)
def plan_generation(request: Any, app: Any) -> Any:
    return default_plan(request)


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    return [Action(f"reroll:{record.id}", "action.reroll"), Action(f"remix:{record.id}", "action.remix")]


@hookimpl
async def check_request(request: Any, actor: Any, app: Any) -> Admission | None:
    """A note on the /draw reply when the prompt names an embedding whose file was
    refused: the user expects the embedding, but the words are used as plain text."""
    generation = request.generation
    texts = [
        generation.prompt,
        generation.negative_prompt,
        generation.hr_prompt,
        generation.hr_negative_prompt,
    ]
    text = " \n ".join(texts)
    # under load the folder's listing of a moment ago answers, without a thread's round trip
    recent = app.library.recent_model_files(("embedding",), models_dir=_models_dir(app))
    if recent is not None:
        refused = _refused_embeddings(recent, text)
    else:
        refused = await asyncio.to_thread(_listed_refused_embeddings, app, text)
    if not refused:
        return None
    names = ", ".join(name for name, _ in refused)
    details = "; ".join(f"{name}: {reason}" for name, reason in refused)
    return Admission(key="draw.embeddings_refused", params={"names": names, "details": details})


def _listed_refused_embeddings(app: Any, text: str) -> list[tuple[str, str]]:
    """``_refused_embeddings`` after a look at the embeddings folder (touches the disk)."""
    return _refused_embeddings(app.library.model_files(("embedding",), models_dir=_models_dir(app)), text)


def _refused_embeddings(files: Any, text: str) -> list[tuple[str, str]]:
    """(embedding name, reason) of each refused embedding file of ``files`` (a
    ``ModelFiles``) that ``text`` names as a word."""
    found = []
    for entry in files.unreadable:
        name = Path(entry.name).stem
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE):
            found.append((name, entry.reason))
    return found


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("reroll", reroll, "cmd.reroll", arguments=(Argument("id", "id", "arg.generation"),)))
    register(
        Command(
            "remix",
            remix,
            "cmd.remix",
            arguments=(
                Argument("id", "id", "arg.generation"),
                Argument("prompt", "text", "arg.prompt", required=False),
            ),
        )
    )
    register(Command("samplers", samplers, "cmd.samplers"))
    register(
        Command(
            "models",
            description="cmd.models",
            subcommands=(
                Command("list", models, "cmd.models.list"),
                Command("refresh", refresh_models, "cmd.models.refresh", moderator=True),
            ),
            default="list",
        )
    )


async def reroll(ctx: CommandContext) -> list[Reply]:
    """The same request with a new random seed, as a child of the original."""
    generation_id = ctx.text.strip()
    record = await ctx.app.service.visible(generation_id, ctx.actor)
    return await redraw(ctx.app, record, {"seed": -1}, ctx.actor, ctx.invocation.route)


async def remix(ctx: CommandContext) -> list[Reply]:
    """The same request with a new prompt (and a new seed), as a child of the original.
    Without a prompt it says how to give one: a chat whose buttons cannot ask for text
    (Discord opens a form for it) shows the command to type."""
    generation_id, _, prompt = ctx.text.strip().partition(" ")
    record = await visible(ctx.app, generation_id, ctx.actor)
    if not prompt.strip():
        return [Reply("remix.prompt_needed", {"id": record.id, "prompt": record.request.prompt}, error=True)]
    # the parent's effective request, as a reroll's: today's default preset is not added again
    return await redraw(ctx.app, record, {"seed": -1}, ctx.actor, ctx.invocation.route, prompt=prompt.strip())


async def samplers(ctx: CommandContext) -> Reply:
    from pipeline.samplers import list_samplers, list_schedulers

    return Reply(
        "samplers.list",
        {
            "samplers": ", ".join(s.name for s in list_samplers()),
            "schedulers": ", ".join(s.label for s in list_schedulers()),
        },
    )


def _models_dir(app: Any) -> Path | None:
    """The library's folder; the configured one when the library was built without one."""
    found = getattr(app.library, "models_dir", None)
    return found if found is not None else app.settings.engine.models_dir


def model_lists(app: Any) -> dict[str, Any]:
    """Everything a prompt or /draw option can name, by kind (also the reply's ``data``,
    so clients can autocomplete), and the files that were skipped, with the reason.
    Hashes are shown only when already computed: listing must not read gigabytes of
    checkpoints (files are checked from their headers and pickles, weights unread)."""
    infos = app.library.infos()
    files = app.library.model_files(models_dir=_models_dir(app))
    default = app.settings.engine.default_checkpoint
    return {
        "checkpoints": [info.name for info in infos],
        "checkpoint_hashes": {info.name: info.sha256 for info in infos if info.sha256},
        # what a checkpoint that is not a plain text-to-image one does: "edit" (instruct-
        # pix2pix: edits an attached image) or "inpainting"
        "checkpoint_kinds": {info.name: _kind(info) for info in infos if _kind(info)},
        "default_checkpoint": default,
        "vaes": files.vaes,
        "loras": files.loras,
        "hypernetworks": files.hypernetworks,
        "embeddings": files.embeddings,
        "unreadable": [
            {"name": f.name, "kind": f.kind, "code": f.code, "reason": f.reason, "side": f.side}
            for f in files.unreadable
        ],
    }


def _kind(info: Any) -> str | None:
    if info.is_edit_model:
        return "edit"
    return "inpainting" if info.is_inpainting else None


def _listed(names: list[str]) -> str:
    return ", ".join(names) or "-"


def _unreadable_reply(ctx: CommandContext, data: dict[str, Any]) -> list[Reply]:
    """The skipped files, one line each in the user's language, and what is loaded."""
    skipped = data["unreadable"]
    if not skipped:
        return []
    lines = [
        ctx.app.translator.t(
            ctx.actor.locale,
            f"models.unreadable.{entry['code']}",
            name=entry["name"],
            kind=Msg(f"models.kind.{entry['kind']}"),
            reason=entry["reason"],
            side=entry["side"] or "",
        )
        for entry in skipped
    ]
    return [Reply("models.unreadable", {"count": len(skipped), "list": "\n".join(lines)})]


async def refresh_models(ctx: CommandContext) -> list[Reply]:
    """``/models refresh`` (moderators): rescan the folder after files were added or removed."""
    await asyncio.to_thread(ctx.app.library.refresh)
    data = await asyncio.to_thread(model_lists, ctx.app)
    counts = {kind: len(data[kind]) for kind in ("checkpoints", "vaes", "loras", "hypernetworks")}
    refreshed = Reply("models.refreshed", {**counts, "embeddings": len(data["embeddings"])}, data=data)
    return [refreshed, *_unreadable_reply(ctx, data)]


async def models(ctx: CommandContext) -> list[Reply]:
    """The checkpoints (short hash when known, the default marked, an edit or inpainting
    one named so) and the other model files, then the files that were skipped and why."""
    data = await asyncio.to_thread(model_lists, ctx.app)
    hashes, default, kinds = data["checkpoint_hashes"], data["default_checkpoint"], data["checkpoint_kinds"]
    translate = ctx.app.translator.t
    checkpoints = [
        (f"{name} [{hashes[name]}]" if name in hashes else name)
        + (" *" if name == default else "")
        + (translate(ctx.actor.locale, f"models.checkpoint.{kinds[name]}") if name in kinds else "")
        for name in data["checkpoints"]
    ]
    listing = Reply(
        "models.list",
        {
            "checkpoints": _listed(checkpoints),
            "default": default,
            "vaes": _listed(data["vaes"]),
            "loras": _listed(data["loras"]),
            "hypernetworks": _listed(data["hypernetworks"]),
            "embeddings": _listed(data["embeddings"]),
        },
        data=data,
    )
    replies = [listing, *_unreadable_reply(ctx, data)]
    folder = _models_dir(ctx.app)
    if folder is not None and not folder.is_dir():
        replies.append(Reply("models.folder_missing", {"path": str(folder)}))
    return replies

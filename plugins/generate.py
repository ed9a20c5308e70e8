"""The default plan and the basic result actions (reroll, and cancel while it runs).

Built in, but it uses only public hooks: with it disabled /draw still works (the core
falls back to the same one-job-per-batch plan) and results simply have no buttons.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bot.draw import options_from_request
from bot.hookspecs import hookimpl
from bot.service import default_plan
from bot.types import Action, Argument, Command, CommandContext, Reply


@hookimpl(trylast=True)
def plan_generation(request: Any, app: Any) -> Any:
    return default_plan(request)


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    return [Action(f"reroll:{record.id}", "action.reroll")]


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("reroll", reroll, "cmd.reroll", arguments=(Argument("id", "id", "arg.generation"),)))
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
    options = {**options_from_request(record.request), "seed": -1}
    return await ctx.app.service.draw(
        ctx.actor, record.request.prompt, options, ctx.invocation.reply_to, parent_id=record.id
    )


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
    so clients can autocomplete). Hashes are shown only when already computed: listing
    must not read gigabytes of checkpoints."""
    from pipeline.embeddings import embedding_files
    from pipeline.networks import NetworkLibrary
    from pipeline.vae import vae_names

    folder = _models_dir(app)
    infos = app.library.infos()
    networks = NetworkLibrary(folder)
    embeddings_dir = folder / "embeddings" if folder is not None else None
    embeddings = (
        embedding_files(embeddings_dir) if embeddings_dir is not None and embeddings_dir.is_dir() else []
    )
    default = app.settings.engine.default_checkpoint
    return {
        "checkpoints": [info.name for info in infos],
        "checkpoint_hashes": {info.name: info.sha256 for info in infos if info.sha256},
        "default_checkpoint": default,
        "vaes": list(vae_names(folder)),
        "loras": networks.lora_names(),
        "hypernetworks": networks.hypernetwork_names(),
        "embeddings": list(dict.fromkeys(path.stem for path in embeddings)),
    }


def _listed(names: list[str]) -> str:
    return ", ".join(names) or "-"


async def refresh_models(ctx: CommandContext) -> list[Reply]:
    """``/models refresh`` (moderators): rescan the folder after files were added or removed."""
    await asyncio.to_thread(ctx.app.library.refresh)
    data = await asyncio.to_thread(model_lists, ctx.app)
    counts = {kind: len(data[kind]) for kind in ("checkpoints", "vaes", "loras", "hypernetworks")}
    return [Reply("models.refreshed", {**counts, "embeddings": len(data["embeddings"])}, data=data)]


async def models(ctx: CommandContext) -> list[Reply]:
    """The checkpoints (short hash when known, the default marked) and the other model files."""
    data = await asyncio.to_thread(model_lists, ctx.app)
    hashes, default = data["checkpoint_hashes"], data["default_checkpoint"]
    checkpoints = [
        (f"{name} [{hashes[name]}]" if name in hashes else name) + (" *" if name == default else "")
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
    folder = _models_dir(ctx.app)
    if folder is not None and not folder.is_dir():
        return [listing, Reply("models.folder_missing", {"path": str(folder)})]
    return [listing]

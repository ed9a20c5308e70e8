"""The default plan and the basic result actions (reroll, and cancel while it runs).

Built in, but it uses only public hooks: with it disabled /draw still works (the core
falls back to the same one-job-per-batch plan) and results simply have no buttons.
"""

from __future__ import annotations

from typing import Any

from bot.draw import options_from_request
from bot.errors import NotFound, UserError
from bot.hookspecs import hookimpl
from bot.service import default_plan
from bot.types import Action, Command, CommandContext, Reply


@hookimpl(trylast=True)
def plan_generation(request: Any, app: Any) -> Any:
    return default_plan(request)


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    return [Action(f"reroll:{record.id}", "action.reroll")]


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("reroll", reroll, "help.reroll"))
    register(Command("samplers", samplers, "help.samplers"))


async def reroll(ctx: CommandContext) -> list[Reply]:
    """The same request with a new random seed, as a child of the original."""
    generation_id = ctx.text.strip()
    if not generation_id:
        raise UserError("error.missing_argument", name="reroll", what="ID")
    record = await ctx.app.store.get(generation_id)
    if record is None or (record.private and record.user.platform_user_id != ctx.actor.user_id):
        raise NotFound("error.not_found", id=generation_id)
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

"""The core: commands in, replies and job events out.

``handle(invocation)`` dispatches a command by its schema; ``draw(...)`` is the path of
DESIGN.md §2 (bot/drawing.py); the job lifecycle (bot/lifecycle.py) makes the service the
queue's ``JobListener``: every state change is stored first and then published, so what
users see is what is stored. Who may see or touch a generation is bot/access.py.
Plugins do not import this module: they use ``bot.api``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from bot.access import Audience, actor_of, is_owner, may_see, may_touch
from bot.commands import split_command
from bot.dispatch import run_command
from bot.drawing import Drawing, default_plan, new_id
from bot.errors import NotFound, UserError
from bot.help import help_command
from bot.identity import link_command, unlink_command
from bot.inputs import check_uploads
from bot.lifecycle import JobLifecycle
from bot.options import draw_options
from bot.queue_view import queue_command
from bot.schema import DRAW_OPTIONS
from bot.types import (
    Actor,
    Argument,
    Attachment,
    Command,
    CommandContext,
    FileInput,
    Invocation,
    Notice,
    Reply,
    Route,
)
from models.identity_store import IdentityStore
from models.records import GenerationRecord
from pipeline.errors import EngineError

if TYPE_CHECKING:
    from bot.app import App

__all__ = [
    "Service",
    "actor_of",
    "core_commands",
    "default_plan",
    "is_owner",
    "may_see",
    "may_touch",
    "new_id",
]

log = logging.getLogger(__name__)


class Service(Drawing, JobLifecycle):
    """One App's core: dispatch here, the /draw path in ``Drawing`` (bot/drawing.py), the
    queue's side in ``JobLifecycle`` (bot/lifecycle.py), access rules in bot/access.py."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.options = draw_options()

    # commands ---------------------------------------------------------------------------------

    async def handle(self, invocation: Invocation) -> list[Reply]:
        """Run one command; errors become replies (translated by the adapter)."""
        try:
            invocation = await self._with_person(self._with_roles(invocation))
            command = self.app.commands.get(invocation.command)
            if command is None:
                visible = sorted(c.name for c in self.app.commands.items.values() if not c.hidden)
                raise UserError(
                    "error.unknown_command",
                    name=invocation.command,
                    allowed=", ".join("/" + n for n in visible),
                )
            check_uploads(invocation.attachments, self.app.settings.limits.max_upload_bytes)
            result = await run_command(self.app, command, invocation)
        except UserError as exc:
            return [Reply(exc.key, exc.params, error=True)]
        except Exception as exc:
            return [self.error_reply(exc, invocation.actor)]
        if result is None:
            return []
        return result if isinstance(result, list) else [result]

    def _with_roles(self, invocation: Invocation) -> Invocation:
        """Add the roles plugins grant (``actor_roles``) before anything looks at the actor."""
        actor = invocation.actor
        extra: set[str] = set()
        for found in self.app.pm.hook.actor_roles(actor=actor, app=self.app):
            extra.update(found or ())
        if extra <= actor.roles:
            return invocation
        return replace(invocation, actor=replace(actor, roles=actor.roles | frozenset(extra)))

    async def _with_person(self, invocation: Invocation) -> Invocation:
        """Name the person a linked identity is one with (``/link``), so that everything
        keyed by ``actor.key`` is theirs together."""
        actor = invocation.actor
        if not self.app.started:  # no store to ask yet (an App built for /help alone)
            return invocation
        person = await IdentityStore(self.app.store).person_of(actor.identity)
        if person == actor.person:
            return invocation
        return replace(invocation, actor=replace(actor, person=person))

    async def handle_line(
        self,
        line: str,
        actor: Actor,
        route: Route | None = None,
        attachments: tuple[Attachment, ...] = (),
    ) -> list[Reply]:
        """A command typed as text (console, Telegram): "/draw a cat --steps 4"."""
        split = split_command(line)
        if split is None:
            split = ("draw", line)
        name, text = split
        return await self.handle(Invocation(name, text, actor, route, attachments))

    async def run_action(self, action_id: str, actor: Actor, route: Route | None = None) -> list[Reply]:
        """A button press: ``<command>:<argument>`` runs that command with the argument."""
        name, _, argument = action_id.partition(":")
        return await self.handle(Invocation(name, argument, actor, route))

    def post(self, record: GenerationRecord, reply: Reply) -> None:
        """Tell a job's user something later (a plugin's finished grid, a stopped run),
        where the job answers: the delivery layer replies to the job's message."""
        audience = Audience.of(record, self.app.settings.bot.locale)
        self.app.bus.publish(
            Notice(record.id, audience.actor, audience.route, audience.thread_key, reply=reply)
        )

    def error_reply(self, exc: BaseException, actor: Actor) -> Reply:
        if isinstance(exc, UserError):
            return Reply(exc.key, exc.params, error=True)
        if isinstance(exc, EngineError):
            return Reply(exc.key, exc.params, error=True)
        if isinstance(exc, ValueError) and _raised_in_pipeline(exc):
            # the engine refused a value no check caught before: say what, in the user's words
            log.warning("engine refused a request: %s", exc, exc_info=exc)
            return Reply("error.invalid_request", {"detail": str(exc)}, error=True)
        custom = self.app.pm.hook.handle_error(exception=exc, actor=actor, app=self.app)
        if custom is not None:
            return custom
        ref = new_id()[-8:]
        log.error("unexpected error (ref %s)", ref, exc_info=exc)
        return Reply("error.internal", {"ref": ref}, error=True)

    async def visible(self, generation_id: str, actor: Actor) -> GenerationRecord:
        """The generation, or NotFound when it does not exist or is someone else's private
        one (the same answer, so a private id cannot be told from a missing one)."""
        record = await self.app.store.get(generation_id) if generation_id else None
        if record is None or not may_see(record, actor):
            raise NotFound("error.not_found", id=generation_id)
        return record


def _raised_in_pipeline(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is in the engine package (``pipeline``)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("pipeline.")


async def cancel_command(ctx: CommandContext) -> Reply:
    return await ctx.app.service.cancel(ctx.text.strip(), ctx.actor)


async def delete_command(ctx: CommandContext) -> Reply:
    return await ctx.app.service.delete(ctx.text.strip(), ctx.actor)


def core_commands(service: Service) -> list[Command]:
    """/draw, /cancel, /queue, /delete and /help: the commands that work with every plugin disabled."""
    return [
        Command(
            "draw",
            service.draw_command,
            "cmd.draw",
            arguments=(Argument("prompt", "text", "arg.prompt", required=False),),
            options=DRAW_OPTIONS,
            attachment=FileInput("file.draw"),
        ),
        Command("cancel", cancel_command, "cmd.cancel", arguments=(Argument("id", "id", "arg.generation"),)),
        queue_command(),
        Command(
            "link",
            link_command,
            "cmd.link",
            arguments=(Argument("code", "text", "arg.link_code", required=False),),
        ),
        Command("unlink", unlink_command, "cmd.unlink"),
        Command("delete", delete_command, "cmd.delete", arguments=(Argument("id", "id", "arg.generation"),)),
        Command(
            "help",
            help_command,
            "cmd.help",
            arguments=(Argument("command", "text", "arg.command", required=False, autocomplete="commands"),),
        ),
    ]

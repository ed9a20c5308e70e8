"""The core: commands in, replies and job events out.

``handle(invocation)`` dispatches a command; ``draw(...)`` is the path of DESIGN.md §2
(draft -> modify_request -> freeze -> check_request -> plan_generation -> store ->
queue). The service is also the queue's ``JobListener``: it records every state change
in the store first and then publishes the event, so what users see is what is stored.

Jobs are held by this App (``App.owner``) under a lease (bot/leases.py): stored with it,
claimed and ended only while this App still holds them. ``recover`` takes over the jobs
of processes that are gone and routes their events as stored on the row (the job's user
and ``route``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ulid import ULID

from bot.commands import parse_args, split_command
from bot.dispatch import run_command
from bot.draw import freeze, new_draft
from bot.errors import NotFound, PermissionDenied, UserError
from bot.governance import scope_of
from bot.help import help_command
from bot.inputs import check_uploads, store_input_image
from bot.leases import owner_gone
from bot.options import draw_options
from bot.plugins import maybe_await
from bot.reruns import draw_line, options_from_infotext, split_infotext
from bot.result_files import discard_staged, put_in_place, stage_images
from bot.schema import DRAW_OPTIONS
from bot.types import (
    Action,
    Actor,
    Admission,
    Argument,
    Attachment,
    Cancelled,
    Command,
    CommandContext,
    Deleted,
    Denial,
    DrawRequest,
    Failed,
    FileInput,
    Finished,
    ImageOut,
    Invocation,
    MessageRef,
    Notice,
    Plan,
    PlannedJob,
    Progress,
    Queued,
    Reply,
    Route,
    Started,
)
from models.base import utcnow
from models.delivery_store import DeliveryStore
from models.moderation_store import ModerationStore
from models.records import GenerationRecord
from models.store import Lease, NewJob
from pipeline.errors import EngineError
from pipeline.queue import Job
from pipeline.request import GenerationResult

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)


def new_id() -> str:
    return str(ULID())


def default_plan(request: DrawRequest) -> Plan:
    """One job per batch; A1111's seeds: batch k starts at seed + k*batch (subseed likewise)."""
    base = request.generation
    size = base.num_images_per_prompt
    jobs = []
    for k in range(request.count):
        seed = base.seed if base.subseed_strength else base.seed + k * size
        jobs.append(PlannedJob(base.replace(seed=seed, subseed=base.subseed + k * size)))
    return Plan(tuple(jobs))


@dataclass(frozen=True)
class Audience:
    """Who to tell about a job, and where: what its events carry."""

    actor: Actor
    route: Route
    thread_key: str | None = None

    @classmethod
    def of(cls, record: GenerationRecord, default_locale: str) -> Audience:
        return cls(actor_of(record, default_locale), Route.from_json(record.route), record.thread_key)


class Service:
    def __init__(self, app: App) -> None:
        self.app = app
        self.options = draw_options()
        self._routes: dict[str, Audience] = {}  # job id -> who to tell

    # commands ---------------------------------------------------------------------------------

    async def handle(self, invocation: Invocation) -> list[Reply]:
        """Run one command; errors become replies (translated by the adapter)."""
        try:
            invocation = self._with_roles(invocation)
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

    # the /draw path ----------------------------------------------------------------------------

    async def draw_command(self, ctx: CommandContext) -> list[Reply]:
        text = ctx.text
        pasted = split_infotext(text) if "\n" in text.strip() else None
        if pasted is not None:
            # a pasted A1111 infotext: its fields become options, then the normal checks apply
            body, overrides = pasted
            with_model = not any(
                name in ("checkpoint", "model", "ckpt") for name, _ in parse_args(overrides).options
            )
            prompt, fields = options_from_infotext(body, self.app.library, with_model=with_model)
            text = draw_line(prompt, fields).removeprefix("/draw ") + " " + overrides
        parsed = parse_args(text)
        options = self.options.convert(parsed, self.app.settings.limits)
        if ctx.invocation.attachments:
            stored = await asyncio.to_thread(
                store_input_image,
                ctx.invocation.attachments[0],
                self.app.images_dir / "inputs",
                self.app.settings.limits,
            )
            options["init-image"] = stored.path
            options.setdefault("size", stored.size)  # the upload's own, in multiples of 8
        return await self.draw(ctx.actor, parsed.text, options, ctx.invocation.route)

    async def draw(
        self,
        actor: Actor,
        prompt: str,
        options: dict[str, Any],
        route: Route,
        *,
        parent_id: str | None = None,
        thread_key: str | None = None,
        forever_run: str | None = None,
    ) -> list[Reply]:
        """The /draw path for ``actor``; its jobs answer at ``route``. ``thread_key`` puts
        them in a chain's thread (variations), ``forever_run`` in a forever run."""
        app = self.app
        draft = new_draft(prompt, options, app.settings, parent_id)
        app.pm.hook.modify_request(draft=draft, actor=actor, app=app)
        request = freeze(draft, actor, app.settings, app.library)
        checked = await self._check(request)
        if isinstance(checked, Denial):
            return [Reply(checked.key, checked.params, error=True)]
        plan = app.pm.hook.plan_generation(request=request, app=app) or default_plan(request)
        priority = min((a.priority for a in checked), default=0)
        max_running = min((a.max_running for a in checked if a.max_running), default=None)
        spoiler = any(a.spoiler for a in checked)
        try:
            ids = await self.submit(
                plan,
                request,
                route,
                priority=priority,
                max_running=max_running,
                spoiler=spoiler,
                thread_key=thread_key,
                forever_run=forever_run,
            )
        except Exception:
            for impl in app.pm.hook.request_dropped.get_hookimpls():
                try:
                    await maybe_await(impl.function(request=request, app=app))
                except Exception:
                    log.exception("request_dropped of plugin %s failed", impl.plugin_name)
            raise
        accepted = Reply("draw.accepted", {"count": len(ids), "ids": ", ".join(ids)}, data={"jobs": ids})
        return [accepted, *(Reply(a.key, a.params) for a in checked if a.key)]

    async def _check(self, request: DrawRequest) -> Denial | list[Admission]:
        """``check_request`` in call order; after the first Denial nothing more is awaited,
        so a trylast check that reserves (quotas) only runs when all others admitted."""
        app = self.app
        results = list(app.pm.hook.check_request(request=request, actor=request.actor, app=app))
        admissions: list[Admission] = []
        try:
            while results:
                result = await maybe_await(results.pop(0))
                if isinstance(result, Denial):
                    return result
                if isinstance(result, Admission):
                    admissions.append(result)
        finally:
            for rest in results:
                if inspect.iscoroutine(rest):
                    rest.close()
        return admissions

    async def submit(
        self,
        plan: Plan,
        request: DrawRequest,
        route: Route,
        *,
        priority: int = 0,
        max_running: int | None = None,
        spoiler: bool = False,
        thread_key: str | None = None,
        forever_run: str | None = None,
    ) -> list[str]:
        """Store every job (one transaction), then queue them; a job is a row before it runs."""
        actor = request.actor
        user = await self.app.store.ensure_user(actor.platform, actor.user_id, actor.name, actor.locale)
        group = new_id()
        jobs = [
            NewJob(
                id=new_id(),
                request=planned.request,
                group_id=group,
                group_index=index,
                kind=planned.kind,
                plan=plan.kind,
                label=planned.label,
                parent_id=request.parent_id,
                private=bool(request.options.get("private")),  # the history plugin's --private
                priority=priority,
                spoiler=spoiler,
                thread_key=thread_key,
                forever_run=forever_run,
            )
            for index, planned in enumerate(plan.jobs)
        ]
        await self.app.store.add_jobs(
            user.id,
            jobs,
            chat_id=actor.chat_id,
            guild_id=actor.guild_id,
            route=route.to_json(),
            roles=sorted(actor.roles),
            lease=self.lease(),
        )
        audience = Audience(actor, route, thread_key)
        for job in jobs:
            self._enqueue(Job(job.id, actor.key, job.request, job.priority, max_running), audience)
        return [job.id for job in jobs]

    def _enqueue(self, job: Job, audience: Audience) -> None:
        self._routes[job.id] = audience
        position = self.app.queue.put(job)
        self.app.bus.publish(Queued(job.id, *_fields(audience), position=position))

    def lease(self) -> Lease:
        """This App's hold on a job from now: renewed by the heartbeat while it lives."""
        seconds = self.app.settings.queue.lease_seconds
        return Lease(self.app.owner, utcnow() + timedelta(seconds=seconds))

    async def renew_leases(self) -> int:
        return await self.app.store.renew(self.lease())

    async def recover(self) -> int:
        """Take over and queue the open jobs of processes that are gone (their lease ran out,
        or they exited on this machine); a job interrupted while running counts an attempt,
        and one interrupted ``max_attempts`` times fails. Returns how many were queued."""
        count = 0
        max_attempts = self.app.settings.queue.max_attempts
        owner = self.app.owner
        for record in await self.app.store.adopt(self.lease(), gone=owner_gone):
            if record.id in self._routes:  # already in this App's queue
                continue
            audience = Audience.of(record, self.app.settings.bot.locale)
            if record.status == "running":
                if record.attempts >= max_attempts:
                    await self._fail(
                        record.id, audience, UserError("error.interrupted", attempts=record.attempts)
                    )
                    continue
                if not await self.app.store.requeue_interrupted(record.id, owner):
                    continue
            self._enqueue(Job(record.id, audience.actor.key, record.request, record.priority), audience)
            count += 1
        return count

    async def visible(self, generation_id: str, actor: Actor) -> GenerationRecord:
        """The generation, or NotFound when it does not exist or is someone else's private
        one (the same answer, so a private id cannot be told from a missing one)."""
        record = await self.app.store.get(generation_id) if generation_id else None
        if record is None or not may_see(record, actor):
            raise NotFound("error.not_found", id=generation_id)
        return record

    async def cancel(self, generation_id: str, actor: Actor) -> Reply:
        record = await self.app.store.get(generation_id)
        if record is None or not _may_touch(record, actor):
            raise NotFound("error.not_found", id=generation_id)
        outcome = self.app.queue.cancel(generation_id)
        if outcome == "running":
            return Reply("cancel.done", {"id": generation_id})
        if await self.app.store.mark_cancelled(generation_id):
            audience = self._routes.pop(generation_id, None) or Audience.of(record, actor.locale)
            self.app.bus.publish(Cancelled(generation_id, *_fields(audience)))
            await self._ended(generation_id)
            return Reply("cancel.done", {"id": generation_id})
        return Reply("cancel.too_late", {"id": generation_id, "status": record.status}, error=True)

    async def delete(self, generation_id: str, actor: Actor) -> Reply:
        """Delete an ended generation, its image rows and files: its owner's or a
        moderator's to do. Anyone else is refused as at a moderator command, and the
        attempt audited; a moderator deleting someone else's result is audited too. A
        ``Deleted`` event then tells the job's conversation, so the adapter removes (or
        edits) the message that showed it."""
        record = await self.visible(generation_id.strip(), actor)
        owner = is_owner(record, actor)
        if not owner and not actor.is_moderator:
            await self._audit_delete(actor, record, allowed=False)
            raise PermissionDenied("error.moderators_only", command="delete")
        if record.status in ("queued", "running"):
            raise UserError("moderation.delete_open", id=record.id, status=record.status)
        stored = await DeliveryStore(self.app.store).message(record.id)  # gone with the row
        paths = await self.app.store.delete(record.id)
        if paths is None:
            raise UserError("moderation.delete_open", id=record.id, status=record.status)
        await asyncio.to_thread(_remove_files, self.app.images_dir, paths)
        if not owner:
            await self._audit_delete(actor, record, allowed=True)
        audience = Audience.of(record, actor.locale)
        message = MessageRef.from_json(stored) if stored else None
        self.app.bus.publish(
            Deleted(record.id, replace(audience.actor, locale=actor.locale), audience.route,
                    audience.thread_key, message=message)
        )  # fmt: skip
        return Reply("moderation.deleted", {"id": record.id})

    async def _audit_delete(self, actor: Actor, record: GenerationRecord, *, allowed: bool) -> None:
        detail: dict[str, Any] = {"command": f"/delete {record.id}"}
        if allowed:
            detail.update(owner=f"{record.user.platform}:{record.user.platform_user_id}")
            detail.update(prompt=record.request.prompt[:200])
        await ModerationStore(self.app.store).audit(
            actor.key, "delete", scope=scope_of(actor), allowed=allowed, target=record.id, detail=detail
        )

    # JobListener ------------------------------------------------------------------------------

    async def job_started(self, job: Job) -> bool:
        if not await self.app.store.mark_running(job.id, self.lease()):
            self._routes.pop(job.id, None)
            return False
        self.app.bus.publish(Started(job.id, *_fields(self._routes[job.id])))
        return True

    def job_progress(self, job: Job, step: int, total: int, preview: bytes | None = None) -> None:
        """``preview``: PNG bytes of a small preview of the image so far, when the engine
        makes them; the delivery layer shows it with the step."""
        audience = self._routes.get(job.id)
        if audience is not None:
            self.app.bus.publish(
                Progress(job.id, *_fields(audience), step=step, total=total, preview=preview)
            )

    async def job_finished(self, job: Job, result: GenerationResult) -> None:
        audience = self._routes[job.id]
        images = await asyncio.to_thread(stage_images, self.app.images_dir, job.id, result)

        async def keep() -> None:
            await asyncio.to_thread(put_in_place, images)

        try:
            stored = await self.app.store.finish(
                job.id,
                [image.record for image in images],
                owner=self.app.owner,
                model_hash=result.model_hash,
                device_seconds=result.device_seconds,
                keep=keep,
            )
        finally:
            await asyncio.to_thread(discard_staged, images)
        self._routes.pop(job.id, None)
        if not stored:  # cancelled, failed or taken over meanwhile: the row says how it ended
            return
        record = await self.app.store.get(job.id)
        assert record is not None
        actions = self.result_actions(record, audience.actor)
        out = tuple(
            ImageOut(i.record.id, i.record.seed, i.record.width, i.record.height, i.record.infotext)
            for i in images
        )
        self.app.bus.publish(
            Finished(job.id, *_fields(audience), images=out, actions=tuple(actions), spoiler=record.spoiler)
        )
        await self._notify("generation_finished", record)

    def result_actions(self, record: GenerationRecord, actor: Actor) -> list[Action]:
        """The buttons plugins offer on a finished job (``result_actions``), in hook order;
        the same for a fresh result and for one shown again later (/show)."""
        actions: list[Action] = []
        for found in self.app.pm.hook.result_actions(record=record, actor=actor, app=self.app):
            actions.extend(found or [])
        # the core's own, last: who may press it is checked on the press (owner or moderator)
        actions.append(Action(f"delete:{record.id}", "action.delete"))
        return actions

    async def _ended(self, generation_id: str) -> None:
        """A job failed or was cancelled (its status is stored): tell ``generation_ended``."""
        record = await self.app.store.get(generation_id)
        if record is not None:
            await self._notify("generation_ended", record)

    async def _notify(self, hook_name: str, record: GenerationRecord) -> None:
        """Call a per-job hook plugin by plugin: one plugin's error never stops the others."""
        for impl in getattr(self.app.pm.hook, hook_name).get_hookimpls():
            try:
                result = impl.function(record=record, app=self.app)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s of plugin %s failed", hook_name, impl.plugin_name)

    async def job_failed(self, job: Job, error: BaseException) -> None:
        await self._fail(job.id, self._routes.pop(job.id), error)

    async def job_stopped(self, job: Job) -> None:
        audience = self._routes.pop(job.id)
        if job.stop_reason == "shutdown":
            await self.app.store.requeue_interrupted(job.id, self.app.owner)
            return
        if await self.app.store.mark_cancelled(job.id):
            self.app.bus.publish(Cancelled(job.id, *_fields(audience)))
            await self._ended(job.id)

    async def _fail(self, generation_id: str, audience: Audience, error: BaseException) -> None:
        """Fail a job this App holds (a process that lost it leaves it to the new holder)."""
        reply = self.error_reply(error, audience.actor)
        message = self.app.translator.t("en", reply.key, **reply.params)
        if await self.app.store.mark_failed(generation_id, reply.key, message, owner=self.app.owner):
            self.app.bus.publish(
                Failed(generation_id, *_fields(audience), key=reply.key, params=reply.params)
            )
            await self._ended(generation_id)


def _fields(audience: Audience) -> tuple[Actor, Route, str | None]:
    """A JobEvent's leading fields after its id."""
    return (audience.actor, audience.route, audience.thread_key)


def actor_of(record: GenerationRecord, default_locale: str) -> Actor:
    """Rebuild who asked from a stored job (restart recovery, cancels from other processes)."""
    user = record.user
    return Actor(
        platform=user.platform,
        user_id=user.platform_user_id,
        name=user.display_name,
        locale=user.locale or default_locale,
        chat_id=record.chat_id,
        guild_id=record.guild_id,
        roles=frozenset(record.actor_roles),
    )


def _raised_in_pipeline(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is in the engine package (``pipeline``)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("pipeline.")


def is_owner(record: GenerationRecord, actor: Actor) -> bool:
    return (record.user.platform, record.user.platform_user_id) == (actor.platform, actor.user_id)


def may_see(record: GenerationRecord, actor: Actor) -> bool:
    """Public results are the community's; private ones their owner's and moderators'."""
    return not record.private or actor.is_moderator or is_owner(record, actor)


def _may_touch(record: GenerationRecord, actor: Actor) -> bool:
    return is_owner(record, actor) or actor.is_moderator


def _remove_files(root: Path, paths: list[str]) -> None:
    for relative in paths:
        (root / relative).unlink(missing_ok=True)


async def cancel_command(ctx: CommandContext) -> Reply:
    return await ctx.app.service.cancel(ctx.text.strip(), ctx.actor)


async def delete_command(ctx: CommandContext) -> Reply:
    return await ctx.app.service.delete(ctx.text.strip(), ctx.actor)


def core_commands(service: Service) -> list[Command]:
    """/draw, /cancel, /delete and /help: the commands that work with every plugin disabled."""
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
        Command("delete", delete_command, "cmd.delete", arguments=(Argument("id", "id", "arg.generation"),)),
        Command(
            "help",
            help_command,
            "cmd.help",
            arguments=(Argument("command", "text", "arg.command", required=False, autocomplete="commands"),),
        ),
    ]

"""The /draw path (DESIGN.md §2): draft -> modify_request -> freeze -> check_request ->
plan_generation -> store -> queue. ``Drawing`` is a part of ``bot.service.Service``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ulid import ULID

from bot.access import Audience
from bot.commands import parse_args
from bot.draw import freeze, freezes_from_memory, new_draft, options_from_request
from bot.help import missing_argument
from bot.inputs import store_input_image
from bot.plugins import maybe_await
from bot.reruns import options_from_infotext, split_infotext, unknown_hash_note
from bot.types import (
    Actor,
    Admission,
    CommandContext,
    Denial,
    DrawRequest,
    Plan,
    PlannedJob,
    Reply,
    RequestDraft,
    Route,
)
from models.store import NewJob
from pipeline.queue import Job

if TYPE_CHECKING:
    from bot.app import App
    from bot.options import OptionTable
    from models.records import GenerationRecord

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


_PLANNED = "drawing.plan"  # DrawRequest.options: the request's plan, made once


def plan_of(request: DrawRequest, app: Any) -> Plan:
    """The jobs ``request`` makes (``plan_generation``, else ``default_plan``), planned
    once per request: the checks that price it (quotas) and the store see the same plan."""
    if _PLANNED not in request.options:
        request.options[_PLANNED] = app.pm.hook.plan_generation(request=request, app=app) or default_plan(
            request
        )
    return request.options[_PLANNED]


class Drawing:
    """The /draw path of the service; its jobs are queued by the service's job lifecycle."""

    app: App
    options: OptionTable

    async def draw_command(self, ctx: CommandContext) -> list[Reply]:
        limits = self.app.settings.limits
        notes: list[Reply] = []
        pasted = split_infotext(ctx.text) if "\n" in ctx.text.strip() else None
        if pasted is None:
            parsed = parse_args(ctx.text)
            if not parsed.text.strip() and not parsed.options and not ctx.invocation.attachments:
                raise missing_argument(ctx)  # a bare /draw: its usage, never an empty-prompt job
            prompt, options = parsed.text, self.options.convert(parsed, limits)
        else:
            # a pasted A1111 infotext: its fields are the options (checked as typed ones are),
            # and options typed after it win over them
            body, overrides = pasted
            typed = parse_args(overrides)
            with_model = not any(name in ("checkpoint", "model", "ckpt") for name, _ in typed.options)
            # model names and hashes are looked up in the models folder: off the event loop
            prompt, fields = await asyncio.to_thread(
                options_from_infotext, body, self.app.library, with_model=with_model
            )
            note = await asyncio.to_thread(
                unknown_hash_note, body, self.app.library, fields.get("checkpoint")
            )
            notes += [note] if note is not None else []
            options = {**self.options.check(fields, limits), **self.options.convert(typed, limits)}
            prompt = " ".join(part for part in (prompt, typed.text.strip()) if part)
        if ctx.invocation.attachments:
            stored = await asyncio.to_thread(
                store_input_image,
                ctx.invocation.attachments[0],
                self.app.images_dir / "inputs",
                self.app.settings.limits,
            )
            options["init-image"] = stored.path
            options.setdefault("size", stored.size)  # the upload's own, in multiples of 8
        replies = await self.draw(ctx.actor, prompt, options, ctx.invocation.route)
        return replies + notes if replies and not replies[0].error else replies

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
        request = await self._freeze(draft, actor)
        return await self._queue_request(request, route, thread_key=thread_key, forever_run=forever_run)

    async def redraw(
        self,
        record: GenerationRecord,
        changes: dict[str, Any],
        actor: Actor,
        route: Route,
        *,
        parent_id: str | None = None,
        thread_key: str | None = None,
        forever_run: str | None = None,
        prompt: str | None = None,
    ) -> list[Reply]:
        """A child of ``record`` (reroll, variation, refine, forever, remix): its stored,
        effective request with only ``changes`` (/draw option values) applied, and
        ``prompt`` instead of the stored one when given (a remix). ``modify_request`` is
        not called again: the stored prompts already hold the styles and presets that
        applied then, and today's defaults must not change what the user asked for."""
        stored = record.request
        options = {**options_from_request(stored), **changes}
        negative = options.pop("negative")
        draft = RequestDraft(
            prompt=stored.prompt if prompt is None else prompt,
            negative_prompt=negative,
            options=options,
            parent_id=record.id if parent_id is None else parent_id,
            styles=list(stored.styles),
            negative_presets=list(stored.negative_presets),
        )
        request = await self._freeze(draft, actor)
        if stored.extra:
            request = replace(request, generation=request.generation.replace(extra=dict(stored.extra)))
        return await self._queue_request(request, route, thread_key=thread_key, forever_run=forever_run)

    async def _freeze(self, draft: RequestDraft, actor: Actor) -> DrawRequest:
        """``freeze`` the draft: names that resolve against the models folder (scans,
        hashes, a load holding the library) do it off the event loop; a draft the library
        answers from memory is frozen here, sparing the thread's round trip."""
        app = self.app
        if freezes_from_memory(draft, app.library):
            return freeze(draft, actor, app.settings, app.library)
        return await asyncio.to_thread(freeze, draft, actor, app.settings, app.library)

    async def _queue_request(
        self, request: DrawRequest, route: Route, *, thread_key: str | None, forever_run: str | None
    ) -> list[Reply]:
        """check_request, plan_generation, store and queue a frozen request. The checks
        (and what they reserve) and the stored jobs are one transaction; the jobs are
        queued once it is committed."""
        app = self.app
        admitted = False
        try:
            async with app.store.transaction():
                checked = await self._check(request)
                if isinstance(checked, Denial):
                    return [Reply(checked.key, checked.params, error=True)]
                admitted = True
                plan = plan_of(request, app)
                max_running = min((a.max_running for a in checked if a.max_running), default=None)
                jobs = await self._store(
                    plan,
                    request,
                    route,
                    priority=min((a.priority for a in checked), default=0),
                    spoiler=any(a.spoiler for a in checked),
                    thread_key=thread_key,
                    forever_run=forever_run,
                )
        except Exception:
            if admitted:
                await self._drop(request)
            raise
        ids = await self._enqueue_all(jobs, request, route, thread_key, max_running)
        accepted = Reply("draw.accepted", {"count": len(ids), "ids": ", ".join(ids)}, data={"jobs": ids})
        return [accepted, *(Reply(a.key, a.params) for a in checked if a.key)]

    async def _drop(self, request: DrawRequest) -> None:
        """``request_dropped``, plugin by plugin: one plugin's error never stops the others."""
        for impl in self.app.pm.hook.request_dropped.get_hookimpls():
            try:
                await maybe_await(impl.function(request=request, app=self.app))
            except Exception:
                log.exception("request_dropped of plugin %s failed", impl.plugin_name)

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
        async with self.app.store.transaction():
            jobs = await self._store(
                plan,
                request,
                route,
                priority=priority,
                spoiler=spoiler,
                thread_key=thread_key,
                forever_run=forever_run,
            )
        return await self._enqueue_all(jobs, request, route, thread_key, max_running)

    async def _store(
        self,
        plan: Plan,
        request: DrawRequest,
        route: Route,
        *,
        priority: int,
        spoiler: bool,
        thread_key: str | None,
        forever_run: str | None,
    ) -> list[NewJob]:
        """The plan's jobs as rows of the actor's user, held by this App."""
        actor = request.actor
        platform, _, user_id = actor.key.partition(":")  # a linked identity's jobs are its person's
        name = actor.name if actor.person is None else ""  # the person keeps their own name
        user = await self.app.store.ensure_user(platform, user_id, name, actor.locale)
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
            # a shared queue holds them until a worker does; else this process does
            lease=self.lease() if getattr(self.app.queue, "holds_jobs", True) else None,
        )
        return jobs

    async def _enqueue_all(
        self,
        jobs: list[NewJob],
        request: DrawRequest,
        route: Route,
        thread_key: str | None,
        max_running: int | None,
    ) -> list[str]:
        actor = request.actor
        audience = Audience(actor, route, thread_key)
        for job in jobs:
            await self._enqueue(Job(job.id, actor.key, job.request, job.priority, max_running), audience)
        return [job.id for job in jobs]

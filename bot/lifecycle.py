"""A job's life after it is stored: queued under this App's lease, started, progress,
finished, failed, stopped or cancelled; recovered from processes that are gone. Each state
change is stored first and then published on the bus, so what users see is what is stored.
``JobLifecycle`` is a part of ``bot.service.Service`` and is the queue's ``JobListener``.

Jobs are held by this App (``App.owner``) under a lease (bot/leases.py): stored with it,
claimed and ended only while this App still holds them. ``recover`` takes over the jobs
of processes that are gone.

Whom a job's events go to (its ``Audience``: the job's user, ``route`` and thread key) is
read from its row when the job is claimed (``job_started``) and carried on the queue's
``Job`` as its ``context``, so progress needs no database read and nothing about a job
is kept in this App's memory: a job stored and queued by one process is run and answered
by another just the same.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.access import Audience, is_owner, may_touch
from bot.errors import ImageStoreError, NotFound, PermissionDenied, UserError
from bot.governance import scope_of
from bot.leases import owner_gone
from bot.replay import stored_params
from bot.result_files import PendingImages
from bot.types import (
    Action,
    Actor,
    Cancelled,
    Deleted,
    Failed,
    Finished,
    ImageOut,
    MessageRef,
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
from models.shared_files import SharedFiles
from models.store import Finishing, Lease
from pipeline.queue import Job
from pipeline.request import GenerationResult

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)


class JobLifecycle:
    """Jobs from the queue's point of view; whom a job answers comes from its row."""

    app: App

    async def _enqueue(self, job: Job, audience: Audience) -> None:
        """Queue a stored job; ``audience`` is only whom the ``Queued`` event tells."""
        if job.request.init_image and not getattr(self.app.queue, "holds_jobs", True):
            await self._share_input(job.request.init_image)
        position = await self.app.queue.put(job)
        self.app.bus.publish(Queued(job.id, *_fields(audience), position=position))

    async def _share_input(self, path: str) -> None:
        """An init image read by a worker on another host: kept in the database by name."""
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
        except OSError:
            return  # the worker reports it cannot be read
        await SharedFiles(self.app.store).put_input(Path(path).name, data)

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
        holds = getattr(self.app.queue, "holds_jobs", True)
        for record in await self.app.store.adopt(self.lease(), gone=owner_gone, unowned=holds):
            if holds and await self.app.queue.position(record.id) is not None:  # already in this App's queue
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
            if not holds:  # back to the shared queue, for any worker; the gone one's entry is dropped
                if not await self.app.store.release_job(record.id, owner):
                    continue
                await self.app.queue.abandon(record.id)
            await self._enqueue(self.job_of(record), audience)
            count += 1
        if not holds:
            count += await self._reoffer()
        return count

    async def _reoffer(self) -> int:
        """Shared queue: defer again the stored jobs nobody holds and no procrastinate job
        carries (a process stopped between storing and deferring them, or a worker's run
        failed before it held them). Only rows older than a lease: newer ones are being
        deferred right now."""
        since = utcnow() - timedelta(seconds=self.app.settings.queue.lease_seconds)
        waiting = {r.id: r for r in await self.app.store.unowned_queued(before=since)}
        missing = await self.app.queue.missing(list(waiting))
        for job_id in missing:
            await self.app.queue.put(self.job_of(waiting[job_id]))
        if missing:
            log.info("offered %d stored job(s) to the shared queue again", len(missing))
        return len(missing)

    def job_of(self, record: GenerationRecord) -> Job:
        """A stored job as the queue takes it (fairness by the person who asked)."""
        audience = Audience.of(record, self.app.settings.bot.locale)
        return Job(record.id, audience.actor.key, record.request, record.priority)

    async def cancel(self, generation_id: str, actor: Actor) -> Reply:
        record = await self.app.store.get(generation_id)
        if record is None or not may_touch(record, actor):
            raise NotFound("error.not_found", id=generation_id)
        outcome = await self.app.queue.cancel(generation_id)
        if outcome == "running" and getattr(self.app.queue, "holds_jobs", True):
            return Reply("cancel.done", {"id": generation_id})  # it stops here, at its next step
        # a worker elsewhere stops it when the word reaches it; the row says now that it is
        # cancelled, so whatever that worker finishes meanwhile is not stored
        if await self.app.store.mark_cancelled(generation_id):
            audience = Audience.of(record, actor.locale)
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
        await self.app.images.remove(paths)
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
        """Claim the job; whom its events tell is read from the claimed row and kept on the job."""
        return (await self.jobs_started([job]))[0]

    async def jobs_started(self, jobs: list[Job]) -> list[bool]:
        """Claim a micro-batch's jobs in one transaction, then announce each one claimed,
        in order; whether each was claimed."""
        claimed = await self.app.store.mark_running_many([job.id for job in jobs], self.lease())
        for job in jobs:
            record = claimed.get(job.id)
            if record is not None:
                job.context = audience = Audience.of(record, self.app.settings.bot.locale)
                self.app.bus.publish(Started(job.id, *_fields(audience)))
        return [job.id in claimed for job in jobs]

    def job_progress(self, job: Job, step: int, total: int, preview: bytes | None = None) -> None:
        """``preview``: PNG bytes of a small preview of the image so far, when the engine
        makes them; the delivery layer shows it with the step."""
        audience = job.context
        if isinstance(audience, Audience):
            self.app.bus.publish(
                Progress(job.id, *_fields(audience), step=step, total=total, preview=preview)
            )

    async def job_finished(self, job: Job, result: GenerationResult) -> None:
        await self.jobs_finished([(job, result)])

    async def jobs_finished(self, finished: list[tuple[Job, GenerationResult]]) -> None:
        """End finished jobs of one device, in order: their images made ready together,
        their rows stored in one transaction (``Store.finish_many``), the
        ``generations_finished`` hooks told of them all, then each one's ``Finished``, then
        each one's ``generation_finished`` hooks, one job after another. A job
        whose images cannot be made ready stays running here (its lease recovers it)."""
        made = await asyncio.gather(
            *(self.app.images.prepare(job.id, result) for job, result in finished), return_exceptions=True
        )
        ready: list[tuple[Job, PendingImages]] = []
        endings: list[Finishing] = []
        for (job, result), pending in zip(finished, made, strict=True):
            if isinstance(pending, asyncio.CancelledError):
                raise pending
            if isinstance(pending, BaseException):
                log.error("job %s: its images could not be made ready", job.id, exc_info=pending)
                continue
            ready.append((job, pending))
            endings.append(
                Finishing(job.id, pending.records, result.model_hash, result.device_seconds,
                          keep=pending.keep, data=pending.data)
            )  # fmt: skip
        try:
            outcomes = await self.app.store.finish_many(endings, owner=self.app.owner)
        except Exception:  # not stored: take back what was put in place
            # (a cancellation may come after the commit, so it leaves the files be)
            for _, pending in ready:
                await pending.undo()
            raise
        stored = [outcome for outcome in outcomes if isinstance(outcome, GenerationRecord)]
        if stored:
            await self._notify("generations_finished", records=stored)
        told: list[GenerationRecord] = []
        for (job, pending), outcome in zip(ready, outcomes, strict=True):
            try:
                if await self._finished(job, pending, outcome):
                    told.append(outcome)  # type: ignore[arg-type]
            except Exception:  # one job's error must not lose the others' ends
                log.exception("job %s: unexpected error while ending it", job.id)
        for record in told:  # after every result is out: a hook that looks at a group sees them all
            await self._notify("generation_finished", record=record)

    async def _finished(
        self, job: Job, pending: PendingImages, outcome: GenerationRecord | Exception | None
    ) -> bool:
        """Tell a finished job's end, once ``Store.finish_many`` said how it went; whether it
        finished (its ``generation_finished`` hooks are due)."""
        if isinstance(outcome, Exception):  # its images could not be kept: nothing was stored
            await pending.undo()  # no file is left once the failure is told
            if not isinstance(outcome, ImageStoreError):
                raise outcome
            await self._fail(job.id, await self._audience(job), outcome)
            return False
        if outcome is None:  # cancelled, failed or taken over meanwhile: the row says how it ended
            await pending.undo()  # files put in place before the job was lost are taken back
            return False
        audience = await self._audience(job)
        actions = self.result_actions(outcome, audience.actor)
        out = tuple(ImageOut(i.id, i.seed, i.width, i.height, i.infotext) for i in outcome.images)
        self.app.bus.publish(
            Finished(job.id, *_fields(audience), images=out, actions=tuple(actions), spoiler=outcome.spoiler)
        )
        return True

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
            await self._notify("generation_ended", record=record)

    async def _notify(self, hook_name: str, **arguments: Any) -> None:
        """Call a job's hook (``arguments`` and the App) plugin by plugin: one plugin's error
        never stops the others."""
        for impl in getattr(self.app.pm.hook, hook_name).get_hookimpls():
            try:
                result = impl.function(**arguments, app=self.app)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s of plugin %s failed", hook_name, impl.plugin_name)

    async def job_failed(self, job: Job, error: BaseException) -> None:
        await self._fail(job.id, await self._audience(job), error)

    async def job_stopped(self, job: Job) -> None:
        if job.stop_reason == "shutdown":
            await self.app.store.requeue_interrupted(job.id, self.app.owner)
            return
        if await self.app.store.mark_cancelled(job.id):
            self.app.bus.publish(Cancelled(job.id, *_fields(await self._audience(job))))
            await self._ended(job.id)

    async def _audience(self, job: Job) -> Audience:
        """Whom ``job`` answers: as read when it was claimed, else from its row."""
        if isinstance(job.context, Audience):
            return job.context
        record = await self.app.store.get(job.id)
        if record is None:
            raise NotFound("error.not_found", id=job.id)
        job.context = audience = Audience.of(record, self.app.settings.bot.locale)
        return audience

    async def _fail(self, generation_id: str, audience: Audience, error: BaseException) -> None:
        """Fail a job this App holds (a process that lost it leaves it to the new holder)."""
        reply = self.error_reply(error, audience.actor)
        message = self.app.translator.t("en", reply.key, **reply.params)
        stored = stored_params(reply.params)
        if await self.app.store.mark_failed(
            generation_id, reply.key, message, owner=self.app.owner, error_params=stored
        ):
            self.app.bus.publish(
                Failed(generation_id, *_fields(audience), key=reply.key, params=reply.params)
            )
            await self._ended(generation_id)


def _fields(audience: Audience) -> tuple[Actor, Route, str | None]:
    """A JobEvent's leading fields after its id."""
    return (audience.actor, audience.route, audience.thread_key)

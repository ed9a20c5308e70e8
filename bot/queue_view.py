"""/queue: where one's jobs stand, and how long the queue is.

``/queue`` lists the actor's jobs that wait or run, oldest first: each with its place in
the queue (1 = next to run), its prompt and how long it has waited, and a Cancel button.
``/queue all`` is for moderators: who has how many jobs queued and running, most first.
Both say how many jobs wait and run in all. The figures come from the store and the
queue, so they are the same whichever process (or worker host) holds a job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bot.i18n import Msg, clipped
from bot.types import Action, Command, CommandContext, Reply
from models.base import utcnow
from models.records import GenerationRecord, OpenJobs

SHOWN = 10  # of one's own jobs, listed with a Cancel button each
SHOWN_USERS = 20  # in the moderators' list
PROMPT_CHARS = 40


def queue_command() -> Command:
    return Command(
        "queue",
        description="cmd.queue",
        subcommands=(
            Command("show", show_queue, "cmd.queue.show"),
            Command("all", whole_queue, "cmd.queue.all", moderator=True),
        ),
        default="show",
    )


async def show_queue(ctx: CommandContext) -> Reply:
    app, actor = ctx.app, ctx.actor
    platform, _, platform_user_id = actor.key.partition(":")
    user = await app.store.find_user(platform, platform_user_id)
    shown = await app.store.list_open(user_id=user.id, limit=SHOWN) if user is not None else []
    people = await app.store.open_by_user()
    totals = _totals(people)
    if not shown:
        return Reply("queue.none", totals, data={**totals, "jobs": []})
    count = max(len(shown), sum(e.queued + e.running for e in people if e.user == actor.key))
    places = [await _place(app, record) for record in shown]
    now = utcnow()
    lines = [_line(ctx, record, place, now) for record, place in zip(shown, places, strict=True)]
    if count > SHOWN:
        lines.append(ctx.app.translator.t(actor.locale, "queue.more", count=count - SHOWN))
    jobs = [
        {"id": record.id, "status": record.status, "position": place, "prompt": record.request.prompt}
        for record, place in zip(shown, places, strict=True)
    ]
    actions = [
        Action(f"cancel:{record.id}", "action.cancel_job", {"n": n}) for n, record in enumerate(shown, 1)
    ]
    params = {**totals, "count": count, "list": "\n".join(lines)}
    return Reply("queue.mine", params, actions=actions, data={**totals, "jobs": jobs})


async def whole_queue(ctx: CommandContext) -> Reply:
    app = ctx.app
    people = await app.store.open_by_user()
    totals = _totals(people)
    if not people:
        return Reply("queue.empty", totals, data={**totals, "users": []})
    lines = [
        app.translator.t(
            ctx.actor.locale, "queue.user_line", name=entry.name or entry.user, user=entry.user,
            queued=entry.queued, running=entry.running,
        )
        for entry in people[:SHOWN_USERS]
    ]  # fmt: skip
    if len(people) > SHOWN_USERS:
        lines.append(app.translator.t(ctx.actor.locale, "queue.more_users", count=len(people) - SHOWN_USERS))
    users = [{"user": e.user, "name": e.name, "queued": e.queued, "running": e.running} for e in people]
    params = {**totals, "people": len(people), "list": "\n".join(lines)}
    return Reply("queue.everyone", params, data={**totals, "users": users})


def _totals(people: list[OpenJobs]) -> dict[str, int]:
    return {"waiting": sum(e.queued for e in people), "running": sum(e.running for e in people)}


async def _place(app: Any, record: GenerationRecord) -> int | None:
    """0 while it runs, its 1-based place while it waits, None where the queue cannot
    tell yet (stored, on its way to the queue)."""
    if record.status == "running":
        return 0
    return await app.queue.position(record.id)


def _line(ctx: CommandContext, record: GenerationRecord, place: int | None, now: datetime) -> str:
    if place == 0:
        where = Msg("queue.running")
    elif place is None:
        where = Msg("queue.queued")
    else:
        where = Msg("queue.place", {"position": place})
    prompt = clipped(" ".join(record.request.prompt.split()), PROMPT_CHARS)
    return ctx.app.translator.t(
        ctx.actor.locale,
        "queue.line",
        id=record.id,
        where=where,
        prompt=prompt or '""',
        size=f"{record.request.width}x{record.request.height}",
        waited=_waited(now, record.created_at),
    )


def _waited(now: datetime, since: datetime) -> Msg:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 60:
        return Msg("queue.seconds", {"n": seconds})
    if seconds < 3600:
        return Msg("queue.minutes", {"n": seconds // 60})
    return Msg("queue.hours", {"n": seconds // 3600, "m": seconds % 3600 // 60})

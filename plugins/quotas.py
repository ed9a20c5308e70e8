"""Quotas: image and GPU-time budgets per user and period, caps, relaxed mode, /quota.

Admission reserves the request's images in the current period with one conditional
UPDATE (``models.quota_store``), so concurrent requests never admit more than the budget
on SQLite or PostgreSQL. The core runs the checks and stores the jobs in one transaction:
a request that is not stored leaves no reservation behind. A job that finishes moves its reservation to "used" (images and
its GPU-seconds); one that fails or is cancelled releases it. Both go through a ledger
keyed by generation id, so a job that is retried or reported twice is billed once. A job
whose end was stored but whose settlement was lost (the process stopped between the two)
is settled when a process next starts (``settle_lost``).

Ordering: ``check_request`` is ``trylast`` and the core awaits no check after the first
Denial, so quotas reserve only when every other check (bans, word lists) admitted the
request; the number of images is taken from the request's plan, which runs before the
reservation, so a plan that fails reserves nothing.
"""

from __future__ import annotations

import logging
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    GLOBAL,
    Msg,
    OptionSpec,
    UserError,
    audit,
    format_time,
    hookimpl,
    plan_of,
    require_moderator,
    scope_key,
    scope_of,
    user_key,
)
from bot.types import Admission, Argument, Command, CommandContext, Denial, DrawRequest, Reply, Route
from models.quota_store import Limits, QuotaStore, Settlement, Usage

log = logging.getLogger(__name__)

Period = Literal["hourly", "daily", "weekly", "monthly"]
RESERVED = "quotas.reserved"  # on DrawRequest.options: what check_request reserved, for request_dropped
RESERVED_IN = "quotas.reserved_in"  # the store transaction the reservation was made in, if any


class BudgetOverride(BaseModel):
    """Per role/tier or per guild/chat: only the keys given replace the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    images: int | None = Field(None, ge=0)
    gpu_seconds: float | None = Field(None, ge=0)
    max_queued: int | None = Field(None, ge=0)
    max_running: int | None = Field(None, ge=0)
    max_cost: int | None = Field(None, ge=0)
    relaxed: bool | None = None


class ScopeOverride(BudgetOverride):
    period: Period | None = None


# The default cap on one request's width x height x steps x images: 1024 steps of a
# 1024x1024 image (2**30), a few minutes of GPU time. It admits A1111's defaults many
# times over, --batch 4 --count 4 --steps 64 at 1024x1024, and a 100-cell grid at 512x512
# with 40 steps; the largest request the [limits] allow (--batch 8 --count 8 --steps 150
# at 1024x1024) costs almost ten times as much, and would keep everyone else waiting.
DEFAULT_MAX_COST = 1024 * 1024 * 1024


class QuotasConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    period: Period = "daily"
    images: int = Field(100, ge=0)
    gpu_seconds: float = Field(0, ge=0)
    max_queued: int = Field(100, ge=0)
    max_running: int = Field(0, ge=0)
    max_cost: int = Field(DEFAULT_MAX_COST, ge=0)
    per_scope: bool = True
    relaxed: bool = False
    relaxed_priority: int = -100
    roles: dict[str, BudgetOverride] = {}
    scopes: dict[str, ScopeOverride] = {}


class Budget(BaseModel):
    """The effective limits of one user in one scope (0 = unlimited)."""

    model_config = ConfigDict(frozen=True)
    period: Period
    images: int
    gpu_seconds: float
    max_queued: int
    max_running: int
    max_cost: int
    relaxed: bool


def config(app: Any) -> QuotasConfig:
    return app.settings.plugin_config("quotas", QuotasConfig)  # type: ignore[return-value]


def budget_for(cfg: QuotasConfig, scope: str, roles: frozenset[str] | tuple[str, ...] = ()) -> Budget:
    """Defaults, then the guild/chat's values, then the most generous of the actor's roles."""
    values: dict[str, Any] = {
        "period": cfg.period,
        "images": cfg.images,
        "gpu_seconds": cfg.gpu_seconds,
        "max_queued": cfg.max_queued,
        "max_running": cfg.max_running,
        "max_cost": cfg.max_cost,
        "relaxed": cfg.relaxed,
    }
    if scope in cfg.scopes:
        values.update(cfg.scopes[scope].model_dump(exclude_none=True))
    role_values = [cfg.roles[role] for role in sorted(roles) if role in cfg.roles]
    for name in ("images", "gpu_seconds", "max_queued", "max_running", "max_cost"):
        given = [getattr(r, name) for r in role_values if getattr(r, name) is not None]
        if given:
            values[name] = 0 if 0 in given else max(given)
    if any(r.relaxed for r in role_values):
        values["relaxed"] = True
    return Budget(**values)


def period_of(kind: str, moment: datetime) -> tuple[str, datetime]:
    """The period's key (the usage row it counts in) and when the next one starts (UTC)."""
    now = moment.astimezone(UTC)
    if kind == "hourly":
        start = now.replace(minute=0, second=0, microsecond=0)
        return "h:" + start.strftime("%Y-%m-%dT%H"), start + timedelta(hours=1)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "daily":
        return "d:" + day.strftime("%Y-%m-%d"), day + timedelta(days=1)
    if kind == "weekly":
        monday = day - timedelta(days=day.weekday())
        return "w:" + monday.strftime("%Y-%m-%d"), monday + timedelta(weeks=1)
    first = day.replace(day=1)
    following = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else first.replace(month=first.month + 1)
    )
    return "m:" + first.strftime("%Y-%m"), following


def usage_scope(cfg: QuotasConfig, scope: str) -> str:
    return scope if cfg.per_scope else GLOBAL


async def effective_budget(app: Any, who: str, scope: str, roles: Any) -> Budget:
    cfg = config(app)
    budget = budget_for(cfg, scope, roles)
    override = await QuotaStore(app.store).override(who, usage_scope(cfg, scope))
    if override is not None:
        changes = {
            k: v
            for k, v in (("images", override.images), ("gpu_seconds", override.gpu_seconds))
            if v is not None
        }
        budget = budget.model_copy(update=changes)
    return budget


def request_cost(request: DrawRequest, app: Any) -> tuple[int, int, int]:
    """(images, jobs, width x height x steps x images) of what the plan will run."""
    plan = plan_of(request, app)
    images = sum(job.request.num_images_per_prompt for job in plan.jobs)
    cost = sum(
        job.request.width
        * job.request.height
        * job.request.num_inference_steps
        * job.request.num_images_per_prompt
        for job in plan.jobs
    )
    return images, len(plan.jobs), cost


# hooks -----------------------------------------------------------------------------------------


@hookimpl
async def startup(app: Any) -> None:
    config(app)  # a bad [plugins.quotas] table fails at startup, naming the key
    await settle_lost(app)


SETTLE_LOOKBACK = timedelta(days=7)  # how far back a start looks for lost settlements


async def settle_lost(app: Any) -> int:
    """Settle the jobs whose end was stored but never settled (the process stopped between
    the two, or the settlement failed): billed, or released, as ``generation_finished`` or
    ``generation_ended`` would have. The ledger makes a job settled here and by a live
    process at once count once. Returns how many; an error is logged, never raised."""
    settled = 0
    try:
        for generation_id in await QuotaStore(app.store).unsettled(datetime.now(UTC) - SETTLE_LOOKBACK):
            record = await app.store.get(generation_id)
            if record is not None:
                await _settle(record, app, record.status)
                settled += 1
    except Exception:
        log.exception("could not settle the quotas of jobs whose settlement was lost")
    if settled:
        log.info("settled the quotas of %d job(s) whose settlement was lost", settled)
    return settled


@hookimpl(trylast=True)
async def check_request(request: Any, actor: Any, app: Any) -> Any:
    cfg = config(app)
    scope = scope_of(actor)
    budget = await effective_budget(app, actor.key, scope, actor.roles)
    images, jobs, cost = request_cost(request, app)
    if budget.max_cost and cost > budget.max_cost:
        return Denial("quota.too_costly", {"cost": cost, "max": budget.max_cost})
    period, refill = period_of(budget.period, datetime.now(UTC))
    where = usage_scope(cfg, scope)
    quotas = QuotaStore(app.store)
    limits = Limits(
        images=budget.images or None,
        gpu_seconds=budget.gpu_seconds or None,
        open_jobs=budget.max_queued or None,
    )
    if await quotas.reserve(actor.key, where, period, images=images, jobs=jobs, limits=limits):
        request.options[RESERVED] = (actor.key, where, period, images, jobs)
        request.options[RESERVED_IN] = app.store.current_transaction()
        return Admission(0, max_running=budget.max_running) if budget.max_running else None
    usage = await quotas.usage(actor.key, where, period)
    if budget.max_queued and usage.jobs_open + jobs > budget.max_queued:
        return Denial(
            "quota.too_many_open", {"open": usage.jobs_open, "max": budget.max_queued, "needed": jobs}
        )
    if budget.relaxed:
        # spent, but relaxed mode admits it after everyone else's jobs, reserving no images
        relaxed = Limits(open_jobs=limits.open_jobs)
        if await quotas.reserve(actor.key, where, period, images=0, jobs=jobs, limits=relaxed):
            request.options[RESERVED] = (actor.key, where, period, 0, jobs)
            request.options[RESERVED_IN] = app.store.current_transaction()
            return Admission(
                cfg.relaxed_priority, "quota.relaxed", {"refill": format_time(refill)},
                max_running=budget.max_running or None,
            )  # fmt: skip
        return Denial(
            "quota.too_many_open", {"open": usage.jobs_open, "max": budget.max_queued, "needed": jobs}
        )
    if budget.gpu_seconds and usage.seconds_used >= budget.gpu_seconds + usage.bonus_seconds:
        return Denial(
            "quota.seconds_spent",
            {
                "used": round(usage.seconds_used, 1),
                "budget": round(budget.gpu_seconds + usage.bonus_seconds, 1),
                "period": Msg(f"quota.period.{budget.period}"),
                "refill": format_time(refill),
            },
        )
    return Denial(
        "quota.images_spent",
        {
            "budget": budget.images + usage.bonus_images,
            "left": _images_left(budget, usage),
            "needed": images,
            "period": Msg(f"quota.period.{budget.period}"),
            "refill": format_time(refill),
        },
    )


@hookimpl
async def request_dropped(request: Any, app: Any) -> None:
    """The admitted request was never stored: give its reservation back, unless it was made
    in the request's own transaction (the core submits in one), which took it back already."""
    reserved = request.options.pop(RESERVED, None)
    within = request.options.pop(RESERVED_IN, None)
    if reserved is not None and (within is None or within.committed):
        who, where, period, images, jobs = reserved
        await QuotaStore(app.store).release(who, where, period, images=images, jobs=jobs)


@hookimpl
async def generations_finished(records: list[Any], app: Any) -> None:
    """Settle a device's finished jobs that were stored together, in one round trip; their
    ``generation_finished`` then finds them settled."""
    await QuotaStore(app.store).settle_many([_settlement(record, app, "finished") for record in records])
    _settled_together.setdefault(app.store, set()).update(record.id for record in records)


@hookimpl
async def generation_finished(record: Any, app: Any) -> None:
    together = _settled_together.get(app.store)
    if together is not None and record.id in together:
        together.discard(record.id)
        return
    await _settle(record, app, "finished")


@hookimpl
async def generation_ended(record: Any, app: Any) -> None:
    await _settle(record, app, record.status)


# per App's store, the finished jobs ``generations_finished`` settled, until their own
# ``generation_finished`` comes (right after it, one by one)
_settled_together: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


async def _settle(record: Any, app: Any, outcome: str) -> None:
    """Bill or release the job's reservation in the period and scope it was admitted in."""
    await QuotaStore(app.store).settle_many([_settlement(record, app, outcome)])


def _settlement(record: Any, app: Any, outcome: str) -> Settlement:
    """How the job's reservation ends, in the period and scope it was admitted in."""
    cfg = config(app)
    # where it was asked: a linked person's user row may be on another platform
    platform = json_platform(record.route) or record.user.platform
    scope = scope_key(platform, record.guild_id, record.chat_id)
    who = f"{record.user.platform}:{record.user.platform_user_id}"
    budget = budget_for(cfg, scope, tuple(record.actor_roles))
    period, _ = period_of(budget.period, record.created_at)
    images = record.request.num_images_per_prompt
    relaxed = record.priority <= cfg.relaxed_priority
    return Settlement(
        record.id,
        who,
        usage_scope(cfg, scope),
        period,
        outcome,
        images if outcome == "finished" else 0,
        float(record.device_seconds or 0.0) if outcome == "finished" else 0.0,
        0 if relaxed else images,
    )


AMOUNTS = (
    OptionSpec("images", "int", bounds=lambda _: (0, 10**9), description="option.quota.images"),
    OptionSpec("gpu-seconds", "number", bounds=lambda _: (0, 10**9), description="option.quota.gpu-seconds"),
)


@hookimpl
def register_commands(register: Any) -> None:
    user = Argument("user", "user", "arg.user")
    subcommands = (
        Command(
            "show", quota_command, "cmd.quota.show", (Argument("user", "user", "arg.other_user", False),)
        ),
        Command("set", _moderate, "cmd.quota.set", (user,), AMOUNTS, moderator=True),
        Command("reset", _moderate, "cmd.quota.reset", (user,), moderator=True),
        Command("grant", _moderate, "cmd.quota.grant", (user,), AMOUNTS, moderator=True),
    )
    register(Command("quota", description="cmd.quota", subcommands=subcommands, default="show"))


# /quota ----------------------------------------------------------------------------------------


async def quota_command(ctx: CommandContext) -> Reply:
    """``/quota [@user]``: one's own budget, or (moderators) another user's."""
    text = ctx.text.strip()
    if not text:
        return await _status(ctx, ctx.actor.key, ctx.actor.roles)
    who = user_key(text, ctx.actor)
    if who != ctx.actor.key:
        await require_moderator(ctx, "quota.view", who)
    return await _status(ctx, who, ctx.actor.roles if who == ctx.actor.key else ())


async def _status(ctx: CommandContext, who: str, roles: Any) -> Reply:
    app = ctx.app
    scope = scope_of(ctx.actor)
    budget = await effective_budget(app, who, scope, roles)
    period, refill = period_of(budget.period, datetime.now(UTC))
    usage = await QuotaStore(app.store).usage(who, usage_scope(config(app), scope), period)
    left = _images_left(budget, usage)
    params = {
        "user": who,
        "period": Msg(f"quota.period.{budget.period}"),
        "images": Msg("quota.images_left", {"left": left, "budget": budget.images + usage.bonus_images})
        if budget.images
        else Msg("quota.images_unlimited"),
        "used": usage.images_used,
        "reserved": usage.images_reserved,
        # an unlimited budget has its own wording: no "of unlimited s"
        "seconds": Msg(
            "quota.seconds_left",
            {
                "used": round(usage.seconds_used, 1),
                "budget": round(budget.gpu_seconds + usage.bonus_seconds, 1),
            },
        )
        if budget.gpu_seconds
        else Msg("quota.seconds_unlimited", {"used": round(usage.seconds_used, 1)}),
        "refill": format_time(refill),
    }
    data = {
        "images_left": left if budget.images else None,
        "images_used": usage.images_used,
        "images_reserved": usage.images_reserved,
        "seconds_used": usage.seconds_used,
        "refill": refill.isoformat(),
    }
    return Reply("quota.status", params, data=data)


def _images_left(budget: Budget, usage: Usage) -> int:
    return max(budget.images + usage.bonus_images - usage.images_used - usage.images_reserved, 0)


async def _moderate(ctx: CommandContext) -> Reply:
    """``/quota set|reset|grant @user [--images N] [--gpu-seconds S]`` (moderators)."""
    sub = ctx.path[-1]
    target = user_key(ctx.text, ctx.actor)
    options = ctx.options
    if sub != "reset" and not options:
        raise UserError("quota.no_amount", command=" ".join(ctx.path))
    images = options.get("images")
    seconds = float(options["gpu-seconds"]) if "gpu-seconds" in options else None
    app, scope = ctx.app, scope_of(ctx.actor)
    where = usage_scope(config(app), scope)
    quotas = QuotaStore(app.store)
    if sub == "set":
        current = await quotas.override(target, where)
        if current is not None:  # keep what this /quota set does not name
            images = current.images if images is None else images
            seconds = current.gpu_seconds if seconds is None else seconds
        await quotas.set_override(target, where, images=images, gpu_seconds=seconds, set_by=ctx.actor.key)
    else:
        budget = await effective_budget(app, target, scope, ())
        period, _ = period_of(budget.period, datetime.now(UTC))
        if sub == "reset":
            await quotas.reset(target, where, period)
        else:
            await quotas.grant(target, where, period, images=images or 0, seconds=seconds or 0.0)
    await audit(ctx, f"quota.{sub}", target=target, images=images, gpu_seconds=seconds)
    return Reply(f"quota.{sub}_done", {"user": target})


def json_platform(route: Any) -> str | None:
    """The platform of a job's stored route (its chat's platform)."""
    if not route:
        return None
    return Route.from_json(route).platform

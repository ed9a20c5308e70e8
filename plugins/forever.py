"""Generate forever: keep drawing new seeds of one request until stopped, capped or out of quota.

A run is A1111's "Generate forever": ``/draw ... --forever``, the Forever button on a
result (``forever:ID``) or ``/forever ID`` draws the request, and each time a job of the
run finishes the same request is drawn again with new random seeds (seed and variation
seed), one job at a time. Every next job goes through ``Service.draw``, so quotas,
moderation and every other ``check_request`` apply to it as to a typed /draw.

Ids and lineage. A run's id is the id of its first job; its jobs are stored with the plan
kind "forever", the later ones carry the run id (``forever_run``) and are children
of the first job (so /lineage of any image of a run is short and names the run; the first
job is the child of the result Forever was pressed on). Each result of a run has a Stop
button, ``stop:<run id>``; ``/stop ID`` takes the id of any job of the run, or the id of
the result the run was started from (the id the user just typed after /forever).

A run ends, with a Notice to its user saying why, when
- the user (or a moderator) stops it: no new job is started, a queued one is cancelled,
  one already running still finishes;
- the next batch would pass ``[plugins.forever] max_images`` images;
- a check refuses the next request (quota spent, a ban, ...): the refusal is quoted;
- a job of the run is cancelled (/cancel) or fails.

State and restarts. The run's state (images drawn, the last job counted, why it ended)
and a stop request are preferences in the scope ("forever", <run id>), written apart so
a stop never races with the run's own updates. The stored jobs are the rest of the
truth: after a restart a queued or interrupted job of the run is recovered by the core
and, when it finishes, the run goes on (or ends, if it was stopped before the restart).
A job is counted once (its id is remembered), so a finished job reported twice draws
nothing twice. A run that has no job left to recover (the process died between a job's
end and the next job being stored) is ended at startup with a notice, never left hanging.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bot.api import (
    OPEN_STATUSES,
    GenerationRecord,
    Msg,
    NotFound,
    OptionSpec,
    PreferenceStore,
    UserError,
    actor_of,
    audit,
    default_plan,
    hookimpl,
    is_owner,
    redraw,
)
from bot.types import Action, Admission, Argument, Command, CommandContext, Denial, Plan, Reply, Route

log = logging.getLogger(__name__)

FLAG = "forever"  # the /draw option
PLAN = "forever"  # the plan kind stored on a run's jobs
SCOPE = "forever"  # preference scope of a run's state; scope id = run id
SOURCE_KEY = "runs"  # in the scope of a result: the runs /forever started from it


class ForeverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_images: int = Field(100, ge=1)


def config(app: Any) -> ForeverConfig:
    return app.settings.plugin_config("forever", ForeverConfig)  # type: ignore[return-value]


def run_of(record: GenerationRecord) -> str:
    return record.forever_run or record.id


def _new_state() -> dict[str, Any]:
    return {"images": 0, "handled": None, "ended": None}


def _repeat_changes() -> dict[str, Any]:
    return {"seed": -1, "subseed": -1, FLAG: True}


def _other_planners(app: Any) -> Any:
    return app.pm.subset_hook_caller("plan_generation", remove_plugins=[sys.modules[__name__]])


# hooks -----------------------------------------------------------------------------------------


@hookimpl
async def startup(app: Any) -> None:
    config(app)  # a bad [plugins.forever] table fails at startup, naming the key
    await _end_stranded_runs(app)


@hookimpl
def register_options(register: Any) -> None:
    register(OptionSpec(FLAG, "flag", description="option.forever"))


@hookimpl
def check_request(request: Any, actor: Any, app: Any) -> Any:
    if not request.options.get(FLAG):
        return None
    if request.count > 1:
        return Denial("forever.one_batch", {"count": request.count})
    planned = _other_planners(app)(request=request, app=app)
    if planned is not None and planned.kind != "draw":
        return Denial("forever.not_with_plan", {"kind": planned.kind})
    return Admission(0, "forever.note", {"max": config(app).max_images})


@hookimpl
def plan_generation(request: Any, app: Any) -> Any:
    """A forever request is planned as any other (one job per batch); only its plan kind
    marks its jobs as a run's. A request another plugin plans (a grid) is refused above."""
    if not request.options.get(FLAG):
        return None
    planned = _other_planners(app)(request=request, app=app) or default_plan(request)
    if planned.kind != "draw":
        return None
    return Plan(planned.jobs, kind=PLAN)


@hookimpl
def result_actions(record: Any, actor: Any, app: Any) -> list[Action]:
    if record.plan == PLAN:
        return [Action(f"stop:{run_of(record)}", "action.stop")]
    return [Action(f"forever:{record.id}", "action.forever")]


@hookimpl
async def generation_finished(record: Any, app: Any) -> None:
    if record.plan == PLAN:
        await _advance(app, record)


@hookimpl
async def generation_ended(record: Any, app: Any) -> None:
    if record.plan != PLAN:
        return
    run_id = run_of(record)
    prefs = PreferenceStore(app.store)
    state = await prefs.get((SCOPE, run_id), "run")
    if state is None and run_id == record.id:
        state = _new_state()
    if state is None or state["ended"]:
        return
    stop = await prefs.get((SCOPE, run_id), "stop")
    if stop is not None:
        await _end(app, run_id, state, record, "stopped", by=stop["by"])
    else:
        await _end(app, run_id, state, record, record.status, job=record.id)


@hookimpl
def register_commands(register: Any) -> None:
    register(Command("forever", forever_command, "cmd.forever", (Argument("id", "id", "arg.generation"),)))
    register(Command("stop", stop_command, "cmd.stop", (Argument("id", "id", "arg.forever_run"),)))


# the run ---------------------------------------------------------------------------------------


async def _advance(app: Any, record: GenerationRecord) -> None:
    """A job of a run finished: count it once, then stop or draw the next one."""
    run_id = run_of(record)
    prefs = PreferenceStore(app.store)
    state = await prefs.get((SCOPE, run_id), "run")
    if state is None:
        if run_id != record.id:
            log.warning("job %s of forever run %s: the run has no state; not continued", record.id, run_id)
            return
        state = _new_state()
    if state["ended"] or state["handled"] == record.id:
        return
    state = {**state, "images": state["images"] + len(record.images), "handled": record.id}
    await prefs.set((SCOPE, run_id), "run", state)
    stop = await prefs.get((SCOPE, run_id), "stop")
    if stop is not None:
        await _end(app, run_id, state, record, "stopped", by=stop["by"])
        return
    cap = config(app).max_images
    if state["images"] + record.request.num_images_per_prompt > cap:
        await _end(app, run_id, state, record, "capped", max=cap)
        return
    actor = actor_of(record, app.settings.bot.locale)
    try:
        replies = await redraw(
            app,
            record,
            _repeat_changes(),
            actor,
            Route.from_json(record.route),
            parent_id=run_id,
            forever_run=run_id,
        )
    except Exception as exc:  # a UserError or a bug: the run ends either way, saying why
        replies = [app.service.error_reply(exc, actor)]
    if replies and replies[0].error:
        reason = Msg(replies[0].key, replies[0].params)
        await _end(app, run_id, state, record, "denied", reason=reason)
    elif await prefs.get((SCOPE, run_id), "stop") is not None:
        # stopped while the next job was being stored, so /stop did not see it: cancel it here
        await _cancel_queued(app, replies[0].data.get("jobs", []), actor)


async def _cancel_queued(app: Any, job_ids: list[str], actor: Any) -> None:
    """Cancel a run's jobs that have not started; the run then ends in ``generation_ended``."""
    for job_id in job_ids:
        try:
            await app.service.cancel(job_id, actor)
        except UserError:
            pass  # it ended meanwhile: the run ends with it


async def _end(
    app: Any, run_id: str, state: dict[str, Any], record: GenerationRecord, why: str, **params: Any
) -> None:
    """Mark the run ended and tell its user why, routed like its last job."""
    await PreferenceStore(app.store).set((SCOPE, run_id), "run", {**state, "ended": why})
    reply = Reply(
        f"forever.{why}", {"id": run_id, "images": state["images"], **params}, error=why == "denied"
    )
    app.service.post(record, reply)


async def _end_stranded_runs(app: Any) -> None:
    """At startup, before the core recovers open jobs: a run that is not ended and has no
    queued or running job would never go on; end it with a notice."""
    jobs = await app.store.summaries(plan=PLAN)
    states = await PreferenceStore(app.store).values(SCOPE, "run")
    runs: dict[str, list[Any]] = {}
    for job in jobs:
        runs.setdefault(job.forever_run or job.id, []).append(job)
    for run_id, run_jobs in runs.items():
        state = states.get(run_id) or _new_state()
        if state["ended"] or any(job.status in OPEN_STATUSES for job in run_jobs):
            continue
        last = await app.store.get(run_jobs[-1].id)
        if last is None:
            continue
        images = sum(job.batch_size for job in run_jobs if job.status == "finished")
        log.info("forever run %s has no job left after a restart; ended", run_id)
        await _end(app, run_id, {**state, "images": images}, last, "interrupted")


# commands --------------------------------------------------------------------------------------


async def forever_command(ctx: CommandContext) -> list[Reply]:
    """``/forever ID``: a run of that result's request, a child of it."""
    generation_id = ctx.text.strip()
    record = await ctx.app.service.visible(generation_id, ctx.actor)
    replies = await redraw(ctx.app, record, _repeat_changes(), ctx.actor, ctx.invocation.route)
    jobs = replies[0].data.get("jobs", []) if replies and not replies[0].error else []
    if jobs:  # remembered so that /stop with the id the user typed stops this run
        prefs = PreferenceStore(ctx.app.store)
        runs = await prefs.get((SCOPE, record.id), SOURCE_KEY, [])
        await prefs.set((SCOPE, record.id), SOURCE_KEY, [*runs, jobs[0]], by=ctx.actor.key)
    return replies


async def _run_record(app: Any, record: GenerationRecord, actor: Any) -> GenerationRecord | None:
    """The job of a run that ``record`` names: itself when it is a run's job, else the first
    job of the latest run started from it that has not ended."""
    if record.plan == PLAN:
        return record
    prefs = PreferenceStore(app.store)
    for run_id in reversed(await prefs.get((SCOPE, record.id), SOURCE_KEY, [])):
        state = await prefs.get((SCOPE, run_id), "run")
        if state is not None and state["ended"]:
            continue
        try:
            return await app.service.visible(run_id, actor)
        except NotFound:
            continue
    return None


async def stop_command(ctx: CommandContext) -> Reply:
    """``/stop ID`` (ID of any job of the run): no new job; a queued one is cancelled."""
    app, actor = ctx.app, ctx.actor
    generation_id = ctx.text.strip()
    record = await _run_record(app, await app.service.visible(generation_id, actor), actor)
    if record is None:
        raise NotFound("forever.not_a_run", id=generation_id)
    run_id = run_of(record)
    if not (is_owner(record, actor) or actor.is_moderator):  # a role check: the refusal is audited
        await audit(ctx, "stop", allowed=False, target=run_id)
        raise UserError("forever.not_yours", id=run_id)
    prefs = PreferenceStore(app.store)
    state = await prefs.get((SCOPE, run_id), "run")
    if state is not None and state["ended"]:
        return Reply("forever.not_running", {"id": run_id}, error=True)
    if await prefs.get((SCOPE, run_id), "stop") is None:
        await prefs.set((SCOPE, run_id), "stop", {"by": actor.name}, by=actor.key)
    # A running job finishes and the run ends then; a queued one is cancelled. A job being
    # stored right now is cancelled by the run itself, which checks for a stop after storing.
    queued = [
        job.id
        for job in await app.store.list_open()
        if job.plan == PLAN and run_of(job) == run_id and job.status == "queued"
    ]
    await _cancel_queued(app, queued, actor)
    return Reply("forever.stopping", {"id": run_id})

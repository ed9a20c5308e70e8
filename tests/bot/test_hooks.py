"""Every hook of bot/hookspecs.py, exercised through a real App; and the meta-test."""

from __future__ import annotations

import ast
import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from bot import hookspecs
from bot.app import build_app
from bot.hookspecs import hookimpl
from bot.plugins import DEFAULT_PLUGINS, PluginError, builtin_name
from bot.types import Action, Actor, Admission, Argument, Command, Denial, Plan, PlannedJob, Reply
from tests.conftest import EventLog, make_settings

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")


def _hook_names() -> list[str]:
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "atelier_spec")]


def test_every_hook_has_a_test() -> None:
    """Like datasette's test_plugin_hooks_have_tests: a hook without a test_hook_<name> fails."""
    tests = {
        node.name
        for path in Path(__file__).parents[1].rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    hooks = _hook_names()
    assert len(hooks) == 18
    missing = [name for name in hooks if not any(t.startswith(f"test_hook_{name}") for t in tests)]
    assert not missing, f"hooks without a test: {missing}"


async def _draw(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


async def test_hook_register_commands(make_app) -> None:
    class Ping:
        @hookimpl
        def register_commands(self, register):
            async def ping(ctx):
                return Reply("draw.accepted", {"count": 0, "ids": ctx.text})

            text = Argument("text", "text", {"en": "What to say back", "zh-CN": "要回复的文字"})
            register(Command("ping", ping, {"en": "Say it back", "zh-CN": "原样回复"}, arguments=(text,)))

    app = await make_app(extra_plugins=(Ping(),))
    replies = await _draw(app, "/ping hello")
    assert replies[0].params == {"count": 0, "ids": "hello"}
    assert app.commands.owners["ping"] != "core"
    (missing,) = await _draw(app, "/ping")  # the schema's argument is required
    assert missing.key == "error.missing_argument" and missing.params["usage"] == "/ping TEXT"


def test_hook_register_commands_duplicate_names_fail_naming_both(tmp_path: Path) -> None:
    class Dup:
        @hookimpl
        def register_commands(self, register):
            register(Command("reroll", None))

    with pytest.raises(
        PluginError,
        match="command 'reroll' is registered twice: by plugin '(generate|Dup)' and by '(Dup|generate)'",
    ):
        build_app(make_settings(tmp_path), plugins=(Dup(),), engines=[object()], library=object())


async def test_hook_register_styles(make_app) -> None:
    class Lib:
        @hookimpl
        def register_styles(self, register):
            register("anime", "anime style, {prompt}", "photo")

    app = await make_app(extra_plugins=(Lib(),))
    assert app.styles.get("Anime").prompt == "anime style, {prompt}"
    assert app.styles.get("anime").negative_prompt == "photo"
    assert app.styles.owners["anime"] == app.pm.get_name(_plugin(app, Lib))


async def test_hook_register_negative_presets(make_app) -> None:
    class Presets:
        @hookimpl
        def register_negative_presets(self, register):
            register("hands", "bad hands, missing fingers")

    app = await make_app(extra_plugins=(Presets(),))
    assert app.presets.get("HANDS").negative_prompt == "bad hands, missing fingers"
    assert app.presets.owners["hands"] == app.pm.get_name(_plugin(app, Presets))


async def test_hook_register_options(make_app) -> None:
    from bot.options import OptionSpec

    class Mood:
        @hookimpl
        def register_options(self, register):
            mood = {"en": "The picture's mood", "zh-CN": "画面的情绪"}
            register(
                OptionSpec(
                    "mood", "choice", aliases=("m",), choices=lambda: ["calm", "wild"], description=mood
                )
            )

        @hookimpl
        def modify_request(self, draft, actor, app):
            if draft.options.get("mood"):
                draft.add_prompt(f"{draft.options['mood']} mood")

    app = await make_app(extra_plugins=(Mood(),))
    log = EventLog(app)
    (job_id,) = (await _draw(app, "/draw a cat --m wild --steps 2"))[0].data["jobs"]
    assert (await app.store.get(job_id)).request.prompt == "a cat, wild mood"
    bad = await _draw(app, "/draw a cat --mood sad")
    assert bad[0].error and "calm" in app.translator.t("en", bad[0].key, **bad[0].params)
    await log.wait_for(lambda: log.of("finished", job_id))


def test_hook_register_options_names_taken_by_the_core_fail_naming_both(tmp_path: Path) -> None:
    from bot.options import OptionSpec

    class Steps:
        @hookimpl
        def register_options(self, register):
            register(OptionSpec("pace", "int", aliases=("steps",)))

    with pytest.raises(PluginError, match="'steps' is registered twice: by plugin 'core' and by 'Steps'"):
        build_app(make_settings(tmp_path), plugins=(Steps(),), engines=[object()], library=object())


async def test_hook_register_grid_axes(make_app) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Axis:
        name: str

    class Axes:
        @hookimpl
        def register_grid_axes(self, register):
            register(Axis("Mood"))

    app = await make_app(extra_plugins=(Axes(),))
    assert app.grid_axes.get("mood") == Axis("Mood")
    assert app.grid_axes.owners["mood"] == app.pm.get_name(_plugin(app, Axes))


def _plugin(app, cls):
    return next(p for p in app.pm.get_plugins() if isinstance(p, cls))


async def test_hook_modify_request(make_app) -> None:
    class Quality:
        @hookimpl
        def modify_request(self, draft, actor, app):
            draft.add_prompt("masterpiece", order=10)
            draft.add_negative("lowres")
            draft.options["steps"] = 3

    app = await make_app(extra_plugins=(Quality(),))
    log = EventLog(app)
    (job_id,) = (await _draw(app, "/draw a cat --negative blurry"))[0].data["jobs"]
    record = await app.store.get(job_id)
    assert record.request.prompt == "a cat, masterpiece"
    assert record.request.negative_prompt == "blurry, lowres"
    assert record.request.num_inference_steps == 3
    await log.wait_for(lambda: log.of("finished", job_id))


async def test_hook_check_request_first_denial_wins_and_may_be_async(make_app) -> None:
    calls = []

    class Quota:
        @hookimpl
        async def check_request(self, request, actor, app):
            calls.append("quota")
            await asyncio.sleep(0)
            return Denial("denied") if "dog" in request.generation.prompt else None

    class Words:
        @hookimpl(tryfirst=True)
        def check_request(self, request, actor, app):
            calls.append("words")
            return Denial("error.not_found", {"id": "x"}) if "cat" in request.generation.prompt else None

    app = await make_app(extra_plugins=(Quota(), Words()))
    replies = await _draw(app, "/draw a cat and a dog")
    assert replies[0].error and replies[0].key == "error.not_found"
    assert calls == ["words"]  # after the first Denial no async check is awaited
    replies = await _draw(app, "/draw a dog")
    assert replies[0].key == "denied"
    assert await app.store.count_by_status() == {}
    assert calls == ["words", "words", "quota"]


async def test_hook_check_request_admission_lowers_priority_and_adds_a_note(make_app) -> None:
    class Relax:
        @hookimpl
        def check_request(self, request, actor, app):
            return Admission(-5, "quota.relaxed", {"refill": "soon"})

    app = await make_app(extra_plugins=(Relax(),))
    await app.queue.stop()
    replies = await _draw(app, "/draw a cat")
    assert [r.key for r in replies] == ["draw.accepted", "quota.relaxed"]
    assert (await app.store.get(replies[0].data["jobs"][0])).priority == -5


async def test_hook_plan_generation(make_app) -> None:
    """A plugin's plan makes the jobs; it is asked once per request, though the quotas
    price the same plan before it is stored."""

    class Sweep:
        calls = 0

        @hookimpl
        def plan_generation(self, request, app):
            Sweep.calls += 1
            base = request.generation
            jobs = tuple(PlannedJob(base.replace(guidance_scale=c), label=f"CFG {c}") for c in (3, 9))
            return Plan(jobs, kind="sweep")

    app = await make_app(extra_plugins=(Sweep(),))
    log = EventLog(app)
    ids = (await _draw(app, "/draw a cat --count 5"))[0].data["jobs"]
    assert len(ids) == 2 and Sweep.calls == 1
    records = [await app.store.get(i) for i in ids]
    assert [r.request.guidance_scale for r in records] == [3, 9]
    assert [r.label for r in records] == ["CFG 3", "CFG 9"]
    assert {r.plan for r in records} == {"sweep"} and records[0].group_id == records[1].group_id
    await log.wait_for(lambda: len(log.of("finished")) == 2)


async def test_hook_plan_generation_core_fallback_with_every_builtin_disabled(make_app) -> None:
    every_builtin = [builtin_name(module) for module in DEFAULT_PLUGINS]
    app = await make_app(plugins={"disabled": every_builtin})
    assert all(app.pm.get_plugin(name) is None for name in every_builtin)
    assert app.pm.get_plugins() == set()
    log = EventLog(app)
    ids = (await _draw(app, "/draw a cat --count 2 --seed 1"))[0].data["jobs"]
    await log.wait_for(lambda: len(log.of("finished")) == 2)
    (queue,) = await _draw(app, "/queue")  # the core's /queue works without plugins too
    assert (queue.key, queue.data) == ("queue.none", {"waiting": 0, "running": 0, "jobs": []})
    # only the core's own action is left: Delete
    assert all([a.id for a in e.actions] == [f"delete:{e.generation_id}"] for e in log.of("finished"))
    assert [(await app.store.get(i)).request.seed for i in ids] == [1, 2]


async def test_hook_result_actions(make_app) -> None:
    class Buttons:
        @hookimpl
        def result_actions(self, record, actor, app):
            return [Action(f"upscale:{record.id}", "action.cancel")]

    app = await make_app(extra_plugins=(Buttons(),))
    log = EventLog(app)
    (job_id,) = (await _draw(app, "/draw a cat"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job_id))
    ids = [a.id for a in log.of("finished", job_id)[0].actions]
    assert {f"reroll:{job_id}", f"upscale:{job_id}"} <= set(ids)


async def test_hook_generation_finished_errors_are_logged(make_app, caplog) -> None:
    seen = []

    class Billing:
        @hookimpl
        async def generation_finished(self, record, app):
            seen.append((record.id, record.status, len(record.images)))

    class Broken:
        @hookimpl
        def generation_finished(self, record, app):
            raise RuntimeError("plugin bug")

    app = await make_app(extra_plugins=(Billing(), Broken()))
    log = EventLog(app)
    with caplog.at_level(logging.ERROR):
        (job_id,) = (await _draw(app, "/draw a cat --batch 2"))[0].data["jobs"]
        await log.wait_for(lambda: log.of("finished", job_id))
        await app.idle()
    assert seen == [(job_id, "finished", 2)]
    assert "generation_finished of plugin" in caplog.text


async def test_hook_generations_finished_comes_first_once_for_the_jobs_stored_together(
    make_app, caplog
) -> None:
    calls = []

    class Together:
        @hookimpl
        async def generations_finished(self, records, app):
            calls.append(("together", [(r.id, r.status, len(r.images)) for r in records]))

        @hookimpl
        async def generation_finished(self, record, app):
            calls.append(("one", record.id))

    class Broken:
        @hookimpl
        def generations_finished(self, records, app):
            raise RuntimeError("plugin bug")

    app = await make_app(extra_plugins=(Together(), Broken()))
    log = EventLog(app)
    with caplog.at_level(logging.ERROR):
        (job_id,) = (await _draw(app, "/draw a cat --batch 2"))[0].data["jobs"]
        await log.wait_for(lambda: log.of("finished", job_id))
        await app.idle()
    assert calls == [("together", [(job_id, "finished", 2)]), ("one", job_id)]
    assert "generations_finished of plugin" in caplog.text


async def test_hook_generation_ended_once_for_failed_and_cancelled_jobs(make_app, caplog) -> None:
    from pipeline.queue import Job

    seen = []

    class Release:
        @hookimpl
        async def generation_ended(self, record, app):
            seen.append((record.id, record.status))

    class Broken:
        @hookimpl
        def generation_ended(self, record, app):
            raise RuntimeError("plugin bug")

    app = await make_app(extra_plugins=(Release(), Broken()))
    await app.queue.stop()  # nothing runs: the test plays the queue's part
    log = EventLog(app)
    cancelled, failed, finished = (await _draw(app, "/draw a cat --count 3"))[0].data["jobs"]
    with caplog.at_level(logging.ERROR):
        await app.service.cancel(cancelled, ALICE)
        await app.service.cancel(cancelled, ALICE)  # too late: no second call
        record = await app.store.get(failed)
        job = Job(failed, ALICE.key, record.request)
        assert await app.service.job_started(job)
        await app.service.job_failed(job, RuntimeError("device lost"))
    assert seen == [(cancelled, "cancelled"), (failed, "failed")]
    assert "generation_ended of plugin" in caplog.text
    assert log.of("failed", failed) and log.of("cancelled", cancelled)
    assert (await app.store.get(finished)).status == "queued"  # untouched: no call for it


async def test_hook_generation_ended_not_called_for_interrupted_jobs(make_app) -> None:
    from pipeline.queue import Job

    seen = []

    class Release:
        @hookimpl
        def generation_ended(self, record, app):
            seen.append(record.id)

    app = await make_app(extra_plugins=(Release(),))
    await app.queue.stop()
    (job_id,) = (await _draw(app, "/draw a cat"))[0].data["jobs"]
    record = await app.store.get(job_id)
    job = Job(job_id, ALICE.key, record.request)
    assert await app.service.job_started(job)
    job.request_stop("shutdown")
    await app.service.job_stopped(job)
    assert seen == [] and (await app.store.get(job_id)).status == "queued"


async def test_hook_actor_roles_grow_the_actor_everywhere(make_app) -> None:
    seen = []

    class Tiers:
        @hookimpl
        def actor_roles(self, actor, app):
            return {"patron"} if actor.user_id == "alice" else None

        @hookimpl
        def check_request(self, request, actor, app):
            seen.append(actor.roles)

    app = await make_app(extra_plugins=(Tiers(),))
    await app.queue.stop()
    (job_id,) = (await _draw(app, "/draw a cat", replace(ALICE, roles=frozenset({"admin"}))))[0].data["jobs"]
    assert seen == [frozenset({"admin", "patron", "moderator"})]  # moderation maps "admin"
    assert set((await app.store.get(job_id)).actor_roles) == {"admin", "patron", "moderator"}


async def test_hook_handle_error(make_app) -> None:
    class Oops:
        @hookimpl
        def register_commands(self, register):
            async def crash(ctx):
                raise MemoryError("boom")

            register(Command("crash", crash, {"en": "Fail", "zh-CN": "出错"}))

    class Advice:
        @hookimpl
        def handle_error(self, exception, actor, app):
            if isinstance(exception, MemoryError):
                return Reply("error.out_of_memory", {"detail": str(exception)}, error=True)
            return None

    app = await make_app(extra_plugins=(Oops(), Advice()))
    replies = await _draw(app, "/crash")
    assert replies[0].key == "error.out_of_memory" and replies[0].params == {"detail": "boom"}
    app.pm.unregister(_plugin(app, Advice))
    replies = await _draw(app, "/crash")
    assert replies[0].key == "error.internal" and len(replies[0].params["ref"]) == 8


async def test_hook_startup(make_app) -> None:
    events = []

    class Life:
        @hookimpl
        async def startup(self, app):
            events.append(("startup", app.started))

    await make_app(extra_plugins=(Life(),))
    assert events == [("startup", True)]


async def test_hook_shutdown(make_app) -> None:
    events = []

    class Life:
        @hookimpl
        def shutdown(self, app):
            events.append("shutdown")

    app = await make_app(extra_plugins=(Life(),))
    assert events == []
    await app.stop()
    assert events == ["shutdown"]


async def test_hook_request_dropped_when_admitted_jobs_cannot_be_stored(make_app, monkeypatch) -> None:
    dropped = []

    class Reserver:
        @hookimpl
        def check_request(self, request, actor, app):
            request.options["reserved"] = True
            return None

        @hookimpl
        async def request_dropped(self, request, app):
            dropped.append(request.options.get("reserved"))

    app = await make_app(extra_plugins=(Reserver(),))

    async def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(app.store, "add_jobs", broken)
    replies = await _draw(app, "/draw a cat")
    assert replies[0].key == "error.internal"
    assert dropped == [True]
    denied_app = await make_app(
        extra_plugins=(Reserver(),), plugins={"moderation": {"blocked_words": ["cat"]}}
    )
    assert (await _draw(denied_app, "/draw a cat"))[0].key == "moderation.blocked"
    assert dropped == [True]  # a denied request reserved nothing to give back

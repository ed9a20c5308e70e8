"""Bad model input through the bot: unknown or malformed network names, corrupt or unsafe
files, a missing models folder, engine refusals. Each gets a clear, translated message,
nothing half-done is stored, and the next request is served."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from bot.types import Actor
from pipeline.checkpoints import CheckpointLibrary
from tests.conftest import EventLog
from tests.pipeline.a1111_layout import pipeline_to_a1111

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
LI = Actor(platform="console", user_id="li", name="Li", locale="zh-CN", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
MODERATION = {"moderation": {"moderators": ["console:mod"]}}


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def _app_with_library(make_app, models: Path, **tables):
    return await make_app(models_dir=models, **tables)


async def _rows(app) -> int:
    return sum((await app.store.count_by_status()).values())


async def _finishes(app, log: EventLog, line: str, actor: Actor = ALICE) -> str:
    [accepted] = await app.service.handle_line(line, actor)
    assert not accepted.error, accepted
    (job,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    assert log.of("finished", job), log.of("failed", job)
    return job


async def test_unknown_and_malformed_network_tags_are_refused_before_anything_is_stored(
    make_app, tmp_path
) -> None:
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    pipe = CheckpointLibrary(None).load("tiny")
    key = next(k for k in _kohya_keys(pipe))
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)},
        str(models / "Lora" / "detail.safetensors"),
    )
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    [reply] = await app.service.handle_line("/draw a cat <lora:detial:0.8>", ALICE)
    assert reply.error and reply.key == "error.unknown_network"
    assert _text(app, reply) == 'Unknown lora "detial". Available: detail'
    [reply] = await app.service.handle_line("/draw a cat <hypernet:nope>", LI)
    assert reply.error and "nope" in _text(app, reply, "zh-CN")
    [reply] = await app.service.handle_line("/draw a cat <lora:detail:lots>", ALICE)
    assert reply.error and reply.key == "error.network_tag" and "lots" in _text(app, reply)
    [reply] = await app.service.handle_line("/draw a cat --hires --hr-prompt 'x <lora:gone>'", ALICE)
    assert reply.error and reply.params["name"] == "gone"
    assert await _rows(app) == 0
    await _finishes(app, log, "/draw a cat <lora:DETAIL:0.5> --steps 2")


def _kohya_keys(pipe):
    from pipeline.networks import kohya_targets

    return [k for k, (module, part) in kohya_targets(pipe).items() if module.weight.shape[1] == 32 and part]


async def test_corrupt_checkpoint_and_network_files_fail_their_job_and_the_next_one_runs(
    make_app, tmp_path
) -> None:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Lora").mkdir()
    (models / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{not json")
    (models / "Lora" / "torn.safetensors").write_bytes(b"\xff" * 16)
    victim = tmp_path / "pwned.txt"
    with open(models / "Lora" / "evil.pt", "wb") as stream:
        pickle.dump({"x": _CreatesFile(str(victim))}, stream)
    app = await _app_with_library(make_app, models)
    log = EventLog(app)
    failures = []
    for line in (
        "/draw a cat --checkpoint broken --steps 2",
        "/draw a cat <lora:torn> --steps 2",
        "/draw a cat <lora:evil> --steps 2",
    ):
        [accepted] = await app.service.handle_line(line, ALICE)
        (job,) = accepted.data["jobs"]
        await log.wait_for(lambda job=job: log.of("failed", job))
        failures.append(log.of("failed", job)[0])
    broken, torn, evil = failures
    assert broken.key == "error.unsafe_checkpoint" and broken.params["name"] == "broken.safetensors"
    assert torn.key == "error.unsafe_checkpoint" and torn.params["name"] == "torn.safetensors"
    assert evil.key == "error.unsafe_checkpoint" and evil.params["name"] == "evil.pt"
    assert "not allowed" in app.translator.t("zh-CN", evil.key, **evil.params)
    assert not victim.exists()
    record = await app.store.get(broken.generation_id)
    assert record.status == "failed" and "broken.safetensors" in record.error
    await _finishes(app, log, "/draw a cat --steps 2")


async def test_a_missing_models_folder_is_reported_and_the_builtin_model_still_draws(
    make_app, tmp_path, caplog
) -> None:
    app = await make_app(models_dir=tmp_path / "nowhere")
    assert f"models folder {tmp_path / 'nowhere'} does not exist" in caplog.text
    listing, missing = await app.service.handle_line("/models", ALICE)
    assert listing.data["checkpoints"] == ["tiny"]
    assert missing.key == "models.folder_missing" and missing.params["path"] == str(tmp_path / "nowhere")
    assert "does not exist" in _text(app, missing) and "不存在" in _text(app, missing, "zh-CN")
    await _finishes(app, EventLog(app), "/draw a cat --steps 2")


async def test_models_refresh_is_for_moderators_and_finds_new_files(make_app, tmp_path) -> None:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    app = await _app_with_library(make_app, models, plugins=MODERATION)
    [denied] = await app.service.handle_line("/models refresh", ALICE)
    assert denied.error and denied.key == "error.moderators_only"
    [bad] = await app.service.handle_line("/models reload", MOD)
    assert bad.error and bad.key == "error.unknown_subcommand" and bad.params["allowed"] == "list, refresh"
    assert app.library.names() == ["tiny"]
    tiny = CheckpointLibrary(None).load("tiny")
    save_file(pipeline_to_a1111(tiny), str(models / "Stable-diffusion" / "fresh.safetensors"))
    (models / "Lora").mkdir()
    (models / "Lora" / "new.safetensors").write_bytes(b"listed, not read")
    [done] = await app.service.handle_line("/models refresh", MOD)
    assert not done.error and done.params["checkpoints"] == 2 and done.params["loras"] == 1
    assert "fresh" in done.data["checkpoints"]
    assert "2 checkpoint(s)" in _text(app, done) and "2 个模型" in _text(app, done, "zh-CN")


async def test_an_engine_refusal_is_translated_and_the_next_job_runs(make_app) -> None:
    app = await make_app()
    log = EventLog(app)
    [accepted] = await app.service.handle_line("/draw a cat --clip-skip 12 --steps 2", ALICE)
    (job,) = accepted.data["jobs"]
    await log.wait_for(lambda: log.of("failed", job))
    [failed] = log.of("failed", job)
    assert failed.key == "error.invalid_request" and "clip skip" in failed.params["detail"]
    assert app.translator.t("zh-CN", failed.key, **failed.params).startswith("引擎拒绝了此请求")
    await _finishes(app, log, "/draw a cat --steps 2")

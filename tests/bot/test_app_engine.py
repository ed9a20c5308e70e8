"""``make_engine``: [engine] settings to the engine, its startup line, when it is built, and
OOM retry through the bot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bot.app import DeferredEngine, build_app, make_engine
from bot.settings import ConfigError
from bot.types import Actor
from pipeline.checkpoints import CheckpointLibrary
from tests.conftest import EventLog, make_settings, opened

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")
OOM_TEXT = "CUDA out of memory. Tried to allocate 64.00 MiB"


def _startup_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.app" and r.levelno == logging.INFO]
    assert len(lines) == 1, lines
    return lines[0]


def test_default_engine_says_how_it_runs(tmp_path, caplog):
    settings = make_settings(tmp_path)
    with caplog.at_level(logging.INFO, logger="bot.app"):
        engine = make_engine(settings, CheckpointLibrary(None, max_loaded=3))
    line = _startup_line(caplog)
    assert line == (
        "engine: device cpu, precision fp32, VAE fp32, attention sdpa, memory mode normal, "
        "memory budget none (max_loaded 3)"
    )
    assert engine.memory.settings.oom_retry is True  # the config's default
    assert engine.memory.settings.mode == "normal" and engine.dtype == torch.float32


def test_engine_settings_reach_the_engine_and_the_startup_line(tmp_path, caplog):
    engine_table = {
        "precision": "bf16",
        "no_half_vae": True,
        "attention": "sdpa",
        "memory_mode": "lowvram",
        "vae_tiling_pixels": 1048576,
        "oom_retry": False,
    }
    settings = make_settings(tmp_path, engine=engine_table)
    with caplog.at_level(logging.INFO, logger="bot.app"):
        engine = make_engine(settings, CheckpointLibrary(None))
    line = _startup_line(caplog)
    for part in ("device cpu", "precision bf16", "VAE fp32", "attention sdpa", "memory mode lowvram"):
        assert part in line, line
    assert "memory budget none (lowvram keeps checkpoints on the CPU)" in line
    memory = engine.memory.settings
    assert (memory.mode, memory.vae_tiling_pixels, memory.oom_retry) == ("lowvram", 1048576, False)
    assert (engine.dtype, engine.memory.vae_dtype) == (torch.bfloat16, torch.float32)


def test_a_budget_is_logged_and_given_to_the_library(tmp_path, caplog):
    library = CheckpointLibrary(None)
    with caplog.at_level(logging.INFO, logger="bot.app"):
        make_engine(make_settings(tmp_path, engine={"memory_budget_gb": 1.5}), library)
    assert "memory budget 1.5 GiB" in _startup_line(caplog)
    assert library.residency is not None and library.residency.budget_bytes == int(1.5 * 1024**3)


def test_xformers_that_cannot_run_fails_at_startup_naming_the_key(tmp_path):
    settings = make_settings(tmp_path, engine={"attention": "xformers"})
    with pytest.raises(ConfigError, match=r"\[engine\] attention: .*xformers"):
        build_app(settings, library=CheckpointLibrary(None))


def test_cli_reports_the_startup_failure_without_a_traceback(tmp_path, capsys):
    from bot.cli import main

    config = tmp_path / "config.toml"
    config.write_text(
        f'[bot]\ndata_dir = "{tmp_path / "data"}"\n[engine]\ndevice = "cpu"\nattention = "xformers"\n',
        encoding="utf-8",
    )
    assert main(["--config", str(config), "generate", "a cat", "-o", str(tmp_path / "out.png")]) == 2
    error = capsys.readouterr().err
    assert "atelier: [engine] attention:" in error and "xformers" in error
    assert "Traceback" not in error


# -- OOM retry through the bot ------------------------------------------------------------------


@pytest.fixture
async def app_with_engine(tmp_path: Path, database_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Apps whose engine ``make_engine`` builds from [engine] (over a library of their own)."""
    apps = []

    async def factory(**engine_table: Any) -> Any:
        settings = make_settings(tmp_path, database_url, engine=engine_table)
        app = build_app(settings, library=CheckpointLibrary(None))
        apps.append(app)
        await app.start()
        return app

    yield factory
    for app in apps:
        await app.stop(wait=False)


def _fail_first_unet_calls(app: Any, times: int) -> list[int]:
    """Raise CUDA's out-of-memory error on the first ``times`` UNet calls."""
    raised: list[int] = []

    def hook(_module, _args):
        if len(raised) < times:
            raised.append(1)
            raise RuntimeError(OOM_TEXT)

    app.library.load("tiny").unet.register_forward_pre_hook(hook)
    return raised


async def _draw(app: Any, log: EventLog, line: str) -> tuple[str, Any]:
    replies = await app.service.handle_line(line, ALICE)
    assert not replies[0].error, replies
    (job_id,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job_id) or log.of("failed", job_id))
    return job_id, (log.of("finished", job_id) or log.of("failed", job_id))[0]


async def _image(app: Any, event: Any) -> np.ndarray:
    return np.asarray((await opened(app, event.images[0])).convert("RGB"))


DRAW = "/draw a cat --seed 11 --steps 2 --size 64x64"


async def test_a_job_that_runs_out_of_memory_is_retried_and_finishes(app_with_engine, caplog):
    app = await app_with_engine()
    log = EventLog(app)
    raised = _fail_first_unet_calls(app, 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine"):
        job_id, event = await _draw(app, log, DRAW)
    assert event.kind == "finished", event
    assert raised == [1]
    assert any("retrying once in medvram mode" in r.getMessage() for r in caplog.records)
    record = await app.store.get(job_id)
    assert record.status == "finished" and len(record.images) == 1
    _again_id, again = await _draw(app, log, DRAW)
    assert np.array_equal(await _image(app, event), await _image(app, again))


async def test_without_retry_the_job_fails_with_advice_and_the_next_one_runs(app_with_engine):
    app = await app_with_engine(oom_retry=False)
    log = EventLog(app)
    raised = _fail_first_unet_calls(app, 1)
    failed_id, failed = await _draw(app, log, DRAW)
    assert failed.kind == "failed" and failed.key == "error.out_of_memory"
    assert failed.params["width"] == 64 and OOM_TEXT in failed.params["detail"]
    assert (await app.store.get(failed_id)).status == "failed"
    _next_id, finished = await _draw(app, log, DRAW)
    assert finished.kind == "finished" and raised == [1]


async def test_a_second_oom_in_the_retry_fails_cleanly(app_with_engine):
    app = await app_with_engine(oom_retry=True)
    log = EventLog(app)
    raised = _fail_first_unet_calls(app, 2)
    _failed_id, failed = await _draw(app, log, DRAW)
    assert failed.kind == "failed" and failed.key == "error.out_of_memory" and raised == [1, 1]
    _next_id, finished = await _draw(app, log, DRAW)
    assert finished.kind == "finished"


async def test_the_engine_is_built_on_its_device_thread_unless_a_setting_may_be_refused(
    tmp_path, database_url, caplog
):
    """A CPU (or "auto") engine is built where it is first used, on the device's thread, so
    the bot answers before torch loads; settings this machine may refuse (a CUDA device, a
    worker's engines) are built at once, and a bad one stops the start."""
    settings = make_settings(tmp_path, database_url)
    app = build_app(settings, library=CheckpointLibrary(None))
    (engine,) = app.engines
    assert type(engine) is DeferredEngine and engine.device == "cpu" and not engine.resident("tiny")
    with caplog.at_level(logging.INFO, logger="bot.app"):
        await app.start()
        try:
            assert not [r for r in caplog.records if r.getMessage().startswith("engine: ")]  # not built yet
            job_id, event = await _draw(app, EventLog(app), DRAW)
            assert event.kind == "finished"
        finally:
            await app.stop(wait=False)
    assert _startup_line(caplog).startswith("engine: device cpu, precision fp32")  # built by the job
    assert engine.device == torch.device("cpu") and engine.resident("tiny")
    with pytest.raises(ConfigError, match="CUDA device"):
        build_app(make_settings(tmp_path, database_url, engine={"device": "cuda:3"}))
    worker = build_app(settings, library=CheckpointLibrary(None), worker=True)
    assert type(worker.engines[0]) is not DeferredEngine and worker.engines[0].device == torch.device("cpu")


# -- several devices ------------------------------------------------------------------------------


async def test_several_devices_each_load_their_own_checkpoints_and_run_jobs_at_once(app_with_engine):
    app = await app_with_engine(devices=["cpu", "cpu"])
    first, second = app.engines
    assert first.library is app.library and second.library is not first.library
    assert second.library.names() == first.library.names()  # one catalog
    log = EventLog(app)
    seen: dict[str, set[str]] = {"first": set(), "second": set()}
    for name, engine in (("first", first), ("second", second)):  # a job alone, or a batch
        generate, generate_batch = engine.generate, engine.generate_batch

        def recording(request, _generate=generate, _name=name, **kwargs):
            seen[_name].add(request.prompt)
            return _generate(request, **kwargs)

        def recording_batch(requests, _generate=generate_batch, _name=name, **kwargs):
            seen[_name].update(request.prompt for request in requests)
            return _generate(requests, **kwargs)

        engine.generate, engine.generate_batch = recording, recording_batch
    await app.queue.stop()  # the jobs wait together; both devices are free when it starts again
    jobs = []
    for prompt, steps in (("a cat", 30), ("a dog", 31)):
        (accepted,) = await app.service.handle_line(f"/draw {prompt} --steps {steps} --size 64x64", ALICE)
        jobs += accepted.data["jobs"]
    (other,) = await app.service.handle_line("/draw a fox --steps 32 --size 64x64", Actor(
        platform="console", user_id="bob", name="Bob", locale="en", chat_id="c"))  # fmt: skip
    jobs += other.data["jobs"]
    await app.queue.start()
    await log.wait_for(lambda: all(log.of("finished", job) for job in jobs), timeout=120)
    assert seen["first"] and seen["second"]  # both devices drew
    assert first.library.is_loaded("tiny") and second.library.is_loaded("tiny")
    app.library.refresh()  # a refresh on one device's library is seen by the other's
    assert second.library.names() == first.library.names()
    with pytest.raises(ConfigError, match="CUDA device"):
        make_engine(
            make_settings(Path("."), engine={"devices": ["cuda:3"]}), CheckpointLibrary(None), device="cuda:3"
        )


# -- warm-up ----------------------------------------------------------------------------------------


async def test_each_device_loads_and_warms_the_default_checkpoint_at_start(app_with_engine, caplog):
    def warmed() -> list[str]:
        return [r.getMessage() for r in caplog.records if "loaded and warmed" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="pipeline.queue.local"):
        app = await app_with_engine(warm_up=True, devices=["cpu", "cpu"])
        for _ in range(600):  # no /draw: the devices warm up on their own
            if len(warmed()) == 2:
                break
            await asyncio.sleep(0.05)
    assert all(engine.library.is_loaded("tiny") for engine in app.engines)
    warmed = warmed()
    assert len(warmed) == 2 and all(m.startswith("tiny loaded and warmed in ") for m in warmed), warmed
    log = EventLog(app)
    job, event = await _draw(app, log, DRAW)
    assert event.kind == "finished"
    cold = await app_with_engine(warm_up=False)
    await asyncio.sleep(0.3)
    assert not cold.library.is_loaded("tiny")  # loaded by its first job only

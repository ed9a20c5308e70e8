"""Settings that would fail or misbehave at run time stop the start instead, naming the key."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bot.hookspecs import hookimpl
from bot.settings import ConfigError, parse_settings
from tests.conftest import make_settings
from tests.scenario import console_env


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ({"steps": 500}, "[defaults] steps: 500 is outside 1-150"),
        ({"steps": 0}, "[defaults] steps: 0 is outside 1-150"),
        ({"width": 500}, "[defaults] width: 500 is not a multiple of 8 (e.g. 496)"),
        ({"height": 4096}, "[defaults] height: 4096 is outside 64-2048"),
        ({"width": 2048, "height": 2048}, "over [limits] max_pixels"),
        ({"cfg_scale": 31}, "[defaults] cfg_scale: 31 is outside 1.0-30.0"),
        ({"batch_size": 9}, "[defaults] batch_size: 9 is outside 1-8"),
        ({"count": 0}, "[defaults] count: 0 is outside 1-8"),
        ({"clip_skip": 13}, "[defaults] clip_skip: 13 is outside 1-12"),
        ({"ensd": -1}, "[defaults] ensd: -1 is negative"),
    ],
)
def test_defaults_outside_the_limits_are_refused(defaults: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"defaults": defaults})
    assert expected in str(info.value)


def test_defaults_are_checked_against_the_configured_limits() -> None:
    parse_settings({"defaults": {"steps": 200}, "limits": {"max_steps": 250}})
    with pytest.raises(ConfigError, match=r"\[defaults\] steps: 20 is outside 30-150"):
        parse_settings({"limits": {"min_steps": 30}})


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ({"defaults": {"sampler": "Euler b"}}, "[defaults] sampler: unknown sampler 'Euler b' (did you mean 'Euler a'?)"),
        ({"defaults": {"sampler": "euler_a"}}, "[defaults] sampler: unknown sampler 'euler_a'"),
        ({"defaults": {"scheduler": "Karas"}}, "[defaults] scheduler: unknown schedule type 'Karas' (did you mean 'Karras'?)"),
        ({"plugins": {"quota": {"max_cost": 5}}}, "[plugins.quota]: no plugin is called 'quota' (did you mean 'quotas'?)"),
        ({"plugins": {"disabled": ["histroy"]}}, "[plugins] disabled: no plugin is called 'histroy' (did you mean 'history'?)"),
    ],
)  # fmt: skip
async def test_names_that_match_nothing_installed_stop_the_build(
    tmp_path: Path, database_url: str, tiny_library, tiny_engine, tables: dict, expected: str
) -> None:
    from bot.app import build_app

    settings = make_settings(tmp_path, database_url, **tables)
    with pytest.raises(ConfigError) as info:
        build_app(settings, engines=[tiny_engine], library=tiny_library)
    assert expected in str(info.value)
    assert "quotas" in str(info.value) or "sampler" in str(info.value) or "schedule" in str(info.value)


async def test_a_default_checkpoint_that_does_not_exist_stops_the_start(make_app) -> None:
    app = await make_app(engine={"default_checkpoint": "sd15"}, start=False)
    with pytest.raises(ConfigError, match=r"\[engine\] default_checkpoint: no checkpoint is called 'sd15'"):
        await app.start()


async def test_a_failing_startup_hook_leaves_no_coroutine_unawaited(make_app) -> None:
    class Refuses:
        @hookimpl
        def startup(self, app):
            raise ConfigError("[plugins.refuses] colour: not a colour")

    class AsyncFirst:
        ran = False

        @hookimpl(tryfirst=True)
        async def startup(self, app):
            AsyncFirst.ran = True

    app = await make_app(extra_plugins=(Refuses(), AsyncFirst()), start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be raised here
        with pytest.raises(ConfigError, match="colour"):
            await app.start()
        import gc

        gc.collect()
    assert AsyncFirst.ran  # called before the refusal, and awaited


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "tables", "expected"),
    [
        ("", '[defaults]\nsampler = "Euler b"\n', "[defaults] sampler: unknown sampler 'Euler b' (did you mean 'Euler a'?)"),
        ("", "[defaults]\nclip_skip = 13\n", "[defaults] clip_skip: 13 is outside 1-12"),
        ("", "[defaults]\nsteps = 500\n", "[defaults] steps: 500 is outside 1-150"),
        ("", "[defaults]\nwidth = 500\n", "[defaults] width: 500 is not a multiple of 8 (e.g. 496)"),
        ('default_checkpoint = "sd15"\n', "", "[engine] default_checkpoint: no checkpoint is called 'sd15'; the checkpoints: tiny"),
        ("", '[plugins]\ndisabled = ["histroy"]\n', "[plugins] disabled: no plugin is called 'histroy' (did you mean 'history'?); the plugins: "),
        ("", '[plugins.quota]\nmax_cost = 5\n', "[plugins.quota]: no plugin is called 'quota' (did you mean 'quotas'?); the plugins: "),
        # refused by the plugin's own startup hook, after other plugins' async ones exist
        ("", "[plugins.quotas]\nimages = -1\n", "[plugins.quotas] images: Input should be greater than or equal to 0"),
    ],
)  # fmt: skip
def test_the_console_does_not_start_with_a_bad_setting(
    tmp_path: Path, engine: str, tables: str, expected: str
) -> None:
    (tmp_path / "config.toml").write_text(
        f'[bot]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[engine]\ndevice = "cpu"\nwarm_up = false\nmodels_dir = "{tmp_path / "models"}"\n{engine}{tables}',
        encoding="utf-8",
    )
    env = console_env(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "console", "--json"],
        input="/draw a cat\n",
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert '"event": "queued"' not in result.stdout

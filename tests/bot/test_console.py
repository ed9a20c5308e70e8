"""The console adapter and the CLI as a user runs them: real processes, real files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.images import read_infotext
from pipeline.infotext import parse

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, database_url: str | None = None) -> dict[str, str]:
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text(
            f'[bot]\ndata_dir = "{tmp_path / "data"}"\n[engine]\ndevice = "cpu"\nmodels_dir = "{tmp_path / "models"}"\n',
            encoding="utf-8",
        )
    env = {**os.environ, "ATELIER_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    env.pop("ATELIER_DATABASE_URL", None)
    if database_url:
        env["ATELIER_DATABASE_URL"] = database_url
    return env


def _atelier(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_generate_writes_a_png_whose_infotext_parses_back_and_repeats(tmp_path: Path) -> None:
    env = _env(tmp_path)
    outputs = []
    for name in ("x.png", "y.png"):
        out = tmp_path / name
        cmd = _atelier(
            "generate",
            "a cat",
            "--checkpoint",
            "tiny",
            "--seed",
            "1",
            "--steps",
            "4",
            "--size",
            "64x64",
            "-o",
            str(out),
        )
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs.append(out)
    fields = parse(read_infotext(outputs[0].read_bytes()))
    assert fields["Prompt"] == "a cat"
    assert (fields["Seed"], fields["Steps"], fields["Size-1"], fields["Size-2"]) == ("1", "4", "64", "64")
    assert (fields["Sampler"], fields["CFG scale"]) == ("Euler a", "7")
    first, second = (Image.open(p).convert("RGB") for p in outputs)
    assert first.size == (64, 64)
    assert first.tobytes() == second.tobytes()


def test_generate_reports_bad_input(tmp_path: Path) -> None:
    cmd = _atelier("generate", "a cat", "--steps", "0", "-o", str(tmp_path / "x.png"))
    result = subprocess.run(
        cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "--steps must be from 1 to 150, got 0" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_console_draw_prints_queued_progress_finished(tmp_path: Path) -> None:
    result = subprocess.run(
        _atelier("console", "--json", "--user", "alice"),
        input="/draw a cat --checkpoint tiny --steps 4 --size 64x64\n",
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    events = _events(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and "reply" in kinds
    job_kinds = [k for k in kinds if k != "reply"]
    assert job_kinds == ["queued", "started", "progress", "progress", "progress", "progress", "finished"]
    assert [(e["step"], e["total"]) for e in events if e["event"] == "progress"] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]
    path = Path(events[-1]["images"][0]["path"])
    assert path.is_file() and parse(read_infotext(path.read_bytes()))["Steps"] == "4"
    text = subprocess.run(
        _atelier("console", "--locale", "zh-CN"),
        input="/draw a cat --steps 0\n/draw a cat --steps 2 --size 64x64\n",
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert "--steps 必须在 1 到 150 之间，收到 0。" in text.stdout
    assert "已排队" in text.stdout and "完成：" in text.stdout and ".png" in text.stdout


def test_plugins_and_db_upgrade_commands(tmp_path: Path) -> None:
    env = _env(tmp_path)
    upgrade = subprocess.run(_atelier("db", "upgrade"), env=env, capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    from bot import db

    assert f"database at revision {db.current_revision('sqlite+aiosqlite://')}" in upgrade.stdout
    assert (tmp_path / "data" / "atelier.db").is_file()
    listing = subprocess.run(_atelier("plugins"), env=env, capture_output=True, text=True, timeout=120)
    assert "generate: check_request, plan_generation, register_commands, result_actions" in listing.stdout
    assert "pnginfo: register_commands" in listing.stdout
    assert (
        "quotas: check_request, generation_ended, generation_finished, generations_finished, register_commands,"
        " request_dropped, startup" in listing.stdout
    )
    assert "moderation: actor_roles, check_request, register_commands, startup" in listing.stdout


def test_bad_config_fails_at_startup_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[limits]\nmax_steps = -3\n", encoding="utf-8")
    result = subprocess.run(
        _atelier("plugins"), env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "[limits] max_steps" in result.stderr


def test_sigkill_with_jobs_queued_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, process_database
) -> None:
    env = _env(tmp_path, process_database)
    proc = subprocess.Popen(
        _atelier("console", "--json"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdin and proc.stdout
    # one slow job occupies the device; three more wait behind it
    proc.stdin.write("/draw slow --steps 30 --size 256x256 --seed 1\n")
    for seed in (2, 3, 4):
        proc.stdin.write(f"/draw a cat --steps 4 --size 64x64 --seed {seed}\n")
    proc.stdin.flush()
    seen: list[dict] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            seen.append(json.loads(line))
        if sum(e["event"] == "queued" for e in seen) == 4 and any(e["event"] == "progress" for e in seen):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not any(e["event"] == "finished" for e in seen)
    jobs = [e["id"] for e in seen if e["event"] == "queued"]
    assert len(jobs) == 4

    rerun = subprocess.run(
        _atelier("console", "--json"),
        input="",
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert rerun.returncode == 0, rerun.stderr
    events = _events(rerun.stdout)
    finished = [e["id"] for e in events if e["event"] == "finished"]
    assert sorted(finished) == sorted(jobs)  # all finish, each exactly once
    assert all(Path(e["images"][0]["path"]).is_file() for e in events if e["event"] == "finished")


# hostile input: no line ends the console ---------------------------------------------------------

INTERNAL = "error.internal"
MODERATOR_CONFIG = {"moderation": {"moderators": ["console:mod"]}}


@pytest.fixture
async def console_app(tmp_path: Path, tiny_library, tiny_engine):
    """A started App on SQLite whose queue takes jobs but runs none (no engine time),
    with a 4 KiB upload cap."""
    from bot.app import build_app
    from tests.conftest import make_settings

    settings = make_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}",
        limits={"max_upload_bytes": 4096},
        plugins=MODERATOR_CONFIG,
    )
    app = build_app(settings, engines=[tiny_engine], library=tiny_library)
    await app.start()
    await app.queue.stop()
    yield app
    await app.stop(wait=False)


def special_paths(folder: Path) -> dict[str, str]:
    """Paths whose reading once killed the console, by the reply each must get."""
    fifo = folder / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    big = folder / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10_000)
    return {
        "/proc/self/mem": "console.attach_unreadable",
        "/dev/zero": "console.attach_not_a_file",
        str(folder): "console.attach_not_a_file",
        str(fifo): "console.attach_not_a_file",
        str(folder / ("x" * 300)): "console.attach_name_too_long",
        "/" + "a/" * 2100 + "b": "console.attach_name_too_long",
        str(folder / "missing.png"): "console.attach_missing",
        str(big): "error.upload_too_large",
    }


def _console(app, user: str = "alice"):
    import io

    from bot.adapters.console import ConsoleAdapter
    from bot.types import Actor

    actor = Actor(platform="console", user_id=user, name=user, chat_id="console")
    return ConsoleAdapter(app, actor, json_mode=True, out=io.StringIO())


async def test_attach_refuses_special_files_and_the_console_goes_on(console_app, tmp_path: Path) -> None:
    console = _console(console_app)
    expected = special_paths(tmp_path)

    async def lines():
        for path in expected:
            yield f"/pnginfo --attach {path}\n"
        yield "/help\n"

    await console.run_lines(lines())
    printed = [json.loads(line) for line in console.out.getvalue().splitlines()]
    errors, rest = printed[: len(expected)], printed[len(expected) :]
    assert [e["key"] for e in errors] == list(expected.values())
    assert all(e["event"] == "error" and len(e["text"]) < 300 for e in errors)
    assert "(EIO)" in errors[0]["text"] and "at most 4 KiB" in errors[-1]["text"]
    assert rest[0]["key"] == "help.header"  # the loop went on to the next line
    zh = console_app.translator.t("zh-CN", "console.attach_not_a_file", path="/dev/zero")
    assert "不是普通文件" in zh


def _fuzz_strategies(app, paths: list[str]):
    from hypothesis import strategies as st

    from bot.commands import quote_value

    huge = st.one_of(
        st.builds(lambda digit, n: digit * n, st.sampled_from("190"), st.integers(4_000, 100_000)),
        st.builds(lambda n: "8" * n + "x64", st.integers(4_000, 10_000)),
        st.integers(min_value=-(10**60), max_value=10**60).map(str),
        st.sampled_from(["-" + "9" * 5_000, "0" * 5_000 + "7", "1e999", "nan", "inf", "-0", "٣", "１２"]),
        st.sampled_from(["9999999999d", "99999999w", "0d", "2024-02-30", "steps: 1-99999999999"]),
    )
    values = st.one_of(
        huge,
        st.floats().map(repr),
        st.from_regex(r"[0-9]{1,30}[xX×*][0-9]{1,30}", fullmatch=True),
        st.sampled_from(paths),
        st.text(max_size=40),
    )
    specs = app.service.options.lookup()
    numeric = sorted(name for name, spec in specs.items() if spec.kind not in ("str", "choice", "flag"))
    numeric += ["since", "limit", "for", "images", "gpu-seconds", "strength", "x", "y"]
    names = sorted(specs) + ["reason", "global", "regex", "strong", "chat", "guild", "attach"]
    option = st.tuples(st.one_of(st.sampled_from(numeric), st.sampled_from(names)), st.one_of(huge, values))
    command = st.sampled_from(
        ["", "/draw", "/grid", "/export", "/history", "/show", "/vary", "/refine", "/pnginfo", "/ban",
         "/unban", "/words", "/words add", "/quota", "/quota set @bob", "/audit", "/style save x",
         "/preset save x", "/cancel", "/delete", "/grid cap", "/forever", "/help", "/models", "/reroll"]
    )  # fmt: skip
    attach = st.one_of(st.just(""), st.sampled_from(paths).map(lambda path: " --attach " + path))
    built = st.builds(
        lambda c, words, opts, a: " ".join([c, words, *(f"--{n} {quote_value(v)}" for n, v in opts)]) + a,
        command,
        st.one_of(huge, st.text(max_size=30)),
        st.lists(option, min_size=1, max_size=4),
        attach,
    )
    return st.one_of(built, built, built, st.text(max_size=200))


async def test_fuzzed_console_lines_never_end_the_loop_or_fail_inside(console_app, tmp_path: Path) -> None:
    """Lines of any commands with huge integers, long and special paths and any text: every
    one is answered, none with the internal-error reply, and the console reads on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from bot.adapters.console import commands

    note = tmp_path / "note.txt"
    note.write_text("not an image", encoding="utf-8")
    paths = [*special_paths(tmp_path), str(note)]
    consoles = {"alice": _console(console_app), "mod": _console(console_app, "mod")}
    lines = _fuzz_strategies(console_app, paths)

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(lines, min_size=1, max_size=4), user=st.sampled_from(sorted(consoles)))
    def check(batch: list[str], user: str) -> None:
        console = consoles[user]

        async def feed():
            for line in batch:
                yield line + "\n"

        async def go() -> list:
            return [await console.handle(text) async for text in commands(feed())]

        future = asyncio.run_coroutine_threadsafe(go(), loop)
        for replies in future.result(timeout=60):
            for reply in replies:
                assert reply.key != INTERNAL, (batch, reply)
                console_app.translator.t("zh-CN", reply.key, **reply.params)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check)
    # the console still answers after everything above
    assert (await consoles["alice"].handle("/help"))[0].key == "help.header"


def test_hostile_lines_do_not_end_the_console_process(tmp_path: Path) -> None:
    lines = [
        b"/pnginfo --attach /proc/self/mem",
        b"/draw a cat --attach /dev/zero",
        b"/pnginfo --attach " + b"x" * 300,
        b"/draw a cat --steps " + b"9" * 100_000,
        b"/draw a cat --seed " + b"9" * 5_000,
        b"/export --since 9999999999d",
        b"/help \xff\xfe\xc3( is not UTF-8",
        b"/cancel",
    ]
    env = {**_env(tmp_path), "PYTHONIOENCODING": "utf-8"}  # strict, as on a UTF-8 terminal
    result = subprocess.run(
        _atelier("console", "--json", "--user", "alice"),
        input=b"\n".join(lines) + b"\n",
        env=env,
        capture_output=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    printed = _events(result.stdout.decode("utf-8"))
    keys = [e["key"] for e in printed if e["event"] in ("reply", "error")]
    assert keys[:6] == [
        "console.attach_unreadable",
        "console.attach_not_a_file",
        "console.attach_name_too_long",
        "error.out_of_range",
        "error.seed_range",
        "error.duration_range",
    ]
    assert keys[6] == "error.unknown_command" and keys[-1] == "error.missing_argument"
    assert "error.internal" not in keys

"""A new user's first hour, through a real ``atelier console --json`` process (issue 14).

One console serves every scenario below, in the order a user would meet them: a pasted
infotext, a bare /draw, phone-typed options, a missing file, rerolls after changing the
default preset (with their progress), and a forever run stopped by the id the user typed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pipeline.infotext import parse
from tests.scenario import ConsoleSession, jobs_of

pytestmark = pytest.mark.slow

PASTE = (
    "/draw a red fox in the snow\n"
    "Negative prompt: lowres, bad hands\n"
    "Steps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Model hash: deadbeef, Model: tiny"
)


def _infotext(session: ConsoleSession, job: str) -> dict[str, str]:
    finished = session.finished(job)
    assert finished["event"] == "finished", finished
    return parse(finished["images"][0]["infotext"])


def _keys(replies: list[dict]) -> list[str]:
    return [reply["key"] for reply in replies]


def test_a_new_users_first_hour(tmp_path: Path) -> None:
    with ConsoleSession(tmp_path) as s:
        # 1. a three-line infotext pasted after /draw is one request, the unknown hash said
        replies = s.command(PASTE)
        assert _keys(replies)[0] == "draw.accepted", replies
        assert "note.model_hash_unknown" in _keys(replies), replies
        assert "deadbeef" in replies[_keys(replies).index("note.model_hash_unknown")]["text"]
        (pasted,) = jobs_of(replies)
        fields = _infotext(s, pasted)
        assert fields["Prompt"] == "a red fox in the snow"
        assert fields["Negative prompt"] == "lowres, bad hands"
        assert (fields["Steps"], fields["Seed"], fields["Sampler"]) == ("2", "5", "Euler")
        # ... and after /pnginfo too: one answer, with the same note
        replies = s.command(PASTE.replace("/draw", "/pnginfo", 1))
        assert _keys(replies) == ["pnginfo.result", "note.model_hash_unknown"], replies
        # a line that is no command starts nothing, and says how to draw it
        time.sleep(0.3)
        (refused,) = s.command("a lonely line")
        assert refused["key"] == "error.not_a_command" and "/draw" in refused["text"]
        assert not jobs_of([refused])

        # 2. a bare /draw shows the usage
        (bare,) = s.command("/draw")
        assert bare["key"] == "error.missing_argument" and "Usage: /draw [PROMPT]" in bare["text"], bare
        assert not jobs_of([bare])

        # 3. phone dashes are options; a single dash is refused; a negative seed still works
        for dash in ("\u2014", "\u2013"):
            replies = s.command(f"/draw a cat {dash}steps 2 {dash}seed 7")
            (job,) = jobs_of(replies)
            fields = _infotext(s, job)
            assert (fields["Prompt"], fields["Steps"], fields["Seed"]) == ("a cat", "2", "7")
        (single,) = s.command("/draw a cat -steps 2")
        assert single["key"] == "error.single_dash" and "--steps" in single["text"], single
        (job,) = jobs_of(s.command("/draw a cat --steps 2 --seed -1"))
        assert _infotext(s, job)["Steps"] == "2"

        # 4. a missing file is "not found"; a bad /history page is a usage error
        (missing,) = s.command("/pnginfo --attach nope.png")
        assert missing["key"] == "console.attach_missing" and 'nope.png" was not found' in missing["text"]
        (page,) = s.command("/history abc")
        assert page["key"] == "error.unexpected_text", page

        # 7. a reroll (a variation, a refine, a remix) is the parent's request: today's default
        # preset is not added again
        (parent,) = jobs_of(s.command('/draw a cat --negative "lowres, bad hands" --steps 4'))
        parent_fields = _infotext(s, parent)
        assert _keys(s.command("/preset default nai"))[0] == "preset.default_set"
        for action in (f"/reroll {parent}", f"/vary {parent}", f"/refine {parent}"):
            (child,) = jobs_of(s.command(action))
            fields = _infotext(s, child)
            assert fields["Negative prompt"] == parent_fields["Negative prompt"] == "lowres, bad hands", (
                action
            )
            assert fields["Prompt"] == parent_fields["Prompt"], action
            # 9. progress is contiguous and ends at the total, though a refine's img2img
            # runs fewer sampler steps than the request's 4
            steps = [
                (e["step"], e["total"]) for e in s.events if e["event"] == "progress" and e["id"] == child
            ]
            assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)], (action, steps)
        # a remix too: only its prompt is new
        (remixed,) = jobs_of(s.command(f"/remix {parent} a dog"))
        fields = _infotext(s, remixed)
        assert (fields["Prompt"], fields["Negative prompt"]) == ("a dog", "lowres, bad hands"), fields
        # while a new /draw does get the new default
        (fresh,) = jobs_of(s.command("/draw a cat --steps 2"))
        assert "bad anatomy" in _infotext(s, fresh)["Negative prompt"]

        # 8. /forever ID runs under a new id; /stop with the id the user typed stops it
        replies = s.command(f"/forever {parent}")
        (run,) = jobs_of(replies)
        assert run != parent
        (stopping,) = s.command(f"/stop {parent}")
        assert stopping["key"] == "forever.stopping" and stopping["text"].count(run), stopping
        s.wait_for(lambda e: e["event"] == "notice" and e.get("key") == "forever.stopped")

        # 12. samplers spelled as in other tools get a "did you mean"
        for typed, meant in (("euler_a", "Euler a"), ("Euler b", "Euler")):
            (wrong,) = s.command(f"/draw a cat --sampler {typed!r}".replace("'", '"'))
            assert wrong["key"] == "error.unknown_sampler", wrong
            assert f'Did you mean "{meant}' in wrong["text"], wrong


def test_the_text_console_shows_files_and_how_to_press_buttons(tmp_path: Path) -> None:
    """11. Without --json, a result's buttons are the commands to type, and an export says
    where its file is."""
    import subprocess
    import sys

    from tests.scenario import console_env

    script = "/draw a cat --steps 2 --seed 3\n/export\n/export\n/style save ink ink drawing, {prompt}\n/style export\n"
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "console", "--user", "alice"],
        input=script,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=console_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Buttons (type the command to press one):" in out, out
    for command in ("/reroll ", "/vary ", "/refine ", "/forever "):
        assert command in out, (command, out)
    zips = [line.strip() for line in out.splitlines() if line.strip().endswith(".zip")]
    csvs = [line.strip() for line in out.splitlines() if line.strip().endswith("styles.csv")]
    # 10. a second export keeps the first one's file
    assert len(zips) == 2 and zips[0] != zips[1], out
    assert all(Path(path).is_file() for path in zips), out
    assert csvs and Path(csvs[0]).is_file(), out


async def test_lines_that_arrive_together_are_one_command() -> None:
    """1. The console's reader: a paste joins its command; a line typed later does not."""
    from bot.adapters.console import commands

    async def typed():
        for line in PASTE.split("\n"):
            yield line + "\n"
        await asyncio.sleep(0.3)
        yield "a lonely line\n"
        yield "/help\n"
        await asyncio.sleep(0.3)
        yield "/draw a \\\n"
        await asyncio.sleep(0.3)
        yield "cat\n"

    got = [text async for text in commands(typed())]
    assert got == [PASTE, "a lonely line", "/help", "/draw a \ncat"]

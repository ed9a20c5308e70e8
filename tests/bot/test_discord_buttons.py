"""Presses on the Discord adapter's results, end to end against the fake Discord: reroll
and variations in a thread, paged actions, who may delete, the remix form, forever until
stop, and buttons that still work after the bot process was stopped and started."""

from __future__ import annotations

import asyncio
import io
import signal
from typing import Any

from PIL import Image

from pipeline.images import read_infotext
from tests.bot.discord_helpers import (
    ALICE,
    BOB,
    CHANNEL,
    GUILD,
    bot_process,
    button,
    buttons,
    draw,
    option,
    png_of,
    restore_discord_urls,  # noqa: F401  (autouse)
    result_of,
    results,
    running,
    server,
    submit_remix,
)
from tests.fakes.discord_api import MANAGE_GUILD, FakeDiscord, user_json


async def test_reroll_and_v2_make_new_generations_and_a_variation_opens_a_thread(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a cat"), option("batch", 2), option("seed", "11"))
            first = await result_of(dc)
            await dc.click(first["id"], button(first, "Reroll"), user=ALICE)
            reroll = await result_of(dc, 2)
            assert reroll["channel_id"] == CHANNEL and reroll["id"] != first["id"]

            await dc.click(first["id"], button(first, "V2"), user=ALICE)
            thread = await dc.wait_for(lambda: dc.messages[first["id"]].get("thread"))
            variation = await result_of(dc, channel=thread["id"])
            assert thread["parent_id"] == CHANNEL
            # a variation pressed inside the thread stays in it
            await dc.click(variation["id"], button(variation, "V1"), user=ALICE)
            await result_of(dc, 2, channel=thread["id"])
            assert sum(1 for m in dc.messages.values() if m.get("thread")) == 1

        job = button(first, "Reroll").removeprefix("reroll:")
        children = await app.store.children(job)
        assert len(children) == 2 and {c.thread_key for c in children} == {None, job}


async def test_more_than_25_actions_are_paged_and_a_button_on_the_next_page_works(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc):
            await draw(dc, option("prompt", "a cat"), option("batch", 8), option("steps", 2))
            result = await result_of(dc)  # V, V strong, refine and upscale 1-8 and five more
            more = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if "More actions (2/2)" in m["content"]), None)
            )
            pages = [buttons(result), buttons(more)]
            assert len(pages[0]) == 25 and len(result["components"]) == 5 and not more["attachments"]
            labels = [b["label"] for page in pages for b in page]
            assert len(labels) == len(set(labels)) == 8 * 4 + 4
            assert all(len(b["custom_id"]) <= 100 for page in pages for b in page)
            await dc.click(more["id"], button(more, "Delete"), user=ALICE)  # the job's own action
            await dc.wait_for(lambda: result["id"] not in dc.messages)
        # the user is mentioned once, the parameters shown once: on the result itself
        assert result["content"].startswith(f"<@{ALICE['id']}>") and result["embeds"]
        assert more["content"] == "More actions (2/2)" and not more["embeds"]


def more_actions(dc: FakeDiscord) -> list[dict[str, Any]]:
    """The further pages of a result's buttons."""
    return [m for m in dc.messages.values() if m["content"].startswith("More actions (")]


async def test_deleting_a_paged_result_after_a_restart_removes_every_page(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a cat"), option("batch", 8), option("steps", 2))
            result = await result_of(dc)
            await dc.wait_for(lambda: more_actions(dc))
        await app.stop(wait=False)
        (more,) = more_actions(dc)  # the Delete button is on this page

        dc.clock_offset = 16 * 60  # the draw's token has expired: they go through the channel
        async with running(make_app, dc):  # a new process: only the stored reference knows the pages
            await dc.click(more["id"], button(more, "Delete"), user=ALICE)
            await dc.wait_for(lambda: result["id"] not in dc.messages)
            await dc.wait_for(lambda: not more_actions(dc))
        assert not results(dc) and dc.sent("DELETE", rf"/channels/{CHANNEL}/messages/{more['id']}")


async def test_delete_by_someone_else_is_refused_and_an_administrator_deletes(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a cat"))
            result = await result_of(dc)
            delete = button(result, "Delete")
            job = delete.removeprefix("delete:")
            await dc.click(result["id"], delete, user=BOB)
            refused = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if m["flags"] & 64), None)
            )
            assert "moderators" in refused["content"] and await app.store.get(job) is not None

            # the server's owner is an administrator: a moderator
            await dc.click(result["id"], delete, user=user_json("1", "owner"))
            await dc.wait_for(lambda: result["id"] not in dc.messages)
            assert await app.store.get(job) is None


async def test_members_of_a_configured_moderator_role_or_with_manage_server_are_moderators(
    make_app,
) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        dc.guilds[GUILD].roles["4242"] = 0  # roles with no permissions of their own
        dc.guilds[GUILD].roles["5151"] = 0
        dc.guilds[GUILD].roles["6262"] = MANAGE_GUILD  # not configured, but may manage the server
        async with running(make_app, dc, discord={"moderator_roles": ["4242"]}) as (app, _):
            await draw(dc, option("prompt", "a cat"))
            result = await result_of(dc)
            await draw(dc, option("prompt", "a dog"))
            other = await result_of(dc, 2)
            delete = button(result, "Delete")
            job = delete.removeprefix("delete:")
            await dc.click(result["id"], delete, user=user_json("78", "member"), roles=("5151",))
            refused = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if m["flags"] & 64), None)
            )
            assert "moderators" in refused["content"] and await app.store.get(job) is not None
            await dc.click(result["id"], delete, user=user_json("77", "helper"), roles=("4242",))
            await dc.wait_for(lambda: result["id"] not in dc.messages)
            assert await app.store.get(job) is None
            delete = button(other, "Delete")
            await dc.click(other["id"], delete, user=user_json("79", "manager"), roles=("6262",))
            await dc.wait_for(lambda: other["id"] not in dc.messages)
            assert await app.store.get(delete.removeprefix("delete:")) is None


async def stopped(process: asyncio.subprocess.Process) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, err.decode(errors="replace")


async def finished(dc: FakeDiscord, count: int) -> dict[str, Any]:
    """The ``count``-th result that mentions its user (a finished job, wherever it is)."""

    def done() -> list[dict[str, Any]]:
        return [m for m in results(dc) if m["content"].startswith(f"<@{ALICE['id']}>")]

    await dc.wait_for(lambda: len(done()) >= count, timeout=300)
    return done()[count - 1]


async def test_a_click_still_works_after_the_bot_process_was_stopped_and_started(tmp_path) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        process = await bot_process(tmp_path, dc)
        try:
            await dc.wait_for(lambda: dc.identifications >= 1, timeout=180)
            await draw(dc, option("prompt", "a cat"))
            first = await finished(dc, 1)
            code, log = await stopped(process)
            assert code == 0, log

            process = await bot_process(tmp_path, dc)
            await dc.wait_for(lambda: dc.identifications >= 2, timeout=180)
            await dc.click(first["id"], button(first, "Reroll"), user=ALICE)
            again = await finished(dc, 2)
            assert again["id"] != first["id"] and again["channel_id"] == CHANNEL
            # every kind of button of the first process's result: upscale, remix, delete
            await dc.click(first["id"], button(first, "Upscale 1"), user=ALICE)
            upscaled = await finished(dc, 3)
            assert Image.open(io.BytesIO(png_of(dc, upscaled))).size == (128, 128)
            remix = button(first, "Remix")
            form = await dc.click(first["id"], remix, user=ALICE)
            await dc.wait_for(lambda: form.responded)
            assert form.response["type"] == 9 and "a cat" in str(form.response["data"]["components"])
            await submit_remix(dc, first, remix, "a dog")
            remixed = await finished(dc, 4)
            assert read_infotext(png_of(dc, remixed)).startswith("a dog\n")
            await dc.click(first["id"], button(first, "Delete"), user=ALICE)
            await dc.wait_for(lambda: first["id"] not in dc.messages, timeout=60)
        finally:
            if process.returncode is None:
                code, log = await stopped(process)
        assert code == 0, log


async def test_remix_asks_for_the_prompt_in_a_form_and_draws_it(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a cat"))
            first = await result_of(dc)
            remix = button(first, "Remix")
            pressed = await dc.click(first["id"], remix, user=ALICE)
            await dc.wait_for(lambda: pressed.responded)
            form = pressed.response
            assert form["type"] == 9 and form["data"]["custom_id"] == remix
            assert "a cat" in str(form["data"]["components"])
            await submit_remix(dc, first, remix, "a dog")
            second = await result_of(dc, 2)
        assert read_infotext(png_of(dc, second)).startswith("a dog\n")


def labelled(dc: FakeDiscord, label: str) -> list[dict[str, Any]]:
    """Results with a button labelled ``label``."""
    return [m for m in results(dc) if label in [b["label"] for b in buttons(m)]]


async def test_forever_keeps_drawing_until_stop_is_pressed(make_app) -> None:
    async with FakeDiscord() as dc:
        server(dc)
        async with running(make_app, dc) as (app, _):
            await draw(dc, option("prompt", "a cat"), option("steps", 2))
            first = await result_of(dc)
            await dc.click(first["id"], button(first, "Forever"), user=ALICE)
            await dc.wait_for(lambda: len(labelled(dc, "Stop")) >= 2, timeout=300)  # new seeds, one by one
            run = labelled(dc, "Stop")[0]
            await dc.click(run["id"], button(run, "Stop"), user=ALICE)
            ended = await dc.wait_for(
                lambda: next((m for m in dc.messages.values() if "was stopped by" in m["content"]), None),
                timeout=120,
            )
            assert not await app.store.list_open()
            drawn = len(labelled(dc, "Stop"))
            await asyncio.sleep(0.5)
            assert len(labelled(dc, "Stop")) == drawn  # nothing more after the end
        seeds = {read_infotext(png_of(dc, m)).split("Seed: ")[1].split(",")[0] for m in labelled(dc, "Stop")}
        assert len(seeds) == drawn and f"after {drawn} image(s)" in ended["content"]
        assert any("Stopping" in m["content"] for m in dc.messages.values())

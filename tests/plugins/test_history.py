"""/history, /show, /export and --private through the service, on SQLite and PostgreSQL,
and as a user types them in the console."""

from __future__ import annotations

import io
import json
import tomllib
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.settings import ConfigError, parse_settings
from bot.types import Actor
from pipeline.images import read_infotext
from plugins.history import HistoryConfig
from tests.conftest import EventLog
from tests.scenario import ConsoleSession, jobs_of

ROOT = Path(__file__).resolve().parents[2]
ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
TABLES = {"plugins": {"moderation": {"moderators": ["console:mod"]}, "quotas": {"max_queued": 0}}}


async def run(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


async def one(app, line: str, actor: Actor = ALICE):
    (reply,) = await run(app, line, actor)
    return reply


def text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def draw(app, log: EventLog, line: str, actor: Actor = ALICE) -> str:
    """Run a /draw-like command to its end; the job id."""
    replies = await run(app, line, actor)
    assert replies[0].key == "draw.accepted", (line, replies[0])
    (job,) = replies[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", job) or log.of("failed", job))
    assert log.of("finished", job), log.of("failed", job)
    return job


def jobs_of_reply(reply) -> str:
    assert reply.key == "draw.accepted", reply
    (job,) = reply.data["jobs"]
    return job


def history_app(make_app, **history):
    tables = {"plugins": {**TABLES["plugins"], "history": history}}
    return make_app(**tables)


async def test_history_pages_newest_first_and_only_moderators_see_others(make_app) -> None:
    app = await history_app(make_app, page_size=2)
    await app.queue.stop()  # rows are all that /history needs
    ids = []
    for k in range(5):
        ids.append(jobs_of_reply(await one(app, f"/draw picture {k} --seed {100 + k} --size 64x72")))
    newest_first = ids[::-1]

    page1 = await one(app, "/history")
    assert (page1.data["page"], page1.data["pages"], page1.data["total"]) == (1, 3, 5)
    assert page1.data["ids"] == newest_first[:2]
    assert (await one(app, "/history 2")).data["ids"] == newest_first[2:4]
    assert (await one(app, "/history 3")).data["ids"] == newest_first[4:]
    line = text(app, page1).splitlines()[1]
    for part in (ids[4], "queued", "picture 4", "seed 104", "64x72", "tiny", "UTC"):
        assert part in line, part
    in_chinese = text(app, await one(app, "/history", replace(ALICE, locale="zh-CN")), "zh-CN")
    assert "第 1/3 页" in in_chinese and f"{ids[4]} 排队中 · picture 4 · 种子 104" in in_chinese
    item = page1.data["items"][0]
    assert (item["seed"], item["width"], item["height"], item["checkpoint"]) == (104, 64, 72, "tiny")

    bad = await one(app, "/history 4")
    assert bad.error and bad.key == "history.bad_page" and "pages are 1 to 3" in text(app, bad)
    assert "没有第 4 页" in text(app, bad, "zh-CN")
    assert (await one(app, "/history 2 3")).key == "error.unexpected_text"

    # someone else's history: refused (and audited) for users, shown to moderators
    refused = await one(app, "/history @alice", BOB)
    assert refused.error and refused.key == "error.moderators_only"
    assert "仅限管理员" in text(app, refused, "zh-CN")
    assert (await one(app, "/history", BOB)).key == "history.empty"
    seen = await one(app, "/history @alice 2", MOD)
    assert seen.data["user"] == "console:alice" and seen.data["ids"] == newest_first[2:4]
    assert (await one(app, "/history 2 @console:alice", MOD)).data["ids"] == newest_first[2:4]
    assert (await one(app, "/history @nobody", MOD)).key == "history.empty"
    audit = (await one(app, "/audit", MOD)).data["entries"]
    assert [(e["actor"], e["action"], e["allowed"]) for e in audit] == [("console:bob", "history", False)]


async def test_private_generations_are_not_found_by_others(make_app) -> None:
    app = await history_app(make_app)
    log = EventLog(app)
    secret = await draw(app, log, "/draw a secret garden --steps 2 --private")
    public = await draw(app, log, "/draw a public park --steps 2")
    assert (await app.store.get(secret)).private and not (await app.store.get(public)).private

    missing = await one(app, "/show 01HZZZZZZZZZZZZZZZZZZZZZZZ", BOB)
    for line in (f"/show {secret}", f"/reroll {secret}", f"/pnginfo {secret}", f"/delete {secret}"):
        reply = await one(app, line, BOB)
        assert reply.error and reply.key == missing.key == "error.not_found", line
        assert text(app, reply, "zh-CN") == text(app, missing, "zh-CN").replace(
            "01HZZZZZZZZZZZZZZZZZZZZZZZ", secret
        )
    assert (await one(app, "/history @alice", BOB)).key == "error.moderators_only"

    # public results may be shown to anyone; private ones to their owner and moderators
    shown = await one(app, f"/show {public}", BOB)
    assert shown.key == "show.result" and shown.files
    assert (await one(app, f"/show {secret}")).key == "show.result"
    assert (await one(app, f"/show {secret}", MOD)).data["private"] is True
    mine = await one(app, "/history")
    assert mine.data["ids"] == [public, secret] and "(private)" in text(app, mine)
    assert [i["private"] for i in (await one(app, "/history @alice", MOD)).data["items"]] == [False, True]

    # a reroll of a private generation is private too, and hidden from the public one's lineage
    child = await draw(app, log, f"/reroll {secret}")
    assert (await app.store.get(child)).private
    assert (await one(app, f"/show {secret}")).data["children"] == [child]
    other = await draw(app, log, f"/reroll {public}", BOB)  # others may reroll public ones
    assert not (await app.store.get(other)).private
    assert (await one(app, f"/show {public}", BOB)).data["children"] == [other]
    assert (await one(app, f"/show {other}", BOB)).data["parent_id"] == public


async def test_show_reposts_a_result_and_walks_a_reroll_chain(make_app) -> None:
    app = await history_app(make_app)
    log = EventLog(app)
    chain = [await draw(app, log, "/draw a lighthouse --steps 2 --seed 7")]
    for _ in range(3):
        chain.append(await draw(app, log, f"/reroll {chain[-1]}"))

    # from the newest back to the first, only by following the parent ids /show answers
    walked, current = [], chain[-1]
    while current is not None:
        shown = await one(app, f"/show {current}")
        finished = log.of("finished", current)[0]
        assert shown.key == "show.result"
        assert [f.image_id for f in shown.files] == [image.id for image in finished.images]
        assert {f.kind for f in shown.files} == {"image"}
        assert [a.id for a in shown.actions] == [a.id for a in finished.actions]
        assert f"reroll:{current}" in [a.id for a in shown.actions]
        assert shown.params["infotext"] == finished.images[0].infotext
        assert shown.data["images"][0]["infotext"] == finished.images[0].infotext
        assert f"Seed: {finished.images[0].seed}" in text(app, shown)
        walked.append((current, shown.data["children"]))
        current = shown.data["parent_id"]
    assert [node for node, _ in walked] == chain[::-1]
    assert [children for _, children in walked] == [[], [chain[3]], [chain[2]], [chain[1]]]
    assert f"Parent: {chain[1]}. Children: {chain[3]}." in text(app, await one(app, f"/show {chain[2]}"))
    assert f"父生成：-。子生成：{chain[1]}。" in text(app, await one(app, f"/show {chain[0]}"), "zh-CN")

    await app.queue.stop()
    (queued,) = (await run(app, "/draw not yet"))[0].data["jobs"]
    pending = await one(app, f"/show {queued}")
    assert pending.key == "show.unfinished" and not pending.files and not pending.actions
    assert f"{queued} is queued. Prompt: not yet" in text(app, pending)
    assert (await one(app, "/show")).key == "error.missing_argument"


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


async def test_export_zips_the_pngs_with_their_infotext_and_an_index(make_app) -> None:
    app = await history_app(make_app, export_limit=3)
    log = EventLog(app)
    first = await draw(app, log, "/draw a red fox --steps 2 --batch 2 --seed 3")
    second = await draw(app, log, f"/reroll {first}")
    await draw(app, log, "/draw not mine --steps 2", BOB)
    await app.queue.stop()
    (queued,) = (await run(app, '/draw "still queued" --private'))[0].data["jobs"]

    reply = await one(app, "/export")
    assert (
        reply.key == "export.done" and reply.data["count"] == 3 and reply.data["images"] == 4
    )  # batches of 2
    (file,) = reply.files
    assert file.kind == "document" and file.name.startswith("console_alice-") and file.name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(file.data)) as archive:
        index = json.loads(archive.read("index.json"))
        assert [entry["id"] for entry in index] == [queued, second, first]
        names = {image["file"] for entry in index for image in entry["images"]}
        assert set(archive.namelist()) == names | {"index.json"}
        for entry in index:
            record = await app.store.get(entry["id"])
            assert entry["status"] == record.status and entry["parent"] == record.parent_id
            assert entry["created"] == record.created_at.isoformat() and entry["private"] == record.private
            assert entry["params"] == record.request.to_dict() and entry["seed"] == record.request.seed
            assert entry["prompt"] == record.request.prompt
            assert len(entry["images"]) == len(record.images)
            for listed, image in zip(entry["images"], record.images, strict=True):
                data = archive.read(listed["file"])
                stored = await app.images.read(image.id)
                assert read_infotext(data) == image.infotext == listed["infotext"]
                assert np.array_equal(png_pixels(data), png_pixels(stored))
                assert (listed["seed"], listed["width"]) == (image.seed, image.width)
    assert index[1]["parent"] == first and index[0]["images"] == [] and index[0]["private"]

    newest = await one(app, "/export --limit 1 --since 1h")
    assert newest.data["ids"] == [queued]
    future = await one(app, "/export --since 2999-01-01")
    assert future.key == "history.empty"
    for line, key in (
        ("/export --limit 4", "error.out_of_range"),
        ("/export --since yesterday", "history.bad_since"),
        ("/export --since 2024-02-30", "history.bad_since"),
        ("/export everything", "error.moderators_only"),  # names a user: for moderators
        ("/export --all", "error.unknown_option"),
    ):
        bad = await one(app, line)
        assert bad.error and bad.key == key, line
    assert "YYYY-MM-DD" in text(app, await one(app, "/export --since x", BOB), "zh-CN")


def test_config_toml_lists_the_history_settings_and_bad_values_fail() -> None:
    settings = parse_settings(tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8")))
    assert set(settings.plugins.table("history")) == set(HistoryConfig.model_fields)
    assert settings.plugin_config("history", HistoryConfig) == HistoryConfig()
    for values, expected in (({"page_size": 0}, "page_size"), ({"pages": 3}, "pages: unknown key")):
        with pytest.raises(ConfigError, match=f"\\[plugins.history\\] {expected}"):
            parse_settings({"plugins": {"history": values}}).plugin_config("history", HistoryConfig)


@pytest.mark.slow
def test_console_history_show_export_and_privacy(tmp_path: Path) -> None:
    config = '[plugins.history]\npage_size = 2\n[plugins.moderation]\nmoderators = ["console:mod"]\n'
    with ConsoleSession(tmp_path, user="alice", config=config) as alice:
        (first,) = jobs_of(alice.command("/draw a cat on a roof --steps 2 --seed 11"))
        alice.finished(first)
        (child,) = jobs_of(alice.command(f"/reroll {first}"))
        alice.finished(child)
        (secret,) = jobs_of(alice.command("/draw my diary --steps 2 --private"))
        alice.finished(secret)
        (listing,) = alice.command("/history")
        assert listing["ids"] == [secret, child] and listing["pages"] == 2
        assert "(private)" in listing["text"]
        (shown,) = alice.command(f"/show {child}")
        assert shown["parent_id"] == first and shown["files"] and f"reroll:{child}" in str(shown["actions"])
        (parent,) = alice.command(f"/show {shown['parent_id']}")
        assert parent["children"] == [child] and parent["parent_id"] is None
        assert read_infotext(Path(parent["files"][0]).read_bytes()) == parent["images"][0]["infotext"]
        (export,) = alice.command("/export")
        with zipfile.ZipFile(export["files"][0]) as archive:
            index = json.loads(archive.read("index.json"))
        assert [entry["id"] for entry in index] == [secret, child, first]
    with ConsoleSession(tmp_path, user="bob", locale="zh-CN") as bob:
        (hidden,) = bob.command(f"/show {secret}")
        (missing,) = bob.command("/show 01HZZZZZZZZZZZZZZZZZZZZZZZ")
        assert hidden["event"] == "error" and hidden["key"] == missing["key"] == "error.not_found"
        assert hidden["text"] == missing["text"].replace("01HZZZZZZZZZZZZZZZZZZZZZZZ", secret)
        assert bob.command(f"/reroll {secret}")[0]["key"] == "error.not_found"
        assert bob.command("/history @alice")[0]["key"] == "error.moderators_only"
        (public,) = bob.command(f"/show {first}")
        assert public["key"] == "show.result" and "子生成" in public["text"]
    with ConsoleSession(tmp_path, user="mod") as mod:
        (seen,) = mod.command("/history @alice 2")
        assert seen["ids"] == [first] and seen["page"] == 2


async def test_history_disabled_leaves_private_unknown(make_app) -> None:
    app = await make_app(plugins={"disabled": ["history"]})
    reply = await one(app, "/draw a cat --private")
    assert reply.error and reply.key == "error.unknown_option"
    assert (await one(app, "/history")).key == "error.unknown_command"


async def test_huge_since_and_page_numbers_get_the_range_message(make_app) -> None:
    app = await history_app(make_app)
    for since in ("9999999999d", "99999999w", "9" * 5_000 + "h"):
        for actor, expected in ((ALICE, "--since must be a duration from 1m to 3650d"), (BOB, "1m 到 3650d")):
            reply = await one(app, f"/export --since {since}", actor)
            assert reply.error and reply.key == "error.duration_range", since
            assert expected in text(app, reply, actor.locale)
    await app.queue.stop()
    await one(app, "/draw a cat")
    reply = await one(app, "/history " + "9" * 5_000)
    assert reply.key == "history.bad_page" and "pages are 1 to 1" in text(app, reply)


async def test_history_and_export_of_someone_else_check_the_role_first_and_are_audited(make_app) -> None:
    app = await history_app(make_app)
    await app.queue.stop()
    (mine,) = (await one(app, "/draw a secret garden --private")).data["jobs"]
    for line in (
        "/export @alice",
        "/export @alice --since forever --bogus",  # refused for the role, not for the options
        "/history @alice 1 2 3",
        '/history @alice "unclosed',
    ):
        reply = await one(app, line, BOB)
        assert reply.error and reply.key == "error.moderators_only", line
    assert (await one(app, "/export --bogus", BOB)).key == "error.unknown_option"  # one's own: no role
    exported = await one(app, "/export @alice", MOD)
    assert exported.key == "export.done" and exported.data["ids"] == [mine]
    (log,) = await run(app, "/audit", MOD)
    entries = [(e["actor"], e["action"], e["target"], e["allowed"]) for e in log.data["entries"]]
    assert entries == [
        ("console:mod", "export", "console:alice", True),
        ("console:bob", "history", "console:alice", False),
        ("console:bob", "history", "console:alice", False),
        ("console:bob", "export", "console:alice", False),
        ("console:bob", "export", "console:alice", False),
    ]

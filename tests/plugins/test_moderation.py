"""Moderation through the service, on SQLite and PostgreSQL: roles, bans, words, NSFW,
/delete and the audit log."""

from __future__ import annotations

from dataclasses import replace

from bot.types import Actor
from tests.conftest import EventLog

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
BOB = Actor(platform="console", user_id="bob", name="Bob", locale="zh-CN", chat_id="c")
MOD = Actor(platform="console", user_id="mod", name="Mod", chat_id="c")
CONFIG = {"moderators": ["console:mod"]}


async def run(app, line: str, actor: Actor = ALICE):
    return await app.service.handle_line(line, actor)


def text(app, reply, locale: str = "en") -> str:
    return app.translator.t(locale, reply.key, **reply.params)


async def test_a_non_moderators_moderator_command_is_refused_and_audited(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    for line in ("/ban @carol", "/unban @carol", "/bans", "/words add dog", "/audit", "/quota reset @carol"):
        (reply,) = await run(app, line, BOB)
        assert reply.error and reply.key == "error.moderators_only", line
        assert "仅限管理员" in text(app, reply, "zh-CN")
    (reply,) = await run(app, "/audit", MOD)
    entries = reply.data["entries"]
    assert [(e["actor"], e["action"], e["allowed"]) for e in entries] == [
        ("console:bob", "quota.reset", False),
        ("console:bob", "audit", False),
        ("console:bob", "words.add", False),
        ("console:bob", "bans", False),
        ("console:bob", "unban", False),
        ("console:bob", "ban", False),
    ]
    assert entries[-1]["target"] == "console:carol"
    assert "console:bob ban console:carol REFUSED" in text(app, reply)


async def test_moderators_come_from_config_adapter_roles_and_scopes(make_app) -> None:
    config = {**CONFIG, "scopes": {"console:chat:c": {"moderators": ["console:local"]}}}
    app = await make_app(plugins={"moderation": config})
    admin = replace(BOB, roles=frozenset({"admin"}))  # e.g. a Telegram chat administrator
    local = Actor(platform="console", user_id="local", name="Local", chat_id="c")
    elsewhere = replace(local, chat_id="other")
    assert not (await run(app, "/bans", admin))[0].error
    assert not (await run(app, "/bans", local))[0].error
    assert (await run(app, "/bans", elsewhere))[0].key == "error.moderators_only"
    # only global (configured) moderators act everywhere
    (reply,) = await run(app, "/ban @carol --global", admin)
    assert reply.key == "error.global_moderators_only"
    assert not (await run(app, "/ban @carol --global", MOD))[0].error


async def test_a_banned_user_is_told_until_when_in_their_language(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    (done,) = await run(app, '/ban @bob --for 2h --reason "spam in #art"', MOD)
    assert not done.error and "until" in text(app, done)
    (reply,) = await run(app, "/draw a cat", BOB)
    assert reply.error and reply.key == "moderation.banned"
    until = reply.params["until"]
    assert until.endswith("UTC")
    assert f"until {until}. Reason: spam in #art" in text(app, reply)
    assert f"直到 {until}。原因：spam in #art" in text(app, reply, "zh-CN")
    assert await app.store.count_by_status() == {}
    assert (await run(app, "/draw a cat"))[0].key == "draw.accepted"  # others still draw

    (listing,) = await run(app, "/bans", MOD)
    assert [b["user"] for b in listing.data["bans"]] == ["console:bob"]
    assert not (await run(app, "/unban @bob", MOD))[0].error
    assert (await run(app, "/draw a cat", BOB))[0].key == "draw.accepted"
    assert (await run(app, "/unban @bob", MOD))[0].key == "moderation.not_banned"

    await run(app, "/ban @bob --global", MOD)
    elsewhere = replace(BOB, chat_id="other")
    (reply,) = await run(app, "/draw a cat", elsewhere)
    assert reply.key == "moderation.banned_forever" and "未说明" in text(app, reply, "zh-CN")
    assert (await run(app, "/ban @bob --for 3 days", MOD))[0].key == "error.bad_duration"
    actions = [e["action"] for e in (await run(app, "/audit", MOD))[0].data["entries"]]
    assert actions == ["ban", "unban", "unban", "ban"]


async def test_a_blocked_word_is_refused_before_anything_is_queued(make_app) -> None:
    app = await make_app(
        plugins={"moderation": {**CONFIG, "blocked_words": ["gore"]}, "quotas": {"images": 3}}
    )
    assert not (await run(app, "/words add --regex c[a@]t", MOD))[0].error
    assert not (await run(app, "/words add dog", MOD))[0].error
    for line, field in (
        ("/draw a c@t", "prompt"),
        ("/draw a GORE scene", "prompt"),
        ("/draw a bird --negative dog", "negative"),
    ):
        (reply,) = await run(app, line)
        assert reply.error and reply.key == "moderation.blocked", line
        assert reply.params["field"].key == f"moderation.field.{field}"
    assert "which is not allowed here" in text(app, reply)
    assert "反向提示词中含有“dog”" in text(app, reply, "zh-CN")
    assert await app.store.count_by_status() == {}
    status = (await run(app, "/quota"))[0]
    assert status.data["images_reserved"] == 0 and status.data["images_left"] == 3  # nothing reserved
    assert (await run(app, "/draw hotdog stand"))[0].key == "draw.accepted"  # whole words only
    (bad,) = await run(app, '/words add --regex "(unclosed"', MOD)
    assert bad.key == "moderation.bad_regex"
    assert not (await run(app, "/words remove dog", MOD))[0].error
    assert (await run(app, "/draw a bird --negative dog"))[0].key == "draw.accepted"
    listing = text(app, (await run(app, "/words", MOD))[0])
    assert "regex: c[a@]t" in listing and "word: gore (config)" in listing and "word: dog" not in listing


async def test_nsfw_only_in_nsfw_channels_or_never(make_app) -> None:
    config = {**CONFIG, "scopes": {"console:chat:strict": {"nsfw": "never"}}}
    app = await make_app(plugins={"moderation": config})
    await app.queue.stop()
    (reply,) = await run(app, "/draw a nude statue")
    assert reply.key == "moderation.nsfw_channel"
    assert "only allowed in channels marked NSFW" in text(app, reply)
    nsfw_channel = replace(ALICE, nsfw_allowed=True)
    assert (await run(app, "/draw a nude statue", nsfw_channel))[0].key == "draw.accepted"
    strict = replace(nsfw_channel, chat_id="strict")
    assert (await run(app, "/draw a nude statue", strict))[0].key == "moderation.nsfw_never"


async def test_delete_by_owner_or_moderator_only(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    log = EventLog(app)
    (done,) = (await run(app, "/draw a cat --steps 2"))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", done))
    await app.idle()
    await app.queue.stop()  # the rest stay queued: no more engine time needed
    paths = [await app.images.path(image.id) for image in log.of("finished", done)[0].images]
    assert paths and all(p.is_file() for p in paths)

    (refused,) = await run(app, f"/delete {done}", BOB)
    assert refused.key == "error.moderators_only"
    assert (await run(app, f"/delete {done}"))[0].key == "moderation.deleted"
    assert await app.store.get(done) is None and not any(p.exists() for p in paths)
    assert (await run(app, f"/delete {done}"))[0].key == "error.not_found"

    cancelled, still_open = (await run(app, "/draw a cat --count 2"))[0].data["jobs"]
    await app.service.cancel(cancelled, ALICE)
    assert (await run(app, f"/delete {cancelled}", MOD))[0].key == "moderation.deleted"
    (reply,) = await run(app, f"/delete {still_open}")
    assert reply.key == "moderation.delete_open" and f"/cancel {still_open}" in text(app, reply)
    entries = (await run(app, "/audit", MOD))[0].data["entries"]
    assert [(e["actor"], e["action"], e["target"], e["allowed"]) for e in entries] == [
        ("console:mod", "delete", cancelled, True),
        ("console:bob", "delete", done, False),
    ]


async def test_allowed_nsfw_results_are_spoilers(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    log = EventLog(app)
    nsfw_channel = replace(ALICE, nsfw_allowed=True)
    (nude,) = (await run(app, "/draw a nude statue", nsfw_channel))[0].data["jobs"]
    (cat,) = (await run(app, "/draw a cat", nsfw_channel))[0].data["jobs"]
    await log.wait_for(lambda: log.of("finished", nude) and log.of("finished", cat))
    assert log.of("finished", nude)[0].spoiler and not log.of("finished", cat)[0].spoiler
    assert (await app.store.get(nude)).spoiler
    plain = await make_app(plugins={"moderation": {**CONFIG, "nsfw_spoiler": False}})
    plain_log = EventLog(plain)
    (again,) = (await run(plain, "/draw a nude statue", nsfw_channel))[0].data["jobs"]
    await plain_log.wait_for(lambda: plain_log.of("finished", again))
    assert not plain_log.of("finished", again)[0].spoiler


async def test_the_role_is_checked_before_the_arguments_and_every_refusal_is_audited(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    for line in (
        "/words foo",  # an unknown action: still the role first
        "/words add",
        "/ban @carol --for 9999999999d --bogus",
        '/ban @carol --reason "unclosed',
        "/unban",
        "/quota set @carol --images lots",
        "/grid cap 5 --bogus",
    ):
        (reply,) = await run(app, line, BOB)
        assert reply.error and reply.key == "error.moderators_only", line
    (reply,) = await run(app, "/audit", MOD)
    entries = [(e["actor"], e["action"], e["target"], e["allowed"]) for e in reversed(reply.data["entries"])]
    assert entries == [
        ("console:bob", "words", None, False),
        ("console:bob", "words.add", None, False),
        ("console:bob", "ban", "console:carol", False),
        ("console:bob", "ban", "console:carol", False),
        ("console:bob", "unban", None, False),
        ("console:bob", "quota.set", "console:carol", False),
        ("console:bob", "grid.cap", None, False),
    ]
    # a moderator gets the usage and range messages the others never reach
    (unknown,) = await run(app, "/words foo", MOD)
    assert unknown.key == "error.unknown_subcommand" and unknown.params["allowed"] == "list, add, remove"
    (too_long,) = await run(app, "/ban @carol --for 9999999999d", MOD)
    assert too_long.key == "error.duration_range" and "3650d" in text(app, too_long)


async def test_the_global_role_is_checked_before_the_arguments_and_every_refusal_is_audited(make_app) -> None:
    """A moderator of one chat who writes --global is refused as such, whatever else the
    line holds, and the attempt is in the global audit log."""
    app = await make_app(plugins={"moderation": CONFIG})
    local = replace(BOB, roles=frozenset({"moderator"}))  # e.g. a Telegram chat administrator
    for line in (
        "/ban @carol --global",
        "/ban @carol --global --for 9999999999d --bogus",
        "/unban @carol --global",
        '/words add --regex "(" --global',
        "/words remove dog --global",
        "/grid cap lots --global",
    ):
        (reply,) = await run(app, line, local)
        assert reply.error and reply.key == "error.global_moderators_only", (line, reply)
    (reply,) = await run(app, "/audit", MOD)
    entries = [(e["actor"], e["action"], e["target"], e["allowed"]) for e in reversed(reply.data["entries"])]
    assert entries == [
        ("console:bob", "ban", "console:carol", False),
        ("console:bob", "ban", "console:carol", False),
        ("console:bob", "unban", "console:carol", False),
        ("console:bob", "words.add", None, False),
        ("console:bob", "words.remove", None, False),
        ("console:bob", "grid.cap", None, False),
    ]
    # in their own chat the same moderator is answered on the arguments, and nothing is refused
    assert (await run(app, '/words add --regex "("', local))[0].key == "moderation.bad_regex"
    assert (await run(app, "/grid cap lots", local))[0].key == "error.not_an_integer"
    assert not (await run(app, "/ban @carol", local))[0].error
    assert not (await run(app, "/ban @dave --global", MOD))[0].error

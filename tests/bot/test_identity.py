"""One person across platforms (bot/identity.py, models/identity_store.py), in the core:
nothing is linked without a code, one account per platform, and linking neither escapes
a ban nor loses a moderator entry."""

from __future__ import annotations

from bot.types import Actor

ALICE = Actor(platform="console", user_id="alice", name="Alice", chat_id="c")
ALICE_TG = Actor(platform="telegram", user_id="42", name="alice_tg", chat_id="42")
BOB_TG = Actor(platform="telegram", user_id="43", name="bob_tg", chat_id="43")
CONFIG = {"moderators": ["console:mod", "telegram:42"]}


async def run(app, line: str, actor: Actor):
    return await app.service.handle_line(line, actor)


async def test_only_the_code_links_and_one_account_per_platform(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    (unknown,) = await run(app, "/link ABCDEFGH", ALICE_TG)
    assert unknown.error and unknown.key == "link.refused.unknown"
    (made,) = await run(app, "/link", ALICE)
    code = made.data["code"]
    (own,) = await run(app, f"/link {code}", ALICE)
    assert own.key == "link.refused.self"
    (done,) = await run(app, f"/link {code.lower()}", ALICE_TG)
    assert done.key == "link.done" and done.data["person"] == "console:alice"
    (made,) = await run(app, "/link", ALICE)
    (second,) = await run(app, f"/link {made.data['code']}", BOB_TG)  # a second Telegram account
    assert second.key == "link.refused.same_platform"


async def test_a_linked_account_keeps_its_ban_and_its_moderator_entry(make_app) -> None:
    app = await make_app(plugins={"moderation": CONFIG})
    (made,) = await run(app, "/link", ALICE)
    await run(app, f"/link {made.data['code']}", BOB_TG)
    mod = Actor(platform="console", user_id="mod", name="Mod", chat_id="43")
    assert not (await run(app, "/ban telegram:43 --global", mod))[0].error
    (refused,) = await run(app, "/draw a cat --steps 1", BOB_TG)
    assert refused.error and refused.key == "moderation.banned_forever"
    assert (await run(app, "/draw a cat --steps 1", ALICE))[
        0
    ].key == "draw.accepted"  # the person is not banned
    await run(app, "/unlink", BOB_TG)

    (made,) = await run(app, "/link", ALICE)
    await run(app, f"/link {made.data['code']}", ALICE_TG)  # telegram:42 is a configured moderator
    (audit,) = await run(app, "/audit", ALICE_TG)
    assert not audit.error

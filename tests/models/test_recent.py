"""Recent answers (models/recent.py): the small reads of every request are kept for a
moment; a change made through this process is seen at once, one made by another process
(another Store on the same database) within ``fresh_for`` seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from bot import db
from models import moderation_store
from models.base import utcnow
from models.identity_store import IdentityStore
from models.moderation_store import ModerationStore
from models.quota_store import QuotaStore
from models.recent import Recent
from models.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counting(answers: list[Any]) -> tuple[list[int], Callable[[], Awaitable[Any]]]:
    calls = [0]

    async def read() -> Any:
        calls[0] += 1
        return answers[calls[0] - 1]

    return calls, read


async def test_an_answer_is_kept_for_fresh_for_seconds_and_then_read_again() -> None:
    clock = Clock()
    recent = Recent(2.0, clock)
    calls, read = counting(["a", "b"])
    assert await recent.get("t", "k", read) == "a"
    clock.now += 1.9
    assert await recent.get("t", "k", read) == "a" and calls == [1]
    clock.now += 0.2
    assert await recent.get("t", "k", read) == "b" and calls == [2]


async def test_keys_and_tables_are_kept_apart_and_a_change_forgets_its_table_only() -> None:
    recent = Recent(2.0, Clock())
    for table, key in (("t", 1), ("t", 2), ("u", 1)):
        assert await recent.get(table, key, counting([f"{table}{key}"])[1]) == f"{table}{key}"
    recent.changed("t")
    assert await recent.get("t", 1, counting(["new"])[1]) == "new"
    assert await recent.get("u", 1, counting(["unused"])[1]) == "u1"


async def test_an_answer_read_while_its_table_changed_is_not_kept() -> None:
    recent = Recent(2.0, Clock())
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "before the change"

    reading = asyncio.create_task(recent.get("t", "k", slow))
    await asyncio.sleep(0)
    recent.changed("t")  # committed while the read was under way
    release.set()
    assert await reading == "before the change"
    assert await recent.get("t", "k", counting(["after"])[1]) == "after"


async def test_fresh_for_zero_keeps_nothing() -> None:
    recent = Recent(0.0, Clock())
    calls, read = counting(["a", "b"])
    assert [await recent.get("t", "k", read), await recent.get("t", "k", read)] == ["a", "b"]


# Each case: a change, and what a read answers before and after it.
async def _ban(store: Store) -> None:
    await ModerationStore(store).ban("console:bob", "global", reason="spam", expires_at=None, banned_by="m")


async def _bans(store: Store) -> list[str]:
    return [ban.user_key for ban in await ModerationStore(store).bans(["global"], user_key="console:bob")]


async def _add_rule(store: Store) -> None:
    await ModerationStore(store).add_rule("global", "word", "dog", "m")


async def _rules(store: Store) -> list[str]:
    return [rule.pattern for rule in await ModerationStore(store).rules(["global"])]


async def _override(store: Store) -> None:
    await QuotaStore(store).set_override("console:bob", "global", images=7, gpu_seconds=None, set_by="m")


async def _images(store: Store) -> int | None:
    found = await QuotaStore(store).override("console:bob", "global")
    return found.images if found else None


async def _link(store: Store) -> None:
    identities = IdentityStore(store)
    await identities.redeem(await identities.new_code("console:alice"), "discord:1")


async def _person(store: Store) -> str | None:
    return await IdentityStore(store).person_of("discord:1")


CASES = {
    "bans": (_ban, _bans, [], ["console:bob"]),
    "word rules": (_add_rule, _rules, [], ["dog"]),
    "quota override": (_override, _images, None, 7),
    "identity link": (_link, _person, None, "console:alice"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_change_is_seen_at_once_here_and_within_fresh_for_in_another_process(
    database_url: str, case: str
) -> None:
    change, read, before, after = CASES[case]
    await asyncio.to_thread(db.upgrade, database_url)
    here, elsewhere = Store.from_url(database_url), Store.from_url(database_url)
    clock = Clock()
    elsewhere.recent = Recent(2.0, clock)
    try:
        assert await read(here) == before and await read(elsewhere) == before  # both keep it
        await change(here)
        assert await read(here) == after
        assert await read(elsewhere) == before  # kept: no statement
        clock.now += 2.0
        assert await read(elsewhere) == after
    finally:
        await here.close()
        await elsewhere.close()


async def test_a_kept_ban_that_ran_out_since_no_longer_counts(database_url: str, monkeypatch) -> None:
    await asyncio.to_thread(db.upgrade, database_url)
    store = Store.from_url(database_url)
    try:
        moderation = ModerationStore(store)
        until = utcnow() + timedelta(hours=1)
        await moderation.ban("console:bob", "global", reason="", expires_at=until, banned_by="m")
        assert await _bans(store) == ["console:bob"]  # kept now
        monkeypatch.setattr(moderation_store, "utcnow", lambda: until + timedelta(seconds=1))
        assert await _bans(store) == []
    finally:
        await store.close()


async def test_a_user_row_is_kept_as_read_and_read_again_when_the_name_or_language_changes(
    database_url: str,
) -> None:
    await asyncio.to_thread(db.upgrade, database_url)
    store = Store.from_url(database_url)
    statements = count_statements(store)
    try:
        first = await store.ensure_user("discord", "1", "Ann", "en")  # created: not kept
        assert await store.ensure_user("discord", "1", "Ann", "en") == first  # read, kept
        before = statements[0]
        assert await store.ensure_user("discord", "1", "Ann", "en") == first
        assert await store.ensure_user("discord", "1", "", None) == first  # nothing to change
        assert statements[0] == before
        renamed = await store.ensure_user("discord", "1", "Anna", "zh-CN")
        assert (renamed.id, renamed.display_name, renamed.locale) == (first.id, "Anna", "zh-CN")
        assert statements[0] > before
        assert (await store.find_user("discord", "1")).display_name == "Anna"
        assert await store.ensure_user("discord", "1", "Anna", "zh-CN") == renamed
    finally:
        await store.close()


async def test_a_user_row_created_in_a_transaction_rolled_back_is_not_kept(database_url: str) -> None:
    await asyncio.to_thread(db.upgrade, database_url)
    store = Store.from_url(database_url)
    try:
        with pytest.raises(RuntimeError):
            async with store.transaction():
                await store.ensure_user("discord", "2", "Bo", "en")
                raise RuntimeError("the request failed")
        assert await store.find_user("discord", "2") is None
        made = await store.ensure_user("discord", "2", "Bo", "en")
        assert await store.find_user("discord", "2") == made
    finally:
        await store.close()


def count_statements(store: Store) -> list[int]:
    from sqlalchemy import event

    statements = [0]

    def count(*_args: Any) -> None:
        statements[0] += 1

    event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    return statements

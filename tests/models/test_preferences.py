"""Preferences: set, replace, delete and the most-specific-scope lookup, on both databases."""

from __future__ import annotations

import asyncio

from bot import db
from bot.types import Actor
from models.preferences import GLOBAL, PreferenceStore, actor_scopes
from models.store import Store


async def test_set_replace_lookup_and_delete(database_url: str) -> None:
    await asyncio.to_thread(db.upgrade, database_url)
    store = Store.from_url(database_url)
    try:
        prefs = PreferenceStore(store)
        alice = Actor("discord", "1", "Alice", chat_id="10", guild_id="20")
        scopes = actor_scopes(alice)
        assert scopes == [("user", "discord:1"), ("chat", "discord:10"), ("guild", "discord:20"), GLOBAL]
        assert await prefs.lookup(scopes, "preset.default", "none") == "none"
        await prefs.set(GLOBAL, "preset.default", "nai")
        await prefs.set(("guild", "discord:20"), "preset.default", "guild")
        assert await prefs.lookup(scopes, "preset.default") == "guild"
        await prefs.set(("user", "discord:1"), "preset.default", {"names": ["a", "b"]}, by="discord:1")
        await prefs.set(("user", "discord:1"), "preset.default", {"names": ["c"]}, by="discord:1")
        assert await prefs.lookup(scopes, "preset.default") == {"names": ["c"]}
        assert await prefs.get(("user", "discord:1"), "preset.default") == {"names": ["c"]}
        assert await prefs.delete(("user", "discord:1"), "preset.default")
        assert not await prefs.delete(("user", "discord:1"), "preset.default")
        assert await prefs.lookup(scopes, "preset.default") == "guild"
        bob = Actor("discord", "2", "Bob")
        assert await prefs.lookup(actor_scopes(bob), "preset.default") == "nai"
        await asyncio.gather(*(prefs.set(GLOBAL, "grid.max_cells", n) for n in range(20)))
        assert await prefs.get(GLOBAL, "grid.max_cells") in range(20)
    finally:
        await store.close()

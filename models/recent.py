"""Recent answers of the small reads every request makes.

Every command asks whom its sender is linked to, and every ``/draw`` asks for the bans and
word rules of its scope, its sender's quota override and its sender's user row: five
statements against rows that change a few times a day (a moderator's command, a new
display name). ``Recent`` keeps such an answer for ``fresh_for`` seconds. A change made
through this process (the repositories call ``changed``) is seen by the next read at
once; one made by another process sharing the database, within ``fresh_for`` seconds.

An answer is kept only when its table did not change while it was read, so a read that
raced a change is never kept past it. Answers must not be mutated by their readers (keep
tuples and frozen records).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

FRESH_FOR = 2.0  # seconds an answer is kept


class Recent:
    def __init__(self, fresh_for: float = FRESH_FOR, clock: Callable[[], float] = time.monotonic) -> None:
        self.fresh_for = fresh_for
        self._clock = clock
        self._answers: dict[str, dict[Hashable, tuple[float, Any]]] = {}
        self._versions: dict[str, int] = {}

    async def get(self, table: str, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """The answer about ``key`` in ``table`` read within ``fresh_for`` seconds, else
        ``read()``'s (kept)."""
        kept = self.kept(table, key, _NONE)
        if kept is not _NONE:
            return kept  # type: ignore[no-any-return]
        return await self.read(table, key, read)

    def kept(self, table: str, key: Hashable, default: Any = None) -> Any:
        """The answer about ``key`` in ``table`` read within ``fresh_for`` seconds, else
        ``default``."""
        kept = self._answers.get(table, {}).get(key)
        return kept[1] if kept is not None and kept[0] > self._clock() else default

    async def read(self, table: str, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``'s answer, kept unless ``table`` changed meanwhile (a read that writes
        calls ``changed``: what it wrote may yet be rolled back with its transaction)."""
        version = self._versions.get(table, 0)
        value = await read()
        if self.fresh_for > 0 and self._versions.get(table, 0) == version:
            answers = self._answers.setdefault(table, {})
            now = self._clock()
            if len(answers) >= _MOST_KEPT:  # many senders: the stale ones go
                for stale in [k for k, (until, _) in answers.items() if until <= now]:
                    del answers[stale]
            answers[key] = (now + self.fresh_for, value)
        return value

    def changed(self, table: str) -> None:
        """This process changed ``table``: its answers are read again."""
        self._versions[table] = self._versions.get(table, 0) + 1
        self._answers.pop(table, None)


_MOST_KEPT = 10_000  # answers of one table past which the stale ones are dropped
_NONE = object()

"""SQLite for the async engine without a thread per connection.

SQLite runs in the process: a statement of ours takes microseconds. The usual async
driver hands every call (cursor, execute, fetch, close, commit) to the connection's own
thread and back, which costs far more than the statement and keeps the event loop waiting
on the interpreter lock. This driver runs each call at once, in the event loop's thread,
and looks to SQLAlchemy's ``sqlite+aiosqlite`` dialect like the driver it expects.

One thing may not run at once: a write while another connection (another task of this
process, or another process) holds the database's write lock. Waiting for it inside
SQLite's busy handler would block the event loop, and with it the task that holds the
lock, so the connection's own busy timeout is 0: a busy statement is tried again after an
``asyncio.sleep``, in short steps, until the configured timeout has passed (``PRAGMA
busy_timeout`` sets it, as for any SQLite connection, or ``?timeout=`` in the URL), and
then fails as SQLite would.

One thing waits for the disk: a checkpoint, which copies the write-ahead log back into
the database file and syncs it. SQLite runs one inside whichever commit finds the log
past 1000 pages; here that is turned off (``wal_autocheckpoint=0``), and every
``CHECKPOINT_EVERY`` commits to the file a checkpoint runs on a worker thread, on a
connection of its own, one at a time per database file, without keeping writers waiting
(``_checkpoint``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection, AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.util.concurrency import await_

log = logging.getLogger(__name__)

SQLITE_BUSY = 5
CHECKPOINT_EVERY = 100  # commits to one database file between two checkpoints
IDLE_SECONDS = 0.5  # a database with no commit for this long has its log started again
# a log this many pages long (4 KiB each) is started again even while writes go on
LOG_PAGES_BOUND = 10_000
# the pauses between tries to start the log again, none of which keeps a writer waiting
_RESTART_PAUSES = (0.001, 0.002, 0.005, 0.01, 0.02)
# the pauses between tries of a busy statement, in seconds; the last repeats
_BACKOFF = (0.0005, 0.001, 0.002, 0.004, 0.008)
_BUSY_TIMEOUT = re.compile(r"^\s*PRAGMA\s+busy_timeout\s*=\s*(\d+)\s*;?\s*$", re.IGNORECASE)


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == SQLITE_BUSY


class Connection:
    """What the dialect's adapter calls on a driver connection, each call run at once."""

    def __init__(self, connection: sqlite3.Connection, database: str | None, uri: bool = False) -> None:
        self._connection: sqlite3.Connection | None = connection
        self._conn = connection  # the adapter sets ``isolation_level`` through this name
        self._tx = _RunAtOnce()
        self.busy_timeout = 5.0  # seconds (sqlite3's default); ``PRAGMA busy_timeout`` changes it
        self._database = database  # the file to checkpoint; None in memory
        self._uri = uri
        connection.execute("PRAGMA busy_timeout=0")
        if database is not None:
            connection.execute("PRAGMA wal_autocheckpoint=0")

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self, self._conn.cursor())

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        cursor = self.cursor()
        await cursor.execute(sql, parameters)
        return cursor

    async def commit(self) -> None:
        await self.retry_busy(self._conn.commit)
        if self._database is not None:
            CHECKPOINTS.committed(self._database, self._uri)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def retry_busy(self, call: Callable[[], Any]) -> Any:
        """``call()``, tried again while the database is busy, up to the busy timeout."""
        try:
            return call()
        except sqlite3.OperationalError as error:
            if not _is_busy(error):
                raise
        deadline = time.monotonic() + self.busy_timeout
        for attempt in itertools.count():
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            try:
                return call()
            except sqlite3.OperationalError as error:
                if not _is_busy(error) or time.monotonic() >= deadline:
                    raise


class Cursor:
    def __init__(self, connection: Connection, cursor: sqlite3.Cursor) -> None:
        self._connection = connection
        self._cursor = cursor

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        timeout = _BUSY_TIMEOUT.match(sql)
        if timeout is not None:  # ours to keep: SQLite's own stays 0 (see the module)
            self._connection.busy_timeout = int(timeout.group(1)) / 1000
            return self
        cursor = self._cursor
        if parameters is None:
            await self._connection.retry_busy(lambda: cursor.execute(sql))
        else:
            await self._connection.retry_busy(lambda: cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Any) -> Cursor:
        rows = list(parameters)
        await self._connection.retry_busy(lambda: self._cursor.executemany(sql, rows))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _Checkpoints:
    """Checkpoints on threads of their own, one at a time per database file: one after
    every ``CHECKPOINT_EVERY`` commits to it (all of this process's connections counted:
    a commit made while one runs counts towards the next), and one that also starts the
    log again once no commit came for ``IDLE_SECONDS``."""

    def __init__(self) -> None:
        self.running: dict[str, concurrent.futures.Future[None]] = {}
        self.done: dict[str, int] = {}
        self.commits: dict[str, int] = {}  # since the last checkpoint began
        self._last: dict[str, float] = {}  # the loop's time of the last commit
        self._idle: dict[str, asyncio.AbstractEventLoop] = {}  # where a look for quiet is due
        # threads of their own: a checkpoint never waits behind the default executor's work
        # (files being written, say), and its end is known without the event loop's help
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    def committed(self, database: str, uri: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._last[database] = loop.time()
        if self._idle.get(database) is not loop:  # none, or one on a loop that has ended
            self._idle[database] = loop
            loop.call_later(IDLE_SECONDS, self._look, database, uri, loop)
        commits = self.commits.get(database, 0) + 1
        self.commits[database] = commits
        if commits >= CHECKPOINT_EVERY and database not in self.running:
            self.start(database, uri)

    def _look(self, database: str, uri: bool, loop: asyncio.AbstractEventLoop) -> None:
        """Start the log again if no commit came for ``IDLE_SECONDS``, else look again then."""
        quiet = loop.time() - self._last.get(database, 0.0)
        if quiet < IDLE_SECONDS or database in self.running:
            loop.call_later(max(IDLE_SECONDS - quiet, 0.05), self._look, database, uri, loop)
            return
        if self._idle.get(database) is loop:
            del self._idle[database]
        self.start(database, uri, restart=True)

    def start(self, database: str, uri: bool = False, *, restart: bool = False) -> None:
        if database in self.running:
            return
        self.commits[database] = 0
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sqlite-checkpoint")
        future = self._threads.submit(_checkpoint, database, uri, restart)
        self.running[database] = future
        future.add_done_callback(lambda done: self._finished(database, done))

    def _finished(self, database: str, future: concurrent.futures.Future[None]) -> None:
        """On the checkpoint's thread (or at once, if it had ended already)."""
        self.running.pop(database, None)
        if future.cancelled():
            return
        if future.exception() is not None:
            log.warning("checkpoint of %s failed: %s", database, future.exception())
            return
        self.done[database] = self.done.get(database, 0) + 1

    async def wait(self) -> None:
        """Until the checkpoints running now have ended."""
        running = [asyncio.wrap_future(future) for future in list(self.running.values())]
        await asyncio.gather(*running, return_exceptions=True)


def _checkpoint(database: str, uri: bool, restart: bool = False) -> None:
    """Copy the log into the database file, keeping no writer waiting; with ``restart``
    (the database was quiet), or once the log is ``LOG_PAGES_BOUND`` pages long, also
    start it again from the top.

    A passive checkpoint copies what was committed so far while writers go on. Starting
    the log again (RESTART) takes the writer lock to copy the pages committed since and
    sync, then needs every reader of the log gone: while writes go on, every write waits
    for it (on an ordinary disk a short job's acknowledgement waits tens of milliseconds),
    so it is left for a quiet moment, or for a log grown long. It is tried without a busy
    handler, so a busy database ends it at once, and again after a short pause, a few
    times; if readers never left, the next checkpoint tries again."""
    if not uri:  # a file that is gone (removed while idle) is not made again
        if not Path(database).exists():
            return
        database, uri = Path(database).absolute().as_uri() + "?mode=rw", True
    connection = sqlite3.connect(database, timeout=0, uri=uri)  # no busy handler: never wait
    try:
        _busy, pages, _copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not restart and pages < LOG_PAGES_BOUND:
            return
        for pause in (*_RESTART_PAUSES, None):
            busy, _pages, _copied = connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if not busy or pause is None:
                return
            time.sleep(pause)
    finally:
        connection.close()


CHECKPOINTS = _Checkpoints()


class _RunAtOnce:
    """The adapter's isolation-level setter queues ``(future, function)`` for the driver's
    thread; here the function runs at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as error:  # handed to the caller through the future
            future.set_exception(error)


async def connect(database: str, **kwargs: Any) -> Connection:
    kwargs["check_same_thread"] = False  # the pool may close a connection from a finalizer
    busy_timeout = float(kwargs.pop("timeout", 5.0))  # ours to wait (``?timeout=`` in the URL)
    connection = sqlite3.connect(database, **kwargs)
    in_memory = database in ("", ":memory:") or "mode=memory" in database
    driver = Connection(connection, None if in_memory else database, bool(kwargs.get("uri")))
    driver.busy_timeout = busy_timeout
    return driver


class _Dbapi(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *args: Any, **kwargs: Any) -> AsyncAdapt_aiosqlite_connection:
        return AsyncAdapt_aiosqlite_connection(self, await_(connect(*args, **kwargs)))


def runs_inline(engine: Any) -> bool:
    """Whether ``engine`` runs SQLite through this module (every call at once)."""
    return isinstance(getattr(engine.dialect, "dbapi", None), _Dbapi)


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The module object for ``create_async_engine(..., module=dbapi())``."""
    import aiosqlite

    driver = SimpleNamespace(
        connect=connect,
        Connection=Connection,
        __version__=aiosqlite.__version__,
        **{
            name: getattr(sqlite3, name)
            for name in (
                "DatabaseError",
                "Error",
                "IntegrityError",
                "NotSupportedError",
                "OperationalError",
                "ProgrammingError",
                "sqlite_version",
                "sqlite_version_info",
            )
        },
    )
    return _Dbapi(driver, sqlite3)

"""The hot path's statements on the driver's connection, around SQLAlchemy's layers.

Every ``/draw`` and every job's start and end run a few small statements: the quota
reservation and the job rows, the claim, the finish and its images, the settlement, and
the small reads a request makes. SQLite runs each in 5-30 us; through an ``AsyncSession`` a
unit of work costs about 350 us of Python before its statements and 60-80 us a statement
(the session, the pool, the engine's execution context, the result objects), and through a
held ``AsyncConnection`` still about 200 us. Here the same statements run on connections
the store holds:

- ``Prepared``: a Core statement compiled once for the dialect, with SQLAlchemy's own
  pieces of an execution (its bind and result processors, its Python-side column
  defaults, the expansion of ``IN`` lists), so a value goes in and comes out as it does
  through a session.
- ``Lane``: one pooled connection the store keeps checked out; a unit of work is its
  statements and one commit on it. ``SqliteLane`` runs them on ``models.sqlite_inline``'s
  connection (a busy database is waited for as that driver waits for it);
  ``AsyncpgLane`` on asyncpg, through SQLAlchemy's adapter of the connection (its
  transaction and its cache of prepared statements), so that a session that joins the
  transaction finds it as its own.
- ``Direct``: the lanes of one store; a unit of work takes an idle lane (or checks out
  another) and gives it back when committed or rolled back. Errors are raised as a session
  raises them (SQLAlchemy's ``IntegrityError``, ``OperationalError``, ...); a lane whose
  server connection was lost is dropped, and one that rested is pinged before use.

An in-memory SQLite database has no lanes: the pool shares its one connection. The
statements and their results are those of a session; ``tests/models/test_direct.py``
runs both ways on both databases.
"""

from __future__ import annotations

import collections
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from models import sqlite_inline

PING_AFTER_IDLE = 1.0  # seconds a server connection may rest before it is pinged
PREPARED_KEPT = 256  # statements kept compiled per store (the hot ones are a dozen)
IDLE_LANES = 8  # connections kept checked out between units of work


class _Context:
    """What a column default's callable is handed (an execution context's two names)."""

    __slots__ = ("current_column", "current_parameters")

    def __init__(self, parameters: dict[str, Any]) -> None:
        self.current_parameters = parameters
        self.current_column: Any = None


class Prepared:
    """One statement compiled for ``dialect`` with the parameter names ``keys`` (an
    INSERT's columns); runs as a session would run it."""

    def __init__(self, statement: Any, dialect: Dialect, keys: Sequence[str] | None, many: bool) -> None:
        compiled: Any = statement.compile(dialect=dialect, column_keys=keys, for_executemany=many)
        if not compiled.positional:  # pragma: no cover - SQLite's and asyncpg's are
            raise NotImplementedError("direct statements need a positional paramstyle")
        self.compiled = compiled
        self.sql: str = compiled.string
        self.positions: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.processors: Mapping[str, Any] = compiled._bind_processors
        self.expanding = bool(compiled.literal_execute_params or compiled.post_compile_params)
        if self.expanding and many:
            raise ValueError("an expanding IN list cannot be sent with executemany")
        self.defaults: list[tuple[Any, str, Any, bool]] = []
        prefetch = compiled.insert_prefetch or compiled.update_prefetch or ()
        getter = compiled._within_exec_param_key_getter if prefetch else None
        for column in prefetch:
            default = column.default if compiled.insert_prefetch else column.onupdate
            if default is None:
                continue
            if not (default.is_scalar or default.is_callable):
                raise NotImplementedError(f"column {column.key}: only scalar and callable defaults")
            self.defaults.append((column, getter(column), default.arg, bool(default.is_callable)))
        self._columns = list(compiled._result_columns)
        self.keys: tuple[str, ...] = tuple(entry.keyname for entry in self._columns)
        self.row = collections.namedtuple("Row", self.keys) if self.keys else None  # type: ignore[misc]
        self._dialect = dialect
        self._results: dict[Any, list[Any] | None] = {}

    def _processors(self, types: Any) -> list[Any] | None:
        """The result processors for the driver's column ``types`` (None: none to run)."""
        found = self._results.get(types, False)
        if found is False:
            columns = self._columns
            kinds = types if types is not None and len(types) == len(columns) else (None,) * len(columns)
            processors = [
                entry.type._cached_result_processor(self._dialect, kind)
                for entry, kind in zip(columns, kinds, strict=True)
            ]
            found = self._results[types] = processors if any(processors) else None
        return found  # type: ignore[return-value]

    def parameters(self, params: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        """The SQL and its positional values for one set of ``params``."""
        values = self.compiled.construct_params(params, escape_names=False)
        if self.defaults:
            context = _Context(values)
            for column, key, arg, is_callable in self.defaults:
                if is_callable:
                    context.current_column = column
                    values[key] = arg(context)
                else:
                    values[key] = arg
        sql, positions, processors = self.sql, self.positions, self.processors
        if self.expanding:
            expanded = self.compiled._process_parameters_for_postcompile(values)
            sql, positions = expanded.statement, expanded.positiontup
            processors = {**processors, **expanded.processors}
        return sql, [processors[key](values[key]) if key in processors else values[key] for key in positions]

    def rows(self, raw: list[Any], types: Any = None) -> list[Any]:
        """The driver's rows as rows with the statement's column names, each value as a
        session reads it."""
        if self.row is None:
            return []
        processors = self._processors(types)
        if processors is None:
            return [self.row(*values) for values in raw]
        return [
            self.row(
                *(
                    convert(value) if convert else value
                    for convert, value in zip(processors, values, strict=True)
                )
            )
            for values in raw
        ]


class Result:
    """What a unit of work's ``execute`` returns: the rows (if any) and the rowcount, read
    as a SQLAlchemy result is read."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class Lane:
    """A connection the store keeps checked out: its unit of work's statements run on the
    driver's connection under it, and SQLAlchemy's ``connection`` stays at hand for a
    transaction that needs a session too (``models.store.Transaction``). The driver's
    part is a subclass's: ``_run``, ``_run_many``, ``in_transaction``, ``_commit``,
    ``rollback``."""

    def __init__(self, direct: Direct, connection: AsyncConnection, raw: Any) -> None:
        self.direct = direct
        self.connection = connection
        self.raw = raw  # SQLAlchemy's adapter of the driver's connection
        self.rested_since = time.monotonic()
        self.lost = False  # its server connection was lost: not used again

    def get_bind(self) -> Any:
        """The engine (for its dialect), as a session's ``get_bind`` answers."""
        return self.direct.engine.sync_engine

    async def execute(
        self, statement: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    ) -> Result:
        """Run ``statement`` with ``params`` (a list of them: once for each, as one
        ``executemany``)."""
        direct = self.direct
        if isinstance(params, Sequence) and not isinstance(params, Mapping):
            if not params:
                return Result([], 0)
            prepared = direct.prepared(statement, params[0], many=len(params) > 1)
            if len(params) > 1:
                batch = [prepared.parameters(one) for one in params]
                sql, rows = batch[0][0], [values for _, values in batch]
                self._announce(sql, rows, many=True)
                try:
                    return Result([], await self._run_many(sql, rows))
                except self.errors as error:  # raised as a session raises it
                    self._failed(error, sql, rows, many=True)
            params = params[0]
        prepared = direct.prepared(statement, params, many=False)
        sql, values = prepared.parameters(params)
        self._announce(sql, values, many=False)
        try:
            raw, rowcount, types = await self._run(sql, values, prepared.row is not None)
        except self.errors as error:
            self._failed(error, sql, values, many=False)
        return Result(prepared.rows(raw, types), rowcount)

    async def scalar(self, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    def _failed(self, error: BaseException, sql: str, params: Any, *, many: bool) -> NoReturn:
        """Raise the driver's ``error`` as a session raises it: SQLAlchemy's
        ``DBAPIError`` subclass (``IntegrityError``, ``OperationalError``, ...) with the
        statement; one that is no database error as it is. A lost connection's lane is
        not used again."""
        dialect: Any = self.direct.dialect
        base = dialect.loaded_dbapi.Error
        adapted = self._adapted(error)
        if not isinstance(adapted, base):
            raise error
        self.lost = dialect.is_disconnect(adapted, self.raw, None)
        raise DBAPIError.instance(
            sql, params, adapted, base, connection_invalidated=self.lost, dialect=dialect, ismulti=many
        ) from error

    def _adapted(self, error: BaseException) -> BaseException:
        """The driver's ``error`` as SQLAlchemy's adapter of the driver raises it."""
        return error

    def _announce(self, sql: str, values: Any, *, many: bool) -> None:
        """The engine's ``before_cursor_execute`` listeners hear of the statement, as of
        any other (without an execution context: there is none)."""
        listeners = self.direct.engine.sync_engine.dispatch.before_cursor_execute
        if listeners:
            listeners(self.connection.sync_connection, None, sql, values, None, many)

    async def commit(self) -> None:
        """Commit what this unit wrote (nothing when a session's transaction on this
        connection already committed it); the engine's ``commit`` listeners hear of it."""
        if not self.in_transaction:
            return
        self._announce_commit()
        try:
            await self._commit()
        except self.errors as error:
            self._failed(error, "COMMIT", (), many=False)

    async def alone(self, statement: Any, params: Mapping[str, Any] | None = None) -> Result:
        """Run one statement as a unit of work of its own: committed, or undone when it
        raises (``Direct.one``)."""
        try:
            result = await self.execute(statement, params)
            await self.commit()
        except BaseException:
            await self.direct._rollback(self)
            raise
        return result

    def _announce_commit(self) -> None:
        listeners = self.direct.engine.sync_engine.dispatch.commit
        if listeners:
            listeners(self.connection.sync_connection)

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    async def _run(self, sql: str, values: list[Any], rows: bool) -> tuple[list[Any], int, Any]:
        """The rows (when ``rows``), the rowcount, and the result's column types (the
        driver's, for the result processors; None where they do not matter)."""
        raise NotImplementedError

    async def _run_many(self, sql: str, rows: list[list[Any]]) -> int:
        raise NotImplementedError

    async def _commit(self) -> None:
        raise NotImplementedError

    async def rollback(self) -> None:
        raise NotImplementedError

    errors: tuple[type[BaseException], ...] = (Exception,)  # what the driver raises
    pings = False  # whether a rested lane is pinged before use (a server's connection)

    async def ping(self) -> bool:
        """Whether the connection still answers (a server may have dropped it)."""
        return True


class SqliteLane(Lane):
    """SQLite through ``models.sqlite_inline``: each call at once, in the loop's thread; a
    busy database waited for with ``asyncio.sleep``."""

    errors = (sqlite3.Error,)

    @property
    def in_transaction(self) -> bool:
        return self.raw.driver_connection.in_transaction

    async def _run(self, sql: str, values: list[Any], rows: bool) -> tuple[list[Any], int, Any]:
        cursor = self.raw.driver_connection.cursor()
        try:
            await cursor.execute(sql, values)
            found = await cursor.fetchall() if rows else []
            return found, cursor.rowcount, None
        finally:
            await cursor.close()

    async def _run_many(self, sql: str, rows: list[list[Any]]) -> int:
        return (await self.raw.driver_connection.cursor().executemany(sql, rows)).rowcount

    async def _commit(self) -> None:
        await self.raw.driver_connection.commit()

    async def rollback(self) -> None:
        await self.raw.driver_connection.rollback()


_ROWCOUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")


class AsyncpgLane(Lane):
    """PostgreSQL through asyncpg, driven through SQLAlchemy's adapter of the connection
    (its transaction, its cache of prepared statements), so that a session joining the
    transaction finds it as its own."""

    pings = True

    def __init__(self, direct: Direct, connection: AsyncConnection, raw: Any) -> None:
        super().__init__(direct, connection, raw)
        self._alone = False  # a statement runs on its own (autocommit)

    async def alone(self, statement: Any, params: Mapping[str, Any] | None = None) -> Result:
        """One statement is atomic on its own: it runs without a transaction around it,
        two round trips (BEGIN, COMMIT) fewer; the engine's ``commit`` listeners still hear
        of its commit."""
        self._alone = True
        try:
            result = await self.execute(statement, params)
        finally:
            self._alone = False
        self._announce_commit()
        return result

    def _adapted(self, error: BaseException) -> BaseException:
        try:
            self.raw._handle_exception(error)  # raises the adapter's translation
        except Exception as translated:
            return translated
        return error  # pragma: no cover - it always raises

    @property
    def in_transaction(self) -> bool:
        return self.raw._transaction is not None

    async def _begin(self) -> None:
        if self.raw._transaction is None and not self._alone:
            await self.raw._start_transaction()

    async def _run(self, sql: str, values: list[Any], rows: bool) -> tuple[list[Any], int, Any]:
        adapter = self.raw
        async with adapter._execute_mutex:
            await self._begin()
            prepared, attributes = await adapter._prepare(
                sql, self.direct.dialect._invalidate_schema_cache_asof
            )
            found = await prepared.fetch(*values)
            status = _ROWCOUNT.match(prepared.get_statusmsg() or "")
            types = tuple(attribute.type.oid for attribute in attributes) if attributes else None
            return found, int(status.group(1)) if status else -1, types

    async def _run_many(self, sql: str, rows: list[list[Any]]) -> int:
        adapter = self.raw
        async with adapter._execute_mutex:
            await self._begin()
            await adapter._connection.executemany(sql, rows)
        return -1

    async def _commit(self) -> None:
        adapter = self.raw
        if adapter._transaction is not None:
            await adapter._call_and_discard(adapter._transaction.commit)

    async def rollback(self) -> None:
        adapter = self.raw
        if adapter._transaction is not None and not adapter._connection.is_closed():
            await adapter._call_and_discard(adapter._transaction.rollback)
        adapter._transaction = None

    async def ping(self) -> bool:
        try:
            await self.raw._async_ping()
        except Exception:
            return False
        return True


class Direct:
    """The lanes of one store, and its compiled statements."""

    def __init__(self, engine: AsyncEngine, lane: type[Lane]) -> None:
        self.engine = engine
        self.dialect = engine.sync_engine.dialect
        self.lane_class = lane
        self._idle: list[Lane] = []
        self._lanes: list[Lane] = []
        self._prepared: collections.OrderedDict[tuple[Any, ...], Prepared] = collections.OrderedDict()
        self._closed = False

    def prepared(self, statement: Any, params: Mapping[str, Any] | None, *, many: bool) -> Prepared:
        keys = tuple(params) if params and getattr(statement, "is_insert", False) else None
        key = (statement, keys, many)
        found = self._prepared.get(key)
        if found is None:
            found = self._prepared[key] = Prepared(statement, self.dialect, keys, many)
            if len(self._prepared) > PREPARED_KEPT:
                self._prepared.popitem(last=False)
        else:
            self._prepared.move_to_end(key)
        return found

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[Lane]:
        """One unit of work on a lane: committed when the block ends, rolled back when it
        raises."""
        lane = await self._take()
        try:
            try:
                yield lane
            except BaseException:
                await self._rollback(lane)
                raise
            try:
                await lane.commit()
            except BaseException:
                await self._rollback(lane)
                raise
        finally:
            await self._give_back(lane)

    async def one(self, statement: Any, params: Mapping[str, Any] | None = None) -> Result:
        """Run one statement on a lane as a unit of work of its own."""
        lane = await self._take()
        try:
            return await lane.alone(statement, params)
        finally:
            await self._give_back(lane)

    async def _rollback(self, lane: Lane) -> None:
        try:
            await lane.rollback()
        except Exception:  # a lost connection: the error that lost it goes on
            lane.lost = True

    async def _take(self) -> Lane:
        """An idle lane, or a new one. On a server, one that rested ``PING_AFTER_IDLE`` or
        longer is pinged first and replaced when the server dropped it (a restart), as
        the pool does for a pooled connection."""
        while self._idle:
            lane = self._idle.pop()
            if (
                lane.pings
                and time.monotonic() - lane.rested_since >= PING_AFTER_IDLE
                and not await lane.ping()
            ):
                lane.lost = True
                await self._give_back(lane)
                continue
            return lane
        connection = await self.engine.connect()
        lane = self.lane_class(self, connection, (await connection.get_raw_connection()).dbapi_connection)
        self._lanes.append(lane)
        return lane

    async def _give_back(self, lane: Lane) -> None:
        """Keep ``lane`` for the next unit of work, or return its connection to the pool
        (more units ran at once than are kept, or the store is closing); a lost one is
        dropped."""
        if lane.lost:
            self._lanes.remove(lane)
            await lane.connection.invalidate()
            await lane.connection.close()
            return
        if not self._closed and len(self._idle) < IDLE_LANES:
            lane.rested_since = time.monotonic()
            self._idle.append(lane)
            return
        self._lanes.remove(lane)
        await lane.connection.close()

    @property
    def held(self) -> int:
        """Connections held now, idle or in use."""
        return len(self._lanes)

    @property
    def busy(self) -> int:
        """Lanes in use now (a unit of work runs on each)."""
        return len(self._lanes) - len(self._idle)

    async def close(self) -> None:
        """Give the idle lanes back to the pool (before the engine is disposed); one in
        use goes back when its unit of work ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for lane in idle:
            self._lanes.remove(lane)
            await lane.connection.close()


def direct_for(engine: AsyncEngine) -> Direct | None:
    """The direct lanes of ``engine``: a SQLite file run in the loop's thread, or
    PostgreSQL through asyncpg; else None (sessions only)."""
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg":
        return Direct(engine, AsyncpgLane)
    if not sqlite_inline.runs_inline(engine):
        return None
    database = engine.url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(engine.url):
        return None  # one connection shared by the whole pool
    return Direct(engine, SqliteLane)

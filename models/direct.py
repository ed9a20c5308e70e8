"""The hot path's statements on SQLite's own connection, around SQLAlchemy's layers.

Every ``/draw`` and every job's start and end run a few small statements: the quota
reservation and the job rows, the claim, the finish and its images, the settlement. In
SQLite each takes 5-30 us; through an ``AsyncSession`` a unit of work costs about 350 us
of Python before its statements and 60-80 us a statement (the session, the pool, the
engine's execution context, the result objects), and through a held ``AsyncConnection``
still about 200 us. Here the same statements run on a connection the store holds:

- ``Prepared``: a Core statement compiled once for the dialect, with SQLAlchemy's own
  pieces of an execution (its bind and result processors, its Python-side column
  defaults, the expansion of ``IN`` lists), so a value goes in and comes out as it does
  through a session.
- ``Lane``: one pooled connection the store keeps checked out, with its driver's
  connection (``models.sqlite_inline``) under it. A unit of work is its statements and one
  commit on that connection. A busy database is waited for as the driver waits for it.
- ``Direct``: the lanes of one store; a unit of work takes an idle lane (or checks out
  another) and gives it back when committed or rolled back.

Only for a SQLite file: an in-memory database has one shared connection for the whole
pool, and other databases send every statement over the network, where these layers are a
small part of the cost. The statements and their results are those of a session; the
store's tests run both ways.
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from models import sqlite_inline

PREPARED_KEPT = 256  # statements kept compiled per store (the hot ones are a dozen)
IDLE_LANES = 4  # connections kept checked out between units of work


class _Context:
    """What a column default's callable is handed (an execution context's two names)."""

    __slots__ = ("current_column", "current_parameters")

    def __init__(self) -> None:
        self.current_parameters: dict[str, Any] = {}
        self.current_column: Any = None


class Prepared:
    """One statement compiled for ``dialect`` with the parameter names ``keys`` (an
    INSERT's columns); runs as a session would run it."""

    def __init__(self, statement: Any, dialect: Dialect, keys: Sequence[str] | None, many: bool) -> None:
        compiled: Any = statement.compile(dialect=dialect, column_keys=keys, for_executemany=many)
        if not compiled.positional:  # pragma: no cover - SQLite's paramstyle is positional
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
        columns = list(compiled._result_columns)
        self.keys: tuple[str, ...] = tuple(entry.keyname for entry in columns)
        self.row = collections.namedtuple("Row", self.keys) if self.keys else None  # type: ignore[misc]
        self.results = [entry.type._cached_result_processor(dialect, None) for entry in columns]
        self._convert = any(self.results)

    def parameters(self, params: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        """The SQL and its positional values for one set of ``params``."""
        values = self.compiled.construct_params(params, escape_names=False)
        if self.defaults:
            context = _Context()
            context.current_parameters = values
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

    def rows(self, raw: list[tuple[Any, ...]]) -> list[Any]:
        if self.row is None:
            return []
        if not self._convert:
            return [self.row(*values) for values in raw]
        results = self.results
        return [
            self.row(
                *(
                    convert(value) if convert else value
                    for convert, value in zip(results, values, strict=True)
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

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]

    def __iter__(self) -> Any:
        return iter(self._rows)


class Lane:
    """A connection the store keeps checked out: its unit of work's statements run on the
    driver's connection under it, and SQLAlchemy's ``connection`` stays at hand for a
    transaction that needs a session too (``models.store.Transaction``)."""

    def __init__(self, direct: Direct, connection: AsyncConnection, driver: sqlite_inline.Connection) -> None:
        self.direct = direct
        self.connection = connection
        self.driver = driver

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
                    cursor = await self.driver.cursor().executemany(sql, rows)
                except sqlite3.Error as error:
                    raise DBAPIError.instance(sql, rows, error, sqlite3.Error, ismulti=True) from error
                return Result([], cursor.rowcount)
            params = params[0]
        prepared = direct.prepared(statement, params, many=False)
        sql, values = prepared.parameters(params)
        self._announce(sql, values, many=False)
        cursor = self.driver.cursor()
        try:
            await cursor.execute(sql, values)
            raw = await cursor.fetchall() if prepared.row is not None else []
        except sqlite3.Error as error:  # raised as a session raises it
            raise DBAPIError.instance(sql, values, error, sqlite3.Error) from error
        finally:
            await cursor.close()
        return Result(prepared.rows(raw), cursor.rowcount)

    async def scalar(self, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    def _announce(self, sql: str, values: Any, *, many: bool) -> None:
        """The engine's ``before_cursor_execute`` listeners hear of the statement, as of
        any other (without an execution context: there is none)."""
        listeners = self.direct.engine.sync_engine.dispatch.before_cursor_execute
        if listeners:
            listeners(self.connection.sync_connection, None, sql, values, None, many)

    async def commit(self) -> None:
        """Commit what this unit wrote (nothing when a session's transaction on this
        connection already committed it); the engine's ``commit`` listeners hear of it."""
        if not self.driver.in_transaction:
            return
        listeners = self.direct.engine.sync_engine.dispatch.commit
        if listeners:
            listeners(self.connection.sync_connection)
        await self.driver.commit()

    async def rollback(self) -> None:
        await self.driver.rollback()


class Direct:
    """The lanes of one store, and its compiled statements."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.sync_engine.dialect
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
        lane = self._idle.pop() if self._idle else await self._open()
        try:
            try:
                yield lane
            except BaseException:
                await lane.rollback()
                raise
            try:
                await lane.commit()
            except BaseException:
                await lane.rollback()
                raise
        finally:
            await self._give_back(lane)

    async def _open(self) -> Lane:
        connection = await self.engine.connect()
        driver = (await connection.get_raw_connection()).driver_connection
        lane = Lane(self, connection, driver)
        self._lanes.append(lane)
        return lane

    async def _give_back(self, lane: Lane) -> None:
        """Keep ``lane`` for the next unit of work, or return its connection to the pool
        (more units ran at once than are kept, or the store is closing)."""
        if not self._closed and len(self._idle) < IDLE_LANES:
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
    """The direct lanes of ``engine``: a SQLite file run in the loop's thread; else None."""
    if not sqlite_inline.runs_inline(engine):
        return None
    database = engine.url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(engine.url):
        return None
    return Direct(engine)

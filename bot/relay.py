"""Job events between processes, through PostgreSQL (LISTEN/NOTIFY).

With the procrastinate backend a job runs in an ``atelier worker`` process, perhaps on
another host, while its user talks to the bot's process. The worker's App publishes its
job events (started, progress with previews, finished, failed, cancelled, notices) on
its bus as always; ``Relay.forward`` sends each one as a notification on
``atelier_events``, one after another in publishing order, so the events of a job arrive
in the order they happened. The bot's App listens (``Relay.listen``) and publishes what
arrives on its own bus, where the delivery layer shows it exactly as a local event.

An event is JSON (``encode_event``/``decode_event``: only the event types and the values
they carry, never arbitrary classes). PostgreSQL limits a notification to 8000 bytes: a
larger event (a preview, a grid) is stored in ``relay_payloads`` and the notification
names its row; rows older than ``PAYLOAD_TTL`` are removed as new ones come. Small events
that pile up while a send runs travel together, as one notification holding a JSON array
of them (``pack_events``): each notification wakes every listener, so a worker's burst of
events (one job's start, progress and end) costs the database one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, bindparam, delete, func, insert, select

from bot.types import (
    Action,
    Actor,
    Cancelled,
    Deleted,
    Failed,
    Finished,
    ImageOut,
    JobEvent,
    MessageRef,
    Notice,
    OutgoingFile,
    Progress,
    Queued,
    Reply,
    Route,
    Started,
)
from models.base import utcnow
from models.tables import RelayPayload

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

CHANNEL = "atelier_events"
INLINE_LIMIT = 7000  # bytes of JSON sent in the notification itself
PAYLOAD_TTL = timedelta(minutes=10)
# the statements of every relayed event, built once (building one costs more than running it)
_PAYLOADS = RelayPayload.__table__
_NOTIFY = select(func.pg_notify(bindparam("channel", type_=String), bindparam("payload", type_=String)))
_ADD_PAYLOAD = (
    insert(_PAYLOADS)
    .values(payload=bindparam("payload"), created_at=bindparam("at"))
    .returning(_PAYLOADS.c.id)
)
_FORGET_PAYLOADS = delete(_PAYLOADS).where(_PAYLOADS.c.created_at < bindparam("before"))
_PAYLOAD = select(_PAYLOADS.c.payload).where(_PAYLOADS.c.id == bindparam("ref"))
SEND_BATCH = 200  # most events sent in one transaction

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Queued, Started, Progress, Finished, Failed, Cancelled, Deleted, Notice,
        Actor, ImageOut, Action, Reply, OutgoingFile,
    )
}  # fmt: skip
_JSON_TYPES: dict[str, type] = {"Route": Route, "MessageRef": MessageRef}


def encode_event(event: JobEvent) -> str:
    return json.dumps(_encode(event), separators=(",", ":"), ensure_ascii=False)


def decode_event(text: str) -> JobEvent:
    events = decode_events(text)
    if len(events) != 1:
        raise ValueError("not one job event")
    return events[0]


def decode_events(text: str) -> list[JobEvent]:
    """The events of one notification: one event, or a packed array of them."""
    values = json.loads(text)
    events = [_decode(value) for value in values] if isinstance(values, list) else [_decode(values)]
    if not all(isinstance(event, JobEvent) for event in events):
        raise ValueError("not a job event")
    return events


def pack_events(texts: list[str], limit: int = INLINE_LIMIT) -> list[str | list[str]]:
    """Encoded events in sending order as notifications: a run of small ones becomes one
    payload (a JSON array, or the event itself when it is alone) of at most ``limit``
    bytes; an event over ``limit`` stays apart as a list of its one text, to be stored
    and named."""
    notifications: list[str | list[str]] = []
    run: list[str] = []
    size = 1

    def close() -> None:
        nonlocal size
        if run:
            notifications.append(run[0] if len(run) == 1 else "[" + ",".join(run) + "]")
            run.clear()
            size = 1

    for text in texts:
        length = len(text.encode())
        if length > limit:
            close()
            notifications.append([text])
            continue
        if size + length + 1 > limit:
            close()
        run.append(text)
        size += length + 1
    close()
    return notifications


_SCALARS = (str, int, float, bool, type(None))
# each event type's fields, read once (dataclasses.fields costs more than the encoding)
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.init) for cls in _TYPES.values()
}


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    fields = _FIELDS.get(kind)
    if fields is not None:
        return {"$t": kind.__name__, "v": {name: _encode(getattr(value, name)) for name in fields}}
    if kind is tuple:
        return {"$l": [_encode(item) for item in value]}
    if kind is list:
        return [_encode(item) for item in value]
    if kind is dict:
        return {"$d": {str(key): _encode(item) for key, item in value.items()}}
    if isinstance(value, bytes):
        return {"$b": base64.b64encode(value).decode("ascii")}
    name = kind.__name__
    if name in _JSON_TYPES and isinstance(value, _JSON_TYPES[name]):
        return {"$t": name, "v": value.to_json()}  # type: ignore[attr-defined]
    if isinstance(value, frozenset | set):
        return {"$s": [_encode(item) for item in sorted(value, key=repr)]}
    if isinstance(value, tuple):
        return {"$l": [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {"$d": {str(key): _encode(item) for key, item in value.items()}}
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)  # a value only shown as text (a path, a number type of a plugin's own)


def _decode(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return [_decode(item) for item in value]
    if kind is not dict:
        return value
    name = value.get("$t")
    if name is not None:
        if name in _TYPES:
            return _TYPES[name](**{key: _decode(item) for key, item in value["v"].items()})
        if name in _JSON_TYPES:
            return _JSON_TYPES[name].from_json(value["v"])  # type: ignore[attr-defined]
    elif "$d" in value:
        return {key: _decode(item) for key, item in value["$d"].items()}
    elif "$l" in value:
        return tuple(_decode(item) for item in value["$l"])
    elif "$b" in value:
        return base64.b64decode(value["$b"])
    elif "$s" in value:
        return frozenset(_decode(item) for item in value["$s"])
    raise ValueError(f"unknown value in a relayed event: {value!r:.80}")


class Relay:
    """One App's end of the relay: ``forward`` (a worker) or ``listen`` (the bot)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._outbox: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Any = None
        self._connection: Any = None
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._sent_payloads = 0
        self._url = ""
        self._open: set[str] = set()

    async def forward(self) -> None:
        """Send every event this App publishes to the listening processes."""
        self._unsubscribe = self.app.bus.subscribe(self._outbox.put_nowait)
        self._tasks.append(asyncio.create_task(self._send_all(), name="relay-send"))

    async def listen(self) -> None:
        """Publish the events other processes send on this App's bus."""
        import asyncpg

        from pipeline.queue.procrastinate import libpq_url

        self._url = libpq_url(self.app.settings.database_url)
        await self._connect(asyncpg)
        self._unsubscribe = self.app.bus.subscribe(self._track)
        self._tasks.append(asyncio.create_task(self._publish_all(), name="relay-publish"))

    def _track(self, event: JobEvent) -> None:
        """Jobs this process told its users about and whose end it has not heard yet."""
        if event.kind == "queued":
            self._open.add(event.generation_id)
        elif event.kind in ("finished", "failed", "cancelled"):
            self._open.discard(event.generation_id)

    async def settled(self, grace: float = 5.0) -> None:
        """Wait until the end of every job this process announced has been heard; a job
        whose row has ended but whose end was not heard within ``grace`` seconds (sent
        while this process was not listening) is given up."""
        ended_since: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        while self._open:
            for job_id in list(self._open):
                record = await self.app.store.get(job_id)
                if record is None or record.status not in ("queued", "running"):
                    first = ended_since.setdefault(job_id, loop.time())
                    if loop.time() - first > grace:
                        self._open.discard(job_id)
            await asyncio.sleep(0.05)

    async def _connect(self, asyncpg: Any) -> None:
        self._connection = await asyncpg.connect(self._url)
        await self._connection.add_listener(CHANNEL, self._heard)
        self._connection.add_termination_listener(self._lost)

    def _lost(self, _connection: Any) -> None:
        """The database connection went away (a restart, the network): listen again as soon
        as it is back. What was sent meanwhile is not heard; the rows keep how jobs ended,
        and the ends never shown are shown once it listens again (bot/replay.py)."""
        if self._tasks:
            log.warning("lost the connection the relay listens on; reconnecting")
            self._tasks.append(asyncio.create_task(self._reconnect(), name="relay-reconnect"))

    async def _reconnect(self) -> None:
        import asyncpg

        for delay in itertools.chain((0.5, 1, 2), itertools.repeat(5)):
            await asyncio.sleep(delay)
            try:
                await self._connect(asyncpg)
            except Exception as exc:
                log.warning("relay: the database is still away (%s)", exc)
                continue
            log.info("relay: listening again")
            await self.app.replay_ends()  # what ended while nobody listened
            return

    async def stop(self) -> None:
        """Send what is still in the outbox, then stop."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            self._outbox.put_nowait(None)
        for task in self._tasks:
            if task.get_name() == "relay-send":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    # sending ------------------------------------------------------------------------------------

    async def _send_all(self) -> None:
        """Send the outbox in order: what has piled up while a send ran goes in one
        transaction (PostgreSQL delivers a transaction's notifications in the order sent)."""
        done = False
        while not done:
            events = [await self._outbox.get()]
            while not self._outbox.empty() and len(events) < SEND_BATCH:
                events.append(self._outbox.get_nowait())
            if None in events:
                done = True
                events = events[: events.index(None)]
            if not events:
                continue
            try:
                await self._send(events)
            except Exception:
                log.exception("could not relay %d events (the first: %s of job %s)", len(events),
                              events[0].kind, events[0].generation_id)  # fmt: skip

    async def _send(self, events: list[JobEvent]) -> None:
        notifications = pack_events([encode_event(event) for event in events])
        if len(notifications) == 1 and isinstance(notifications[0], str):
            # the common case, small events: one statement, atomic on its own
            await self.app.store.one(_NOTIFY, {"channel": CHANNEL, "payload": notifications[0]})
            return
        async with self.app.store.unit() as unit:
            for payload in notifications:
                if isinstance(payload, list):  # one event too large to inline: stored, named
                    row = await unit.scalar(_ADD_PAYLOAD, {"payload": payload[0], "at": utcnow()})
                    payload = json.dumps({"ref": row})
                    self._sent_payloads += 1
                    if self._sent_payloads % 100 == 1:
                        await unit.execute(_FORGET_PAYLOADS, {"before": utcnow() - PAYLOAD_TTL})
                await unit.execute(_NOTIFY, {"channel": CHANNEL, "payload": payload})

    # listening ----------------------------------------------------------------------------------

    def _heard(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._inbox.put_nowait(payload)

    async def _publish_all(self) -> None:
        while True:  # one at a time: a job's events are published in the order they were sent
            payload = await self._inbox.get()
            try:
                events = await self._read(payload)
            except Exception:
                log.exception("could not read a relayed event")
                continue
            for event in events:
                self.app.bus.publish(event)

    async def _read(self, payload: str) -> list[JobEvent]:
        if payload.startswith('{"ref"'):
            ref = json.loads(payload)["ref"]
            async with self.app.store.unit() as unit:
                text = await unit.scalar(_PAYLOAD, {"ref": ref})
            if text is None:
                log.warning("a relayed event (payload %s) was removed before it was read", ref)
                return []
            payload = text
        return decode_events(payload)

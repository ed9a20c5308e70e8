"""How a job's finish is stored: its images and its finished status in one transaction,
only in the process that holds it, and several jobs' finishes at once (a worker's ends
that waited).

These operations are methods of :class:`models.store.Store`, which inherits them from
``_JobEnds``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, String, any_, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from models.base import utcnow
from models.records import GenerationRecord, ImageRecord
from models.store_rows import JOB_WITH_USER, JOBS, _in_id_order, _record, _row_user
from models.tables import Image, ImageData

# the statements of every job's end, built once: building a statement costs more than
# running it
_IS_HELD = (JOBS.c.id == bindparam("job"), JOBS.c.status == "running", JOBS.c.owner == bindparam("holder"))
_HELD_ANY = select(JOBS.c.id).where(
    JOBS.c.id.in_(bindparam("jobs", expanding=True)), *_IS_HELD[1:]
)  # which of ``jobs`` are held by ``holder``
_FINISH = (
    update(JOBS)
    .where(*_IS_HELD)
    .values(
        status="finished",
        finished_at=bindparam("at"),
        model_hash=bindparam("hash"),
        device_seconds=bindparam("seconds"),
    )
    .returning(*JOB_WITH_USER)
)
# PostgreSQL: a group's jobs finished in one statement, each with its own hash and seconds
# (the rows locked in id order, as every writer of several jobs takes them)
_ENDING = (
    func.unnest(
        bindparam("jobs", type_=ARRAY(String)),
        bindparam("hashes", type_=ARRAY(String)),
        bindparam("seconds", type_=ARRAY(Float)),
    )
    .table_valued("job", "hash", "seconds")
    .render_derived(name="ending")
)
_FINISH_ALL = (
    update(JOBS)
    .where(
        JOBS.c.id == _ENDING.c.job,
        JOBS.c.status == "running",
        JOBS.c.owner == bindparam("holder"),
        _in_id_order(JOBS.c.id == any_(bindparam("jobs", type_=ARRAY(String)))),
    )
    .values(
        status="finished",
        finished_at=bindparam("at"),
        model_hash=_ENDING.c.hash,
        device_seconds=_ENDING.c.seconds,
    )
    .returning(*JOB_WITH_USER)
)
_ADD_IMAGES = insert(Image.__table__)
_ADD_IMAGE_DATA = insert(ImageData.__table__)


@dataclass(frozen=True)
class Finishing:
    """One job's part of ``Store.finish_many``, as ``Store.finish`` takes it."""

    generation_id: str
    images: Sequence[ImageRecord]
    model_hash: str | None
    device_seconds: float
    keep: Callable[[], Awaitable[None]] | None = None
    data: Mapping[str, bytes] | None = None


class _JobEnds:
    """The finishing operations of :class:`models.store.Store`; the store gives them its
    units of work (``unit``, ``one``)."""

    if TYPE_CHECKING:
        engine: Any

        def unit(self) -> AbstractAsyncContextManager[Any]: ...

        async def one(self, statement: Any, params: Mapping[str, Any] | None = None) -> Any: ...

    async def finish(
        self,
        generation_id: str,
        images: Sequence[ImageRecord],
        *,
        owner: str,
        model_hash: str | None,
        device_seconds: float,
        keep: Callable[[], Awaitable[None]] | None = None,
        data: Mapping[str, bytes] | None = None,
    ) -> GenerationRecord | None:
        """Images and the finished status in one transaction: a job finishes exactly once,
        and only in the process that holds it. Returns the finished job (read in the same
        transaction, so its end needs no second look), or None when this process did not
        win it.

        ``keep`` runs once the job is seen held by ``owner``, before the job is written: it
        puts the image files in place, so a process that lost the job writes none and no
        image row is ever stored without its file (if ``keep`` fails, nothing is stored and
        its error is raised). It runs before the transaction's first write, so that on
        SQLite no other writer waits for the files (or an upload) behind the database's one
        write lock; when the job was lost between that look and the write, the result is
        None and the caller takes the files back (``PendingImages.undo``). ``data``: the PNG
        bytes by image id, stored with the rows (the database image store)."""
        finishing = Finishing(generation_id, images, model_hash, device_seconds, keep, data)
        (outcome,) = await self.finish_many([finishing], owner=owner)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def finish_many(
        self, jobs: Sequence[Finishing], *, owner: str
    ) -> list[GenerationRecord | None | Exception]:
        """``finish`` for several jobs, all their writes in one transaction (a worker's
        ends that waited, stored at once): each job's ``keep`` runs first, then every row
        is written. Each job's outcome, in order: its finished record, None when this
        process did not win it, or the error its ``keep`` raised (nothing of it stored)."""
        for job in jobs:
            for image in job.images:
                if image.generation_id != job.generation_id:
                    raise ValueError(
                        f"image {image.id} belongs to {image.generation_id}, not {job.generation_id}"
                    )
        outcomes: list[GenerationRecord | None | Exception] = [None] * len(jobs)
        won = set(range(len(jobs)))  # not lost so far
        keeping = [index for index, job in enumerate(jobs) if job.keep is not None]
        if keeping:  # one look for all, then every keep at once (files, uploads)
            ids = [jobs[index].generation_id for index in keeping]
            held = {row.id for row in (await self.one(_HELD_ANY, {"jobs": ids, "holder": owner})).all()}
            won -= {index for index in keeping if jobs[index].generation_id not in held}
            keeping = [index for index in keeping if index in won]
            kept = await asyncio.gather(*(jobs[index].keep() for index in keeping), return_exceptions=True)  # type: ignore[misc]
            for index, error in zip(keeping, kept, strict=True):
                if isinstance(error, BaseException):
                    if not isinstance(error, Exception):
                        raise error  # a cancellation
                    outcomes[index] = error
                    won.discard(index)
        writing = sorted(won, key=lambda index: jobs[index].generation_id)  # rows locked in id order
        if not writing:
            return outcomes
        async with self.unit() as unit:
            images: list[dict[str, Any]] = []
            data: list[dict[str, Any]] = []
            for index, row in await self._finish_rows(
                unit, [(index, jobs[index]) for index in writing], owner
            ):
                if row is None:  # cancelled, failed or taken over meanwhile
                    continue
                job = jobs[index]
                outcomes[index] = _record(row, user=_row_user(row), images=job.images)
                images.extend(dataclasses.asdict(image) for image in job.images)
                data.extend({"image_id": key, "data": value} for key, value in (job.data or {}).items())
            if images:
                await unit.execute(_ADD_IMAGES, images)
            if data:
                await unit.execute(_ADD_IMAGE_DATA, data)
        return outcomes

    async def _finish_rows(
        self, unit: Any, jobs: list[tuple[int, Finishing]], owner: str
    ) -> list[tuple[int, Any]]:
        """Mark ``jobs`` (indexed, in id order) finished where ``owner`` holds them: each
        one's index with its row, None for one it does not hold. On PostgreSQL one
        statement for them all; on SQLite (in process, no round trips) one each."""
        at = utcnow()
        if len(jobs) > 1 and self.engine.dialect.name == "postgresql":
            ending = [job for _, job in jobs]
            rows = await unit.execute(
                _FINISH_ALL,
                {"jobs": [job.generation_id for job in ending], "hashes": [job.model_hash for job in ending],
                 "seconds": [job.device_seconds for job in ending], "holder": owner, "at": at},
            )  # fmt: skip
            by_id = {row.id: row for row in rows.all()}
            return [(index, by_id.get(job.generation_id)) for index, job in jobs]
        found = []
        for index, job in jobs:
            finished = {"job": job.generation_id, "holder": owner, "at": at,
                        "hash": job.model_hash, "seconds": job.device_seconds}  # fmt: skip
            found.append((index, (await unit.execute(_FINISH, finished)).first()))
        return found

"""Bytes that processes on other hosts must read, kept in the database (the shared queue
with ``[queue] image_store = "database"``): finished images (``image_data``, written with
the finished job by ``Store.finish``) and uploaded init images (``stored_inputs``, by
content name, so the same upload is one row)."""

from __future__ import annotations

from sqlalchemy import select

from models.base import utcnow
from models.sql import insert_ignore
from models.store import Store
from models.tables import ImageData, StoredInput


class SharedFiles:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def image(self, image_id: str) -> bytes | None:
        async with self.store.session() as session:
            return await session.scalar(select(ImageData.data).where(ImageData.image_id == image_id))

    async def put_input(self, name: str, data: bytes) -> None:
        """Keep an uploaded init image by its content name (the same bytes, the same name)."""
        async with self.store.session() as session:
            await session.execute(
                insert_ignore(session, StoredInput).values(name=name, data=data, created_at=utcnow())
            )

    async def input(self, name: str) -> bytes | None:
        async with self.store.session() as session:
            return await session.scalar(select(StoredInput.data).where(StoredInput.name == name))

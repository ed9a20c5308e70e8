"""Images by id: the one way adapters (and plugins) get a result's bytes.

Events and replies name images by id; nothing outside this module joins the images
folder with a stored path. With the local queue the bytes are files written by this
process (bot/result_files.py); with workers on other hosts ([queue] backend =
"procrastinate") they are rows the finishing worker stored with the job
(``DatabaseImageStore``), or files in a folder every host shares. Adapters only ``read``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

from bot.errors import NotFound
from models.shared_files import SharedFiles
from models.store import Store


class ImageStore(Protocol):
    async def read(self, image_id: str) -> bytes:
        """The PNG bytes of an image (infotext intact). Raises ``NotFound``
        (``error.image_missing``) when the image or its file is gone (/delete)."""
        ...


class LocalImageStore:
    """The images folder of this machine, indexed by the ``images`` table."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store

    async def read(self, image_id: str) -> bytes:
        path = await self.path(image_id)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError:
            raise NotFound("error.image_missing", id=image_id) from None

    async def path(self, image_id: str) -> Path:
        """Where the file is on this machine: only for what runs beside the store (the
        console prints paths); a remote store has no such method."""
        record = await self.store.image(image_id)
        if record is None:
            raise NotFound("error.image_missing", id=image_id)
        return self.root / record.path


class DatabaseImageStore:
    """Images kept in the database (``image_data``), written with the finished job: any
    host that reaches the database reads them, no shared disk."""

    def __init__(self, store: Store) -> None:
        self.files = SharedFiles(store)

    async def read(self, image_id: str) -> bytes:
        data = await self.files.image(image_id)
        if data is None:
            raise NotFound("error.image_missing", id=image_id)
        return data

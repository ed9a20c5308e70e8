"""Images by id: the one way adapters (and plugins) get a result's bytes.

Events and replies name images by id; nothing outside this module joins the images
folder with a stored path. With the local queue the bytes are files written by this
process (bot/result_files.py); with workers on other hosts ([queue] backend =
"procrastinate") they are rows the finishing worker stored with the job
(``DatabaseImageStore``), or files in a folder every host shares. With [queue]
image_store = "s3" (either backend) they are objects in an S3-compatible bucket
(``S3ImageStore``), put there by the finishing process. Adapters only ``read``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bot.errors import ImageStoreError, NotFound
from bot.result_files import PendingImages, files_on_keep, rows_with_bytes, uploads
from models.shared_files import SharedFiles
from models.store import Store

if TYPE_CHECKING:
    from bot.s3 import S3Client
    from bot.settings import Settings
    from pipeline.request import GenerationResult

log = logging.getLogger(__name__)


class ImageStore(Protocol):
    async def read(self, image_id: str) -> bytes:
        """The PNG bytes of an image (infotext intact). Raises ``NotFound``
        (``error.image_missing``) when the image or its file is gone (/delete)."""
        ...

    async def remove(self, paths: Iterable[str]) -> None:
        """Remove what the store keeps for images whose rows were deleted (their stored
        paths); a failure is logged, not raised."""
        ...

    async def prepare(self, generation_id: str, result: GenerationResult) -> PendingImages:
        """A finished job's images made ready for ``Store.finish`` (bot/result_files.py)."""
        ...

    async def start(self) -> None:
        """At the App's start: a store it cannot use stops the start (``ConfigError``)."""
        ...

    async def close(self) -> None: ...


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

    async def remove(self, paths: Iterable[str]) -> None:
        await asyncio.to_thread(_unlink_under, self.root, list(paths))

    async def prepare(self, generation_id: str, result: GenerationResult) -> PendingImages:
        return await files_on_keep(self.root, generation_id, result)

    async def start(self) -> None:
        pass  # the App makes its images folder

    async def close(self) -> None:
        pass


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

    async def remove(self, paths: Iterable[str]) -> None:
        """Nothing: the bytes went with the rows."""

    async def prepare(self, generation_id: str, result: GenerationResult) -> PendingImages:
        return await rows_with_bytes(generation_id, result)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class S3ImageStore:
    """Images kept as objects in an S3-compatible bucket (``[s3]``), indexed by the
    ``images`` table: an image's object key is ``prefix`` + its stored path. Any host
    that reaches the bucket and the database reads them, no shared disk."""

    def __init__(self, client: S3Client, store: Store, prefix: str = "images/") -> None:
        self.client = client
        self.store = store
        self.prefix = prefix

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> S3ImageStore:
        from bot.s3 import S3Client, Signer

        secrets, config = settings.secrets, settings.s3
        signer = Signer(secrets.s3_access_key_id or "", secrets.s3_secret_access_key or "", config.region)
        return cls(S3Client(config.endpoint_url, config.bucket, signer), store, config.prefix)

    def key(self, path: str) -> str:
        return self.prefix + path

    async def prepare(self, generation_id: str, result: GenerationResult) -> PendingImages:
        return await uploads(self, generation_id, result)

    async def start(self) -> None:
        """The bucket answers and takes these keys, else ``ConfigError`` naming the
        endpoint, the bucket and what it said."""
        from bot.s3 import S3Error
        from bot.settings import ConfigError

        try:
            await self.client.check_bucket(self.prefix)
        except S3Error as exc:
            advice = {
                403: "check ATELIER_S3_ACCESS_KEY_ID, ATELIER_S3_SECRET_ACCESS_KEY and [s3] region",
                404: "create the bucket, or check [s3] bucket",
                None: "check [s3] endpoint_url and that the service is running",
            }.get(exc.status, "check [s3] endpoint_url, bucket and region")
            answer = f"{exc.status} {exc.code}" if exc.status is not None else f"no answer ({exc.message})"
            raise ConfigError(
                f'[s3] bucket "{self.client.bucket}" at {self.client.endpoint_url} cannot be used: '
                f"{answer}; {advice}"
            ) from None

    async def read(self, image_id: str) -> bytes:
        from bot.s3 import S3Error

        record = await self.store.image(image_id)
        if record is None:
            raise NotFound("error.image_missing", id=image_id)
        try:
            data = await self.client.get_object(self.key(record.path))
        except S3Error as exc:
            log.error("image %s could not be read: %s", image_id, exc)
            raise ImageStoreError("error.image_store_read", id=image_id) from exc
        if data is None:
            raise NotFound("error.image_missing", id=image_id)
        return data

    async def upload(self, images: Sequence[tuple[str, bytes]], uploaded: list[str]) -> None:
        """Put the PNGs (stored path, bytes) in the bucket at once; each key that went in
        is added to ``uploaded``, so a caller can take them out again. Raises
        ``ImageStoreError`` when any did not go in (after the client's retries)."""
        from bot.s3 import S3Error

        async def put(path: str, data: bytes) -> None:
            key = self.key(path)
            await self.client.put_object(key, data, "image/png")
            uploaded.append(key)

        outcomes = await asyncio.gather(*(put(path, data) for path, data in images), return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for failure in failures:
            if not isinstance(failure, S3Error):
                raise failure
        if failures:
            log.error("%d of %d image(s) could not be stored: %s", len(failures), len(images), failures[0])
            raise ImageStoreError("error.image_store_write") from failures[0]

    async def remove(self, paths: Iterable[str]) -> None:
        """Delete the objects of these stored paths; a failure is logged, not raised (the
        rows are gone already, so nobody reads them again)."""
        await self.delete_keys(self.key(path) for path in paths)

    async def delete_keys(self, keys: Iterable[str]) -> None:
        from bot.s3 import S3Error

        for key in keys:
            try:
                await self.client.delete_object(key)
            except S3Error as exc:
                log.warning("object %s was left in the bucket: %s", key, exc)

    async def close(self) -> None:
        await self.client.close()


def _unlink_under(root: Path, paths: list[str]) -> None:
    for relative in paths:
        try:
            (root / relative).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("image file %s was left behind: %s", relative, exc)

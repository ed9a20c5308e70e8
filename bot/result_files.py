"""A finished job's PNGs: written once the job is won, before its rows are stored.

The store keeps a job's images only in the process that still holds the job
(``Store.finish``); the files follow the same rule. ``Store.finish`` first checks that the
job is still held, then runs ``keep``, which writes each PNG (under a hidden name, renamed
to its final one, so no file is ever seen half written), and only then stores the rows.
A process that lost the job writes no file, and no image row points at a file that was
never written; files written for a job that could not be stored after all are removed
again (``undo``). Files are written on a worker thread, never on the event loop, in one
trip per job.

Each image store prepares a result its own way (``ImageStore.prepare``) with the pieces
here: files (as above, ``files_on_keep``), bytes stored with the rows (``rows_with_bytes``),
or objects uploaded to a bucket inside that transaction and deleted again if it does not
commit (``uploads``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ulid import ULID

from bot.errors import ImageStoreError
from models.records import ImageRecord
from pipeline.request import GenerationResult

if TYPE_CHECKING:
    from bot.image_store import S3ImageStore

log = logging.getLogger(__name__)


async def _nothing() -> None:
    return None


@dataclass
class PendingImages:
    """A finished job's images, ready for ``Store.finish``: ``records`` (and ``data``, the
    PNGs stored with them) go in its transaction; ``keep`` runs once the job is won, before
    the commit; ``undo`` takes back what ``keep`` did when storing failed after it."""

    records: list[ImageRecord]
    data: dict[str, bytes] | None = None
    keep: Callable[[], Awaitable[None]] | None = None
    undo: Callable[[], Awaitable[None]] = _nothing


async def files_on_keep(root: Path, generation_id: str, result: GenerationResult) -> PendingImages:
    """``result``'s images as files under ``root`` (the images folder, ``LocalImageStore``),
    written by ``keep`` once the job is won; ``undo`` removes them again."""
    folder = _today()
    records = [
        _image_record(folder, generation_id, index, image) for index, image in enumerate(result.images)
    ]
    written: list[Path] = []

    async def keep() -> None:
        try:
            await asyncio.to_thread(write_images, root, records, result, written)
        except OSError as exc:
            log.error("the images of %s could not be written: %s", generation_id, exc)
            raise ImageStoreError("error.image_store_write") from exc

    async def undo() -> None:
        await asyncio.to_thread(remove_files, written)

    return PendingImages(records, keep=keep, undo=undo)


async def rows_with_bytes(generation_id: str, result: GenerationResult) -> PendingImages:
    """``result``'s PNGs stored with their rows (``DatabaseImageStore``)."""
    encoded = await asyncio.to_thread(encode_images, generation_id, result)
    return PendingImages([image for image, _ in encoded], data={image.id: png for image, png in encoded})


async def uploads(store: S3ImageStore, generation_id: str, result: GenerationResult) -> PendingImages:
    """``result``'s PNGs uploaded once the job is won (``S3ImageStore``); what went in is
    deleted again (best effort) when the job's rows are not stored after all."""
    encoded = await asyncio.to_thread(encode_images, generation_id, result)
    uploaded: list[str] = []

    async def keep() -> None:
        await store.upload([(image.path, png) for image, png in encoded], uploaded)

    async def undo() -> None:
        await store.delete_keys(list(uploaded))

    return PendingImages([image for image, _ in encoded], keep=keep, undo=undo)


def write_images(
    root: Path, records: list[ImageRecord], result: GenerationResult, written: list[Path]
) -> None:
    """Write each image as the PNG its record names (by generation id, index and seed: a
    re-run writes over it), under a hidden name first; ``written`` collects the files in
    place. What was being written when an error came is removed."""
    from pipeline.images import save_png

    token = secrets.token_hex(4)
    for record, image in zip(records, result.images, strict=True):
        path = root / record.path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{token}.partial")
        started = time.perf_counter()
        try:
            save_png(image.image, temporary, image.infotext)
            os.replace(temporary, path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        written.append(path)
        log.debug("saved %s in %.3fs", record.path, time.perf_counter() - started)


def encode_images(generation_id: str, result: GenerationResult) -> list[tuple[ImageRecord, bytes]]:
    """The PNGs as bytes, for the database image store: nothing is written to disk."""
    from pipeline.images import png_bytes

    folder = _today()
    return [
        (_image_record(folder, generation_id, index, image), png_bytes(image.image, image.infotext))
        for index, image in enumerate(result.images)
    ]


def _today() -> Path:
    return Path(datetime.now(UTC).strftime("%Y-%m-%d"))


def _image_record(folder: Path, generation_id: str, index: int, image: Any) -> ImageRecord:
    width, height = image.image.size
    relative = folder / f"{generation_id}-{index}-{image.seed}.png"
    return ImageRecord(
        str(ULID()), generation_id, index, relative.as_posix(), width, height, image.seed, image.subseed,
        image.infotext,
    )  # fmt: skip


def remove_files(paths: list[Path]) -> None:
    """Remove files written for a job whose rows were not stored after all."""
    for path in paths:
        path.unlink(missing_ok=True)

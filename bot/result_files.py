"""A finished job's PNGs: written under a temporary name, put in place once the job is won.

The store keeps a job's images only in the process that still holds the job
(``Store.finish``); the files follow the same rule. Each PNG is first written under a
hidden name and renamed to its final one inside that transaction, so a process that lost
the job (another took it over) leaves no file behind, and no image row points at a file
that was never written. Files run on a worker thread, never on the event loop.

Each image store prepares a result its own way (``ImageStore.prepare``) with the pieces
here: files (as above, ``staged_files``), bytes stored with the rows (``rows_with_bytes``),
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


@dataclass(frozen=True)
class StagedImage:
    """An image written under ``staged`` until its job is stored as finished, then ``path``."""

    record: ImageRecord
    path: Path
    staged: Path


async def _nothing() -> None:
    return None


@dataclass
class PendingImages:
    """A finished job's images, ready for ``Store.finish``: ``records`` (and ``data``, the
    PNGs stored with them) go in its transaction; ``keep`` runs once the job is won, before
    the commit; ``undo`` takes back what ``keep`` did when storing failed after it;
    ``discard`` always runs last and removes what is left over."""

    records: list[ImageRecord]
    data: dict[str, bytes] | None = None
    keep: Callable[[], Awaitable[None]] | None = None
    undo: Callable[[], Awaitable[None]] = _nothing
    discard: Callable[[], Awaitable[None]] = _nothing


async def staged_files(root: Path, generation_id: str, result: GenerationResult) -> PendingImages:
    """``result``'s images as files under ``root``: written under temporary names now, put
    in place by ``keep`` (the images folder, ``LocalImageStore``)."""
    staged = await asyncio.to_thread(stage_images, root, generation_id, result)
    placed: list[StagedImage] = []

    async def keep() -> None:
        try:
            await asyncio.to_thread(put_in_place, staged, placed)
        except OSError as exc:
            log.error("the images of %s could not be put in place: %s", generation_id, exc)
            raise ImageStoreError("error.image_store_write") from exc

    async def undo() -> None:
        await asyncio.to_thread(remove_placed, placed)

    async def discard() -> None:
        if len(placed) < len(staged):  # what was put in place has no staged file left
            await asyncio.to_thread(discard_staged, staged)

    return PendingImages([image.record for image in staged], keep=keep, undo=undo, discard=discard)


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


def stage_images(root: Path, generation_id: str, result: GenerationResult) -> list[StagedImage]:
    """Write the PNGs, named by generation id, index and seed (a re-run overwrites them),
    into today's folder under ``root``, each under a hidden temporary name."""
    from pipeline.images import save_png

    folder = _today()
    (root / folder).mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staged = []
    for index, image in enumerate(result.images):
        record = _image_record(folder, generation_id, index, image)
        path = root / record.path
        temporary = path.with_name(f".{path.name}.{token}.partial")
        started = time.perf_counter()
        save_png(image.image, temporary, image.infotext)
        log.debug("saved %s in %.3fs", record.path, time.perf_counter() - started)
        staged.append(StagedImage(record, path, temporary))
    return staged


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


def put_in_place(images: list[StagedImage], placed: list[StagedImage] | None = None) -> None:
    """Rename each staged file to its final name; ``placed`` collects those renamed."""
    for image in images:
        os.replace(image.staged, image.path)
        if placed is not None:
            placed.append(image)


def remove_placed(images: list[StagedImage]) -> None:
    """Remove files put in place for a job whose rows were not stored after all."""
    for image in images:
        image.path.unlink(missing_ok=True)


def discard_staged(images: list[StagedImage]) -> None:
    """Remove what was not put in place (the job was lost, or storing it failed)."""
    for image in images:
        image.staged.unlink(missing_ok=True)

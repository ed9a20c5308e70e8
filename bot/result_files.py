"""A finished job's PNGs: written under a temporary name, put in place once the job is won.

The store keeps a job's images only in the process that still holds the job
(``Store.finish``); the files follow the same rule. Each PNG is first written under a
hidden name and renamed to its final one inside that transaction, so a process that lost
the job (another took it over) leaves no file behind, and no image row points at a file
that was never written. Files run on a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ulid import ULID

from models.records import ImageRecord
from pipeline.request import GenerationResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedImage:
    """An image written under ``staged`` until its job is stored as finished, then ``path``."""

    record: ImageRecord
    path: Path
    staged: Path


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


def put_in_place(images: list[StagedImage]) -> None:
    for image in images:
        os.replace(image.staged, image.path)


def discard_staged(images: list[StagedImage]) -> None:
    """Remove what was not put in place (the job was lost, or storing it failed)."""
    for image in images:
        image.staged.unlink(missing_ok=True)

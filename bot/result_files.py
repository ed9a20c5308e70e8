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

    folder = Path(datetime.now(UTC).strftime("%Y-%m-%d"))
    (root / folder).mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staged = []
    for index, image in enumerate(result.images):
        relative = folder / f"{generation_id}-{index}-{image.seed}.png"
        path = root / relative
        temporary = path.with_name(f".{path.name}.{token}.partial")
        started = time.perf_counter()
        save_png(image.image, temporary, image.infotext)
        log.debug("saved %s in %.3fs", relative, time.perf_counter() - started)
        width, height = image.image.size
        record = ImageRecord(
            str(ULID()),
            generation_id,
            index,
            relative.as_posix(),
            width,
            height,
            image.seed,
            image.subseed,
            image.infotext,
        )
        staged.append(StagedImage(record, path, temporary))
    return staged


def put_in_place(images: list[StagedImage]) -> None:
    for image in images:
        os.replace(image.staged, image.path)


def discard_staged(images: list[StagedImage]) -> None:
    """Remove what was not put in place (the job was lost, or storing it failed)."""
    for image in images:
        image.staged.unlink(missing_ok=True)

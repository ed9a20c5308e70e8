"""Files fitted to a platform's upload limits; nothing is ever dropped in silence.

An image over ``image_bytes`` is shown as a smaller JPEG preview, and the original PNG
(its infotext intact) is attached as a document where ``document_bytes`` allows; where
it does not, a note says so and names the /show id. A document over the limit, or a
file removed meanwhile, becomes a note as well. Image work runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import dataclass

from bot.adapters.base import Limits
from bot.errors import ImageStoreError, NotFound
from bot.i18n import Msg
from bot.image_store import ImageStore
from bot.inputs import size_text
from bot.types import OutgoingFile

SHRINK_STEPS = 8  # each step scales by SHRINK_FACTOR; 8 steps reach about 6% of the side
SHRINK_FACTOR = 0.7
PREVIEW_QUALITY = 85


@dataclass(frozen=True)
class Fitted:
    files: tuple[OutgoingFile, ...]
    notes: tuple[Msg, ...]


async def fit_files(
    files: Sequence[OutgoingFile],
    limits: Limits,
    images: ImageStore,
    show_id: str | None,
    *,
    notes: bool = True,
) -> Fitted:
    """Every file with its bytes, within the limits. ``notes=False`` (progress previews)
    skips what does not fit without a word: the next step brings another."""
    fitted: list[OutgoingFile] = []
    said: list[Msg] = []
    for file in files:
        data = file.data
        if data is None:
            try:
                data = await images.read(str(file.image_id))
            except NotFound:
                said.append(Msg("delivery.file_missing", {"name": file.name}))
                continue
            except ImageStoreError:  # the store did not answer: the image itself is kept
                said.append(Msg("delivery.file_unavailable", {"name": file.name}))
                continue
        whole = OutgoingFile(file.name, file.kind, data=data, image_id=file.image_id)
        if file.kind == "image" and not _fits(data, limits.image_bytes):
            preview = await asyncio.to_thread(shrink, data, int(limits.image_bytes or 0))
            if preview is not None:
                fitted.append(OutgoingFile(_preview_name(file.name), "image", data=preview))
            if not notes:
                continue
            if _fits(data, limits.document_bytes):
                fitted.append(OutgoingFile(file.name, "document", data=data, image_id=file.image_id))
            else:
                said.append(_too_big(file.name, len(data), limits, show_id))
        elif file.kind == "document" and not _fits(data, limits.document_bytes):
            if notes:
                said.append(_too_big(file.name, len(data), limits, None))
        else:
            fitted.append(whole)
    return Fitted(tuple(fitted), tuple(said))


def _fits(data: bytes, limit: int | None) -> bool:
    return limit is None or len(data) <= limit


def _preview_name(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return f"{stem}-preview.jpg"


def _too_big(name: str, size: int, limits: Limits, show_id: str | None) -> Msg:
    limit = size_text(int(limits.document_bytes or limits.image_bytes or 0))
    params = {"name": name, "size": size_text(size), "limit": limit}
    if show_id is not None:
        return Msg("delivery.original_too_big", {**params, "id": show_id})
    return Msg("delivery.file_too_big", params)


def shrink(data: bytes, max_bytes: int) -> bytes | None:
    """A JPEG of the image within ``max_bytes``, scaled down as far as needed (None when
    even the smallest step is too big)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    scale = 1.0
    for _ in range(SHRINK_STEPS):
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        resized.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
        scale *= SHRINK_FACTOR
    return None

"""Files users send: the size cap every command's uploads share, and images for img2img
(validated, normalised to PNG, stored by content hash).

Image work runs on a worker thread (PIL decoding and file writes must not block the
event loop). Every refusal of an image is ``error.init_image`` with a translated detail
naming what is accepted; nothing is written for a refused upload.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import UserError
from bot.i18n import Msg
from bot.options import shown
from bot.types import Attachment

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_PIXELS = 4096 * 4096


def check_uploads(attachments: tuple[Attachment, ...], max_bytes: int) -> None:
    """Refuse a command whose upload is over ``[limits] max_upload_bytes``.

    The one check every command's files pass, before any handler reads them. Adapters
    never hold an upload over the cap whole: the console reads at most ``max_bytes + 1``
    bytes of a file, which still arrive here to be refused; Telegram and Discord refuse a
    file whose size, as the platform states it, is over the cap before fetching it.
    """
    for attachment in attachments:
        if len(attachment.data) > max_bytes:
            raise UserError(
                "error.upload_too_large", name=shown(attachment.filename), max=size_text(max_bytes)
            )


def size_text(count: int) -> str:
    """``20 MiB``, ``64 KiB``, ``512 B``: a byte count as limits are written."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            value = count / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{count} B"


@dataclass(frozen=True)
class InputImage:
    path: str  # absolute path of the stored PNG
    size: tuple[int, int]  # the job's size when the user names none (``fit_size``)


def store_input_image(attachment: Attachment, folder: Path, limits: Any) -> InputImage:
    """Check the upload and keep it as ``<sha256>.png``."""
    from PIL import Image, UnidentifiedImageError

    allowed = ", ".join(ACCEPTED_FORMATS)
    try:
        with Image.open(io.BytesIO(attachment.data)) as image:
            if image.format not in ACCEPTED_FORMATS:
                raise _refused("error.init_image.format", format=image.format, allowed=allowed)
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise _refused(
                    "error.init_image.pixels", width=image.width, height=image.height, max=MAX_INPUT_PIXELS
                )
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise _refused("error.init_image.unreadable", allowed=allowed) from None
    size = fit_size(rgb.width, rgb.height, limits)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return InputImage(str(path.resolve()), size)


def fit_size(width: int, height: int, limits: Any) -> tuple[int, int]:
    """An image's own size, scaled down (aspect kept) to fit ``[limits]`` max_size and
    max_pixels, then rounded down to multiples of 8 as A1111 sizes are; refused when a
    side ends up under min_size."""
    scale = min(1.0, limits.max_size / max(width, height), math.sqrt(limits.max_pixels / (width * height)))
    fitted = (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)
    if min(fitted) < limits.min_size:
        raise _refused("error.init_image.too_small", width=width, height=height, min=limits.min_size)
    return fitted


def _refused(detail_key: str, **params: Any) -> UserError:
    return UserError("error.init_image", detail=Msg(detail_key, params))

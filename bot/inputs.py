"""Images users send (img2img input): validated, normalised to PNG, stored by content hash.

Run on a worker thread (PIL decoding and file writes must not block the event loop).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from bot.errors import UserError
from bot.types import Attachment

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUT_PIXELS = 4096 * 4096


def store_input_image(attachment: Attachment, folder: Path) -> str:
    """Check the upload and keep it as ``<sha256>.png``; returns the absolute path."""
    from PIL import Image, UnidentifiedImageError

    if len(attachment.data) > MAX_INPUT_BYTES:
        raise UserError("error.init_image", detail=f"larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB")
    try:
        with Image.open(io.BytesIO(attachment.data)) as image:
            if image.format not in ACCEPTED_FORMATS:
                raise UserError(
                    "error.init_image", detail=f"{image.format} is not one of {', '.join(ACCEPTED_FORMATS)}"
                )
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise UserError(
                    "error.init_image", detail=f"{image.width}x{image.height} has too many pixels"
                )
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(
            "error.init_image", detail=f"not a readable image ({exc.__class__.__name__})"
        ) from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path.resolve())

"""Infotext storage inside image files, where A1111 puts it (A1111-SEMANTICS.md §12.3).

PNGs carry a ``parameters`` text chunk; JPEG/WebP carry the EXIF UserComment; GIFs a
comment. Reading accepts all three so users can hand the bot an image made by A1111 (or by
the bot itself) and get its settings back, plus NovelAI PNGs, which A1111 converts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Mapping
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

logger = logging.getLogger(__name__)

_PARAMETERS_KEY = "parameters"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A compressed text chunk may not inflate beyond this: an infotext is a few kB, and an
# uploaded PNG must not be able to make the reader allocate gigabytes.
_MAX_TEXT_BYTES = 16 * 1024 * 1024

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
# EXIF UserComment starts with an 8-byte character-code prefix.
_UNICODE_PREFIX = b"UNICODE\0"
_ASCII_PREFIX = b"ASCII\0\0\0"
_JIS_PREFIX = b"JIS\0\0\0\0\0"
_UNDEFINED_PREFIX = b"\0" * 8

# A1111 looks NovelAI's sampler string up, as is, among its lower-cased sampler names and
# aliases (§9.1) and falls back to "Euler a". NovelAI's own k_euler_ancestral is an A1111
# alias; names A1111 lacks (k_dpm_2_ancestral, k_dpmpp_2s_ancestral, ...) become "Euler a".
_A1111_SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",),
    "DPM++ 2S a": ("k_dpmpp_2s_a",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "Euler": ("k_euler",),
    "LMS": ("k_lms",),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DPM fast": ("k_dpm_fast",),
    "DPM adaptive": ("k_dpm_ad",),
    "Restart": ("restart",),
    "DDIM": ("ddim",),
    "DDIM CFG++": ("ddim_cfgpp",),
    "PLMS": ("plms",),
    "UniPC": ("unipc",),
    "LCM": ("k_lcm",),
}
_NOVELAI_SAMPLERS: dict[str, str] = {
    alias.lower(): name for name, aliases in _A1111_SAMPLER_ALIASES.items() for alias in (name, *aliases)
}
_NOVELAI_DEFAULT_SAMPLER = "Euler a"


class ImageFormatError(ValueError):
    """The bytes are not an image Pillow can read."""


# ---------------------------------------------------------------------------------------
# Writing


def save_png(image: Image.Image, path_or_file: str | os.PathLike[str] | IO[bytes], infotext: str) -> None:
    """Save ``image`` as PNG with ``infotext`` in the ``parameters`` chunk A1111 reads."""
    image.save(path_or_file, format="PNG", pnginfo=_png_info(infotext))


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The PNG file ``save_png`` would write, in memory (for uploads)."""
    buffer = io.BytesIO()
    save_png(image, buffer, infotext)
    return buffer.getvalue()


def _png_info(infotext: str) -> PngInfo:
    """tEXt (Latin-1) where the text allows it, as PIL/A1111 write it; else UTF-8 iTXt."""
    info = PngInfo()
    try:
        infotext.encode("latin-1")
    except UnicodeEncodeError:
        # "replace" only matters for lone surrogates, which UTF-8 cannot hold.
        info.add_itxt(_PARAMETERS_KEY, infotext.encode("utf-8", "replace"))
    else:
        info.add_text(_PARAMETERS_KEY, infotext)
    return info


# ---------------------------------------------------------------------------------------
# Reading


def read_infotext(data: bytes) -> str | None:
    """The infotext stored in an image file, or None when it has none.

    Order as A1111: the PNG ``parameters`` text, else the EXIF UserComment, else the
    (GIF) comment; empty texts count as absent. A NovelAI PNG is converted instead.
    Raises ``ImageFormatError`` when ``data`` is not a readable image.
    """
    with _open_image(data) as image:
        meta: dict[str, Any] = dict(image.info)
        if image.format == "PNG":
            # PIL only reports text chunks placed before the pixel data.
            meta.update(_png_text_chunks(data))
        if meta.get("Software") == "NovelAI":
            converted = _novelai_infotext(meta, image.size)
            if converted is not None:
                return converted
        for text in (
            _as_text(meta.get(_PARAMETERS_KEY)),
            _exif_comment(image),
            _as_text(meta.get("comment")),
        ):
            if text:
                return text
    return None


def _open_image(data: bytes) -> Image.Image:
    """Identify ``data`` as an image without decoding its pixels."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:
        # Pillow's format plugins raise many unrelated types (OSError, SyntaxError,
        # struct.error, DecompressionBombError, ...) for corrupt or hostile input.
        raise ImageFormatError(f"not a readable image: {exc}") from exc


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "ignore")
    return str(value)


def _png_text_chunks(data: bytes) -> dict[str, str]:
    """Every tEXt/zTXt/iTXt chunk of a PNG, wherever it sits; a later key wins, as in PIL."""
    texts: dict[str, str] = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length or chunk_type == b"IEND":
            break
        pos += 12 + length  # length, type, body, CRC
        entry = _decode_text_chunk(chunk_type, body)
        if entry is not None:
            texts[entry[0]] = entry[1]
    return texts


def _decode_text_chunk(chunk_type: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a PNG text chunk; None for other chunks and broken ones."""
    keyword, _, rest = body.partition(b"\0")
    key = keyword.decode("latin-1")
    if chunk_type == b"tEXt":
        return key, rest.decode("latin-1")
    if chunk_type == b"zTXt":
        inflated = _inflate(rest[1:])
        return None if inflated is None else (key, inflated.decode("latin-1"))
    if chunk_type == b"iTXt" and len(rest) >= 2:
        compressed = rest[0] == 1
        _language, _, rest = rest[2:].partition(b"\0")
        _translated_key, _, raw = rest.partition(b"\0")
        text = _inflate(raw) if compressed else raw
        return None if text is None else (key, text.decode("utf-8", "replace"))
    return None


def _inflate(data: bytes) -> bytes | None:
    decompressor = zlib.decompressobj()
    try:
        text = decompressor.decompress(data, _MAX_TEXT_BYTES)
    except zlib.error:
        return None
    return None if decompressor.unconsumed_tail else text


def _exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment as text (where A1111 stores JPEG/WebP infotexts)."""
    try:
        exif = image.getexif()
        raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT, exif.get(_USER_COMMENT))
    except Exception:
        # A corrupt EXIF block makes Pillow raise assorted types; it just holds no comment.
        logger.debug("unreadable EXIF", exc_info=True)
        return None
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.rstrip("\0")
    return _decode_user_comment(bytes(raw))


def _decode_user_comment(raw: bytes) -> str:
    """Text of an EXIF UserComment: 8-byte character code, then the encoded text.

    A1111 writes ``UNICODE\\0`` + UTF-16-BE; some tools write UTF-16-LE under the same code,
    recognised by a byte-order mark or by which byte of the mostly-ASCII text is zero.
    """
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE_PREFIX:
        text = _decode_utf16(body)
    elif prefix in (_ASCII_PREFIX, _UNDEFINED_PREFIX):
        text = body.decode("utf-8", "replace")
    elif prefix == _JIS_PREFIX:
        text = body.decode("shift_jis", "replace")
    else:
        text = raw.decode("utf-8", "ignore")
    return text.rstrip("\0")


def _decode_utf16(body: bytes) -> str:
    if body[:2] == b"\xff\xfe":
        return body[2:].decode("utf-16-le", "replace")
    if body[:2] == b"\xfe\xff":
        return body[2:].decode("utf-16-be", "replace")
    # ASCII characters have a zero high byte: first in big-endian, second in little-endian.
    little_endian = body[1::2].count(0) > body[0::2].count(0)
    return body.decode("utf-16-le" if little_endian else "utf-16-be", "replace")


def _novelai_infotext(meta: Mapping[str, Any], size: tuple[int, int]) -> str | None:
    """A1111's conversion of NovelAI's Description + JSON Comment; None when malformed."""
    try:
        settings = json.loads(meta["Comment"])
        description = meta["Description"]
        sampler = settings["sampler"]
        sampler_name = (
            _NOVELAI_SAMPLERS.get(sampler, _NOVELAI_DEFAULT_SAMPLER)
            if isinstance(sampler, str)
            else _NOVELAI_DEFAULT_SAMPLER
        )
        params = (
            f"Steps: {settings['steps']}, Sampler: {sampler_name}, CFG scale: {settings['scale']}, "
            f"Seed: {settings['seed']}, Size: {size[0]}x{size[1]}, Clip skip: 2, ENSD: 31337"
        )
        return f"{description}\nNegative prompt: {settings['uc']}\n{params}"
    except (KeyError, TypeError, ValueError, RecursionError):
        logger.warning("NovelAI image with unreadable generation parameters", exc_info=True)
        return None

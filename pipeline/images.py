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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

logger = logging.getLogger(__name__)

_PARAMETERS_KEY = "parameters"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# Caps on the text read from a PNG's chunks. A1111 infotexts are a few KB, so a larger
# chunk is no infotext; and a small upload must not make the reader inflate gigabytes
# (128 zTXt chunks of 16 MiB each compress into 2 MB). Decompression stops at the cap.
MAX_TEXT_CHUNK = 64 * 1024  # bytes of one text chunk, decompressed; a larger chunk is skipped
MAX_TEXT_TOTAL = 1024 * 1024  # bytes of all text chunks, decompressed; reading stops there

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
    A PNG is read chunk by chunk within ``MAX_TEXT_CHUNK``/``MAX_TEXT_TOTAL``, its
    pixels never decoded. Raises ``ImageFormatError`` when ``data`` is not a readable image.
    """
    if data.startswith(_PNG_SIGNATURE):
        png = _read_png(data)
        return _infotext(png.texts, png.size, lambda: _png_exif_comment(png.exif))
    with _open_image(data) as image:
        return _infotext(dict(image.info), image.size, lambda: _exif_comment(image))


def image_format(data: bytes) -> str:
    """Pillow's name of the image format of ``data`` ("PNG", "JPEG" ...), from its header;
    ``ImageFormatError`` when it is not a readable image. PNG text chunks are not read."""
    if data.startswith(_PNG_SIGNATURE):
        _png_size(data)
        return "PNG"
    with _open_image(data) as image:
        return str(image.format)


def _infotext(
    meta: Mapping[str, Any], size: tuple[int, int], exif_comment: Callable[[], str | None]
) -> str | None:
    if meta.get("Software") == "NovelAI":
        converted = _novelai_infotext(meta, size)
        if converted is not None:
            return converted
    for read in (
        lambda: _as_text(meta.get(_PARAMETERS_KEY)),
        exif_comment,
        lambda: _as_text(meta.get("comment")),
    ):
        text = read()
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


@dataclass(frozen=True)
class _PngMeta:
    size: tuple[int, int]
    texts: dict[str, str]  # every text chunk by keyword, wherever it sits; a later key wins, as in PIL
    exif: bytes | None  # the eXIf chunk


def _png_size(data: bytes) -> tuple[int, int]:
    """The size in the IHDR chunk, which must come first; ``ImageFormatError`` otherwise."""
    pos = len(_PNG_SIGNATURE)
    if len(data) < pos + 8 + 13 or data[pos : pos + 8] != b"\0\0\0\x0dIHDR":
        raise ImageFormatError("not a readable image: a PNG signature without an IHDR chunk")
    width, height = struct.unpack_from(">II", data, pos + 8)
    if not width or not height:
        raise ImageFormatError(f"not a readable image: a PNG of {width}x{height} pixels")
    return width, height


def _read_png(data: bytes) -> _PngMeta:
    """A PNG's size, text chunks and EXIF, walking the chunks itself (PIL reports only the
    text before the pixel data, and would decode the pixels to find a later eXIf)."""
    size = _png_size(data)
    texts: dict[str, str] = {}
    exif: bytes | None = None
    left = MAX_TEXT_TOTAL
    pos = len(_PNG_SIGNATURE)
    view = memoryview(data)
    while pos + 8 <= len(data) and left > 0:
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        body = view[pos + 8 : pos + 8 + length]
        if len(body) < length or chunk_type == b"IEND":
            break
        pos += 12 + length  # length, type, body, CRC
        if chunk_type == b"eXIf":
            exif = bytes(body)
        elif chunk_type in _TEXT_CHUNKS:
            entry, used = _decode_text_chunk(chunk_type, bytes(body), min(MAX_TEXT_CHUNK, left))
            left -= used
            if entry is not None:
                texts[entry[0]] = entry[1]
    return _PngMeta(size, texts, exif)


def _decode_text_chunk(chunk_type: bytes, body: bytes, limit: int) -> tuple[tuple[str, str] | None, int]:
    """((keyword, text) or None, bytes of text produced) of a PNG text chunk; None for a
    broken chunk or one whose text is over ``limit`` bytes, of which at most ``limit + 1``
    are produced."""
    keyword, _, rest = body.partition(b"\0")
    key = keyword.decode("latin-1")
    if chunk_type == b"tEXt":
        if len(rest) > limit:
            return None, limit + 1
        return (key, rest.decode("latin-1")), len(rest)
    if chunk_type == b"zTXt":
        inflated, used = _inflate(rest[1:], limit)
        return (None if inflated is None else (key, inflated.decode("latin-1"))), used
    if len(rest) < 2:
        return None, 0
    compressed = rest[0] == 1
    _language, _, rest = rest[2:].partition(b"\0")
    _translated_key, _, raw = rest.partition(b"\0")
    if compressed:
        text, used = _inflate(raw, limit)
    else:
        text, used = (None, limit + 1) if len(raw) > limit else (raw, len(raw))
    return (None if text is None else (key, text.decode("utf-8", "replace"))), used


def _inflate(data: bytes, limit: int) -> tuple[bytes | None, int]:
    """zlib data inflated up to ``limit`` bytes (None past it, or when broken), and how
    many bytes were produced: never more than ``limit + 1``."""
    decompressor = zlib.decompressobj()
    try:
        text = decompressor.decompress(data, limit + 1)
    except zlib.error:
        return None, 0
    if len(text) > limit:
        return None, len(text)
    return text, len(text)


def _png_exif_comment(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:
        # A corrupt EXIF block makes Pillow raise assorted types; it just holds no comment.
        logger.debug("unreadable EXIF", exc_info=True)
        return None
    return _user_comment(exif)


def _exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment as text (where A1111 stores JPEG/WebP infotexts)."""
    try:
        exif = image.getexif()
    except Exception:
        # A corrupt EXIF block makes Pillow raise assorted types; it just holds no comment.
        logger.debug("unreadable EXIF", exc_info=True)
        return None
    return _user_comment(exif)


def _user_comment(exif: Image.Exif) -> str | None:
    try:
        raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT, exif.get(_USER_COMMENT))
    except Exception:
        logger.debug("unreadable EXIF", exc_info=True)  # as above: no comment
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

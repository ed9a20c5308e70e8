"""The layout of a ``torch.save`` zip archive, decided from the file's own bytes.

torch's reader looks for the zip end record by searching backwards from the end and
then dispatches on the members it finds, TorchScript included, while Python's
``zipfile`` gives up on some of the same files (a few bytes after the end record).
Two readers that disagree about one file are how a TorchScript archive got past a
layout check. So no zip library is used here, and an archive is accepted only in the
exact shape ``torch.save`` writes a state dict:

* the end record is the file's last 22 bytes, with no comment; when zip64 end records
  are present they sit directly before it, and both agree;
* the central directory ends exactly where the end records begin;
* the members follow one another from byte 0 without a gap or an overlap, each stored
  uncompressed, its local header agreeing with its central entry;
* every member lives under one top-level folder, with only the names torch writes for
  a state dict, one ``data.pkl`` and one ``version``.

Anything else raises :class:`LayoutError` with the reason; the caller refuses the file.
Nothing in a member is interpreted here.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["LayoutError", "Member", "TorchArchive", "read_layout", "read_member"]

_END = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_DESCRIPTOR_32 = struct.Struct("<4sIII")
_DESCRIPTOR_64 = struct.Struct("<4sIQQ")
_EXTRA_FIELD = struct.Struct("<HH")

_END_SIG = b"PK\x05\x06"
_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_END_SIG = b"PK\x06\x06"
_CENTRAL_SIG = b"PK\x01\x02"
_LOCAL_SIG = b"PK\x03\x04"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_ZIP64_END_BODY = _ZIP64_END.size - 12  # the record's own size field counts the bytes after it

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
# torch sets bit 3 (sizes follow the data in a descriptor) and bit 11 (UTF-8 names).
_ALLOWED_FLAGS = 0x0808
_DESCRIPTOR_FLAG = 0x0008
_ZIP64_FIELD = 0x0001
_TORCH_PADDING_FIELD = 0x4246  # "FB": torch pads local headers so data is 64-byte aligned
# An SDXL checkpoint holds about 2,600 storages; far more means a crafted archive.
MAX_MEMBERS = 100_000
# The end record may be preceded by up to 64 KiB of comment; look that far for a displaced one.
_END_SEARCH = 65_536 + _END.size

# Everything ``torch.save`` writes for a state dict, relative to the archive's folder.
_STATE_DICT_MEMBER = re.compile(
    r"(data\.pkl|data/\d{1,20}|version|byteorder|\.data/serialization_id|\.format_version|\.storage_alignment)"
)
# Members only TorchScript (``torch.jit.save``) writes: program code and its constants.
_TORCHSCRIPT_MEMBER = re.compile(
    r"(constants\.pkl|attributes\.pkl|model\.json|\.data/version|(code|constants|extra|tensors|bytecode)/.*"
    r"|.*\.debug_pkl)"
)


class LayoutError(ValueError):
    """The file is not exactly a ``torch.save`` state-dict archive; the text says why."""


@dataclass(frozen=True)
class Member:
    """One member's stored bytes: ``size`` bytes starting at file offset ``offset``."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class TorchArchive:
    """A checked archive: its top-level folder and its members by name below it
    (``"data.pkl"``, ``"data/0"``, ``"version"`` ...)."""

    folder: str
    members: Mapping[str, Member]


@dataclass(frozen=True)
class _Entry:
    name: str
    flags: int
    method: int
    header_offset: int
    size: int
    original_size: int


def read_layout(stream: BinaryIO, size: int) -> TorchArchive:
    """Check the archive in ``stream`` (``size`` bytes) and map its members.

    Reads the end records, the central directory and each local header; never member
    data. Raises :class:`LayoutError`.
    """
    directory_offset, directory_size, count = _end_records(stream, size)
    entries = _central_directory(stream, directory_offset, directory_size, count)
    # Names first: a TorchScript archive is refused as such, whatever else is odd about it.
    folder = _check_names([entry.name for entry in entries])
    for entry in entries:
        _check_storage(entry)
    members = _local_headers(stream, entries, directory_offset)
    return TorchArchive(folder, {member.name.split("/", 1)[1]: member for member in members})


def read_member(stream: BinaryIO, member: Member) -> bytes:
    """The member's bytes (the caller bounds ``member.size`` first)."""
    data = _read_at(stream, member.offset, member.size)
    if len(data) != member.size:
        raise LayoutError(f"member {member.name!r} is cut short")
    return data


# --- end records -----------------------------------------------------------------------------


def _end_records(stream: BinaryIO, size: int) -> tuple[int, int, int]:
    if size < _LOCAL.size + _CENTRAL.size + _END.size:
        raise LayoutError(f"the file has {size} bytes, too few for a zip archive")
    end_at = size - _END.size
    signature, disk, directory_disk, disk_entries, entries, directory_size, directory_offset, comment = (
        _END.unpack(_read_at(stream, end_at, _END.size))
    )
    if signature != _END_SIG:
        trailing = _bytes_after_end_record(stream, size, size)
        raise LayoutError(
            "the file does not end with a zip end record" if trailing is None else _trailing(trailing)
        )
    if comment:
        raise LayoutError("the zip end record carries a comment, which torch never writes")
    if disk or directory_disk or disk_entries != entries:
        raise LayoutError("the archive claims to span several disks")
    limit = end_at
    locator_at = end_at - _ZIP64_LOCATOR.size
    if locator_at >= 0 and _read_at(stream, locator_at, 4) == _LOCATOR_SIG:
        entries, directory_size, directory_offset, limit = _zip64_end(
            stream, locator_at, (entries, directory_size, directory_offset)
        )
    elif entries == _U16 or _U32 in (directory_size, directory_offset):
        raise LayoutError("the zip end record points to zip64 records that are not there")
    if entries == 0:
        # An empty end record appended to a real archive hides it from some readers.
        trailing = _bytes_after_end_record(stream, size, end_at)
        raise LayoutError("the archive has no members" if trailing is None else _trailing(trailing))
    if entries > MAX_MEMBERS:
        raise LayoutError(f"the archive claims {entries} members, more than the {MAX_MEMBERS} allowed")
    if directory_offset + directory_size != limit:
        raise LayoutError("the central directory does not end where the end records begin")
    return directory_offset, directory_size, entries


def _zip64_end(stream: BinaryIO, locator_at: int, classic: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Entries, directory size and offset from the zip64 records, which must sit directly
    before the end record and agree with it; plus where they begin."""
    _signature, record_disk, record_offset, disks = _ZIP64_LOCATOR.unpack(
        _read_at(stream, locator_at, _ZIP64_LOCATOR.size)
    )
    if record_disk != 0 or disks != 1:
        raise LayoutError("the zip64 locator claims the archive spans several disks")
    record_at = locator_at - _ZIP64_END.size
    if record_at < 0 or record_offset != record_at:
        raise LayoutError("the zip64 end record is not directly before its locator")
    fields = _ZIP64_END.unpack(_read_at(stream, record_at, _ZIP64_END.size))
    signature, body, _made, _needed, disk, directory_disk, disk_entries, entries = fields[:8]
    directory_size, directory_offset = fields[8:]
    if signature != _ZIP64_END_SIG or body != _ZIP64_END_BODY:
        raise LayoutError("the zip64 end record is malformed")
    if disk or directory_disk or disk_entries != entries:
        raise LayoutError("the zip64 end record claims the archive spans several disks")
    wide = (entries, directory_size, directory_offset)
    for narrow, value, marker in zip(classic, wide, (_U16, _U32, _U32), strict=True):
        if narrow not in (value, marker):
            raise LayoutError("the zip end record and the zip64 end record disagree")
    return entries, directory_size, directory_offset, record_at


def _bytes_after_end_record(stream: BinaryIO, size: int, search_end: int) -> int | None:
    """How many bytes follow the last end record that starts before ``search_end`` (None:
    there is none); the real one when the last 22 bytes are not it."""
    start = max(0, search_end - _END_SEARCH)
    tail = _read_at(stream, start, search_end - start)
    # Only a signature with a whole record after it can be the real end record.
    found = tail.rfind(_END_SIG, 0, len(tail) - _END.size + len(_END_SIG))
    return None if found < 0 else size - start - found - _END.size


def _trailing(count: int) -> str:
    return f"{count} bytes follow the zip end record"


# --- central directory -----------------------------------------------------------------------


def _central_directory(stream: BinaryIO, offset: int, size: int, count: int) -> list[_Entry]:
    raw = _read_at(stream, offset, size)
    if len(raw) != size:
        raise LayoutError("the central directory is cut short")
    entries: list[_Entry] = []
    position = 0
    for _ in range(count):
        if position + _CENTRAL.size > size:
            raise LayoutError("the central directory holds fewer entries than the end record claims")
        fields = _CENTRAL.unpack_from(raw, position)
        signature, _made, _needed, flags, method = fields[:5]
        compressed, uncompressed, name_length, extra_length, comment_length, disk = fields[8:14]
        header_offset = fields[16]
        name_at = position + _CENTRAL.size
        extra_at = name_at + name_length
        end = extra_at + extra_length + comment_length
        if signature != _CENTRAL_SIG or end > size:
            raise LayoutError("the central directory is malformed")
        name = _member_name(raw[name_at:extra_at])
        if comment_length:
            raise LayoutError(f"member {name!r} carries a comment, which torch never writes")
        uncompressed, compressed, header_offset, disk = _zip64_values(
            name, raw[extra_at : extra_at + extra_length], (uncompressed, compressed, header_offset, disk)
        )
        if disk != 0:
            raise LayoutError(f"member {name!r} claims to be on another disk")
        entries.append(_Entry(name, flags, method, header_offset, compressed, uncompressed))
        position = end
    if position != size:
        raise LayoutError("the central directory holds more than the end record counts")
    return entries


def _member_name(raw: bytes) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError("a member name is not UTF-8") from None
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise LayoutError(f"member name {name[:80]!r} is not one torch writes")
    return name


def _check_storage(entry: _Entry) -> None:
    if entry.flags & ~_ALLOWED_FLAGS:
        raise LayoutError(
            f"member {entry.name!r} uses zip features torch never writes (flags {entry.flags:#06x})"
        )
    if entry.method != 0 or entry.size != entry.original_size:
        raise LayoutError(f"member {entry.name!r} is compressed; torch stores members as they are")


def _extra_fields(name: str, extra: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    position = 0
    while position < len(extra):
        if position + _EXTRA_FIELD.size > len(extra):
            raise LayoutError(f"member {name!r} has a malformed extra field")
        field_id, length = _EXTRA_FIELD.unpack_from(extra, position)
        start = position + _EXTRA_FIELD.size
        if start + length > len(extra) or field_id in fields:
            raise LayoutError(f"member {name!r} has a malformed extra field")
        fields[field_id] = extra[start : start + length]
        position = start + length
    return fields


def _zip64_values(name: str, extra: bytes, narrow: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Sizes, header offset and disk, with every value marked as "in zip64" replaced, in the
    order the zip format lists them. The zip64 field must hold exactly those values."""
    fields = _extra_fields(name, extra)
    if set(fields) - {_ZIP64_FIELD}:
        raise LayoutError(f"member {name!r} has extra fields torch never writes")
    data = fields.get(_ZIP64_FIELD, b"")
    markers = (_U32, _U32, _U32, _U16)
    widths = (8, 8, 8, 4)
    values = list(narrow)
    position = 0
    for index, (marker, width) in enumerate(zip(markers, widths, strict=True)):
        if values[index] != marker:
            continue
        if position + width > len(data):
            raise LayoutError(f"member {name!r} lacks the zip64 values its entry points to")
        values[index] = int.from_bytes(data[position : position + width], "little")
        position += width
    if position != len(data):
        raise LayoutError(f"member {name!r} has zip64 values its entry does not use")
    return values[0], values[1], values[2], values[3]


# --- local headers ---------------------------------------------------------------------------


def _local_headers(stream: BinaryIO, entries: list[_Entry], directory_offset: int) -> list[Member]:
    """Walk the members in file order: each must start where the previous one (and its
    data descriptor) ended, the first at byte 0 and the last ending at the directory."""
    ordered = sorted(entries, key=lambda entry: entry.header_offset)
    members: list[Member] = []
    position = 0
    for index, entry in enumerate(ordered):
        if entry.header_offset != position:
            raise LayoutError(f"member {entry.name!r} does not start where the previous one ends")
        data_at = _local_header(stream, entry)
        data_end = data_at + entry.size
        following = ordered[index + 1].header_offset if index + 1 < len(ordered) else directory_offset
        if data_end > following:
            raise LayoutError(f"member {entry.name!r} overlaps what follows it")
        _check_descriptor(stream, entry, data_end, following - data_end)
        members.append(Member(entry.name, data_at, entry.size))
        position = following
    return members


def _local_header(stream: BinaryIO, entry: _Entry) -> int:
    """Check the local header against the central entry; where the member's data begins."""
    fields = _LOCAL.unpack(_read_exactly(stream, entry.header_offset, _LOCAL.size, entry.name))
    signature, _needed, flags, method, _time, _date, _crc, compressed, uncompressed = fields[:9]
    name_length, extra_length = fields[9:]
    if signature != _LOCAL_SIG or flags != entry.flags or method != 0:
        raise LayoutError(f"the local header of member {entry.name!r} disagrees with the directory")
    name_at = entry.header_offset + _LOCAL.size
    raw = _read_exactly(stream, name_at, name_length + extra_length, entry.name)
    if _member_name(raw[:name_length]) != entry.name:
        raise LayoutError(f"the local header of member {entry.name!r} names another member")
    if set(_extra_fields(entry.name, raw[name_length:])) - {_ZIP64_FIELD, _TORCH_PADDING_FIELD}:
        raise LayoutError(f"member {entry.name!r} has extra fields torch never writes")
    # With a descriptor the local sizes may be zero; otherwise they must be the member's.
    allowed = {entry.size if entry.size < _U32 else _U32, _U32}
    if flags & _DESCRIPTOR_FLAG:
        allowed.add(0)
    if compressed not in allowed or uncompressed not in allowed:
        raise LayoutError(f"the local header of member {entry.name!r} gives another size")
    return name_at + name_length + extra_length


def _check_descriptor(stream: BinaryIO, entry: _Entry, data_end: int, gap: int) -> None:
    """The bytes between a member's data and the next member: nothing, or exactly its data
    descriptor (16 bytes, or 24 with zip64 sizes) repeating its size."""
    if not entry.flags & _DESCRIPTOR_FLAG:
        if gap:
            raise LayoutError(f"{gap} unaccounted bytes follow member {entry.name!r}")
        return
    layouts = {_DESCRIPTOR_32.size: _DESCRIPTOR_32, _DESCRIPTOR_64.size: _DESCRIPTOR_64}
    layout = layouts.get(gap)
    if layout is None:
        raise LayoutError(f"{gap} unaccounted bytes follow member {entry.name!r}")
    signature, _crc, compressed, uncompressed = layout.unpack(
        _read_exactly(stream, data_end, gap, entry.name)
    )
    if signature != _DESCRIPTOR_SIG or compressed != entry.size or uncompressed != entry.size:
        raise LayoutError(f"the data descriptor of member {entry.name!r} disagrees with the directory")


# --- member names ----------------------------------------------------------------------------


def _check_names(names: list[str]) -> str:
    """The one folder all members live in, once every name is one torch writes for a
    state dict (each once, ``data.pkl`` and ``version`` present)."""
    folders = {name.split("/", 1)[0] for name in names}
    if len(folders) != 1 or any("/" not in name for name in names):
        raise LayoutError("the members are not all in one folder, as torch writes them")
    seen: set[str] = set()
    for name in names:
        relative = name.split("/", 1)[1]
        if _TORCHSCRIPT_MEMBER.fullmatch(relative):
            raise LayoutError(
                f"it is a TorchScript archive (it holds {relative!r}): that is program code, not a state dict"
            )
        if not _STATE_DICT_MEMBER.fullmatch(relative):
            raise LayoutError(f"unexpected member {name!r} in the archive")
        if relative in seen:
            raise LayoutError(f"member {name!r} appears twice")
        seen.add(relative)
    for required in ("data.pkl", "version"):
        if required not in seen:
            raise LayoutError(f"the archive has no {required}, which every torch state-dict archive has")
    return folders.pop()


# --- reading ---------------------------------------------------------------------------------


def _read_at(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    return stream.read(size)


def _read_exactly(stream: BinaryIO, offset: int, size: int, name: str) -> bytes:
    data = _read_at(stream, offset, size)
    if len(data) != size:
        raise LayoutError(f"member {name!r} is cut short")
    return data

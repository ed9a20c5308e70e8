"""Reading model files without trusting them (A1111-SEMANTICS.md §15).

This module alone decides what a model file is, from its own bytes and never from its
name or from what another library guesses:

* **safetensors**: an 8-byte little-endian length, then that many bytes of a JSON
  object whose every entry is checked (dtype, shape, offsets) before a byte of tensor
  data is read, the entries tiling the data exactly;
* **torch zip archive** (``torch.save`` since 1.6): exactly the layout torch writes for
  a state dict (:mod:`pipeline.torch_zip`); TorchScript and every other zip is refused;
* **torch legacy file** (before 1.6): torch's pickled magic number first.

The pickles in both torch formats go through one unpickler,
:mod:`pipeline.restricted_pickle`, and tensor bytes are read here from the checked
member or file region into tensors of the size the record claims, once that size is
proven against the file. ``torch.load`` and ``torch.jit.load`` are never called, so
nothing in a file can run. Checkpoints, VAEs, LoRAs, hypernetworks and embeddings all
read through :func:`read_model_file` (or :func:`load_state_dict` on top of it).

Refusals raise :class:`UnsafeCheckpoint`, a :class:`CheckpointLoadError` with its own
message key, naming the file and the reason; a file that cannot be read at all (I/O)
raises :class:`CheckpointLoadError`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from pipeline import restricted_pickle, torch_zip
from pipeline.errors import CheckpointLoadError, EngineError
from pipeline.restricted_pickle import PickleRefused, describe

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_SAFETENSORS_HEADER",
    "FileSummary",
    "UnsafeCheckpoint",
    "inspect_model_file",
    "load_safetensors",
    "load_state_dict",
    "read_model_file",
    "read_safetensors_header",
    "sniff_format",
]

Format = Literal["safetensors", "torch-zip", "torch-legacy"]

# safetensors' own reader refuses headers above 100 MB; so do we, before reading one.
MAX_SAFETENSORS_HEADER = 100_000_000
_LENGTH_BYTES = 8
# A safetensors header is an object of objects of lists: three levels, nothing deeper.
_MAX_JSON_DEPTH = 3
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA = "__metadata__"
# A state dict's data.pkl holds names and records; an SDXL checkpoint's is about 300 KB.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
_SMALL_MEMBER = 64
# torch's legacy files start with this pickle: protocol 2, the magic number as LONG1, STOP.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e"
_LEGACY_PROTOCOL = 1001
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class UnsafeCheckpoint(CheckpointLoadError):
    """A model file refused before anything in it ran: a layout that is not exactly a
    safetensors file or a torch state-dict file, a pickle naming a global outside the
    allow-list, or a record that does not fit the file.

    Message key ``error.unsafe_checkpoint``; params ``name`` (file name), ``file`` (full
    path) and ``reason``.
    """

    key = "error.unsafe_checkpoint"

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        path = Path(path)
        EngineError.__init__(
            self, f"refused to load {path}: {reason}", name=path.name, file=str(path), reason=reason
        )


@dataclass(frozen=True)
class FileSummary:
    """What a scan learns from a model file without reading its tensor data.

    ``shapes``: tensor name -> shape of the state dict (A1111's ``state_dict`` wrapper
    unwrapped); ``metadata``: a safetensors file's ``__metadata__``."""

    format: Format
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)


def _dtypes() -> dict[str, Any]:
    import torch

    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }  # fmt: skip
    return {code: getattr(torch, name) for code, name in names.items() if hasattr(torch, name)}


# --- entry points --------------------------------------------------------------------------------


def sniff_format(path: str | os.PathLike[str]) -> Format:
    """Which of the three accepted formats ``path`` is, from its first bytes; raises
    :class:`UnsafeCheckpoint` for anything else. Only the start is read: the full checks
    happen when the file is read."""
    with _opened(path) as (stream, size, where):
        return _sniff(stream, size, where)


def read_model_file(path: str | os.PathLike[str], *, meta: bool = False) -> Any:
    """The object a model file holds: a safetensors file's tensors, or the unpickled
    object of a torch file (a dict of tensors and plain values, as ``torch.load`` would
    give for a safe file). Raises :class:`UnsafeCheckpoint` / :class:`CheckpointLoadError`.

    ``meta``: every check runs but no tensor data is read; tensors are built on torch's
    meta device (shapes and dtypes only). Cheap enough for a folder scan: headers, the
    central directory and ``data.pkl``."""
    return _read(path, meta=meta)


def inspect_model_file(path: str | os.PathLike[str]) -> FileSummary:
    """Check ``path`` as :func:`read_model_file` does, without reading tensor data; the
    state dict's shapes and a safetensors file's metadata."""
    import torch

    loaded, form, metadata = _read(path, meta=True, with_format=True)
    state = _unwrapped(loaded)
    shapes = {}
    if isinstance(state, Mapping):
        shapes = {
            k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
        }
    return FileSummary(form, shapes, metadata)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from A1111's ``state_dict`` wrapper.

    Non-tensor entries (training step counters, callbacks) are dropped.
    """
    import torch

    path = Path(path)
    loaded = _unwrapped(read_model_file(path))
    if not isinstance(loaded, Mapping):
        raise CheckpointLoadError(path.name, f"{path.name} holds a {type(loaded).__name__}, not a state dict")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; refuses any file that is not one."""
    with _opened(path) as (stream, size, where):
        if _sniff(stream, size, where) != "safetensors":
            raise UnsafeCheckpoint(where, "it is not a safetensors file")
        return _safetensors(stream, size, where, meta=False)[0]


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    with _opened(path) as (stream, size, where):
        header, _start = _safetensors_header(stream, size, where)
        return header


def _unwrapped(loaded: Any) -> Any:
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        return loaded["state_dict"]
    return loaded


# --- opening and sniffing ------------------------------------------------------------------------


class _opened:  # noqa: N801 - used as a context manager, like open()
    """The file, its size and its path; I/O errors become :class:`CheckpointLoadError`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.stream: BinaryIO | None = None

    def __enter__(self) -> tuple[BinaryIO, int, Path]:
        try:
            self.stream = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
            size = os.fstat(self.stream.fileno()).st_size
        except OSError as exc:
            if self.stream is not None:
                self.stream.close()
            raise _unreadable(self.path, exc) from exc
        return self.stream, size, self.path

    def __exit__(self, kind: Any, exc: Any, traceback: Any) -> None:
        if self.stream is not None:
            self.stream.close()
        if isinstance(exc, OSError):
            raise _unreadable(self.path, exc) from exc


def _unreadable(path: Path, exc: OSError) -> CheckpointLoadError:
    return CheckpointLoadError(path.name, f"cannot read {path}: {exc.strerror or exc}")


def _sniff(stream: BinaryIO, size: int, path: Path) -> Format:
    stream.seek(0)
    head = stream.read(len(_LEGACY_MAGIC))
    if len(head) >= _LENGTH_BYTES + 1:
        (length,) = struct.unpack("<Q", head[:_LENGTH_BYTES])
        if head[_LENGTH_BYTES : _LENGTH_BYTES + 1] == b"{" and 2 <= length <= size - _LENGTH_BYTES:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head == _LEGACY_MAGIC:
        return "torch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        # A pickle without torch's header: unpickle it through the allow-list so the
        # refusal names what it would have run; a harmless one is still not a model file.
        stream.seek(0)
        try:
            restricted_pickle.unpickle(_Capped(stream, size), None)
        except PickleRefused as exc:
            raise UnsafeCheckpoint(path, exc.reason) from None
        raise UnsafeCheckpoint(path, "it is a plain pickle, not a file torch.save wrote")
    if path.suffix.lower() == ".safetensors":
        # Named as one: say what is wrong with it as a safetensors file.
        _safetensors_header(stream, size, path)
    raise UnsafeCheckpoint(
        path, "it is neither a safetensors file nor a torch state-dict file (unrecognised first bytes)"
    )


def _read(path: str | os.PathLike[str], *, meta: bool, with_format: bool = False) -> Any:
    with _opened(path) as (stream, size, where):
        form = _sniff(stream, size, where)
        metadata: dict[str, str] = {}
        if form == "safetensors":
            loaded, metadata = _safetensors(stream, size, where, meta=meta)
        elif form == "torch-zip":
            loaded = _torch_zip(stream, size, where, meta=meta)
        else:
            loaded = _torch_legacy(stream, size, where, meta=meta)
    return (loaded, form, metadata) if with_format else loaded


# --- safetensors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    dtype: Any
    shape: tuple[int, ...]
    begin: int
    end: int


def _safetensors_header(stream: BinaryIO, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The parsed, checked header and where the data begins."""
    stream.seek(0)
    prefix = stream.read(_LENGTH_BYTES)
    if len(prefix) < _LENGTH_BYTES:
        raise UnsafeCheckpoint(path, f"the file has {size} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_SAFETENSORS_HEADER:
        raise UnsafeCheckpoint(
            path, f"its header claims {length} bytes, over the {MAX_SAFETENSORS_HEADER}-byte limit"
        )
    if _LENGTH_BYTES + length > size:
        raise UnsafeCheckpoint(
            path, f"its header claims {length} bytes but only {size - _LENGTH_BYTES} follow"
        )
    header = _parse_header(stream.read(length), path)
    start = _LENGTH_BYTES + length
    _tensor_entries(header, size - start, path)
    return header, start


def _parse_header(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeCheckpoint(path, f"its header is not valid JSON ({exc.reason})") from exc
    depth = _json_depth(text)
    if depth > _MAX_JSON_DEPTH:
        raise UnsafeCheckpoint(path, f"its header is nested {depth} levels deep; a safetensors header has 3")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise UnsafeCheckpoint(path, f"its header is not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(header, dict):
        raise UnsafeCheckpoint(path, "its header is not a JSON object")
    return header


def _json_depth(text: str) -> int:
    """The deepest bracket nesting outside strings; counted before parsing, so no parser
    recurses through a header made of 200,000 ``[``."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key appears twice")
    return found


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0][:200] if text else type(exc).__name__


def _tensor_entries(header: dict[str, Any], data_size: int, path: Path) -> list[_TensorEntry]:
    """Every entry type-checked; together they must cover the data exactly, as the
    safetensors format requires, so no bytes hide between or after tensors."""
    dtypes = _dtypes()
    entries: list[_TensorEntry] = []
    for name, entry in header.items():
        if name == _METADATA:
            _check_metadata(entry, path)
            continue
        entries.append(_tensor_entry(name, entry, dtypes, data_size, path))
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise UnsafeCheckpoint(
                path, f"tensor {describe(entry.name)} does not start where the previous one ends"
            )
        position = entry.end
    if position != data_size:
        raise UnsafeCheckpoint(path, f"{data_size - position} bytes after the last tensor belong to none")
    return entries


def _tensor_entry(name: str, entry: Any, dtypes: dict[str, Any], data_size: int, path: Path) -> _TensorEntry:
    label = describe(name)
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise UnsafeCheckpoint(
            path, f"tensor {label} is not described by exactly dtype, shape and data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise UnsafeCheckpoint(
            path, f"tensor {label} has dtype {describe(dtype)}; allowed: {', '.join(dtypes)}"
        )
    if not _ints(shape, restricted_pickle.MAX_DIMS):
        raise UnsafeCheckpoint(path, f"tensor {label} has shape {describe(shape)}, not a list of sizes")
    if not _ints(offsets, 2) or len(offsets) != 2 or not offsets[0] <= offsets[1] <= data_size:
        raise UnsafeCheckpoint(path, f"tensor {label} has invalid data offsets")
    torch_dtype = dtypes[dtype]
    if math.prod(shape) * torch_dtype.itemsize != offsets[1] - offsets[0]:
        raise UnsafeCheckpoint(
            path, f"tensor {label}'s shape does not match its {offsets[1] - offsets[0]} bytes"
        )
    return _TensorEntry(name, torch_dtype, tuple(shape), offsets[0], offsets[1])


def _ints(value: Any, most: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= most
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeCheckpoint(path, "its __metadata__ does not map names to strings")


def _safetensors(
    stream: BinaryIO, size: int, path: Path, *, meta: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    import torch

    header, start = _safetensors_header(stream, size, path)
    entries = _tensor_entries(header, size - start, path)
    tensors: dict[str, Any] = {}
    for entry in entries:
        if meta:
            tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
            continue
        raw = _read_bytes(stream, start + entry.begin, entry.end - entry.begin, path)
        tensors[entry.name] = raw.view(entry.dtype).reshape(entry.shape)
    return tensors, dict(header.get(_METADATA) or {})


def _read_bytes(stream: BinaryIO, offset: int, count: int, path: Path) -> torch.Tensor:
    """``count`` bytes at ``offset`` as a uint8 tensor; the caller has proven that the file
    holds them, so the allocation is bounded by the file's own size."""
    import torch

    buffer = torch.empty(count, dtype=torch.uint8)
    _read_into(stream, offset, buffer, path)
    return buffer


def _read_into(stream: BinaryIO, offset: int, target: torch.Tensor, path: Path) -> None:
    """Fill the contiguous CPU tensor ``target`` with the bytes at ``offset``, straight
    into its memory."""
    import torch

    view = memoryview(target.view(torch.uint8).numpy())
    stream.seek(offset)
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])
        if not got:
            raise UnsafeCheckpoint(path, "the file ends before the data its records describe")
        done += got


# --- torch zip archives --------------------------------------------------------------------------


def _torch_zip(stream: BinaryIO, size: int, path: Path, *, meta: bool) -> Any:
    import torch

    try:
        archive = torch_zip.read_layout(stream, size)
        _check_archive_metadata(stream, archive, path)
        pickle_member = archive.members["data.pkl"]
        if pickle_member.size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpoint(
                path, f"its data.pkl has {pickle_member.size} bytes, over the {MAX_PICKLE_BYTES} limit"
            )
        pickled = io.BytesIO(torch_zip.read_member(stream, pickle_member))
    except torch_zip.LayoutError as exc:
        raise UnsafeCheckpoint(path, str(exc)) from None

    def storage(key: str, dtype: Any, numel: int) -> torch.Tensor:
        member = archive.members.get(f"data/{key}")
        if member is None:
            raise PickleRefused(f"it refers to storage {key}, which the archive lacks")
        if member.size != numel * dtype.itemsize:
            raise PickleRefused(
                f"storage {key} holds {member.size} bytes, not the {numel} elements its record claims"
            )
        if meta:
            return torch.empty(numel, dtype=dtype, device="meta")
        return _read_bytes(stream, member.offset, member.size, path).view(dtype)

    loaded = _unpickle(pickled, storage, path)
    if pickled.tell() != len(pickled.getbuffer()):
        raise UnsafeCheckpoint(path, "its data.pkl continues after the end of the pickle")
    return loaded


def _check_archive_metadata(stream: BinaryIO, archive: torch_zip.TorchArchive, path: Path) -> None:
    version = _small_member(stream, archive, "version", path)
    if version is None or not re.fullmatch(rb"\d{1,4}\n?", version):
        raise UnsafeCheckpoint(path, "its version record is not a number")
    byteorder = _small_member(stream, archive, "byteorder", path)
    if byteorder not in (None, b"little"):
        raise UnsafeCheckpoint(path, "it was saved big-endian; only little-endian files are read")


def _small_member(stream: BinaryIO, archive: torch_zip.TorchArchive, name: str, path: Path) -> bytes | None:
    member = archive.members.get(name)
    if member is None:
        return None
    if member.size > _SMALL_MEMBER:
        raise UnsafeCheckpoint(path, f"its {name} record has {member.size} bytes; torch writes a few")
    return torch_zip.read_member(stream, member)


def _unpickle(stream: BinaryIO, storages: Any, path: Path, *, legacy: bool = False) -> Any:
    try:
        return restricted_pickle.unpickle(stream, storages, legacy=legacy)
    except PickleRefused as exc:
        raise UnsafeCheckpoint(path, exc.reason) from None


# --- torch legacy files --------------------------------------------------------------------------


def _torch_legacy(stream: BinaryIO, size: int, path: Path, *, meta: bool) -> Any:
    """torch < 1.6: magic, protocol and system-info pickles, the object pickle, the list of
    storage keys, then each storage as an element count and its bytes, to the file's end."""
    import torch

    stream.seek(len(_LEGACY_MAGIC))
    pickles = _Capped(stream, size)
    if _unpickle(pickles, None, path) != _LEGACY_PROTOCOL:
        raise UnsafeCheckpoint(path, "its torch format version is not one torch ever wrote")
    info = _unpickle(pickles, None, path)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsafeCheckpoint(path, "it was not saved little-endian; only little-endian files are read")
    pending: dict[str, torch.Tensor] = {}
    claimed = 0

    def storage(key: str, dtype: Any, numel: int) -> torch.Tensor:
        nonlocal claimed
        claimed += 8 + numel * dtype.itemsize
        # Storages come after this pickle, so the file must be at least this long;
        # checked before anything is allocated.
        if claimed > size:
            raise PickleRefused("its storage records claim more bytes than the file holds")
        flat = torch.empty(numel, dtype=dtype, device="meta" if meta else "cpu")
        pending[key] = flat
        return flat

    loaded = _unpickle(pickles, storage, path, legacy=True)
    keys = _unpickle(pickles, None, path)
    if (
        not isinstance(keys, list)
        or not all(isinstance(key, str) for key in keys)
        or len(keys) != len(pending)
        or set(keys) != set(pending)
    ):
        raise UnsafeCheckpoint(path, "its list of storages does not match the storages its object uses")
    position = stream.tell()
    for key in keys:
        flat = pending[key]
        (count,) = struct.unpack("<q", _exactly(stream, position, 8, path))
        nbytes = flat.numel() * flat.element_size()
        if count != flat.numel() or position + 8 + nbytes > size:
            raise UnsafeCheckpoint(
                path, f"storage {describe(key)} does not hold the elements its record claims"
            )
        if not meta:
            _read_into(stream, position + 8, flat, path)
        position += 8 + nbytes
    if position != size:
        raise UnsafeCheckpoint(path, f"{size - position} bytes follow the last storage")
    return loaded


class _Capped:
    """The file as the unpickler reads it: no read asks for more than the file has left,
    so a pickle claiming a huge bytes object cannot make the reader allocate for it."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size

    def _left(self, wanted: int) -> int:
        left = max(0, self._size - self._stream.tell())
        return left if wanted is None or wanted < 0 else min(wanted, left)

    def read(self, wanted: int = -1) -> bytes:
        return self._stream.read(self._left(wanted))

    def readline(self, wanted: int = -1) -> bytes:
        return self._stream.readline(self._left(wanted))

    def tell(self) -> int:
        return self._stream.tell()


def _exactly(stream: BinaryIO, offset: int, count: int, path: Path) -> bytes:
    stream.seek(offset)
    data = stream.read(count)
    if len(data) != count:
        raise UnsafeCheckpoint(path, "the file ends before the data its records describe")
    return data

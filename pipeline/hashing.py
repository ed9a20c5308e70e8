"""Model file hashes as A1111 writes them into infotexts (A1111-SEMANTICS.md §13).

The module-level functions are pure: they read the file every time, so parity checks
never see a stale value. Checkpoints are gigabytes, so the engine should go through
:class:`HashCache`, which remembers full hashes per (path, size, mtime) like A1111's
own cache does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_OLD_HASH_OFFSET = 0x100000
_OLD_HASH_LENGTH = 0x10000
_SAFETENSORS_LENGTH_BYTES = 8

# kind -> (full hash algorithm, number of hex characters A1111 keeps)
_SHORT_HASH_KINDS: dict[str, tuple[str, int]] = {
    "checkpoint": ("sha256", 10),
    "vae": ("sha256", 10),
    "hypernetwork": ("sha256", 10),
    "textual_inversion": ("sha256", 12),
    "lora": ("lora", 12),
}

ALGORITHMS = ("sha256", "addnet", "old")


def _digest_stream(stream: BinaryIO, limit: int | None = None) -> str:
    """sha256 of the rest of ``stream`` (or its next ``limit`` bytes), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    remaining = limit
    while remaining is None or remaining > 0:
        size = _CHUNK if remaining is None else min(_CHUNK, remaining)
        chunk = stream.read(size)
        if not chunk:
            break
        digest.update(chunk)
        if remaining is not None:
            remaining -= len(chunk)
    return digest.hexdigest()


def sha256(path: str | os.PathLike[str]) -> str:
    """Full-file sha256; A1111's short hashes are prefixes of this."""
    with open(path, "rb") as stream:
        return _digest_stream(stream)


def old_model_hash(path: str | os.PathLike[str]) -> str:
    """The pre-2023 8-hex checkpoint hash: sha256 of 64 KiB starting at 1 MiB.

    Files of 1 MiB or less hash empty input, so they all give ``e3b0c442``.
    """
    with open(path, "rb") as stream:
        stream.seek(_OLD_HASH_OFFSET)
        return _digest_stream(stream, _OLD_HASH_LENGTH)[:8]


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's tensor data, skipping the JSON header.

    This makes the LoRA hash independent of metadata edits. A header that claims more
    bytes than the file holds is refused, since hashing would silently cover nothing.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as stream:
        prefix = stream.read(_SAFETENSORS_LENGTH_BYTES)
        if len(prefix) < _SAFETENSORS_LENGTH_BYTES:
            raise ValueError(
                f"{os.fspath(path)!s}: not a safetensors file: {file_size} bytes, "
                f"too short for the {_SAFETENSORS_LENGTH_BYTES}-byte header length"
            )
        (header_length,) = struct.unpack("<Q", prefix)
        if _SAFETENSORS_LENGTH_BYTES + header_length > file_size:
            raise ValueError(
                f"{os.fspath(path)!s}: malformed safetensors header: it claims {header_length} bytes "
                f"but the file has only {file_size - _SAFETENSORS_LENGTH_BYTES} after the length field"
            )
        stream.seek(_SAFETENSORS_LENGTH_BYTES + header_length)
        return _digest_stream(stream)


def _is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Named ``.safetensors`` and laid out as one: the header length fits the file and the
    header opens a JSON object. The loaders decide a file's format from its bytes, so a
    torch file under that name loads, and is hashed whole like any other torch LoRA."""
    if not os.fspath(path).lower().endswith(".safetensors"):
        return False
    with open(path, "rb") as stream:
        head = stream.read(_SAFETENSORS_LENGTH_BYTES + 1)
        size = os.fstat(stream.fileno()).st_size
    if len(head) <= _SAFETENSORS_LENGTH_BYTES:
        return False
    (header_length,) = struct.unpack("<Q", head[:_SAFETENSORS_LENGTH_BYTES])
    return head[-1:] == b"{" and _SAFETENSORS_LENGTH_BYTES + header_length <= size


def _full_hash(path: str | os.PathLike[str], algorithm: str) -> str:
    if algorithm == "sha256":
        return sha256(path)
    if algorithm == "addnet":
        return addnet_hash(path)
    if algorithm == "old":
        return old_model_hash(path)
    raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def _short_hash_spec(path: str | os.PathLike[str], kind: str) -> tuple[str, int]:
    """Which full hash a ``kind`` uses, and how many hex characters it keeps."""
    try:
        algorithm, length = _SHORT_HASH_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown hash kind {kind!r}; expected one of {', '.join(_SHORT_HASH_KINDS)}"
        ) from None
    if algorithm == "lora":
        algorithm = "addnet" if _is_safetensors(path) else "sha256"
    return algorithm, length


def short_hash(path: str | os.PathLike[str], kind: str) -> str:
    """The hash A1111 writes for a file of ``kind`` (checkpoint, vae, lora, ...)."""
    algorithm, length = _short_hash_spec(path, kind)
    return _full_hash(path, algorithm)[:length]


class HashCache:
    """Full hashes keyed by (resolved path, size, mtime_ns), optionally persisted as JSON.

    A changed size or mtime invalidates an entry, so replacing a model file never reuses
    its old hash. Safe to share between threads; the JSON file is replaced atomically so
    a crash cannot leave half a cache behind.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._loaded = self._path is None

    def get(self, path: str | os.PathLike[str], kind_or_algo: str) -> str:
        """A full hash (``sha256``, ``addnet``, ``old``) or a short hash for a ``short_hash`` kind."""
        if kind_or_algo in ALGORITHMS:
            return self._full(path, kind_or_algo)
        algorithm, length = _short_hash_spec(path, kind_or_algo)
        return self._full(path, algorithm)[:length]

    def _full(self, path: str | os.PathLike[str], algorithm: str) -> str:
        resolved = str(Path(path).resolve())
        stat = os.stat(resolved)
        with self._lock:
            self._load_locked()
            entry = self._entries.get(resolved)
            if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
                cached = entry.get("hashes", {}).get(algorithm)
                if isinstance(cached, str):
                    return cached
        # Hash outside the lock: a checkpoint takes seconds and other files need not wait.
        value = _full_hash(resolved, algorithm)
        with self._lock:
            entry = self._entries.get(resolved)
            if not entry or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
                entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hashes": {}}
                self._entries[resolved] = entry
            entry["hashes"][algorithm] = value
            try:
                self._save_locked()
            except OSError as exc:
                # The hash is correct either way; a read-only cache only costs a re-hash later.
                logger.warning("could not write hash cache %s: %s", self._path, exc)
        return value

    def _load_locked(self) -> None:
        if self._loaded or self._path is None:
            return
        self._loaded = True
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable hash cache %s: %s", self._path, exc)
            return
        if isinstance(data, dict):
            self._entries = {
                key: value
                for key, value in data.items()
                if isinstance(value, dict) and isinstance(value.get("hashes"), dict)
            }

    def _save_locked(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self._path.name}.", suffix=".tmp", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self._entries, handle, indent=1, sort_keys=True)
            os.replace(tmp_name, self._path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

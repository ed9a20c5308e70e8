from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import hashing
from pipeline.hashing import HashCache, addnet_hash, old_model_hash, sha256, short_hash

MIB = 1024 * 1024
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random_bytes(2 * MIB + 12345)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    return path, data


def write_safetensors_bytes(path: Path, header: bytes, body: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


# --- sha256 --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, MIB + 1, 3 * MIB + 7])
def test_sha256_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    got = sha256(path)
    assert isinstance(got, str)
    assert got == hashlib.sha256(data).hexdigest()
    assert sha256(str(path)) == got


def test_sha256_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256(tmp_path / "nope")


# --- old model hash ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 10, MIB])
def test_old_hash_of_small_files_is_empty_hash(tmp_path: Path, size: int) -> None:
    path = tmp_path / "small.ckpt"
    path.write_bytes(random_bytes(size))
    assert old_model_hash(path) == "e3b0c442"


@pytest.mark.parametrize("size", [MIB + 1, MIB + 0x8000, MIB + 0x10000, MIB + 0x10001, 3 * MIB])
def test_old_hash_reads_64k_at_1mib(tmp_path: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    got = old_model_hash(path)
    assert got == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert len(got) == 8


# --- addnet hash ---------------------------------------------------------------------------


def test_addnet_hash_skips_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.arange(100, dtype=torch.float32)}, str(path), metadata={"ss_name": "x"})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert addnet_hash(path) == hashlib.sha256(raw[8 + header_len :]).hexdigest()
    assert addnet_hash(path) != sha256(path)


def test_addnet_hash_ignores_metadata_changes(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(16)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a), metadata={"note": "one"})
    save_file(tensors, str(b), metadata={"note": "a much longer note"})
    assert addnet_hash(a) == addnet_hash(b)
    assert sha256(a) != sha256(b)


def test_addnet_hash_large_body(tmp_path: Path) -> None:
    body = random_bytes(2 * MIB + 3)
    path = tmp_path / "x.safetensors"
    write_safetensors_bytes(path, b"{}" + b" " * 6, body)
    assert addnet_hash(path) == hashlib.sha256(body).hexdigest()


def test_addnet_hash_header_to_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors_bytes(path, b"{}", b"")
    assert addnet_hash(path) == EMPTY_SHA


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_addnet_hash_too_short(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="too short"):
        addnet_hash(path)


@pytest.mark.parametrize("claimed", [11, 2**40, 2**64 - 1])
def test_addnet_hash_header_longer_than_file(tmp_path: Path, claimed: int) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", claimed) + b"{}" + b"\0" * 8)
    with pytest.raises(ValueError, match="malformed safetensors header"):
        addnet_hash(path)


# --- short hashes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "length"),
    [("checkpoint", 10), ("vae", 10), ("hypernetwork", 10), ("textual_inversion", 12)],
)
def test_short_hash_is_sha256_prefix(big_file: tuple[Path, bytes], kind: str, length: int) -> None:
    path, data = big_file
    got = short_hash(path, kind)
    assert got == hashlib.sha256(data).hexdigest()[:length]
    assert len(got) == length


def test_short_hash_lora_safetensors_uses_addnet(tmp_path: Path) -> None:
    path = tmp_path / "Style.SafeTensors"
    body = random_bytes(5000)
    write_safetensors_bytes(path, b'{"__metadata__":{}}', body)
    assert short_hash(path, "lora") == hashlib.sha256(body).hexdigest()[:12]


def test_short_hash_lora_other_formats_use_sha256(tmp_path: Path) -> None:
    path = tmp_path / "style.pt"
    data = random_bytes(5000)
    path.write_bytes(data)
    assert short_hash(path, "lora") == hashlib.sha256(data).hexdigest()[:12]


@pytest.mark.parametrize("kind", ["Checkpoint", "lycoris", "", "sha256"])
def test_short_hash_unknown_kind(big_file: tuple[Path, bytes], kind: str) -> None:
    with pytest.raises(ValueError, match="unknown hash kind"):
        short_hash(big_file[0], kind)


# --- HashCache -----------------------------------------------------------------------------


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    real = hashing._full_hash

    def spy(path: str | os.PathLike[str], algorithm: str) -> str:
        calls.append((os.fspath(path), algorithm))
        return real(path, algorithm)

    monkeypatch.setattr(hashing, "_full_hash", spy)
    return calls


def test_cache_returns_same_values_as_functions(big_file: tuple[Path, bytes]) -> None:
    path, _ = big_file
    cache = HashCache()
    assert cache.get(path, "sha256") == sha256(path)
    assert cache.get(path, "old") == old_model_hash(path)
    assert cache.get(path, "checkpoint") == short_hash(path, "checkpoint")
    assert cache.get(path, "textual_inversion") == short_hash(path, "textual_inversion")


def test_cache_addnet_and_lora(tmp_path: Path) -> None:
    path = tmp_path / "l.safetensors"
    write_safetensors_bytes(path, b"{}", b"abc")
    cache = HashCache()
    assert cache.get(path, "addnet") == addnet_hash(path)
    assert cache.get(path, "lora") == short_hash(path, "lora")


def test_cache_hashes_once(big_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_hashing(monkeypatch)
    path, _ = big_file
    cache = HashCache()
    for _ in range(3):
        cache.get(path, "sha256")
        cache.get(path, "checkpoint")
        cache.get(tmp_alias(path), "vae")
    assert [algo for _, algo in calls] == ["sha256"]


def tmp_alias(path: Path) -> Path:
    """The same file through a different spelling of its path."""
    return path.parent / "." / path.name


def test_cache_invalidates_on_change(big_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = big_file
    cache = HashCache()
    before = cache.get(path, "sha256")
    new = bytes([data[0] ^ 0xFF]) + data[1:]
    path.write_bytes(new)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = cache.get(path, "sha256")
    assert after != before
    assert after == hashlib.sha256(new).hexdigest()


def test_cache_keeps_entry_when_size_and_mtime_match(big_file: tuple[Path, bytes]) -> None:
    # Documented trade-off: identity is (path, size, mtime_ns), as in A1111's cache.
    path, data = big_file
    cache = HashCache()
    before = cache.get(path, "sha256")
    stat = path.stat()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.get(path, "sha256") == before


def test_cache_persists_atomically(
    tmp_path: Path, big_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = big_file
    cache_file = tmp_path / "state" / "hashes.json"
    first = HashCache(cache_file)
    value = first.get(path, "sha256")
    assert cache_file.exists()
    stored = json.loads(cache_file.read_text())
    assert stored[str(path.resolve())]["hashes"]["sha256"] == value
    assert [p.name for p in cache_file.parent.iterdir()] == ["hashes.json"]

    calls = count_hashing(monkeypatch)
    second = HashCache(cache_file)
    assert second.get(path, "checkpoint") == value[:10]
    assert calls == []


def test_cache_ignores_malformed_file(tmp_path: Path, big_file: tuple[Path, bytes]) -> None:
    cache_file = tmp_path / "hashes.json"
    cache_file.write_text("{not json")
    path, data = big_file
    assert HashCache(cache_file).get(path, "sha256") == hashlib.sha256(data).hexdigest()
    assert json.loads(cache_file.read_text())  # rewritten as valid JSON


def test_cache_ignores_wrong_shape_entries(tmp_path: Path, big_file: tuple[Path, bytes]) -> None:
    path, data = big_file
    cache_file = tmp_path / "hashes.json"
    cache_file.write_text(json.dumps({str(path.resolve()): "garbage", "other": {"hashes": 3}}))
    assert HashCache(cache_file).get(path, "sha256") == hashlib.sha256(data).hexdigest()


def test_cache_unknown_kind(big_file: tuple[Path, bytes]) -> None:
    with pytest.raises(ValueError, match="unknown hash kind"):
        HashCache().get(big_file[0], "md5")


def test_cache_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HashCache().get(tmp_path / "missing.ckpt", "sha256")


def test_cache_is_thread_safe(tmp_path: Path) -> None:
    files = []
    for i in range(6):
        path = tmp_path / f"m{i}.bin"
        path.write_bytes(random_bytes(70_000, seed=i))
        files.append(path)
    cache_file = tmp_path / "hashes.json"
    cache = HashCache(cache_file)
    errors: list[BaseException] = []
    results: dict[tuple[int, str], set[str]] = {}
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for j in range(12):
                path = files[(n + j) % len(files)]
                algo = ("sha256", "old", "checkpoint")[j % 3]
                value = cache.get(path, algo)
                with lock:
                    results.setdefault((files.index(path), algo), set()).add(value)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(values) == 1 for values in results.values())
    stored = json.loads(cache_file.read_text())
    assert len(stored) == len(files)
    for i, path in enumerate(files):
        assert (
            stored[str(path.resolve())]["hashes"]["sha256"]
            == hashlib.sha256(random_bytes(70_000, seed=i)).hexdigest()
        )

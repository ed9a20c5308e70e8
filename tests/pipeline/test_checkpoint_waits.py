"""A checkpoint library that never makes the event loop, a /draw or another device wait:
what it answers from memory, scans seen whole, and a lock of each device's own."""

from __future__ import annotations

import threading

import pipeline.checkpoints as checkpoints
from pipeline.checkpoints import CheckpointLibrary
from pipeline.errors import CheckpointLoadError
from tests.pipeline.a1111_layout import a1111_library, fake_diffusers_folder


def _slow_scans(library: CheckpointLibrary) -> tuple[threading.Event, threading.Event]:
    """Make ``library``'s scans wait: the first event is set when one begins, and it goes on
    once the second one is set."""
    scanning, scanned = threading.Event(), threading.Event()
    scan = library._scan

    def slow_scan():
        scanning.set()
        scanned.wait(10)
        return scan()

    library._scan = slow_scan
    return scanning, scanned


def test_a_rescan_is_seen_whole_and_the_skipped_files_need_no_lock(tmp_path, monkeypatch):
    """Readers that do not wait for a load (``unreadable``, ``resolve`` of a refused name,
    ``model_files``) see the last whole scan while a new one runs, never a part of it."""
    fake_diffusers_folder(tmp_path, "beta")
    (tmp_path / "Stable-diffusion" / "single.safetensors").write_bytes(b"x")
    (tmp_path / "embeddings").mkdir()
    library = CheckpointLibrary(tmp_path)
    assert [entry.name for entry in library.unreadable()] == ["Stable-diffusion/single.safetensors"]
    assert library.recent_model_files(("embedding",)) is None  # nothing looked at yet
    listed = library.model_files(("embedding",))
    assert library.recent_model_files(("embedding",)) is listed
    assert library.recent_model_files(("lora",)) is None  # another question
    monkeypatch.setattr(checkpoints, "LISTING_FRESH_FOR", 0.0)
    assert library.recent_model_files(("embedding",)) is None  # too old
    monkeypatch.undo()
    library.model_files(("embedding",))
    scanning, scanned = _slow_scans(library)
    (tmp_path / "Stable-diffusion" / "single.safetensors").unlink()
    refresher = threading.Thread(target=library.refresh)
    refresher.start()
    try:
        assert scanning.wait(5)
        assert library.recent_model_files(("embedding",)) is None  # a refresh forgets it
        seen: list[object] = []

        def read() -> None:
            seen.append([entry.name for entry in library.unreadable()])
            seen.append(len(library.model_files(("checkpoint",)).unreadable))
            try:
                library.resolve("single")
            except CheckpointLoadError as exc:
                seen.append(type(exc).__name__)

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(5)
        assert seen == [
            ["Stable-diffusion/single.safetensors"],
            1,
            "UnsafeCheckpoint",
        ]  # refused, not unknown
    finally:
        scanned.set()
        refresher.join()
    assert library.unreadable() == [] and library.names() == ["tiny", "beta"]


def test_a_checkpoint_known_with_its_hashes_resolves_from_memory(a1111_dir):
    """Once the folder is scanned and a checkpoint hashed, resolving it reads no file and
    does not wait for a load holding the library (a /draw freezes on the event loop)."""
    library = a1111_library(a1111_dir, hash_cache=a1111_dir / "memory.json")
    assert not library.answers_from_memory("tiny")  # the folder is not scanned yet
    library.names()
    assert library.answers_from_memory("tiny") and library.answers_from_memory("folder")
    assert library.answers_from_memory("no such model")  # refused from the catalog
    assert not library.answers_from_memory("single")  # its hashes are still to compute
    library.resolve("single")
    assert library.answers_from_memory("SINGLE")
    loading, done = threading.Event(), threading.Event()

    def load() -> None:  # a load holds the lock while it builds a pipeline
        with library._lock:
            loading.set()
            done.wait(10)

    holder = threading.Thread(target=load)
    holder.start()
    loading.wait(5)
    resolved: list[str] = []
    resolver = threading.Thread(target=lambda: resolved.append(library.resolve("single").name))
    resolver.start()
    resolver.join(5)
    done.set()
    holder.join()
    assert resolved == ["single"]
    # a rescan holds the lock too: the old catalog answers until the new one is ready
    scanning, scanned = _slow_scans(library)
    refresher = threading.Thread(target=library.refresh)
    refresher.start()
    scanning.wait(5)
    assert library.answers_from_memory("folder")
    resolver = threading.Thread(target=lambda: resolved.append(library.resolve("folder").name))
    resolver.start()
    resolver.join(5)
    scanned.set()
    refresher.join()
    assert resolved == ["single", "folder"]
    assert "folder" in library.names()


def test_a_device_never_waits_for_another_devices_load(a1111_dir):
    """Each device's view of a library loads under a lock of its own, and the queue's
    question of which device has a checkpoint (asked on the event loop) reads no file and
    waits for no load."""
    first = a1111_library(a1111_dir, hash_cache=a1111_dir / "devices.json")
    second = first.for_device()
    first.load("tiny")
    assert first.is_loaded("TINY") and not second.is_loaded("tiny")
    assert not first.is_loaded("single") and not first.is_loaded("no such model")
    assert not first.answers_from_memory("single")  # is_loaded read no file: still unhashed
    loading, done = threading.Event(), threading.Event()

    def load() -> None:  # a load on the first device holds its lock while it builds a pipeline
        with first._lock:
            loading.set()
            done.wait(30)

    holder = threading.Thread(target=load)
    holder.start()
    try:
        assert loading.wait(5)
        answers: list[object] = []

        def other_device() -> None:
            answers.append(first.is_loaded("tiny"))
            second.load("tiny")
            with second.in_use("tiny"):
                answers.append(second.is_loaded("tiny"))
            second.refresh()  # a rescan does not wait for a load either
            answers.append(second.resolve("single").name)  # nor does hashing a file
            answers.append(first.answers_from_memory("single"))  # learnt by both views

        worker = threading.Thread(target=other_device)
        worker.start()
        worker.join(30)
        assert answers == [True, True, "single", True]
    finally:
        done.set()
        holder.join()


def test_a_draft_is_frozen_from_memory_only_when_nothing_is_looked_up_on_disk(a1111_dir, tmp_path):
    from bot.commands import parse_args
    from bot.draw import freezes_from_memory, new_draft
    from bot.options import draw_options
    from tests.conftest import make_settings

    settings = make_settings(tmp_path)
    library = a1111_library(a1111_dir, hash_cache=a1111_dir / "drafts.json")

    def from_memory(line: str) -> bool:
        parsed = parse_args(line)
        draft = new_draft(parsed.text, draw_options().convert(parsed, settings.limits), settings)
        return freezes_from_memory(draft, library)

    library.names()
    assert from_memory("a cat") and from_memory("a cat --checkpoint folder")
    assert not from_memory("a cat --checkpoint single")  # hashed on the first use
    library.resolve("single")
    assert from_memory("a cat --checkpoint single")
    assert not from_memory("a cat <lora:style:0.5>")  # networks are found in the folder
    assert not from_memory("a cat --lora style")
    assert not from_memory("a cat --vae single")
    assert not freezes_from_memory(new_draft("a cat", {}, settings), object())  # another library

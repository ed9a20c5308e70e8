from __future__ import annotations

import json
import threading

import pytest
import torch

import pipeline.checkpoints as checkpoints
from pipeline.checkpoints import CheckpointInfo, CheckpointLibrary
from pipeline.errors import CheckpointLoadError, UnknownCheckpoint
from pipeline.tiny import build_tiny_pipeline


def _fake_folder(root, name: str) -> None:
    folder = root / "Stable-diffusion" / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


@pytest.fixture(scope="module")
def saved_models_dir(tmp_path_factory):
    """A models folder holding the tiny pipeline saved as a diffusers folder ``foo``."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_pipeline().save_pretrained(root / "Stable-diffusion" / "foo")
    return root


def test_without_models_dir_only_tiny():
    library = CheckpointLibrary(None)
    assert library.names() == ["tiny"]
    assert library.resolve("tiny") == CheckpointInfo(name="tiny", path=None, kind="builtin", sha256=None)


def test_missing_models_folder_is_not_an_error(tmp_path):
    assert CheckpointLibrary(tmp_path / "nowhere").names() == ["tiny"]


def test_names_tiny_first_then_diffusers_folders_sorted(tmp_path):
    for name in ("zeta", "Alpha", "beta"):
        _fake_folder(tmp_path, name)
    (tmp_path / "Stable-diffusion" / "not-a-model").mkdir()
    (tmp_path / "Stable-diffusion" / "single.safetensors").write_bytes(b"x")
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny", "Alpha", "beta", "zeta"]
    info = library.resolve("beta")
    assert info.kind == "diffusers"
    assert info.path == tmp_path / "Stable-diffusion" / "beta"
    assert info.sha256 is None


def test_folder_named_like_the_builtin_is_ignored(tmp_path):
    _fake_folder(tmp_path, "TINY")
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny"]
    assert library.resolve("TINY").kind == "builtin"


def test_resolve_is_case_insensitive(tmp_path):
    _fake_folder(tmp_path, "MyModel")
    library = CheckpointLibrary(tmp_path)
    assert library.resolve("mymodel").name == "MyModel"
    assert library.resolve("TINY").name == "tiny"


def test_unknown_checkpoint_lists_available_names(tmp_path):
    _fake_folder(tmp_path, "foo")
    library = CheckpointLibrary(tmp_path)
    with pytest.raises(UnknownCheckpoint) as info:
        library.resolve("bar")
    assert "tiny, foo" in str(info.value)
    assert info.value.params == {"name": "bar", "available": "tiny, foo"}
    with pytest.raises(UnknownCheckpoint):
        library.load("bar")


def test_refresh_rescans(tmp_path):
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["tiny"]
    _fake_folder(tmp_path, "later")
    assert library.names() == ["tiny"]  # scanned once, until asked again
    library.refresh()
    assert library.names() == ["tiny", "later"]


def test_load_tiny_is_cached():
    library = CheckpointLibrary(None)
    first = library.load("tiny")
    assert library.load("Tiny") is first
    assert library.loaded_names() == ["tiny"]


def test_concurrent_loads_build_once(monkeypatch):
    calls = []
    real_build = checkpoints.build_tiny_pipeline

    def counting_build():
        calls.append(1)
        return real_build()

    monkeypatch.setattr(checkpoints, "build_tiny_pipeline", counting_build)
    library = CheckpointLibrary(None)
    results = []
    threads = [threading.Thread(target=lambda: results.append(library.load("tiny"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 4 and all(r is results[0] for r in results)


def test_least_recently_used_pipeline_is_dropped(saved_models_dir):
    library = CheckpointLibrary(saved_models_dir, max_loaded=1)
    tiny = library.load("tiny")
    library.load("foo")
    assert library.loaded_names() == ["foo"]
    assert library.load("tiny") is not tiny


def test_max_loaded_must_be_positive():
    with pytest.raises(ValueError, match="max_loaded"):
        CheckpointLibrary(None, max_loaded=0)


def test_diffusers_folder_loads_offline_with_tiny_weights(saved_models_dir):
    library = CheckpointLibrary(saved_models_dir)
    assert library.names() == ["tiny", "foo"]
    pipe = library.load("foo")
    assert library.load("foo") is pipe
    assert pipe.safety_checker is None
    assert pipe.tokenizer.convert_tokens_to_ids(",</w>") == 267
    reference = build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_broken_folder_raises_load_error_with_reason(tmp_path):
    _fake_folder(tmp_path, "broken")
    library = CheckpointLibrary(tmp_path)
    with pytest.raises(CheckpointLoadError) as info:
        library.load("broken")
    assert info.value.params["name"] == "broken"
    assert info.value.params["reason"]
    assert "broken" in str(info.value)
    assert library.loaded_names() == []


def test_empty_tokenizer_is_rejected(saved_models_dir, monkeypatch):
    # An offline load can silently produce a 2-token tokenizer (TESTING-NOTES §2.4).
    monkeypatch.setattr(checkpoints, "_MIN_TOKENIZER_SIZE", 10**6)
    library = CheckpointLibrary(saved_models_dir)
    with pytest.raises(CheckpointLoadError, match="tokenizer"):
        library.load("foo")

"""Textual-inversion embeddings: file formats, safe loading, prompt matching, TI hashes."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pipeline.clip import CHUNK_LENGTH, EMBEDDING_PLACEHOLDER_ID, EOS_ID, chunk_prompt, encode_chunks
from pipeline.embeddings import (
    EmbeddingDatabase,
    EmbeddingLoadError,
    embedding_files,
    load_embedding,
    ti_hashes_field,
)
from pipeline.tiny import build_tiny_pipeline

WIDTH = 32  # the tiny text encoder's hidden size


@pytest.fixture(scope="module")
def tiny() -> Any:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def tokenize(tiny: Any) -> Any:
    def _tokenize(texts: list[str]) -> list[list[int]]:
        return tiny.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    return _tokenize


def vectors(rows: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator)


def save_a1111(path: Path, vec: torch.Tensor, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, **extra}, path)
    return path


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def fixes(chunks: list[Any]) -> list[tuple[int, int, str]]:
    """(chunk index, slot, embedding name) of every placed embedding."""
    return [(i, fix.slot, fix.embedding.name) for i, chunk in enumerate(chunks) for fix in chunk.fixes]


class _WritesFile:
    """Unpickling this calls ``open(target, "w")``: a file appears if the pickle is executed."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.target, "w"))


# --- file formats --------------------------------------------------------------------------------


def test_reads_every_format_and_names_by_file_stem(tmp_path: Path) -> None:
    a1111 = vectors(2, 1)
    save_a1111(
        tmp_path / "a1111.pt",
        a1111,
        name="inner-name",
        step=1500,
        sd_checkpoint="6ce0161689",
        sd_checkpoint_name="v1-5-pruned-emaonly",
    )
    torch.save({"emb_params": vectors(3, 2)}, tmp_path / "embparams.pt")
    torch.save({"<cat-toy>": vectors(1, 3)[0]}, tmp_path / "diffusers.bin")
    torch.save({"<cat-toy>": vectors(2, 4)}, tmp_path / "diffusers2.bin")
    save_safetensors(tmp_path / "st.safetensors", {"emb_params": vectors(4, 5)})
    save_safetensors(tmp_path / "single.safetensors", {"whatever": vectors(1, 6)[0]})
    save_a1111(tmp_path / "sub" / "deeper" / "nested.PT", vectors(1, 7))
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "preview.png").write_bytes(b"\x89PNG")

    db = EmbeddingDatabase(tmp_path)

    assert sorted(db.names()) == [
        "a1111",
        "diffusers",
        "diffusers2",
        "embparams",
        "nested",
        "single",
        "st",
    ]
    first = db.get("a1111")
    assert first is not None
    assert torch.equal(first.vectors, a1111)
    assert first.vectors.dtype == torch.float32
    assert (first.step, first.sd_checkpoint, first.sd_checkpoint_name) == (
        1500,
        "6ce0161689",
        "v1-5-pruned-emaonly",
    )
    # A1111 names an embedding by its file; the stored name is only metadata.
    assert first.stored_name == "inner-name" and "inner-name" not in db
    assert {name: e.rows for name, e in db.embeddings.items()} == {
        "a1111": 2,
        "embparams": 3,
        "diffusers": 1,
        "diffusers2": 2,
        "st": 4,
        "single": 1,
        "nested": 1,
    }
    assert all(e.width == WIDTH for e in db.embeddings.values())
    assert torch.equal(db.get("diffusers").vectors, vectors(1, 3))  # (C,) becomes (1, C)
    assert torch.equal(db.get("st").vectors, vectors(4, 5))
    assert len(db) == 7 and "st" in db and "notes" not in db and "preview" not in db


def test_half_precision_vectors_become_float32(tmp_path: Path) -> None:
    save_a1111(tmp_path / "half.pt", vectors(2, 1).half())
    embedding = load_embedding(tmp_path / "half.pt")
    assert embedding is not None and embedding.vectors.dtype == torch.float32
    assert torch.equal(embedding.vectors, vectors(2, 1).half().float())


def test_walk_order_is_natural_and_skips_hidden_folders(tmp_path: Path) -> None:
    for name in ("emb10.pt", "emb2.pt", "b/x.bin", ".hidden/secret.pt", "a/readme.md"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in embedding_files(tmp_path)] == [
        "emb2.pt",
        "emb10.pt",
        "b/x.bin",
    ]


def test_later_file_with_the_same_name_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_a1111(tmp_path / "a" / "twin.pt", vectors(1, 1))
    save_a1111(tmp_path / "b" / "twin.pt", vectors(1, 2))
    with caplog.at_level(logging.WARNING, logger="pipeline.embeddings"):
        db = EmbeddingDatabase(tmp_path)
        assert torch.equal(db.get("twin").vectors, vectors(1, 2))
    assert "same name" in caplog.text


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"string_to_param": {"*": torch.zeros(1, WIDTH), "#": torch.zeros(1, WIDTH)}}, "exactly one"),
        ({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, "exactly one"),
        ({"emb_params": torch.zeros(2, 3, WIDTH)}, "shape"),
        ({"emb_params": torch.zeros(0, WIDTH)}, "shape"),
        ({"emb_params": torch.zeros(2, WIDTH, dtype=torch.long)}, "floating point"),
        ({"emb_params": torch.zeros(CHUNK_LENGTH + 1, WIDTH)}, "at most 75"),
        ([torch.zeros(1, WIDTH)], "not a dict"),
        ({"name": "no tensors"}, "not a tensor"),
    ],
)
def test_unusable_layouts_are_refused(tmp_path: Path, payload: Any, reason: str) -> None:
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(EmbeddingLoadError, match=reason):
        load_embedding(tmp_path / "bad.pt")


def test_seventy_five_vectors_are_accepted(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "long.safetensors", {"emb_params": vectors(CHUNK_LENGTH, 1)})
    assert load_embedding(tmp_path / "long.safetensors").rows == CHUNK_LENGTH


def test_sdxl_pairs_load_for_two_encoder_models_only_and_broken_files_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip_l, clip_g = vectors(2, 1, 768), vectors(2, 2, 1280)
    save_safetensors(tmp_path / "xl.safetensors", {"clip_l": clip_l, "clip_g": clip_g})
    save_safetensors(tmp_path / "uneven.safetensors", {"clip_l": clip_l, "clip_g": vectors(3, 2, 1280)})
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file")
    (tmp_path / "empty.bin").write_bytes(b"")
    save_a1111(tmp_path / "good.pt", vectors(1, 1))
    with caplog.at_level(logging.INFO, logger="pipeline.embeddings"):
        db = EmbeddingDatabase(tmp_path)
        assert db.names() == ["good", "xl"]
        pair = db.get("xl")
        assert pair.widths == (768, 1280) and torch.equal(pair.vectors, torch.cat([clip_l, clip_g], dim=1))
        assert db.usable(WIDTH) == [db.get("good")]
        assert db.usable((768, 1280)) == [pair]
    assert "has width 768+1280; skipped" in caplog.text
    assert "uneven.safetensors" in caplog.text and "clip_g vectors" in caplog.text
    assert "corrupt.safetensors" in caplog.text and "garbage.pt" in caplog.text


def test_missing_or_absent_folder_gives_an_empty_database(tmp_path: Path, tokenize: Any) -> None:
    for db in (EmbeddingDatabase(tmp_path / "nope"), EmbeddingDatabase(None)):
        assert len(db) == 0 and db.names() == [] and db.embeddings == {}
        lookup = db.lookup(tokenize, hidden_size=WIDTH)
        ids = tokenize(["a cat"])[0]
        assert all(lookup(ids, i) is None for i in range(len(ids)))
        chunks, count = chunk_prompt("a cat", tokenize, embeddings=lookup)
        assert fixes(chunks) == [] and count == 4
        assert db.used(chunks) == {}


def test_refresh_sees_new_files_and_bumps_the_version(tmp_path: Path) -> None:
    db = EmbeddingDatabase(tmp_path)
    assert db.names() == []
    version = db.version
    save_a1111(tmp_path / "late.pt", vectors(1, 1))
    assert db.names() == []  # scanned once, until refreshed
    db.refresh()
    assert db.names() == ["late"] and db.version == version + 1


# --- safe loading --------------------------------------------------------------------------------


def test_pickle_that_would_run_code_is_refused_and_not_executed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tokenize: Any
) -> None:
    folder = tmp_path / "embeddings"
    marker = tmp_path / "pwned.txt"
    save_a1111(folder / "evil.pt", vectors(1, 1), payload=_WritesFile(marker))
    with open(folder / "evil_too.bin", "wb") as handle:
        torch.save({"<tok>": vectors(1, 2), "x": _WritesFile(marker)}, handle)
    save_a1111(folder / "good.pt", vectors(1, 3))

    # The payload is live: a plain (unsafe) load of the same kind of file does create its file.
    control_marker = tmp_path / "control.txt"
    save_a1111(tmp_path / "control.pt", vectors(1, 1), payload=_WritesFile(control_marker))
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()

    with caplog.at_level(logging.WARNING, logger="pipeline.embeddings"):
        db = EmbeddingDatabase(folder)
        assert db.names() == ["good"]
    assert not marker.exists()
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 2
    assert any("evil.pt" in m for m in refusals) and any("evil_too.bin" in m for m in refusals)
    assert all("open" in m for m in refusals)  # the reason names the blocked global
    # The database keeps serving the embeddings that loaded.
    chunks, _ = chunk_prompt("good", tokenize, embeddings=db.lookup(tokenize, hidden_size=WIDTH))
    assert fixes(chunks) == [(0, 0, "good")]
    with pytest.raises(EmbeddingLoadError, match="cannot be loaded safely"):
        load_embedding(folder / "evil.pt")
    assert not marker.exists()


# --- matching names in prompts -------------------------------------------------------------------


def test_embedding_takes_one_slot_per_vector_with_the_fragment_weight(tmp_path: Path, tokenize: Any) -> None:
    save_a1111(tmp_path / "myemb.pt", vectors(3, 1))
    db = EmbeddingDatabase(tmp_path)
    lookup = db.lookup(tokenize, hidden_size=WIDTH)

    chunks, count = chunk_prompt("a, (myemb:1.5) b", tokenize, embeddings=lookup)

    a_ids = tokenize(["a"])[0]
    assert fixes(chunks) == [(0, 2, "myemb")]
    # "a" "," then three placeholder slots (the five name tokens are consumed), then "b".
    assert chunks[0].tokens[1:7] == [*a_ids, 267, *[EMBEDDING_PLACEHOLDER_ID] * 3, *tokenize(["b"])[0]]
    assert chunks[0].multipliers[3:6] == [1.5, 1.5, 1.5]
    assert chunks[0].multipliers[6] == 1.0
    assert count == 6
    assert chunks[0].fixes[0].embedding.token_length == len(tokenize(["myemb"])[0]) == 5


def test_name_must_match_as_token_ids(tmp_path: Path, tokenize: Any) -> None:
    save_a1111(tmp_path / "cat.pt", vectors(1, 1))
    lookup = EmbeddingDatabase(tmp_path).lookup(tokenize, hidden_size=WIDTH)
    # "cats" tokenises to c a t s</w>, not c a t</w>: no match inside a longer word.
    chunks, _ = chunk_prompt("cats cat", tokenize, embeddings=lookup)
    assert fixes(chunks) == [(0, 4, "cat")]
    ids = tokenize(["a cat"])[0]
    assert lookup(ids, 1).name == "cat"
    assert lookup(ids, 0) is None
    assert lookup(ids, -1) is None and lookup(ids, len(ids)) is None


def test_longest_name_wins_among_names_with_the_same_first_token(tmp_path: Path, tokenize: Any) -> None:
    save_a1111(tmp_path / "my.pt", vectors(1, 1))
    save_a1111(tmp_path / "my emb.pt", vectors(2, 2))
    lookup = EmbeddingDatabase(tmp_path).lookup(tokenize, hidden_size=WIDTH)

    chunks, _ = chunk_prompt("my emb, my cat", tokenize, embeddings=lookup)

    assert fixes(chunks) == [(0, 0, "my emb"), (0, 3, "my")]


def test_embedding_is_never_split_across_chunks(tmp_path: Path, tokenize: Any) -> None:
    save_a1111(tmp_path / "emb.pt", vectors(3, 1))
    lookup = EmbeddingDatabase(tmp_path).lookup(tokenize, hidden_size=WIDTH)
    filler = " ".join(["a"] * 73)  # 73 one-token words

    chunks, count = chunk_prompt(f"{filler} emb b", tokenize, embeddings=lookup)

    # 73 + 3 > 75: the first chunk closes early (counted as 75) and the embedding starts chunk 2.
    assert fixes(chunks) == [(1, 0, "emb")]
    assert chunks[0].tokens[74:] == [EOS_ID] * 3
    assert chunks[1].tokens[1:5] == [EMBEDDING_PLACEHOLDER_ID] * 3 + tokenize(["b"])[0]
    assert count == 75 + 4

    chunks, _ = chunk_prompt(" ".join(["a"] * 72) + " emb", tokenize, embeddings=lookup)
    assert fixes(chunks) == [(0, 72, "emb")] and len(chunks) == 1  # exactly fills the chunk


def test_wrong_width_embedding_is_skipped_for_that_model(
    tmp_path: Path, tokenize: Any, caplog: pytest.LogCaptureFixture
) -> None:
    save_a1111(tmp_path / "wide.pt", vectors(1, 1, 768))
    save_a1111(tmp_path / "fits.pt", vectors(1, 2))
    db = EmbeddingDatabase(tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline.embeddings"):
        lookup = db.lookup(tokenize, hidden_size=WIDTH)
        db.lookup(tokenize, hidden_size=WIDTH)

    chunks, _ = chunk_prompt("wide fits", tokenize, embeddings=lookup)
    assert fixes(chunks) == [(0, 4, "fits")]  # "wide" stays four plain tokens
    width_lines = [r for r in caplog.records if "wide" in r.getMessage() and "width 768" in r.getMessage()]
    assert len(width_lines) == 1  # logged once per model width, not per lookup
    # A 768-wide text encoder takes it; the database itself still holds both.
    chunks, _ = chunk_prompt("wide fits", tokenize, embeddings=db.lookup(tokenize, hidden_size=768))
    assert fixes(chunks) == [(0, 0, "wide")]
    assert sorted(db.names()) == ["fits", "wide"]


# --- encoding -------------------------------------------------------------------------------------


def _token_rows_seen_by_encoder(tiny: Any, chunks: list[Any]) -> list[torch.Tensor]:
    """The token-embedding rows the transformer received for each chunk (position part removed)."""
    text_encoder = tiny.text_encoder
    embeddings_module = getattr(text_encoder, "text_model", text_encoder).embeddings
    seen: list[torch.Tensor] = []
    hook = embeddings_module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        encode_chunks(text_encoder, chunks)
    finally:
        hook.remove()
    positions = embeddings_module.position_embedding.weight.detach()
    return [out[0] - positions[: out.shape[1]] for out in seen]


def test_encoder_receives_the_embedding_vectors_at_their_slots(
    tmp_path: Path, tiny: Any, tokenize: Any
) -> None:
    vec = vectors(2, 11)
    save_safetensors(tmp_path / "style.safetensors", {"emb_params": vec})
    lookup = EmbeddingDatabase(tmp_path).lookup(tokenize, hidden_size=WIDTH)
    filler = " ".join(["a"] * 71)  # fills slots 4-74 after "x", the two vectors and the comma
    chunks, _ = chunk_prompt(f"x style, {filler} style", tokenize, embeddings=lookup)
    assert fixes(chunks) == [(0, 1, "style"), (1, 0, "style")]

    rows = _token_rows_seen_by_encoder(tiny, chunks)

    torch.testing.assert_close(rows[0][2:4], vec, rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[1][1:3], vec, rtol=0, atol=1e-6)
    # The other slots are the ordinary token embeddings.
    token_table = tiny.text_encoder.get_input_embeddings().weight.detach()
    x_id = tokenize(["x"])[0][0]
    torch.testing.assert_close(rows[0][1], token_table[x_id], rtol=0, atol=1e-6)


def test_encoding_changes_with_the_embedding(tmp_path: Path, tiny: Any, tokenize: Any) -> None:
    save_a1111(tmp_path / "one" / "style.pt", vectors(1, 21))
    save_a1111(tmp_path / "two" / "style.pt", vectors(1, 22))
    prompt = "a photo of style"

    def encode(lookup: Any) -> torch.Tensor:
        chunks, _ = chunk_prompt(prompt, tokenize, embeddings=lookup)
        return encode_chunks(tiny.text_encoder, chunks)

    plain = encode(None)
    first = encode(EmbeddingDatabase(tmp_path / "one").lookup(tokenize, hidden_size=WIDTH))
    first_again = encode(EmbeddingDatabase(tmp_path / "one").lookup(tokenize, hidden_size=WIDTH))
    second = encode(EmbeddingDatabase(tmp_path / "two").lookup(tokenize, hidden_size=WIDTH))

    assert plain.shape == first.shape == second.shape == (1, 77, WIDTH)
    assert not torch.allclose(first, plain)
    assert not torch.allclose(first, second)
    assert torch.equal(first, first_again)


# --- TI hashes -------------------------------------------------------------------------------------


def test_used_reports_short_hashes_in_first_use_order(tmp_path: Path, tokenize: Any) -> None:
    files = {
        "alpha": save_a1111(tmp_path / "alpha.pt", vectors(1, 1)),
        "beta": save_safetensors(tmp_path / "beta.safetensors", {"emb_params": vectors(2, 2)}),
        "unused": save_a1111(tmp_path / "unused.pt", vectors(1, 3)),
    }
    db = EmbeddingDatabase(tmp_path)
    lookup = db.lookup(tokenize, hidden_size=WIDTH)
    cond, _ = chunk_prompt("beta and alpha, beta", tokenize, embeddings=lookup)
    uncond, _ = chunk_prompt("alpha", tokenize, embeddings=lookup)

    used = db.used([*cond, *uncond])

    expected = {name: hashlib.sha256(files[name].read_bytes()).hexdigest()[:12] for name in ("beta", "alpha")}
    assert used == expected and list(used) == ["beta", "alpha"]
    assert all(len(h) == 12 for h in used.values())
    assert ti_hashes_field(used) == f"beta: {expected['beta']}, alpha: {expected['alpha']}"
    assert db.used(chunk_prompt("nothing here", tokenize, embeddings=lookup)[0]) == {}


def test_used_leaves_out_an_embedding_whose_file_is_gone(tmp_path: Path, tokenize: Any) -> None:
    path = save_a1111(tmp_path / "gone.pt", vectors(1, 1))
    db = EmbeddingDatabase(tmp_path)
    chunks, _ = chunk_prompt("gone", tokenize, embeddings=db.lookup(tokenize, hidden_size=WIDTH))
    os.remove(path)
    assert db.used(chunks) == {}


def test_ti_hashes_field_removes_colons_and_commas_from_names() -> None:
    assert ti_hashes_field({"a:b,c": "0123456789ab", "plain": "ba9876543210"}) == (
        "abc: 0123456789ab, plain: ba9876543210"
    )
    assert ti_hashes_field({}) == ""


def test_refused_files_are_kept_with_their_reasons(tmp_path: Path) -> None:
    save_a1111(tmp_path / "good.pt", vectors(1, 1))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, tmp_path / "two.pt")
    torch.save({"x": _WritesFile(tmp_path / "pwned")}, tmp_path / "evil.pt")
    db = EmbeddingDatabase(tmp_path)
    assert db.names() == ["good"]
    refused = {entry.name: entry.reason for entry in db.refused}
    assert refused["empty"] == "the file is empty"
    assert "exactly one tensor, found 2" in refused["two"]
    assert "io.open, which is not allowed" in refused["evil"]
    assert not (tmp_path / "pwned").exists()

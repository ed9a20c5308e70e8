from __future__ import annotations

import re
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline.clip import (
    BOS_ID,
    COMMA_ID,
    EOS_ID,
    EmbeddingMatch,
    PromptChunk,
    apply_emphasis,
    chunk_prompt,
    encode_chunks,
    match_lengths,
    pad_repeating_last,
    target_token_count,
)
from pipeline.errors import PromptSyntaxError

# --- a toy tokenizer: commas are 267, every other word one deterministic id ----------------------


def word_id(word: str) -> int:
    if word == ",":
        return COMMA_ID
    return 1000 + zlib.crc32(word.encode()) % 40000


def fake_tokenize(texts: list[str]) -> list[list[int]]:
    assert isinstance(texts, list)
    return [[word_id(w) for w in re.findall(r",|[^\s,]+", text)] for text in texts]


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def ids(text: str) -> list[int]:
    return fake_tokenize([text])[0]


def content(chunk: PromptChunk) -> list[int]:
    """The chunk's ids between BOS and the final EOS, trailing EOS padding removed."""
    body = chunk.tokens[1:-1]
    while body and body[-1] == EOS_ID:
        body = body[:-1]
    return body


def assert_well_formed(chunks: list[PromptChunk]) -> None:
    for chunk in chunks:
        assert len(chunk.tokens) == 77 and len(chunk.multipliers) == 77
        assert chunk.tokens[0] == BOS_ID and chunk.tokens[-1] == EOS_ID
        assert chunk.multipliers[0] == 1.0 and chunk.multipliers[-1] == 1.0
        assert all(type(t) is int for t in chunk.tokens)
        assert all(type(m) is float for m in chunk.multipliers)


# --- chunking ------------------------------------------------------------------------------------


def test_empty_prompt_is_one_padded_chunk():
    chunks, count = chunk_prompt("", fake_tokenize)
    assert count == 0 and type(count) is int
    assert len(chunks) == 1
    assert chunks[0].tokens == [49406] + [49407] * 76
    assert chunks[0].multipliers == [1.0] * 77
    assert target_token_count(0) == 75


@pytest.mark.parametrize(("count", "target"), [(0, 75), (1, 75), (75, 75), (76, 150), (150, 150), (151, 225)])
def test_target_token_count(count, target):
    result = target_token_count(count)
    assert result == target and type(result) is int


def test_short_prompt():
    chunks, count = chunk_prompt("a cat", fake_tokenize)
    assert count == 2
    assert_well_formed(chunks)
    assert chunks[0].tokens[:4] == [BOS_ID, word_id("a"), word_id("cat"), EOS_ID]
    assert chunks[0].tokens[4:] == [EOS_ID] * 73


def test_exactly_75_tokens_is_one_chunk():
    chunks, count = chunk_prompt(words(75), fake_tokenize)
    assert len(chunks) == 1 and count == 75
    assert content(chunks[0]) == ids(words(75))


def test_76_tokens_spill_into_second_chunk():
    text = words(76)
    chunks, count = chunk_prompt(text, fake_tokenize)
    assert_well_formed(chunks)
    assert len(chunks) == 2 and count == 76
    assert target_token_count(count) == 150
    assert content(chunks[0]) == ids(text)[:75]
    assert content(chunks[1]) == ids(text)[75:]


def test_break_closes_chunk():
    chunks, count = chunk_prompt("a BREAK b", fake_tokenize)
    assert count == 76
    assert [content(c) for c in chunks] == [[word_id("a")], [word_id("b")]]


def test_break_alone_gives_one_empty_chunk_counting_75():
    chunks, count = chunk_prompt("BREAK", fake_tokenize)
    assert count == 75
    assert len(chunks) == 1
    assert chunks[0].tokens == [BOS_ID] + [EOS_ID] * 76


def test_double_break_closes_an_empty_chunk():
    chunks, count = chunk_prompt("a BREAK BREAK b", fake_tokenize)
    assert [content(c) for c in chunks] == [[word_id("a")], [], [word_id("b")]]
    assert count == 151


def test_break_at_full_chunk_closes_it_then_next_starts_fresh():
    chunks, count = chunk_prompt(words(75) + " BREAK x", fake_tokenize)
    assert [len(content(c)) for c in chunks] == [75, 1]
    assert count == 76


def test_break_in_brackets_is_the_word_break_with_negative_weight():
    chunks, count = chunk_prompt("(a BREAK b)", fake_tokenize)
    assert len(chunks) == 1 and count == 3
    assert content(chunks[0]) == [word_id("a"), word_id("BREAK"), word_id("b")]
    assert chunks[0].multipliers[1:4] == [1.1, -1.1, 1.1]


def test_emphasis_multipliers():
    chunks, count = chunk_prompt("x (a) [b] (c:1.5) ((d:1.2):1.5)", fake_tokenize)
    assert count == 5
    assert content(chunks[0]) == [word_id(w) for w in "x a b c d".split()]
    assert chunks[0].multipliers[1:6] == [1.0, 1.1, 0.9090909090909091, 1.5, 1.7999999999999998]
    assert chunks[0].multipliers[6:] == [1.0] * 71


def test_multi_token_fragment_shares_its_weight():
    chunks, _ = chunk_prompt("(red big cat:1.3), dog", fake_tokenize)
    assert content(chunks[0]) == [word_id(w) for w in ["red", "big", "cat", ",", "dog"]]
    assert chunks[0].multipliers[1:6] == [1.3, 1.3, 1.3, 1.0, 1.0]


def test_emphasis_none_keeps_brackets_and_break_literal():
    chunks, count = chunk_prompt("(a) BREAK b", fake_tokenize, emphasis="None")
    assert count == 3
    assert content(chunks[0]) == [word_id("(a)"), word_id("BREAK"), word_id("b")]
    assert chunks[0].multipliers == [1.0] * 77


@pytest.mark.parametrize("mode", ["Original", "No norm", "Ignore"])
def test_other_modes_parse_brackets(mode):
    chunks, _ = chunk_prompt("(a)", fake_tokenize, emphasis=mode)
    assert content(chunks[0]) == [word_id("a")]
    assert chunks[0].multipliers[1] == 1.1


def test_unknown_emphasis_mode_rejected():
    with pytest.raises(ValueError, match="emphasis"):
        chunk_prompt("a", fake_tokenize, emphasis="original")


def test_bad_weight_fails_like_a1111():
    with pytest.raises(PromptSyntaxError):
        chunk_prompt("(a:1.2.3)", fake_tokenize)


def test_tokenize_called_with_lists_of_fragment_texts():
    calls: list[list[str]] = []

    def recording(texts: list[str]) -> list[list[int]]:
        calls.append(texts)
        return fake_tokenize(texts)

    chunk_prompt("a (b) c", recording)
    assert calls and all(isinstance(c, list) for c in calls)
    assert [t for c in calls for t in c] == ["a ", "b", " c"]


def test_numpy_like_ids_become_ints():
    class IntLike(int):
        pass

    chunks, _ = chunk_prompt("a", lambda texts: [[IntLike(5)] for _ in texts])
    assert type(chunks[0].tokens[1]) is int


# --- comma backtracking (§7.1 window edge) ---------------------------------------------------------


def test_comma_at_slot_55_wraps_and_moves_19_tokens():
    text = f"{words(55)} , {words(19, 'v')} x"
    chunks, count = chunk_prompt(text, fake_tokenize)
    assert_well_formed(chunks)
    all_ids = ids(text)
    assert len(chunks) == 2
    first = chunks[0].tokens
    assert first[1:57] == all_ids[:56] and first[56] == COMMA_ID
    assert first[57:] == [EOS_ID] * 20  # 19 paddings + the closing EOS
    assert content(chunks[1]) == all_ids[56:]
    assert len(content(chunks[1])) == 20
    assert count == 75 + 20


def test_comma_at_slot_54_does_not_wrap():
    text = f"{words(54)} , {words(20, 'v')} x"
    chunks, count = chunk_prompt(text, fake_tokenize)
    all_ids = ids(text)
    assert content(chunks[0]) == all_ids[:75]
    assert content(chunks[1]) == [word_id("x")]
    assert count == 76


def test_wrap_moves_multipliers_with_tokens():
    text = f"{words(55)} , ({words(19, 'v')}:1.4) x"
    chunks, _ = chunk_prompt(text, fake_tokenize)
    assert chunks[0].multipliers[57:] == [1.0] * 20
    assert chunks[1].multipliers[1:20] == [1.4] * 19
    assert chunks[1].multipliers[20] == 1.0


def test_comma_padding_backtrack_zero_disables_wrap():
    text = f"{words(55)} , {words(19, 'v')} x"
    chunks, count = chunk_prompt(text, fake_tokenize, comma_padding_backtrack=0)
    assert content(chunks[0]) == ids(text)[:75]
    assert count == 76


def test_larger_backtrack_reaches_further():
    text = f"{words(30)} , {words(44, 'v')} x"  # comma at slot 30, distance 45
    chunks, _ = chunk_prompt(text, fake_tokenize)
    assert len(content(chunks[0])) == 75
    chunks, count = chunk_prompt(text, fake_tokenize, comma_padding_backtrack=45)
    assert len(content(chunks[0])) == 31
    assert len(content(chunks[1])) == 45
    assert count == 75 + 45


def test_comma_in_last_slot_is_a_plain_close():
    text = f"{words(74)} , x"
    chunks, count = chunk_prompt(text, fake_tokenize)
    assert content(chunks[0]) == ids(text)[:75]
    assert content(chunks[1]) == [word_id("x")]
    assert count == 76


def test_only_the_latest_comma_counts():
    text = f"{words(55)} , {words(9, 'u')} , {words(9, 'v')} x"  # commas at 55 and 65
    chunks, _ = chunk_prompt(text, fake_tokenize)
    assert len(content(chunks[0])) == 66
    assert content(chunks[1]) == ids(text)[66:]


def test_comma_arriving_at_full_chunk_is_not_remembered():
    # The comma closes chunk 1 by rule (c) and takes slot 0 of chunk 2; the close reset
    # last_comma, so even a backtrack reaching slot 0 does not wrap chunk 2.
    text = f"{words(75)} , {words(74, 'v')} x"
    chunks, count = chunk_prompt(text, fake_tokenize, comma_padding_backtrack=80)
    assert [len(content(c)) for c in chunks] == [75, 75, 1]
    assert chunks[1].tokens[1] == COMMA_ID
    assert count == 151


def test_comma_after_wrap_is_forgotten_then_new_commas_count():
    # After the wrap the moved tokens start chunk 2 with no comma remembered.
    text = f"{words(55)} , {words(19, 'v')} {words(56, 'x')} y"
    chunks, count = chunk_prompt(text, fake_tokenize)
    assert [len(content(c)) for c in chunks] == [56, 75, 1]
    assert count == 151


def test_commas_only_never_wrap():
    chunks, count = chunk_prompt(" ".join([","] * 80), fake_tokenize)
    assert [len(content(c)) for c in chunks] == [75, 5]
    assert count == 80


def test_long_prompt_three_chunks_count():
    chunks, count = chunk_prompt(words(160), fake_tokenize)
    assert [len(content(c)) for c in chunks] == [75, 75, 10]
    assert count == 160
    assert target_token_count(count) == 225


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(","), st.just("BREAK"), st.from_regex(r"w[0-9]{1,2}", fullmatch=True)), max_size=250
    ),
    st.integers(min_value=0, max_value=40),
)
def test_chunks_are_well_formed_and_keep_every_token(parts, backtrack):
    text = " ".join(parts)
    chunks, count = chunk_prompt(text, fake_tokenize, comma_padding_backtrack=backtrack)
    assert_well_formed(chunks)
    kept = [t for c in chunks for t in content(c)]
    assert kept == [word_id(p) for p in parts if p != "BREAK"]
    assert all(len(content(c)) <= 75 for c in chunks)
    ends_with_break = bool(parts) and parts[-1] == "BREAK"
    if ends_with_break:
        assert count == 75 * len(chunks)
    else:
        assert count == 75 * (len(chunks) - 1) + len(content(chunks[-1]))


# --- textual-inversion placeholders ---------------------------------------------------------------


def lookup_for(name: str, rows: int) -> tuple[EmbeddingMatch, object]:
    match = EmbeddingMatch(name=name, vectors=torch.ones(rows, 32), token_length=1)
    target = word_id(name)

    def lookup(tokens, position):
        return match if tokens[position] == target else None

    return match, lookup


def test_embedding_takes_one_slot_per_row():
    match, lookup = lookup_for("emb", 3)
    chunks, count = chunk_prompt("a (emb:1.2) b", fake_tokenize, embeddings=lookup)
    assert count == 5
    assert content(chunks[0]) == [word_id("a"), 0, 0, 0, word_id("b")]
    assert chunks[0].multipliers[1:6] == [1.0, 1.2, 1.2, 1.2, 1.0]
    assert len(chunks[0].fixes) == 1
    assert chunks[0].fixes[0].slot == 1 and chunks[0].fixes[0].embedding is match


def test_embedding_is_never_split_across_chunks():
    _, lookup = lookup_for("emb", 3)
    chunks, count = chunk_prompt(f"{words(73)} emb b", fake_tokenize, embeddings=lookup)
    assert [len(content(c)) for c in chunks] == [73, 4]
    assert chunks[0].fixes == []
    assert chunks[1].fixes[0].slot == 0
    assert count == 75 + 4


def test_embedding_that_fits_exactly_stays():
    _, lookup = lookup_for("emb", 3)
    chunks, count = chunk_prompt(f"{words(72)} emb b", fake_tokenize, embeddings=lookup)
    assert [len(content(c)) for c in chunks] == [75, 1]
    assert chunks[0].fixes[0].slot == 72


def test_embedding_moves_with_comma_wrap():
    _, lookup = lookup_for("emb", 2)
    chunks, _ = chunk_prompt(
        f"{words(60)} , {words(4, 'v')} emb {words(8, 'u')} x", fake_tokenize, embeddings=lookup
    )
    assert len(content(chunks[0])) == 61
    assert chunks[0].fixes == []
    assert [f.slot for f in chunks[1].fixes] == [4]
    assert content(chunks[1])[4:6] == [0, 0]


def test_without_lookup_embedding_names_are_plain_tokens():
    chunks, _ = chunk_prompt("a emb", fake_tokenize)
    assert content(chunks[0]) == [word_id("a"), word_id("emb")]
    assert chunks[0].fixes == []


# --- emphasis ---------------------------------------------------------------------------------------


def _z_and_multipliers():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 16, generator=gen) + 0.5
    multipliers = torch.ones(2, 77)
    multipliers[0, 3:6] = 1.1
    multipliers[1, 10] = 0.9090909090909091
    multipliers[1, 20:30] = 1.5
    return z, multipliers


def test_emphasis_original_restores_mean():
    z, multipliers = _z_and_multipliers()
    out = apply_emphasis(z, multipliers, "Original")
    weighted = z * multipliers.reshape(2, 77, 1).expand(z.shape)
    expected = weighted * (z.mean() / weighted.mean())
    assert out.dtype == torch.float32 and out.shape == z.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.mean(), z.mean(), rtol=1e-5, atol=1e-7)


def test_emphasis_default_mode_is_original():
    z, multipliers = _z_and_multipliers()
    assert torch.equal(apply_emphasis(z, multipliers), apply_emphasis(z, multipliers, "Original"))


def test_emphasis_no_norm_only_multiplies():
    z, multipliers = _z_and_multipliers()
    out = apply_emphasis(z, multipliers, "No norm")
    assert torch.equal(out, z * multipliers.unsqueeze(-1))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("mode", ["Ignore", "None"])
def test_emphasis_ignore_and_none_leave_z(mode):
    z, multipliers = _z_and_multipliers()
    out = apply_emphasis(z, multipliers, mode)
    assert torch.equal(out, z) and out.dtype == torch.float32


def test_emphasis_all_ones_is_identity():
    z, _ = _z_and_multipliers()
    assert torch.equal(apply_emphasis(z, torch.ones(2, 77)), z)


def test_emphasis_float64_multipliers_still_give_float32():
    z, multipliers = _z_and_multipliers()
    out = apply_emphasis(z, multipliers.double(), "Original")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, apply_emphasis(z, multipliers, "Original"))


def test_emphasis_unknown_mode():
    z, multipliers = _z_and_multipliers()
    with pytest.raises(ValueError):
        apply_emphasis(z, multipliers, "Weird")


# --- encoding with a tiny CLIP text model -------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(config).eval()
    # A fresh final LayerNorm (weight 1, bias 0) gives outputs whose overall mean is rounding
    # noise around 0, so "Original" emphasis (a ratio of two means) would divide noise by
    # noise; trained encoders have a real bias, and so does this one.
    with torch.no_grad():
        _final_norm(model).weight.normal_(1.0, 0.2)
        _final_norm(model).bias.normal_(0.0, 0.5)
    return model


# Our encoding path and the model called directly run different kernels (batched chunks,
# other shapes), which round differently on different CPUs: compare them with a tolerance.
BETWEEN_PATHS = {"rtol": 1e-5, "atol": 1e-6}


def _final_norm(model):
    return getattr(model, "text_model", model).final_layer_norm


def _run(model, tokens: list[int], **kwargs):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), output_hidden_states=True, **kwargs)


def test_encode_single_chunk_clip_skip_1(encoder):
    chunks, _ = chunk_prompt("a cat", fake_tokenize)
    z = encode_chunks(encoder, chunks)
    assert z.shape == (1, 77, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z, _run(encoder, chunks[0].tokens).last_hidden_state, **BETWEEN_PATHS)


def test_encode_clip_skip_2_is_penultimate_plus_final_norm(encoder):
    chunks, _ = chunk_prompt("a cat", fake_tokenize)
    skip1 = encode_chunks(encoder, chunks, clip_skip=1)
    skip2 = encode_chunks(encoder, chunks, clip_skip=2)
    assert not torch.allclose(skip1, skip2)
    with torch.no_grad():
        expected = _final_norm(encoder)(_run(encoder, chunks[0].tokens).hidden_states[-2])
    torch.testing.assert_close(skip2, expected, **BETWEEN_PATHS)


def test_encode_clip_skip_bounds(encoder):
    chunks, _ = chunk_prompt("a", fake_tokenize)
    encode_chunks(encoder, chunks, clip_skip=6)  # 5 layers + embeddings
    with pytest.raises(ValueError):
        encode_chunks(encoder, chunks, clip_skip=7)
    with pytest.raises(ValueError):
        encode_chunks(encoder, chunks, clip_skip=0)


def test_encode_concatenates_chunks_and_applies_emphasis_per_chunk(encoder):
    chunks, _ = chunk_prompt(f"(big:1.3) {words(80)}", fake_tokenize)
    assert len(chunks) == 2
    z = encode_chunks(encoder, chunks, clip_skip=2)
    assert z.shape == (1, 154, 32)
    for i, chunk in enumerate(chunks):
        with torch.no_grad():
            raw = _final_norm(encoder)(_run(encoder, chunk.tokens).hidden_states[-2])
        expected = apply_emphasis(raw, torch.tensor([chunk.multipliers]), "Original")
        torch.testing.assert_close(z[:, 77 * i : 77 * (i + 1)], expected, **BETWEEN_PATHS)
    ignored = encode_chunks(encoder, chunks, clip_skip=2, emphasis="Ignore")
    assert not torch.allclose(ignored[:, :77], z[:, :77])
    torch.testing.assert_close(ignored[:, 77:], z[:, 77:], rtol=0, atol=0)  # no weights in chunk 2


def test_encode_rejects_empty_chunk_list(encoder):
    with pytest.raises(ValueError):
        encode_chunks(encoder, [])


def test_encode_injects_embedding_vectors(encoder):
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    match = EmbeddingMatch("emb", vector, 1)
    target = word_id("emb")
    chunks, _ = chunk_prompt(
        "a emb cat", fake_tokenize, embeddings=lambda t, p: match if t[p] == target else None
    )
    z = encode_chunks(encoder, chunks)
    # Same thing done by hand: put the vector in the embedding table row of the placeholder id.
    table = encoder.get_input_embeddings()
    saved = table.weight.data[0].clone()
    try:
        table.weight.data[0] = vector[0]
        expected = _run(encoder, chunks[0].tokens).last_hidden_state
    finally:
        table.weight.data[0] = saved
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
    assert not table._forward_hooks  # the hook is removed again


def test_encode_pad_id_replaces_tokens_after_first_eos(encoder):
    chunks, _ = chunk_prompt("a cat", fake_tokenize)
    z = encode_chunks(encoder, chunks, pad_id=0)
    tokens = chunks[0].tokens[:4] + [0] * 73
    torch.testing.assert_close(z, _run(encoder, tokens).last_hidden_state, **BETWEEN_PATHS)


# --- conditioning lengths ---------------------------------------------------------------------------


def test_match_lengths_pads_shorter_with_empty_prompt():
    empty = torch.randn(1, 77, 8)
    cond = torch.randn(2, 154, 8)
    uncond = torch.randn(2, 77, 8)
    new_cond, new_uncond = match_lengths(cond, uncond, empty)
    assert new_cond is cond
    assert new_uncond.shape == (2, 154, 8)
    assert torch.equal(new_uncond[:, :77], uncond)
    assert torch.equal(new_uncond[0, 77:], empty[0]) and torch.equal(new_uncond[1, 77:], empty[0])

    new_uncond2, new_cond2 = match_lengths(uncond, torch.randn(1, 231, 8), empty)
    assert new_uncond2.shape == (2, 231, 8)
    assert torch.equal(new_uncond2[:, 154:], empty.repeat(2, 1, 1))


def test_match_lengths_equal_and_invalid():
    empty = torch.randn(1, 77, 8)
    cond, uncond = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    assert match_lengths(cond, uncond, empty) == (cond, uncond)
    with pytest.raises(ValueError):
        match_lengths(torch.randn(1, 100, 8), uncond, empty)


def test_pad_repeating_last():
    a, b = torch.randn(154, 4), torch.randn(77, 4)
    out = pad_repeating_last([a, b])
    assert out[0] is a
    assert out[1].shape == (154, 4)
    assert torch.equal(out[1][:77], b)
    assert torch.equal(out[1][77:], b[-1:].repeat(77, 1))
    assert pad_repeating_last([]) == []

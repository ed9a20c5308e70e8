from __future__ import annotations

import re
import zlib

import pytest
import torch

from pipeline import clip
from pipeline.conditioning import build_conds, positive_parts

C = 3


def tokenize(texts: list[str]) -> list[list[int]]:
    return [
        [
            clip.COMMA_ID if w == "," else 1000 + zlib.crc32(w.encode()) % 40000
            for w in re.findall(r",|[^\s,]+", t)
        ]
        for t in texts
    ]


class FakeEncoder:
    """A deterministic "text encoder": each token's vector depends on its id and position."""

    def __init__(self) -> None:
        self.encoded: list[list[int]] = []

    def __call__(self, chunks: list[clip.PromptChunk]) -> torch.Tensor:
        out = []
        for chunk in chunks:
            self.encoded.append(chunk.tokens)
            ids = torch.tensor(chunk.tokens, dtype=torch.float32)
            positions = torch.arange(77, dtype=torch.float32)
            z = (ids / 50000 + positions / 100).unsqueeze(-1) + torch.arange(C, dtype=torch.float32) / 10
            out.append(z)
        return torch.cat(out).unsqueeze(0)


def chunk(text: str) -> list[clip.PromptChunk]:
    return clip.chunk_prompt(text, tokenize)[0]


def build(prompt: str, negative: str = "", steps: int = 4, encoder: FakeEncoder | None = None, **kwargs):
    return build_conds(
        prompt,
        negative,
        steps,
        chunk=chunk,
        encode=encoder or FakeEncoder(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        **kwargs,
    )


def raw(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = chunk(text)
    z = FakeEncoder()(chunks)[0]
    weights = torch.tensor([m for c in chunks for m in c.multipliers])
    return z, weights


def test_schedule_variants_share_one_emphasis_normalisation():
    """§16.19: ``[(cat:1.5):dog:2]`` normalises both variants over both texts at once."""
    ((schedule, _),) = build("[(cat:1.5):dog:2]").parts
    assert [end for end, _ in schedule] == [2, 4]
    z_cat, w_cat = raw("(cat:1.5)")
    z_dog, w_dog = raw("dog")
    z = torch.stack([z_cat, z_dog])
    w = torch.stack([w_cat, w_dog]).unsqueeze(-1)
    factor = z.mean() / (z * w).mean()
    assert torch.allclose(schedule[0][1], z_cat * w_cat.unsqueeze(-1) * factor, atol=1e-6)
    assert torch.allclose(schedule[1][1], z_dog * factor, atol=1e-6)
    # Encoded alone, the weighted variant would be normalised differently.
    alone = clip.apply_emphasis(z_cat[None], w_cat[None])[0]
    assert not torch.allclose(schedule[0][1], alone, atol=1e-6)


def test_repeated_schedule_texts_weigh_in_the_normalisation():
    """``[(a:2)|b|b]`` at 3 steps encodes a, b, b together: b counts twice in the mean."""
    ((schedule, _),) = build("[(a:2)|b|b]", steps=3).parts
    z_a, w_a = raw("(a:2)")
    z_b, w_b = raw("b")
    z = torch.stack([z_a, z_b, z_b])
    w = torch.stack([w_a, w_b, w_b]).unsqueeze(-1)
    factor = z.mean() / (z * w).mean()
    assert torch.allclose(schedule[0][1], z_a * w_a.unsqueeze(-1) * factor, atol=1e-6)


def test_shorter_variants_get_the_empty_chunk():
    long_text = " ".join(f"w{i}" for i in range(100))
    encoder = FakeEncoder()
    ((schedule, _),) = build(f"[short:{long_text}:2]", encoder=encoder).parts
    assert [tensor.shape for _, tensor in schedule] == [(154, C), (154, C)]
    empty_tokens = chunk("")[0].tokens
    assert empty_tokens in encoder.encoded
    empty_z = FakeEncoder()(chunk(""))[0]
    assert torch.allclose(schedule[0][1][77:], empty_z, atol=1e-6)  # all weights 1: unchanged


def test_and_parts_weights_and_negative_prompt():
    encoded = build("a cat AND a dog:0.5 AND x :-1", "blurry AND ugly")
    assert [weight for _, weight in encoded.parts] == [1.0, 0.5, -1.0]
    # The negative prompt is not split: one schedule holding the whole text.
    assert len(encoded.uncond) == 1
    z, w = raw("blurry AND ugly")
    assert torch.allclose(encoded.uncond[0][1], clip.apply_emphasis(z[None], w[None])[0])


def test_identical_texts_are_encoded_once():
    encoder = FakeEncoder()
    # The parts are "cat" and " cat" (leading whitespace stays, §4); the negative repeats the second.
    encoded = build("cat AND cat AND cat", " cat", encoder=encoder)
    assert len(encoder.encoded) == 2
    assert encoded.parts[1][0][0][1] is encoded.parts[2][0][0][1] is encoded.uncond[0][1]


def test_extra_network_tags_are_cut_before_splitting():
    assert positive_parts("<lora:x:0.5>a cat AND <hypernet:y>dog") == [("a cat", 1.0), (" dog", 1.0)]


def test_hires_timeline_continues_after_the_first_pass():
    """``[a:b:25]`` at 20 base + 10 hires steps switches after hires call 5 (§3.4)."""
    ((schedule, _),) = build("[a:b:25]", steps=20, hires_steps=10).parts
    assert [end for end, _ in schedule] == [5, 10]


def test_output_device_and_dtype():
    encoded = build_conds(
        "a", "b", 2, chunk=chunk, encode=FakeEncoder(), device=torch.device("cpu"), dtype=torch.float16
    )
    assert encoded.parts[0][0][0][1].dtype == torch.float16
    assert encoded.uncond[0][1].dtype == torch.float16


def test_plain_prompt_equals_diffusers_encoding(tiny_library):
    """Without emphasis, chunking or clip skip, our conditioning is diffusers' own."""
    pipe = tiny_library.load("tiny")

    def tokenize_tiny(texts):
        return pipe.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    encoded = build_conds(
        "a cat",
        "ugly",
        4,
        chunk=lambda text: clip.chunk_prompt(text, tokenize_tiny)[0],
        encode=lambda chunks: clip.encode_chunks(pipe.text_encoder, chunks, emphasis="Ignore"),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="ugly")
    assert torch.allclose(encoded.parts[0][0][0][1], cond[0], atol=1e-5)
    assert torch.allclose(encoded.uncond[0][1], uncond[0], atol=1e-5)


@pytest.mark.parametrize("prompt", ["", "AND", "a AND", "[a:b:0]"])
def test_edge_prompts_encode(prompt):
    encoded = build(prompt)
    assert all(len(schedule) >= 1 for schedule, _ in encoded.parts)

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.tiny as tiny
from pipeline.tiny import TINY_NAME, build_tiny_pipeline, build_tiny_tokenizer, byte_unicode_chars, tiny_vocab

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def _checksum(pipe) -> float:
    total = 0.0
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for tensor in module.state_dict().values():
            total += float(tensor.double().sum()) + float(tensor.double().abs().sum())
    return total


def test_name_and_docstring_say_what_tiny_is():
    assert TINY_NAME == "tiny"
    doc = tiny.__doc__.lower()
    assert "noise" in doc and "random" in doc
    assert "tests" in doc and "offline" in doc


def test_comma_has_real_clip_id(tokenizer):
    assert tokenizer.convert_tokens_to_ids(",</w>") == 267
    assert _ids(tokenizer, ",") == [49406, 267, 49407]


def test_special_tokens_have_sd1_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 49407
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407


def test_byte_layout_matches_clip():
    vocab = tiny_vocab()
    chars = byte_unicode_chars()
    assert len(chars) == len(set(chars)) == 256
    assert all(vocab[c] == i for i, c in enumerate(chars))
    assert all(vocab[c + "</w>"] == 256 + i for i, c in enumerate(chars))
    assert len(vocab) == 514
    # Real CLIP has "a</w>" at 320 and "!" at 0.
    assert vocab["a</w>"] == 320
    assert vocab["!"] == 0


def test_every_character_is_one_token(tokenizer):
    assert _ids(tokenizer, "a cat") == [49406, 320, 66, 64, 339, 49407]
    assert _ids(tokenizer, "") == [49406, 49407]


def test_unicode_is_never_unknown(tokenizer):
    ids = tokenizer("héllo 日本 🎨", add_special_tokens=False)["input_ids"]
    assert ids and all(0 <= i < 512 for i in ids)
    # Byte-level: one token per UTF-8 byte.
    assert len(ids) == len("héllo".encode()) + len("日本".encode()) + len("🎨".encode())


def test_components_match_the_testing_notes():
    pipe = build_tiny_pipeline()
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.unet.config.block_out_channels == [32, 64] or tuple(pipe.unet.config.block_out_channels) == (
        32,
        64,
    )
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


def test_text_encoder_output_mean_is_not_zero():
    # A1111's "Original" emphasis divides by the output's mean: it must be well away from 0.
    pipe = build_tiny_pipeline()
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        mean = pipe.text_encoder(input_ids=ids).last_hidden_state.mean().item()
    assert abs(mean) > 0.01


def test_weights_are_identical_on_every_build():
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(first, name).state_dict()
        b = getattr(second, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_weights_are_identical_in_another_process():
    code = (
        "from pipeline.tiny import build_tiny_pipeline; from tests.pipeline.test_tiny import _checksum; "
        + ("print(repr(_checksum(build_tiny_pipeline())))")
    )
    python_path = os.environ.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), python_path])),
        },
        check=True,
    )
    assert float(out.stdout.strip().splitlines()[-1]) == _checksum(build_tiny_pipeline())


def test_tiny_generates_an_image():
    pipe = build_tiny_pipeline()
    generator = torch.Generator().manual_seed(0)
    image = pipe("a cat", num_inference_steps=1, width=64, height=64, generator=generator).images[0]
    assert image.size == (64, 64)


def test_tokenizer_survives_save_and_load(tmp_path, tokenizer):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "a cat, (sitting:1.2) on 日本"
    assert _ids(loaded, text) == _ids(tokenizer, text)
    assert loaded.convert_tokens_to_ids(",</w>") == 267

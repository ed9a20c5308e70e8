"""The built-in ``tiny`` checkpoint: a random-weight SD 1.x pipeline built in code.

``tiny`` draws noise. Its weights are random, so every image it makes is coloured
noise; it exists so that tests and offline smoke runs exercise the whole generation
path (tokenizer, text encoder, UNet, VAE, schedulers, callbacks) without downloading
anything and in a fraction of a second on a CPU.

The weights are the same on every call in every process: they are drawn from a fixed
seed inside ``torch.random.fork_rng()``, so building the pipeline leaves the caller's
global RNG state untouched.

The tokenizer is a byte-level CLIP vocabulary without merges (every character is one
token, nothing is ever unknown), laid out on the real SD1 CLIP ids: the 256 byte
characters at 0..255 in CLIP's byte-to-unicode order, the same characters with
``</w>`` at 256..511, and the special tokens at 49406/49407. A1111's chunking rules
hard-code BOS 49406, EOS 49407 and the comma 267 (``,</w>``), and with this layout they
hold here exactly as with the real tokenizer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
_WEIGHT_SEED = 20240601


def byte_unicode_chars() -> list[str]:
    """CLIP's (GPT-2's) byte-to-unicode table: byte ``b``'s printable stand-in is at index ``b``'s
    position in CLIP's order, printable ASCII/Latin-1 bytes first, the rest remapped after 255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_vocab() -> dict[str, int]:
    """The byte-level vocabulary on real SD1 CLIP ids (``,</w>`` is 267, as in CLIP)."""
    chars = byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = BOS_ID
    vocab["<|endoftext|>"] = EOS_ID
    return vocab


def build_tiny_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=tiny_vocab(),
        merges=[],
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """Build the ``tiny`` pipeline on the CPU in float32 (about 0.1 s)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        return _assemble()


def _assemble() -> StableDiffusionPipeline:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Seeded components in a fixed order: the draw order defines the weights.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    # Four blocks, so vae_scale_factor is 8 as in real SD (and small latents keep it fast).
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=VOCAB_SIZE,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            max_position_embeddings=MAX_LENGTH,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _offset_layer_norms(text_encoder)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipe


def _offset_layer_norms(text_encoder: torch.nn.Module) -> None:
    """Give the text encoder's LayerNorms non-trivial affine weights.

    Freshly initialised LayerNorms (weight 1, bias 0) make every output token vector sum to
    zero, so the encoder output's mean is 0 up to rounding; A1111's "Original" emphasis
    divides by that mean and would turn the conditioning into noise or NaN (depending on
    the thread count). Real CLIP weights never do that, and tiny should not either.
    """
    import torch

    with torch.no_grad():
        for module in text_encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 + 0.1 * torch.randn_like(module.bias))

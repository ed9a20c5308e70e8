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

``build_tiny_sdxl`` is the same idea for SDXL: a CLIP-L-like and an OpenCLIP-bigG-like text
encoder of different widths (32 + 48 = 80 cross-attention features, a 40-wide projected
pooled vector), a UNet with SDXL's ``text_time`` extra conditioning and two transformer
layers in its attention block, and a VAE with SDXL's scaling factor. It is not a
built-in checkpoint; tests save it as a diffusers folder or a single file.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
_WEIGHT_SEED = 20240601
_SDXL_WEIGHT_SEED = 20240602
# The tiny SDXL's text widths: CLIP-L-like, OpenCLIP-bigG-like, and bigG's projection.
SDXL_WIDTHS = (32, 48)
SDXL_POOLED_WIDTH = 40
_SDXL_TIME_EMBED_DIM = 8
# OpenCLIP pads with "!" (id 0) after the end token, CLIP with the end token itself.
OPEN_CLIP_PAD_TOKEN = "!"


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


def build_tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=tiny_vocab(),
        merges=[],
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        unk_token="<|endoftext|>",
    )


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """Build the ``tiny`` pipeline on the CPU in float32 (about 0.1 s)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        return _assemble()


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline on the CPU in float32; the same weights on every call."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SDXL_WEIGHT_SEED)
        return _assemble_sdxl()


def _text_config(width: int, layers: int, **extra: object) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        max_position_embeddings=MAX_LENGTH,
        **extra,
    )


def _tiny_vae(scaling_factor: float = 0.18215, **extra: object) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    # Four blocks, so vae_scale_factor is 8 as in real SD (and small latents keep it fast).
    return AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        scaling_factor=scaling_factor,
        **extra,
    )


def _assemble_sdxl() -> StableDiffusionXLPipeline:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    width_l, width_g = SDXL_WIDTHS
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=width_l + width_g,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_WIDTH + 6 * _SDXL_TIME_EMBED_DIM,
    )
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(_text_config(width_l, 3))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(width_g, 3, projection_dim=SDXL_POOLED_WIDTH, hidden_act="gelu")
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tiny_tokenizer(),
        tokenizer_2=build_tiny_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _offset_layer_norms(text_encoder)
    _offset_layer_norms(text_encoder_2)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def sd_scheduler() -> Any:
    """The SD 1.x/2.x training schedule as diffusers' pipelines carry it (a pipeline needs
    one; the engine's own samplers never call it)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _assemble() -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

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
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(32, 5))
    scheduler = sd_scheduler()
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

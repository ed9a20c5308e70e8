"""SDXL base models: loading, text conditioning and the UNet's size conditioning, as A1111
runs them (A1111-SEMANTICS.md §7.2, §9.2).

* Text: every 75-token chunk (A1111's chunking and emphasis, ``pipeline.clip``) goes
  through CLIP-L, whose ``hidden_states[-2]`` is taken without the final LayerNorm, and
  through OpenCLIP-bigG, whose penultimate output is the same ``hidden_states[-2]``
  (the input of its last block, no final LayerNorm). Each encoder's output is weighted on
  its own, then the two are joined on the feature axis (768 + 1280 = 2048). The pooled
  vector is bigG's projected pooled output of the text's *first* chunk. Clip skip changes
  nothing (A1111's "Clip skip SDXL" option, off by default, is not offered); the infotext
  still records it.
* Token ids: both encoders read the same ids from one CLIP vocabulary; CLIP-L pads a chunk
  with the end token, bigG with id 0 (``!``) after the first end token, as A1111 does for
  OpenCLIP. Textual-inversion pairs put ``clip_l`` into CLIP-L and ``clip_g`` into bigG.
* Size conditioning (``time_ids``): ``[original h, w, crop top, left, target h, w]``. A1111
  builds it from the size its conds are made for: the request's width and height for
  txt2img and img2img, the hires target for the hires pass; crop 0, 0 (the default
  "crop top/left" settings). cond and uncond share it.
* An empty negative prompt (all of its scheduled texts empty) is zeros, cross-attention
  tokens and pooled vector alike: A1111 forces zero embeddings for it on SDXL.
* σ schedules take their SDXL variants (Align Your Steps' SDXL table).

Single files use SGM's key layout (``conditioner.embedders.0.transformer.*`` for CLIP-L,
``conditioner.embedders.1.model.*`` for bigG, ``model.diffusion_model.*`` with
``label_emb`` for the UNet) and are assembled from shipped diffusers configs
(``pipeline/configs/sdxl``) by diffusers' converters, so nothing is fetched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline import clip
from pipeline.conditioning import RawText

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

# SGM's "penultimate" layer for both encoders: the input of the last transformer block.
PENULTIMATE = -2
# A1111 pads OpenCLIP chunks with id 0 after the first end token, whatever the tokenizer says.
OPEN_CLIP_PAD_ID = 0
# The CPU allocator's alignment in bytes.
_ALIGNMENT = 64
# A1111's defaults for "crop top/left" (sdxl_crop_top, sdxl_crop_left).
CROP_TOP = 0
CROP_LEFT = 0


def is_sdxl(pipe: Any) -> bool:
    """Whether ``pipe`` is an SDXL base pipeline (two text encoders)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_widths(pipe: Any) -> tuple[int, int]:
    """The two encoders' widths (768, 1280 for real SDXL): how wide an embedding pair must be."""
    return (int(pipe.text_encoder.config.hidden_size), int(pipe.text_encoder_2.config.hidden_size))


def time_ids(width: int, height: int) -> torch.Tensor:
    """SDXL's size conditioning for conds made at ``width`` x ``height`` (float32, 6 values)."""
    return torch.tensor([height, width, CROP_TOP, CROP_LEFT, height, width], dtype=torch.float32)


def encode_raw(pipe: Any, chunks: Sequence[clip.PromptChunk]) -> RawText:
    """Both encoders' unweighted outputs for a text's chunks, and the first chunk's pooled vector."""
    if not chunks:
        raise ValueError("encoding needs at least one chunk")
    width_l = int(pipe.text_encoder.config.hidden_size)
    outputs_l, outputs_g = [], []
    pooled = None
    for chunk in chunks:
        out_l = clip.run_chunk(pipe.text_encoder, chunk, columns=slice(0, width_l))
        out_g = clip.run_chunk(
            pipe.text_encoder_2, chunk, pad_id=OPEN_CLIP_PAD_ID, columns=slice(width_l, None)
        )
        outputs_l.append(out_l.hidden_states[PENULTIMATE])
        outputs_g.append(out_g.hidden_states[PENULTIMATE])
        if pooled is None:
            pooled = out_g.text_embeds
    return RawText(streams=(torch.cat(outputs_l, dim=1), torch.cat(outputs_g, dim=1)), pooled=pooled)


# --------------------------------------------------------------------------------------
# Loading


def load_folder(folder: Path) -> StableDiffusionXLPipeline:
    """An SDXL diffusers folder, offline."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        _align(module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _align(module: torch.nn.Module) -> None:
    """Copy weights that sit misaligned inside the memory-mapped file into memory of their own.

    CPU matrix products round differently on misaligned data, so without this a folder
    would draw slightly other pixels than the same weights from a single file."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()


# What a complete SDXL base file holds, by SGM key prefix.
_PARTS = {
    "UNet": "model.diffusion_model.",
    "VAE": "first_stage_model.",
    "CLIP-L text encoder": "conditioner.embedders.0.transformer.",
    "OpenCLIP-bigG text encoder": "conditioner.embedders.1.model.",
}
_REFINER_KEY = "conditioner.embedders.0.model."


def check_single_file(keys: Sequence[str]) -> str | None:
    """Why an SGM-layout state dict cannot be loaded as an SDXL base model (None: it can)."""
    if any(key.startswith(_REFINER_KEY) for key in keys):
        return "it is an SDXL refiner; only SDXL base models are supported"
    missing = [name for name, prefix in _PARTS.items() if not any(k.startswith(prefix) for k in keys)]
    return f"it has no {', no '.join(missing)} weights" if missing else None


def assemble_single_file(
    state: dict[str, torch.Tensor],
    config: Path,
    tokenizers: tuple[Any, Any],
    prediction_type: str = "epsilon",
) -> StableDiffusionXLPipeline:
    """The pipeline from an already safely loaded SGM-layout state dict and a folder of
    SDXL configs; each component is converted from the dict, so diffusers never opens the
    file itself."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common: dict[str, Any] = {"config": str(config), "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
    vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, state, subfolder="text_encoder", **common
    )
    text_encoder_2 = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, state, subfolder="text_encoder_2", **common
    )
    scheduler = EulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=True)
    scheduler = EulerDiscreteScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

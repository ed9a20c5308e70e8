"""Test helper: a diffusers SDXL pipeline -> SGM (A1111 SDXL) single-file key layout.

The UNet and VAE use the LDM layout of ``a1111_layout`` (plus ``label_emb`` for SDXL's
extra conditioning); CLIP-L sits under ``conditioner.embedders.0.transformer.`` with its
transformers keys, OpenCLIP-bigG under ``conditioner.embedders.1.model.`` with OpenCLIP's
names (fused ``in_proj`` attention weights, ``text_projection`` stored transposed).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tests.pipeline.a1111_layout import UNET_PREFIX, VAE_PREFIX, unet_to_a1111, vae_to_ldm

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

_ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
_RESBLOCK_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def sdxl_to_sgm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole SDXL pipeline as one SGM-layout state dict."""
    unet = pipe.unet.state_dict()
    added = {k: v for k, v in unet.items() if k.startswith("add_embedding.")}
    rest = {k: v for k, v in unet.items() if k not in added}
    state = unet_to_a1111(rest, layers_per_block=pipe.unet.config.layers_per_block)
    for key, value in added.items():
        for old, new in _ADD_EMBEDDING.items():
            if key.startswith(old):
                state[UNET_PREFIX + new + key[len(old) :]] = value
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    state.update(
        {CLIP_L_PREFIX + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    )
    state.update(
        {CLIP_G_PREFIX + k: v for k, v in open_clip_layout(pipe.text_encoder_2.state_dict()).items()}
    )
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def open_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP's text-tower names."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif match := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            fused.setdefault((match[1], match[3]), {})[match[2]] = value
        elif match := re.match(r"encoder\.layers\.(\d+)\.(.*)$", key):
            rest = match[2]
            for old, new in _RESBLOCK_RENAMES:
                rest = rest.replace(old, new)
            out[f"transformer.resblocks.{match[1]}.{rest}"] = value
        elif not key.endswith("position_ids"):
            raise KeyError(f"no OpenCLIP name for {key!r}")
    for (layer, kind), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out

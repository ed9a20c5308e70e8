"""Test helper: diffusers SD 1.x state dicts -> A1111 (original LDM) single-file key layout.

diffusers ships only the opposite converter, and committed fixtures would break across
transformers versions (TESTING-NOTES §2.3), so single-file checkpoints are generated at
test time from the tiny pipeline. The mapping is generic over the number of blocks and
``layers_per_block``, so it works for tiny and for a real SD 1.x layout alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def pipeline_to_a1111(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole pipeline as one A1111 state dict (UNet, VAE and CLIP text encoder)."""
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_a1111(pipe.unet.state_dict(), layers_per_block=pipe.unet.config.layers_per_block))
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    state.update(text_encoder_to_a1111(pipe.text_encoder.state_dict()))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def text_encoder_to_a1111(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 saves flattened keys; real SD files always carry ``text_model.``.
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}


def _rename_resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_key(key: str, layers: int, up_has_attention: dict[int, bool]) -> str:
    simple = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for old, new in simple.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        slot = block * (layers + 1) + index + 1
        return (
            f"input_blocks.{slot}.0.{_rename_resnet(rest)}"
            if kind == "resnets"
            else f"input_blocks.{slot}.1.{rest}"
        )
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(match[1]) + 1) * (layers + 1)}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_resnet(match[2])}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        slot = block * (layers + 1) + index
        return (
            f"output_blocks.{slot}.0.{_rename_resnet(rest)}"
            if kind == "resnets"
            else f"output_blocks.{slot}.1.{rest}"
        )
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        block = int(match[1])
        position = 2 if up_has_attention.get(block) else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{position}.{match[2]}"
    raise KeyError(f"no A1111 name for UNet key {key!r}")


def unet_to_a1111(state: dict[str, torch.Tensor], *, layers_per_block: int) -> dict[str, torch.Tensor]:
    up_has_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    flags = {block: True for block in up_has_attention}
    return {UNET_PREFIX + _unet_key(k, layers_per_block, flags): v for k, v in state.items()}


def _vae_side_key(key: str, num_up: int) -> str:
    key = key.replace("conv_norm_out", "norm_out")
    if match := re.match(r"(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{match[2]}.block.{match[3]}.{_vae_resnet(match[4])}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{match[1]}.downsample.{match[2]}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{num_up - 1 - int(match[1])}.block.{match[2]}.{_vae_resnet(match[3])}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{num_up - 1 - int(match[1])}.upsample.{match[2]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_vae_resnet(match[3])}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        side, rest = match[1], match[2]
        for old, new in _VAE_ATTENTION_RENAMES.items():
            if rest.startswith(old + "."):
                return f"{side}.mid.attn_1.{new}{rest[len(old) :]}"
    return key


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE in LDM layout without a prefix (what a ``.vae.pt`` file holds)."""
    num_up = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        new = _vae_side_key(key, num_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[new] = value
    return out


def build_a1111_models(base: Path) -> Path:
    """An A1111 models folder under ``base``: a diffusers folder, a ``.safetensors`` and a
    ``.ckpt`` (in a subfolder), each single file with a ``.vae.pt`` and ``.yaml`` beside it; plus ``cfg``,
    the tiny diffusers folder single files are assembled with."""
    from safetensors.torch import save_file

    from pipeline.tiny import build_tiny_pipeline

    models = base / "models"
    sd_dir = models / "Stable-diffusion"
    (sd_dir / "sub").mkdir(parents=True)
    for sub in ("VAE", "Lora", "hypernetworks", "embeddings"):
        (models / sub).mkdir()
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(base / "cfg")
    pipe.save_pretrained(sd_dir / "folder")
    state = pipeline_to_a1111(pipe)
    vae = {"state_dict": vae_to_ldm(pipe.vae.state_dict())}
    save_file(state, sd_dir / "single.safetensors")
    torch.save(vae, sd_dir / "single.vae.pt")
    (sd_dir / "single.yaml").write_text("model:\n  params:\n    parameterization: eps\n    use_ema: false\n")
    torch.save({"state_dict": state, "global_step": 7}, sd_dir / "sub" / "pickled.ckpt")
    torch.save(vae, sd_dir / "sub" / "pickled.vae.pt")
    (sd_dir / "sub" / "pickled.yaml").write_text("model:\n  params:\n    use_ema: true\n")
    return base


def a1111_library(base: Path, **kwargs: Any) -> Any:
    """A ``CheckpointLibrary`` over ``build_a1111_models``' folder."""
    from pipeline.checkpoints import CheckpointLibrary

    kwargs.setdefault("config_dirs", {"sd1": base / "cfg"})
    return CheckpointLibrary(base / "models", **kwargs)


def fake_diffusers_folder(root: Path, name: str) -> None:
    """A checkpoint folder under ``root`` that only a scan looks at (no weights)."""
    folder = root / "Stable-diffusion" / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

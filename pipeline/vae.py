"""Separate VAE files and the full-precision decode fallback (DESIGN §7, A1111 ``--no-half-vae``).

A VAE file in ``<models_dir>/VAE/`` is a safetensors file or a ``.pt``/``.ckpt`` read with
``torch.load(weights_only=True)``; its keys may be A1111/LDM ones (``first_stage_model.``
prefixed or bare ``encoder.down.0…``/``decoder.up.0…``) or diffusers ones, and it is loaded
into an ``AutoencoderKL`` built from the current model's VAE config.

Half-precision SD VAEs overflow on some latents and decode to NaN, which becomes a black
image. The engine decodes through :func:`decode_with_fallback`: when a fp16/bf16 decode
has a NaN or is entirely black, it is repeated in float32 for that call (the VAE is put
back to its dtype afterwards, so a request always gives the same pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.networks import UnknownNetwork
from pipeline.safe_load import load_state_dict

logger = logging.getLogger(__name__)

__all__ = ["VAE_EXTENSIONS", "VAE_SUBDIR", "decode_with_fallback", "find_vae", "load_vae", "needs_fp32_retry"]

VAE_SUBDIR = "VAE"
VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_PREFIXES = ("first_stage_model.", "vae.")

# SD 1.x/2.x's VAE, for files loaded without a model to copy the architecture from.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def vae_names(models_dir: Path | None) -> dict[str, Path]:
    """VAE name (file stem; ``x.vae.pt`` is ``x.vae``) → file, sorted case-insensitively."""
    folder = models_dir / VAE_SUBDIR if models_dir is not None else None
    if folder is None or not folder.is_dir():
        return {}
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VAE_EXTENSIONS]
    found: dict[str, Path] = {}
    for path in sorted(files, key=lambda p: str(p).casefold()):
        found.setdefault(path.stem, path)
    return found


def find_vae(models_dir: Path | None, name: str) -> Path:
    """The VAE file called ``name`` (exact, then case-insensitive, then with its extension)."""
    files = vae_names(models_dir)
    for candidate, path in files.items():
        if name in (candidate, path.name):
            return path
    for candidate, path in files.items():
        if name.casefold() in (candidate.casefold(), path.name.casefold()):
            return path
    raise UnknownNetwork(name, "vae", list(files))


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def _is_diffusers_layout(state: dict[str, Any]) -> bool:
    return any(key.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for key in state)


def load_vae(path: str | Path, *, config: dict[str, Any] | None = None) -> Any:
    """An ``AutoencoderKL`` (float32, CPU, eval) with the weights of ``path``.

    ``config`` is the architecture (the loaded checkpoint's ``vae.config``); SD's VAE when
    omitted. Raises ``ValueError`` when the file's weights do not fit that architecture.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    config = dict(SD_VAE_CONFIG if config is None else config)
    state = _strip_prefix(load_state_dict(path))
    if not _is_diffusers_layout(state):
        state = convert_ldm_vae_checkpoint(state, config)
    # diffusers' mid-block attention is Linear; LDM stores 1x1 conv weights.
    state = {k: v[:, :, 0, 0] if k.endswith(".weight") and "attentions" in k and v.dim() == 4 else v
             for k, v in state.items()}  # fmt: skip
    known = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(known)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"{path.name}: not a VAE for this model ({len(missing)} weights missing, e.g. {missing[0]})"
        )
    if unexpected:
        logger.info("%s: ignoring %d unused keys", path.name, len(unexpected))
    return vae.eval()


def needs_fp32_retry(decoded: torch.Tensor) -> bool:
    """A NaN anywhere, or every value at -1 (or below): the half-precision VAE overflowed."""
    return bool(torch.isnan(decoded).any()) or bool((decoded <= -1).all())


def decode_with_fallback(
    vae: Any, latents: torch.Tensor, decode: Callable[[Any, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``decode(vae, latents)``, redone in float32 when a half-precision decode failed."""
    decoded = decode(vae, latents)
    dtype = vae.dtype
    if dtype not in _HALF_DTYPES or not needs_fp32_retry(decoded):
        return decoded
    logger.warning("VAE decode in %s produced NaN or a black image; retrying in float32", dtype)
    vae.to(torch.float32)
    try:
        return decode(vae, latents)
    finally:
        vae.to(dtype)

"""Separate VAE files and the full-precision decode fallback (DESIGN §7, A1111 ``--no-half-vae``).

A VAE file in ``<models_dir>/VAE/`` (or ``<checkpoint>.vae.*`` beside a checkpoint) is read
through :mod:`pipeline.safe_load` like every model file; its keys may be A1111/LDM ones (``first_stage_model.``
prefixed or bare ``encoder.down.0…``/``decoder.up.0…``) or diffusers ones, and it is loaded
into an ``AutoencoderKL`` built from the current model's VAE config.

Half-precision SD VAEs overflow on some latents and decode to NaN, which becomes a black
image. The engine decodes through :func:`decode_with_fallback`: when a fp16/bf16 decode
has a NaN or is entirely black, it is repeated in float32 for that call (the VAE is put
back to its dtype afterwards, so a request always gives the same pixels).

A batch is decoded one image at a time (:func:`decode_batch`), as A1111 does: image ``i``
then does not depend on the others, nor on the memory mode, and the fp32 retry redoes only
the image that needs it. Large images can be decoded in overlapping tiles
(:func:`tiled_decode`), blended linearly across the overlaps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.networks import NetworkLoadError, UnknownNetwork
from pipeline.safe_load import load_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "TILE_LATENTS",
    "VAE_EXTENSIONS",
    "VAE_SUBDIR",
    "VaeLoadError",
    "decode_batch",
    "decode_with_fallback",
    "find_vae",
    "load_vae",
    "needs_fp32_retry",
    "tiled_decode",
]

VAE_SUBDIR = "VAE"
VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_PREFIXES = ("first_stage_model.", "vae.")
# Tiles of 64 latents (512 px, what the SD VAE was trained on), a quarter of them overlapping.
TILE_LATENTS = 64
_TILE_OVERLAP_SHARE = 0.25

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


class VaeLoadError(NetworkLoadError, ValueError):
    """A VAE file whose weights cannot go into the model's VAE (missing keys, wrong shapes,
    a layout the converter cannot read). A ``ValueError`` too, as callers expect of a
    file that does not fit."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, "VAE", reason)


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
    omitted. Raises :class:`VaeLoadError` (a ``ValueError``) when the file's weights do not
    fit that architecture, ``UnsafeCheckpoint`` when the file is refused.
    """
    path = Path(path)
    config = dict(SD_VAE_CONFIG if config is None else config)
    state = _strip_prefix(load_state_dict(path))
    try:
        vae, unexpected = _vae_from_state(state, config)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        # diffusers' converter and load_state_dict fail in many ways on a foreign dict.
        reason = " ".join(str(exc).split())[:300]
        raise VaeLoadError(
            path, f"its weights do not fit this model's VAE ({type(exc).__name__}: {reason})"
        ) from exc
    if unexpected:
        logger.info("%s: ignoring %d unused keys", path.name, len(unexpected))
    return vae.eval()


def _vae_from_state(state: dict[str, Any], config: dict[str, Any]) -> tuple[Any, list[str]]:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not _is_diffusers_layout(state):
        state = convert_ldm_vae_checkpoint(state, config)
    # diffusers' mid-block attention is Linear; LDM stores 1x1 conv weights.
    state = {k: v[:, :, 0, 0] if k.endswith(".weight") and "attentions" in k and v.dim() == 4 else v
             for k, v in state.items()}  # fmt: skip
    known = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(known)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"not a VAE for this model ({len(missing)} weights missing, e.g. {missing[0]})")
    return vae, unexpected


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
    # Outside inference mode, so the weights never become inference tensors.
    with torch.inference_mode(False), torch.no_grad():
        vae.to(torch.float32)
    try:
        return decode(vae, latents)
    finally:
        with torch.inference_mode(False), torch.no_grad():
            vae.to(dtype)


Decode = Callable[[Any, torch.Tensor], torch.Tensor]


def decode_batch(vae: Any, latents: torch.Tensor, decode: Decode, *, tile: int | None = None) -> torch.Tensor:
    """Each image of the batch through :func:`decode_with_fallback`; tiled with ``tile``-latent
    tiles when ``tile`` is given (images that fit in one tile are decoded whole)."""
    if tile is not None:
        decode = functools.partial(tiled_decode, decode=decode, tile=tile)
    return torch.cat([decode_with_fallback(vae, one, decode) for one in latents.split(1)])


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def _ramp(size: int, fade: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """1 in the middle, rising from near 0 over ``fade`` at a side that overlaps a neighbour."""
    weights = torch.ones(size)
    fade = min(fade, size // 2)
    if fade > 0:
        rise = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if fade_in:
            weights[:fade] = rise
        if fade_out:
            weights[-fade:] = torch.minimum(weights[-fade:], rise.flip(0))
    return weights


def tiled_decode(
    vae: Any, latents: torch.Tensor, decode: Decode, *, tile: int = TILE_LATENTS, overlap: int | None = None
) -> torch.Tensor:
    """``decode`` in overlapping ``tile``x``tile`` latent tiles, blended into one image (float32).

    Peak memory is that of one tile's decode. The decoder's normalisation sees one tile at
    a time, so a tiled image is close to, not equal to, the whole decode."""
    height, width = latents.shape[-2:]
    if height <= tile and width <= tile:
        return decode(vae, latents)
    overlap = max(1, int(tile * _TILE_OVERLAP_SHARE)) if overlap is None else overlap
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    out = weight = None
    scale = 1
    for top in rows:
        for left in cols:
            piece = decode(vae, latents[..., top : top + tile, left : left + tile]).float()
            if out is None:
                scale = piece.shape[-1] // min(tile, width)
                out = piece.new_zeros((*piece.shape[:2], height * scale, width * scale))
                weight = piece.new_zeros((1, 1, height * scale, width * scale))
            assert weight is not None
            rows_w = _ramp(piece.shape[-2], overlap * scale, top > 0, top != rows[-1])
            cols_w = _ramp(piece.shape[-1], overlap * scale, left > 0, left != cols[-1])
            mask = (rows_w[:, None] * cols_w[None, :]).to(piece.device)
            y, x = top * scale, left * scale
            out[..., y : y + piece.shape[-2], x : x + piece.shape[-1]] += piece * mask
            weight[..., y : y + piece.shape[-2], x : x + piece.shape[-1]] += mask
    assert out is not None and weight is not None
    return out / weight

"""Pixels ↔ latents and the step arithmetic of partial denoising (A1111-SEMANTICS.md §9.6).

img2img and the hires pass both start from an image's latents plus noise at some σ in
the middle of a schedule; which σ, and how many steps are then run, is A1111's
arithmetic below, not diffusers' (A1111 runs one step more, §16.10).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# A1111 clamps the strength so that a full-strength job still starts below σ_max.
_MAX_DENOISE = 0.999


@dataclass(frozen=True)
class StepPlan:
    """A partial run: the schedule is computed for ``schedule_steps`` and the last
    ``run_steps`` are sampled, i.e. σ's from index ``start_index`` on."""

    schedule_steps: int
    run_steps: int

    @property
    def start_index(self) -> int:
        return self.schedule_steps - self.run_steps


def _check_strength(denoise: float) -> float:
    if not 0 <= denoise <= 1:
        raise ValueError(f"denoising strength must be 0-1, got {denoise}")
    return min(float(denoise), _MAX_DENOISE)


def img2img_plan(steps: int, denoise: float) -> StepPlan:
    """A1111's default: ``t_enc = int(min(denoise, 0.999)·steps)`` and ``t_enc + 1`` steps from
    index ``steps − t_enc − 1``; 20 steps at 0.75 run 16 steps from σ[4]."""
    t_enc = int(_check_strength(denoise) * steps)
    return StepPlan(schedule_steps=steps, run_steps=t_enc + 1)


def hires_plan(steps: int, denoise: float) -> StepPlan:
    """ "Do exactly the amount of steps" (always on for hires): a schedule for
    ``int(steps / min(denoise, 0.999))`` steps of which the last ``steps`` run."""
    strength = _check_strength(denoise)
    if strength <= 0:
        raise ValueError("denoising strength must be above 0 for the hires pass")
    return StepPlan(schedule_steps=int(steps / strength), run_steps=steps)


def _noised_at_timestep(
    start: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timestep: int
) -> torch.Tensor:
    """The timestep samplers' equivalent of ``x0 + noise·σ``: ``√ᾱ·x0 + √(1−ᾱ)·noise``."""
    alpha = float(alphas_cumprod[timestep])
    return start * alpha**0.5 + noise * (1 - alpha) ** 0.5


def load_init_image(path: str | Path, width: int, height: int) -> Any:
    """The init image as RGB at the request size, A1111's "Just resize" (Lanczos, no crop)."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image


def images_to_tensor(images: list[Any]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch * 2.0 - 1.0


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
    """VAE latents (float32, scaled by the VAE's scaling factor) of images in [-1, 1];
    ``scaled=False``: without the factor (an instruct-pix2pix model's image channels).

    The posterior's *mean* (its mode): A1111 draws a sample, but not from the image's seed
    stream (§8.6 routes only the start noise through ImageRNG), and the SD VAE's posterior
    std is far below a pixel level, so the mean is the reproducible choice.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(images).latent_dist
    mean = posterior.mean.float()
    return mean * vae.config.scaling_factor if scaled else mean


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) from scaled latents, as diffusers' pipelines decode."""
    scaled = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
    return vae.decode(scaled, return_dict=False)[0]


def to_pil(decoded: torch.Tensor) -> list[Any]:
    """8-bit images as A1111 makes them: clamp (x+1)/2 to [0, 1], scale by 255 and truncate.

    diffusers rounds instead; A1111 converts with a plain ``astype(uint8)``, so a pixel
    value of 127.9 is 127 there, and parity needs the same.
    """
    from PIL import Image

    images = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
    arrays = (255.0 * images.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    return [Image.fromarray(array) for array in arrays]

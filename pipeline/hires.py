"""Hires fix: target size, upscalers and infotext fields (A1111-SEMANTICS.md §9.6).

The first pass runs at the request size; its result is upscaled (in latent space for the
"Latent*" upscalers, in pixel space otherwise), cropped to the target aspect and
denoised again. The sampling itself is the engine's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_DENOISING_STRENGTH = 0.7
LATENT_FACTOR = 8

# Upscaler name -> (torch interpolation mode, antialias).
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Upscaler name -> PIL resampling filter name.
PIXEL_UPSCALERS: dict[str, str] = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)


@dataclass(frozen=True)
class HiresTarget:
    """The final size, and the size the first pass is upscaled to before the crop."""

    width: int
    height: int
    upscaled_width: int
    upscaled_height: int

    @property
    def latent_crop(self) -> tuple[int, int]:
        """Latent pixels cut off (x, y): ``t//2`` at the start and ``(t+1)//2`` at the end."""
        return (
            (self.upscaled_width - self.width) // LATENT_FACTOR,
            (self.upscaled_height - self.height) // LATENT_FACTOR,
        )


def check_upscaler(name: str) -> str:
    if name not in UPSCALERS:
        raise ValueError(f"unknown hires upscaler {name!r}; available: {', '.join(UPSCALERS)}")
    return name


def hires_target(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0) -> HiresTarget:
    """``int(w·scale) × int(h·scale)``, or the resize values; with one of them the other
    follows the aspect ratio, with both the image is upscaled to cover that aspect first."""
    if resize_x == 0 and resize_y == 0:
        w, h = int(width * scale), int(height * scale)
        return HiresTarget(w, h, w, h)
    if resize_y == 0:
        return HiresTarget(resize_x, resize_x * height // width, resize_x, resize_x * height // width)
    if resize_x == 0:
        return HiresTarget(resize_y * width // height, resize_y, resize_y * width // height, resize_y)
    if width / height < resize_x / resize_y:
        return HiresTarget(resize_x, resize_y, resize_x, resize_x * height // width)
    return HiresTarget(resize_x, resize_y, resize_y * width // height, resize_y)


def upscale_latents(latents: torch.Tensor, upscaler: str, target: HiresTarget) -> torch.Tensor:
    """Interpolate first-pass latents to the upscaled size (pixels // 8)."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    size = (target.upscaled_height // LATENT_FACTOR, target.upscaled_width // LATENT_FACTOR)
    options: dict[str, Any] = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, **options)


def upscale_images(images: list[Any], upscaler: str, target: HiresTarget) -> list[Any]:
    """Resize decoded first-pass images to the upscaled size with PIL."""
    from PIL import Image

    resample = getattr(Image.Resampling, PIXEL_UPSCALERS[upscaler])
    size = (target.upscaled_width, target.upscaled_height)
    return [image.resize(size, resample=resample) for image in images]


def crop_latents(latents: torch.Tensor, target: HiresTarget) -> torch.Tensor:
    crop_x, crop_y = target.latent_crop
    height, width = latents.shape[-2], latents.shape[-1]
    return latents[..., crop_y // 2 : height - (crop_y + 1) // 2, crop_x // 2 : width - (crop_x + 1) // 2]


def infotext_fields(
    *,
    denoising_strength: float,
    scale: float,
    resize_x: int,
    resize_y: int,
    second_pass_steps: int,
    upscaler: str,
    prompt: str,
    hr_prompt: str,
    negative_prompt: str,
    hr_negative_prompt: str,
    sampler: str | None,
    schedule: str | None,
) -> dict[str, Any]:
    """The hires fields in A1111's order; the optional ones only when they say something."""
    fields: dict[str, Any] = {"Denoising strength": denoising_strength}
    if resize_x == 0 and resize_y == 0:
        fields["Hires upscale"] = scale
    else:
        fields["Hires resize"] = f"{resize_x}x{resize_y}"
    if second_pass_steps:
        fields["Hires steps"] = second_pass_steps
    fields["Hires upscaler"] = upscaler
    if hr_prompt and hr_prompt != prompt:
        fields["Hires prompt"] = hr_prompt
    if hr_negative_prompt and hr_negative_prompt != negative_prompt:
        fields["Hires negative prompt"] = hr_negative_prompt
    if sampler is not None:
        fields["Hires sampler"] = sampler
    if schedule is not None:
        fields["Hires schedule type"] = schedule
    return fields

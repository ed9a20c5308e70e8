"""Live previews: latents to a small RGB image without the VAE (A1111's "Approx cheap").

Each RGB channel is a fixed linear mix of the four latent channels, one pixel per latent
cell (an eighth of the image's size), then mapped from [-1, 1] to 0-255. The mixes are
the published per-family factors A1111 uses for its cheap approximation; no model is
loaded and nothing is downloaded. It costs one tiny matrix product per preview, so it
runs on the device thread right after a step.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Rows: latent channels 1-4; columns: R, G, B.
SD_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
SDXL_FACTORS = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


_FACTORS: dict[tuple[bool, str], torch.Tensor] = {}


def _factors(sdxl: bool, device: torch.device) -> torch.Tensor:
    import torch

    key = (sdxl, str(device))
    if key not in _FACTORS:
        _FACTORS[key] = torch.tensor(SDXL_FACTORS if sdxl else SD_FACTORS, dtype=torch.float32, device=device)
    return _FACTORS[key]


def latent_rgb(latents: torch.Tensor, *, sdxl: bool = False) -> torch.Tensor:
    """``(B, 4, h, w)`` latents -> ``(B, h, w, 3)`` uint8 on the CPU."""
    import torch

    if latents.dim() != 4 or latents.shape[1] != 4:
        raise ValueError(f"previews need (B, 4, h, w) latents, got {tuple(latents.shape)}")
    rgb = latents.detach().float().permute(0, 2, 3, 1) @ _factors(sdxl, latents.device)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu()


def preview_image(latents: torch.Tensor, *, sdxl: bool = False, index: int = 0) -> Image.Image:
    """The preview of image ``index`` of the batch as a PIL image (latent-sized)."""
    from PIL import Image

    return Image.fromarray(latent_rgb(latents[index : index + 1], sdxl=sdxl)[0].numpy(), "RGB")


def preview_png(latents: torch.Tensor, *, sdxl: bool = False, index: int = 0) -> bytes:
    """PNG bytes of ``preview_image``: what a progress event carries across processes."""
    return _png(preview_image(latents, sdxl=sdxl, index=index))


def batch_preview_png(latents: torch.Tensor, *, sdxl: bool = False) -> bytes:
    """The whole batch side by side in one PNG, as a job's progress shows it."""
    from PIL import Image

    rgb = latent_rgb(latents, sdxl=sdxl)  # (B, h, w, 3)
    batch, height, width, _ = rgb.shape
    row = rgb.permute(1, 0, 2, 3).reshape(height, batch * width, 3)
    return _png(Image.fromarray(row.numpy(), "RGB"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over size: it lives seconds
    return buffer.getvalue()

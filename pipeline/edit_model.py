"""Instruct-pix2pix ("edit") checkpoints, as A1111 runs them.

What kind of model a checkpoint is follows from its UNet's input channels: 4 take the
latents alone (text to image), 9 also a mask and a masked image's latents (inpainting),
8 also an image's latents (instruct-pix2pix; A1111's yaml for them says
``cond_stage_key: edit`` and ``conditioning_key: hybrid``). The scan reads the count from
the weights' first convolution, the ``.yaml`` or a diffusers folder's ``unet/config.json``,
without loading anything (:class:`pipeline.checkpoints.CheckpointInfo.unet_inputs`).

An edit model only runs img2img: its image channels are the VAE encoding of the resized
init image, the posterior's mode (its mean) *without* the latent scale factor, added
after the latents at every UNet call (:func:`image_conditioning`). A1111 has no
text-to-image for it (its UNet would get the inpainting channels and fail), so the bot and
the engine refuse one with :class:`~pipeline.errors.EditModelNeedsImage`.

Guidance (``pipeline.denoiser``): with an "Image CFG scale" other than 1 every call
evaluates three rows per image, the prompt with the image, the negative prompt with the
image and the negative prompt with zeros for the image, combined as
``blank + cfg·(cond − uncond) + image_cfg·(uncond − blank)``; at exactly 1 the usual two
rows run, both with the image. Like A1111, the three-way guidance takes no ``AND``
(:class:`~pipeline.errors.EditModelAndPrompt`) and ignores "Negative Guidance minimum
sigma"; "Skip Early CFG" (which A1111 cannot combine with it) skips both negative rows.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TXT2IMG_INPUTS = 4
EDIT_INPUTS = 8
INPAINTING_INPUTS = 9
UNET_INPUTS = (TXT2IMG_INPUTS, EDIT_INPUTS, INPAINTING_INPUTS)
UNET_INPUTS_TEXT = "4 (text to image), 8 (instruct-pix2pix) and 9 (inpainting)"
# A1111's UI default of "Image CFG scale".
DEFAULT_IMAGE_CFG_SCALE = 1.5
# The UNet's first convolution in an LDM state dict: (out, in_channels, 3, 3).
_FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def unet_inputs(shapes: Mapping[str, Any]) -> int | None:
    """The UNet's input channels from a state dict's shapes (tuples or tensors); None
    when the dict has no LDM UNet."""
    shape = shapes.get(_FIRST_CONV)
    shape = getattr(shape, "shape", shape)
    if shape is None or len(shape) != 4:
        return None
    return int(shape[1])


def folder_unet_inputs(folder: Path) -> int | None:
    """A diffusers folder's UNet input channels, from ``unet/config.json``."""
    try:
        config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("in_channels") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_edit_unet(unet: Any) -> bool:
    return int(unet.config.in_channels) == EDIT_INPUTS


def three_way_scale(image_cfg_scale: float | None) -> float | None:
    """The Image CFG scale when it asks for the three-way guidance (not 1), else None."""
    if image_cfg_scale is None or image_cfg_scale == 1.0:
        return None
    return float(image_cfg_scale)


def image_conditioning(encoded_mode: torch.Tensor, batch: int) -> torch.Tensor:
    """The image channels for ``batch`` images: the init image's unscaled latents
    (``(1, 4, h, w)``, the posterior's mode) repeated per image, as float32."""
    return encoded_mode.float().expand(batch, -1, -1, -1)


def blank_rows(x: torch.Tensor, image_cond: torch.Tensor) -> torch.Tensor:
    """Latents ``x`` with zeros in place of the image channels (the third row of guidance)."""
    import torch

    zeros = x.new_zeros((x.shape[0], image_cond.shape[1], *x.shape[2:]))
    return torch.cat([x, zeros], dim=1)


@contextmanager
def grey_image(width: int, height: int) -> Iterator[str]:
    """A mid-grey PNG's path for the block, to edit when an engine warms an edit model up."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="atelier-warm-up-") as folder:
        path = Path(folder) / "grey.png"
        Image.new("RGB", (width, height), (128, 128, 128)).save(path)
        yield str(path)

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from pipeline import previews


def test_each_rgb_channel_is_the_published_mix_of_the_latent_channels():
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, 0] = 1.0  # only the first latent channel: RGB = its row of factors
    rgb = previews.latent_rgb(latents)
    expected = [round((f + 1.0) * 127.5 - 0.5) for f in previews.SD_FACTORS[0]]
    assert rgb.shape == (1, 2, 3, 3) and rgb.dtype == torch.uint8
    assert [abs(int(v) - e) <= 1 for v, e in zip(rgb[0, 0, 0].tolist(), expected, strict=True)] == [True] * 3


def test_zero_latents_are_mid_grey_and_extremes_clamp():
    assert previews.latent_rgb(torch.zeros(1, 4, 1, 1))[0, 0, 0].tolist() == [127, 127, 127]
    high = previews.latent_rgb(torch.full((1, 4, 1, 1), 100.0))[0, 0, 0]
    low = previews.latent_rgb(torch.full((1, 4, 1, 1), -100.0))[0, 0, 0]
    assert all(0 <= int(v) <= 255 for v in [*high, *low])


def test_sdxl_uses_its_own_factors():
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(previews.latent_rgb(latents), previews.latent_rgb(latents, sdxl=True))


def test_preview_png_is_latent_sized_and_picks_the_image_of_the_batch():
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    first = Image.open(io.BytesIO(previews.preview_png(latents)))
    second = Image.open(io.BytesIO(previews.preview_png(latents, index=1)))
    assert first.size == (6, 8) and first.mode == "RGB"
    assert first.tobytes() != second.tobytes()
    assert second.tobytes() == previews.preview_image(latents, index=1).tobytes()


def test_wrong_latent_shapes_are_refused():
    with pytest.raises(ValueError, match="4, h, w"):
        previews.latent_rgb(torch.zeros(1, 3, 2, 2))

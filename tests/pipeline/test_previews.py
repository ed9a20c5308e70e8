from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from pipeline import previews
from pipeline.request import GenerationRequest


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


# -- live previews from the engine -------------------------------------------------------------


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat", seed=1, width=64, height=48, num_inference_steps=4, sampler_name="Euler a"
    )
    return base.replace(**changes)


@pytest.fixture
def previewing(engine):
    engine.preview_every = 1
    yield engine
    engine.preview_every = 0


def _run(engine, request):
    seen: list[tuple[str, int, object]] = []
    result = engine.generate(
        request,
        on_progress=lambda step, total: seen.append(("progress", step, total)),
        on_preview=lambda step, png: seen.append(("preview", step, png)),
    )
    return result, seen


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M"])
def test_previews_come_before_the_progress_of_their_step(previewing, sampler):
    result, seen = _run(previewing, _request(sampler_name=sampler, num_images_per_prompt=2))
    assert [step for kind, step, _ in seen if kind == "progress"] == [1, 2, 3, 4]
    previewed = [i for i, (kind, _, _) in enumerate(seen) if kind == "preview"]
    assert len(previewed) >= 2
    for i in previewed:  # the step's own progress report follows its preview
        assert seen[i + 1][:2] == ("progress", seen[i][1]) and seen[i][1] < 4
    pngs = [Image.open(io.BytesIO(seen[i][2])) for i in previewed]
    assert {png.size for png in pngs} == {(2 * 64 // 8, 48 // 8)}  # two latent-sized images side by side
    assert len({png.tobytes() for png in pngs}) == len(pngs)  # the picture develops
    assert len(result.images) == 2


def test_progress_is_contiguous_when_a_pass_has_fewer_sampler_steps(engine):
    """DDIM at 4 steps runs 3 sampler steps; img2img runs its denoising share of them."""
    for request in (_request(sampler_name="DDIM"), _request(sampler_name="DDIM", num_inference_steps=5)):
        _, seen = _run(engine, request)
        total = request.num_inference_steps
        assert [(step, t) for _, step, t in seen] == [(s, total) for s in range(1, total + 1)]


def test_previews_every_n_steps_and_through_the_hires_pass(previewing):
    hires = _request(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)
    previewing.preview_every = 2
    _, seen = _run(previewing, hires)
    assert [step for kind, step, _ in seen if kind == "preview"] == [2, 4]  # 4 + 2 steps; none on the last
    previewing.preview_every = 1
    _, seen = _run(previewing, hires)
    last = Image.open(io.BytesIO([png for kind, _, png in seen if kind == "preview"][-1]))
    assert last.size == (96 // 8, 72 // 8)  # step 5 comes from the hires pass's latents


def test_previews_change_nothing_in_the_image(engine, previewing):
    previewing.preview_every = 0
    plain = engine.generate(_request())
    previewing.preview_every = 1
    previewed, seen = _run(previewing, _request())
    assert seen and plain.images[0].image.tobytes() == previewed.images[0].image.tobytes()


def test_no_previews_unless_asked(engine):
    assert engine.preview_every == 0
    _, seen = _run(engine, _request())
    assert [kind for kind, _, _ in seen] == ["progress"] * 4


def test_the_batch_preview_is_the_images_previews_side_by_side():
    latents = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    row = Image.open(io.BytesIO(previews.batch_preview_png(latents, sdxl=True)))
    assert row.size == (21, 5)
    for index in range(3):
        tile = row.crop((7 * index, 0, 7 * index + 7, 5))
        assert tile.tobytes() == previews.preview_image(latents, sdxl=True, index=index).tobytes()

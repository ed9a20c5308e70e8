from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import engine as engine_module
from pipeline import hires, infotext, latents, samplers
from pipeline.denoiser import sd_alphas_cumprod
from pipeline.latents import StepPlan, hires_plan, img2img_plan
from pipeline.request import GenerationRequest
from pipeline.rng import ImageRNG

SIZE = 32


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat",
        seed=3,
        width=SIZE,
        height=SIZE,
        num_inference_steps=3,
        sampler_name="Euler",
        rng="CPU",
    )
    return base.replace(**changes)


def _pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image).astype(np.int16)


@pytest.fixture(scope="module")
def init_path(tmp_path_factory):
    """A 48x40 noise picture: not the request size, so it must be resized."""
    generator = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def recorded(monkeypatch):
    """Every sampling loop the engine runs, with its start latent, schedule and result."""
    runs = []
    lookup = engine_module.sampler_loop

    def recording(name):
        loop = lookup(name)
        if loop is None:
            return None

        def run(x, schedule, ctx):
            start = x.clone()
            out = loop(x, schedule, ctx)
            runs.append(SimpleNamespace(name=name, x=start, schedule=schedule, out=out.clone(), ctx=ctx))
            return out

        return run

    monkeypatch.setattr(engine_module, "sampler_loop", recording)
    return runs


def _init_latent(engine, path: str, width: int = SIZE, height: int = SIZE) -> torch.Tensor:
    vae = engine._models["tiny"].pipe.vae
    image = latents.load_init_image(path, width, height)
    with torch.inference_mode():
        return latents.encode(vae, latents.images_to_tensor([image]))


def _first_noise(request: GenerationRequest, shape: tuple[int, ...]) -> torch.Tensor:
    return ImageRNG(shape, request.image_seeds(), source="CPU").next()


# -- step arithmetic (§9.6) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "denoise", "expected"),
    [
        (20, 0.75, StepPlan(20, 16)),  # the spec's example: 16 steps from σ[4]
        (20, 1.0, StepPlan(20, 20)),  # min(1, 0.999): t_enc 19, the whole schedule
        (20, 0.0, StepPlan(20, 1)),
        (3, 0.5, StepPlan(3, 2)),
        (30, 0.35, StepPlan(30, 11)),
    ],
)
def test_img2img_plan(steps, denoise, expected):
    plan = img2img_plan(steps, denoise)
    assert plan == expected
    assert plan.start_index == steps - int(min(denoise, 0.999) * steps) - 1


@pytest.mark.parametrize(
    ("steps", "denoise", "schedule_steps"),
    [(10, 0.7, 14), (10, 1.0, 10), (5, 0.3, 16), (20, 0.5, 40), (3, 0.7, 4)],
)
def test_hires_plan_does_exactly_the_requested_steps(steps, denoise, schedule_steps):
    plan = hires_plan(steps, denoise)
    assert (plan.schedule_steps, plan.run_steps) == (schedule_steps, steps)
    assert plan.start_index == schedule_steps - steps


@pytest.mark.parametrize("denoise", [-0.1, 1.5])
def test_strength_out_of_range_is_refused(denoise):
    with pytest.raises(ValueError, match="0-1"):
        img2img_plan(20, denoise)


def test_hires_needs_some_denoising():
    with pytest.raises(ValueError, match="above 0"):
        hires_plan(10, 0.0)


# -- img2img --------------------------------------------------------------------------------------


def test_img2img_runs_16_of_20_steps_from_sigma_4(engine, recorded, init_path):
    request = _request(init_image=init_path, denoising_strength=0.75, num_inference_steps=20)
    progress = []
    result = engine.generate(request, on_progress=lambda s, t: progress.append((s, t)))
    (run,) = recorded
    full = samplers.sigma_schedule("Euler", "Automatic", 20).sigmas
    assert torch.equal(run.schedule.cpu(), full[4:])
    assert len(run.schedule) - 1 == 16
    noise = _first_noise(request, (4, SIZE // 8, SIZE // 8))
    expected = _init_latent(engine, init_path) + noise * full[4]
    assert torch.allclose(run.x, expected, atol=1e-6)
    assert progress[-1] == (20, 20) and all(t == 20 for _, t in progress)
    assert result.images[0].image.size == (SIZE, SIZE)


def test_img2img_timestep_sampler_starts_at_the_matching_alpha(engine, recorded, init_path):
    request = _request(
        init_image=init_path, denoising_strength=0.75, num_inference_steps=20, sampler_name="DDIM"
    )
    engine.generate(request)
    (run,) = recorded
    full = samplers.timesteps("DDIM", 20)
    assert run.schedule == full[:16]
    alpha = float(sd_alphas_cumprod()[full[15]])
    noise = _first_noise(request, (4, SIZE // 8, SIZE // 8))
    expected = _init_latent(engine, init_path) * alpha**0.5 + noise * (1 - alpha) ** 0.5
    assert torch.allclose(run.x, expected, atol=1e-6)
    assert run.ctx.extra["is_img2img"] is True


def test_img2img_is_deterministic_and_follows_strength(engine, init_path):
    request = _request(init_image=init_path, denoising_strength=0.5)
    first = engine.generate(request)
    assert np.array_equal(_pixels(first), _pixels(engine.generate(request)))
    stronger = engine.generate(request.replace(denoising_strength=0.9))
    assert not np.array_equal(_pixels(first), _pixels(stronger))


def test_img2img_batch_images_equal_solo_runs(engine, init_path):
    request = _request(init_image=init_path, denoising_strength=0.6, sampler_name="Euler a")
    batch = engine.generate(request.replace(num_images_per_prompt=2))
    solo = engine.generate(request.replace(seed=request.seed + 1))
    assert np.abs(_pixels(batch, 1) - _pixels(solo)).max() <= 1


def test_img2img_infotext(engine, init_path):
    result = engine.generate(_request(init_image=init_path))  # strength: A1111's default 0.75
    text = result.images[0].infotext
    assert "Size: 32x32, Model: tiny, Denoising strength: 0.75, RNG: CPU" in text
    parsed = infotext.parse(text)
    assert parsed["Denoising strength"] == "0.75"
    assert "Hires upscale" not in parsed


def test_img2img_cannot_be_combined_with_hires(engine, init_path):
    with pytest.raises(ValueError, match="hires"):
        engine.generate(_request(init_image=init_path, enable_hr=True))


# -- hires fix ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "scale", "resize", "target"),
    [
        ((64, 48), 1.5, (0, 0), hires.HiresTarget(96, 72, 96, 72)),
        ((64, 48), 1.3, (0, 0), hires.HiresTarget(83, 62, 83, 62)),
        ((64, 48), 2.0, (96, 0), hires.HiresTarget(96, 72, 96, 72)),
        ((64, 48), 2.0, (0, 72), hires.HiresTarget(96, 72, 96, 72)),
        ((64, 48), 2.0, (96, 96), hires.HiresTarget(96, 96, 128, 96)),  # wider: cut x
        ((64, 64), 2.0, (128, 64), hires.HiresTarget(128, 64, 128, 128)),  # taller: cut y
    ],
)
def test_hires_target(size, scale, resize, target):
    assert hires.hires_target(*size, scale, *resize) == target


def test_crop_cuts_half_at_the_start_and_the_rest_at_the_end():
    target = hires.HiresTarget(width=96, height=64, upscaled_width=120, upscaled_height=64)
    assert target.latent_crop == (3, 0)
    x = torch.arange(15.0).view(1, 1, 1, 15).expand(1, 4, 8, 15)
    cropped = hires.crop_latents(x, target)
    assert cropped.shape == (1, 4, 8, 12)
    assert cropped[0, 0, 0].tolist() == list(range(1, 13))


def test_hires_pass_continues_from_the_upscaled_first_pass(engine, recorded):
    request = _request(enable_hr=True, hr_scale=2.0)
    progress = []
    result = engine.generate(request, on_progress=lambda s, t: progress.append((s, t)))
    first, second = recorded
    assert first.x.shape == (1, 4, 4, 4) and second.x.shape == (1, 4, 8, 8)
    # 3 hires steps at 0.7: the schedule for int(3/0.7) = 4 steps, from σ[1].
    full = samplers.sigma_schedule("Euler", "Automatic", 4).sigmas
    assert torch.equal(second.schedule.cpu(), full[1:])
    upscaled = torch.nn.functional.interpolate(first.out, size=(8, 8), mode="bilinear")
    noise = _first_noise(request, (4, 8, 8))  # a fresh ImageRNG at the hires shape (§8.6)
    assert torch.allclose(second.x, upscaled + noise * full[1], atol=1e-5)
    assert progress == [(step, 6) for step in range(1, 7)]
    assert result.images[0].image.size == (64, 64)


@pytest.mark.parametrize("upscaler", hires.UPSCALERS)
def test_every_upscaler(engine, upscaler):
    request = _request(
        enable_hr=True, hr_upscaler=upscaler, hr_resize_x=48, hr_resize_y=40, hr_second_pass_steps=2
    )
    result = engine.generate(request)
    assert result.images[0].image.size == (48, 40)
    assert np.asarray(result.images[0].image).std() > 0
    assert infotext.parse(result.images[0].infotext)["Hires upscaler"] == upscaler


def test_latent_upscalers_differ(engine):
    """At 1.5x (nearest and nearest-exact agree on exact 2x upscales). Antialiasing only acts
    when shrinking, so bilinear upscales the same with or without it, up to the rounding of
    two different kernels (which differ between CPUs); bicubic's antialiasing does change it."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    target = hires.hires_target(64, 64, 1.5)
    plain = hires.upscale_latents(latents, "Latent", target)
    smoothed = hires.upscale_latents(latents, "Latent (antialiased)", target)
    torch.testing.assert_close(smoothed, plain, rtol=1e-5, atol=1e-6)
    images = {
        name: _pixels(engine.generate(_request(enable_hr=True, hr_scale=1.5, hr_upscaler=name)))
        for name in hires.LATENT_UPSCALERS
        if name != "Latent (antialiased)"
    }
    assert len({image.tobytes() for image in images.values()}) == len(images)


def test_hires_with_a_timestep_sampler(engine, recorded):
    engine.generate(_request(enable_hr=True, hr_sampler_name="DDIM", hr_second_pass_steps=2))
    first, second = recorded
    assert (first.name, second.name) == ("Euler", "DDIM")
    full = samplers.timesteps("DDIM", int(2 / 0.7))
    assert second.schedule == full[: len(full) - (int(2 / 0.7) - 2)]


def test_hires_conditioning_uses_the_hires_timeline_and_prompt(engine, monkeypatch):
    seen = []
    build = engine_module.conditioning.build_conds

    def spy(prompt, negative, steps, **kwargs):
        seen.append((prompt, negative, steps, kwargs["hires_steps"]))
        return build(prompt, negative, steps, **kwargs)

    monkeypatch.setattr(engine_module.conditioning, "build_conds", spy)
    engine.generate(
        _request(
            negative_prompt="ugly",
            enable_hr=True,
            hr_prompt="a dog",
            hr_sampler_name="Heun",
            hr_second_pass_steps=2,
        )
    )
    assert seen == [("a cat", "ugly", 3, None), ("a dog", "ugly", 3, 4)]


def test_hires_prompt_changes_the_image(engine):
    plain = _pixels(engine.generate(_request(enable_hr=True)))
    other = _pixels(engine.generate(_request(enable_hr=True, hr_prompt="a dog")))
    assert not np.array_equal(plain, other)
    assert np.array_equal(plain, _pixels(engine.generate(_request(enable_hr=True, hr_prompt="a cat"))))


def test_hires_infotext_defaults(engine):
    text = engine.generate(_request(enable_hr=True)).images[0].infotext
    assert "Size: 32x32, Model: tiny, Denoising strength: 0.7, RNG: CPU" in text
    assert text.endswith("Hires upscale: 2.0, Hires upscaler: Latent, Version: v1.10.1")
    parsed = infotext.parse(text)
    assert parsed["Denoising strength"] == "0.7"
    assert "Hires steps" not in parsed and "Hires sampler" not in text
    assert parsed["Hires sampler"] == "Use same sampler"  # the reader's default
    assert parsed["Hires prompt"] == ""  # the reader's default: same as the prompt


def test_hires_infotext_optional_fields(engine):
    request = _request(
        negative_prompt="ugly",
        enable_hr=True,
        denoising_strength=0.55,
        hr_resize_x=48,
        hr_resize_y=48,
        hr_second_pass_steps=2,
        hr_upscaler="Latent (nearest-exact)",
        hr_prompt="a dog, sharp",
        hr_negative_prompt="blurry",
        hr_sampler_name="DPM++ 2M",
        hr_scheduler="Exponential",
    )
    text = engine.generate(request).images[0].infotext
    assert (
        "Hires resize: 48x48, Hires steps: 2, Hires upscaler: Latent (nearest-exact), "
        'Hires prompt: "a dog, sharp", Hires negative prompt: blurry, Hires sampler: DPM++ 2M, '
        "Hires schedule type: Exponential, Version: v1.10.1"
    ) in text
    parsed = infotext.parse(text)
    assert parsed["Denoising strength"] == "0.55"
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("48", "48")
    assert parsed["Hires prompt"] == "a dog, sharp"
    assert parsed["Hires sampler"] == "DPM++ 2M"


def test_hires_prompt_equal_to_the_prompt_is_not_written(engine):
    text = (
        engine.generate(_request(enable_hr=True, hr_prompt="a cat", hr_negative_prompt="")).images[0].infotext
    )
    assert "Hires prompt" not in text and "Hires negative prompt" not in text


def test_hires_is_deterministic(engine):
    request = _request(enable_hr=True, sampler_name="Euler a", hr_upscaler="Lanczos", num_images_per_prompt=2)
    first = engine.generate(request)
    second = engine.generate(request)
    for index in range(2):
        assert np.array_equal(_pixels(first, index), _pixels(second, index))


def test_unknown_upscaler_is_refused(engine):
    with pytest.raises(ValueError, match="Latent"):
        engine.generate(_request(enable_hr=True, hr_upscaler="ESRGAN_4x"))

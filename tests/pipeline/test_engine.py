from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import engine as engine_module
from pipeline import infotext, samplers
from pipeline.checkpoints import CheckpointLibrary
from pipeline.engine import Engine
from pipeline.errors import GenerationCancelled, OutOfMemory, UnknownCheckpoint, UnknownSampler
from pipeline.request import GenerationRequest
from pipeline.samplers import select_sampler
from pipeline.tiny import build_tiny_pipeline

SIZE = 64
STEPS = 3

# diffusers' schedulers hand torch tensors to numpy, which numpy 2 warns about on every step.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat", seed=1, width=SIZE, height=SIZE, num_inference_steps=STEPS, sampler_name="Euler a"
    )
    return base.replace(**changes)


def _pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image).astype(np.int16)


@pytest.fixture(scope="module")
def baseline(engine):
    """The result of ``_request()``, which many tests compare against."""
    return engine.generate(_request())


# -- determinism and seeds ---------------------------------------------------------------


def test_same_request_gives_identical_pixels(engine, baseline):
    assert np.array_equal(_pixels(engine.generate(_request())), _pixels(baseline))


def test_result_fields(baseline):
    assert len(baseline.images) == 1
    image = baseline.images[0]
    assert image.image.size == (SIZE, SIZE)
    assert (image.seed, image.subseed) == (1, 0)
    assert baseline.model_name == "tiny"
    assert baseline.model_hash is None
    assert baseline.device_seconds > 0


def test_batch_image_equals_solo_run_with_its_seed(engine, baseline):
    batch = engine.generate(_request(seed=1, num_images_per_prompt=3))
    assert [image.seed for image in batch.images] == [1, 2, 3]
    assert [image.subseed for image in batch.images] == [0, 1, 2]
    solo = engine.generate(_request(seed=3))
    # Batched and single UNet calls differ by float rounding (~1e-6): at most one level.
    assert np.abs(_pixels(batch, 0) - _pixels(baseline)).max() <= 1
    assert np.abs(_pixels(batch, 2) - _pixels(solo)).max() <= 1
    assert not np.array_equal(_pixels(batch, 0), _pixels(batch, 1))


def test_different_seeds_differ(engine, baseline):
    other = engine.generate(_request(seed=2))
    assert np.abs(_pixels(other) - _pixels(baseline)).mean() > 1


def test_ensd_changes_ancestral_step_noise_only(engine, baseline):
    batch = engine.generate(_request(num_images_per_prompt=2, ensd=31337))
    assert not np.array_equal(_pixels(batch, 0), _pixels(baseline))
    # Per-step noise is per image, so a batch still equals solo runs.
    solo = engine.generate(_request(seed=2, ensd=31337))
    assert np.abs(_pixels(batch, 1) - _pixels(solo)).max() <= 1
    # A deterministic sampler draws no step noise: ENSD changes nothing.
    euler = _pixels(engine.generate(_request(sampler_name="Euler")))
    assert np.array_equal(euler, _pixels(engine.generate(_request(sampler_name="Euler", ensd=31337))))


def test_variation_seed_changes_output(engine, baseline):
    varied = engine.generate(_request(subseed=5, subseed_strength=0.5))
    assert not np.array_equal(_pixels(varied), _pixels(baseline))
    assert varied.images[0].subseed == 5


def test_rng_sources(engine, baseline):
    nv = _pixels(engine.generate(_request(rng="NV")))
    assert not np.array_equal(nv, _pixels(baseline))
    # Without CUDA, A1111 draws "GPU" noise with the CPU generator.
    assert np.array_equal(_pixels(engine.generate(_request(rng="GPU"))), _pixels(baseline))


def test_clip_skip_changes_output(engine, baseline):
    two = _pixels(engine.generate(_request(clip_skip=2)))
    assert not np.array_equal(two, _pixels(baseline))


def test_prompt_changes_output(engine, baseline):
    dog = _pixels(engine.generate(_request(prompt="a dog")))
    assert not np.array_equal(dog, _pixels(baseline))


def test_extra_network_tags_are_removed_before_encoding(engine, baseline):
    tagged = engine.generate(_request(prompt="a cat <othernet:foo:0.7>"))
    assert np.array_equal(_pixels(tagged), _pixels(baseline))
    assert infotext.parse(tagged.images[0].infotext)["Prompt"] == "a cat <othernet:foo:0.7>"


def test_long_prompt_with_short_negative_runs_separate_unet_passes(engine, tiny_library):
    """A1111's default: cond and uncond of different lengths are evaluated separately, not
    padded, so no "Pad conds" field (§7.2, §10)."""
    long_prompt = ", ".join(["a red cat"] * 20)  # 199 characters: three 75-token chunks
    calls = []
    handle = tiny_library.load("tiny").unet.register_forward_hook(
        lambda module, args, kwargs_out: calls.append(args[0].shape[0])
    )
    try:
        result = engine.generate(_request(prompt=long_prompt, negative_prompt="blurry", sampler_name="Euler"))
    finally:
        handle.remove()
    assert calls == [1, 1] * STEPS
    parsed = infotext.parse(result.images[0].infotext)
    assert parsed["Prompt"] == long_prompt
    assert "Pad conds" not in parsed


def test_plain_euler_matches_diffusers_euler(engine, tiny_library):
    """Without emphasis, chunking or clip skip, our conditioning is diffusers' own; our Euler
    loop then differs from diffusers' only by its log-σ interpolation (§9.2)."""
    from diffusers import EulerDiscreteScheduler

    from pipeline.rng import ImageRNG

    request = _request(sampler_name="Euler", prompt="a cat", negative_prompt="ugly")
    ours = engine.generate(request)
    pipe = tiny_library.load("tiny")
    scheduler = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="linspace")
    try:
        noise = ImageRNG((4, SIZE // 8, SIZE // 8), [1], source="CPU").next()
        theirs = pipe(
            "a cat",
            negative_prompt="ugly",
            num_inference_steps=STEPS,
            guidance_scale=7,
            width=SIZE,
            height=SIZE,
            latents=noise,
        ).images[0]
    finally:
        pipe.scheduler = scheduler
    assert np.abs(_pixels(ours) - np.asarray(theirs).astype(np.int16)).max() <= 1


def test_generate_leaves_global_rng_untouched(engine):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    engine.generate(_request())
    assert torch.equal(torch.rand(3), expected)


# -- samplers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    ["Euler a", "Euler", "DPM++ 2M", "DDIM", "Heun", "LMS", "DPM2", "UniPC", "PLMS", "DPM++ 2M SDE"],
)
def test_samplers_run_and_report_every_step(engine, sampler):
    steps = []
    result = engine.generate(_request(sampler_name=sampler), on_progress=lambda s, t: steps.append((s, t)))
    assert steps == [(step, STEPS) for step in range(1, STEPS + 1)]
    parsed = infotext.parse(result.images[0].infotext)
    assert parsed["Sampler"] == sampler
    assert np.asarray(result.images[0].image).std() > 0


def test_select_sampler_accepts_aliases_case_and_legacy_names():
    assert select_sampler("k_euler_a").name == "Euler a"
    assert select_sampler("euler A").name == "Euler a"
    legacy = select_sampler("DPM++ 2M Karras")
    assert (legacy.name, legacy.schedule) == ("DPM++ 2M", "Karras")
    automatic = select_sampler("DPM++ 2M", "Automatic")
    assert (automatic.schedule, automatic.effective_schedule) == ("Automatic", "Karras")


def test_the_engine_takes_sampler_names_exactly_and_resolves_nothing_leniently(engine, monkeypatch):
    """/draw resolves a sampler once (``bot.draw.resolve_sampler``) and stores the canonical
    names; the engine looks them up exactly, never through the lenient readers."""
    from pipeline import samplers

    lenient = []
    for name in ("select_sampler", "get_sampler", "resolve", "_cut_legacy_suffixes", "canonical_names"):
        original = getattr(samplers, name)
        monkeypatch.setattr(
            samplers, name, lambda *a, _o=original, _n=name, **k: lenient.append(_n) or _o(*a, **k)
        )
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1, "hr_sampler_name": "Euler"}
    request = _request(sampler_name="DPM++ 2M", scheduler="Karras", **hires)
    engine.generate_batch([request, request.replace(seed=2)])
    assert lenient == []
    with pytest.raises(UnknownSampler):
        engine.generate(_request(sampler_name="k_euler_a"))  # an alias is /draw's to read, not the engine's


def test_unknown_sampler_lists_available_names(engine):
    with pytest.raises(UnknownSampler) as info:
        engine.generate(_request(sampler_name="Euler b"))
    message = str(info.value)
    assert "Euler b" in message
    for name in ("DPM++ 2M", "Euler a", "DDIM", "UniPC", "LCM"):
        assert name in info.value.params["available"]
    assert "DPM++ 2M, DPM++ SDE" in message


def test_unknown_checkpoint_lists_available_names(engine):
    with pytest.raises(UnknownCheckpoint) as info:
        engine.generate(_request(checkpoint="sd15"))
    assert info.value.params["available"] == "tiny"
    assert "tiny" in str(info.value)


# -- progress and cancellation -----------------------------------------------------------


@pytest.mark.parametrize("sampler", ["Heun", "PLMS", "DPM2 a"])
def test_progress_counts_user_steps_for_uneven_callbacks(engine, sampler):
    # Heun/DPM2 call back 2n-1 times and PNDM n+1 times; the user asked for n steps.
    steps = []
    engine.generate(
        _request(sampler_name=sampler, num_inference_steps=4), on_progress=lambda s, t: steps.append((s, t))
    )
    assert [t for _, t in steps] == [4] * len(steps)
    numbers = [s for s, _ in steps]
    assert numbers == sorted(set(numbers))
    assert 1 <= numbers[0] and numbers[-1] == 4


def test_cancel_stops_at_the_next_step(engine, tiny_library):
    steps = []
    unet = tiny_library.load("tiny").unet
    calls = []
    handle = unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(GenerationCancelled):
            engine.generate(
                _request(),
                on_progress=lambda s, t: steps.append(s),
                should_stop=lambda: bool(steps) and steps[-1] >= 2,
            )
    finally:
        handle.remove()
    assert steps == [1, 2]
    assert len(calls) == 2  # no UNet call after the step that saw the stop request


def test_cancel_before_start_runs_nothing(engine):
    steps = []
    with pytest.raises(GenerationCancelled):
        engine.generate(_request(), on_progress=lambda s, t: steps.append(s), should_stop=lambda: True)
    assert steps == []


def test_engine_works_after_a_cancel(engine, baseline):
    with pytest.raises(GenerationCancelled):
        engine.generate(_request(), should_stop=lambda: True)
    assert np.array_equal(_pixels(engine.generate(_request())), _pixels(baseline))


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("Unable to find a valid cuDNN algorithm to run convolution"),
        torch.cuda.OutOfMemoryError("CUDA out of memory."),
    ],
)
def test_out_of_memory_is_translated(tiny_library, monkeypatch, error):
    engine = Engine(tiny_library)

    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(type(tiny_library.load("tiny").unet), "forward", explode)
    with pytest.raises(OutOfMemory) as info:
        engine.generate(_request())
    assert info.value.__cause__ is None
    assert info.value.params["detail"]


def test_other_runtime_errors_pass_through(tiny_library, monkeypatch):
    engine = Engine(tiny_library)

    def explode(*args, **kwargs):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(type(tiny_library.load("tiny").unet), "forward", explode)
    with pytest.raises(RuntimeError, match="shapes"):
        engine.generate(_request())


# -- infotext ----------------------------------------------------------------------------


def test_infotext_parses_back_for_every_image(engine):
    request = _request(
        prompt="a (cat:1.2), <othernet:x:1>",
        negative_prompt="lowres, blurry",
        seed=40,
        guidance_scale=6.5,
        num_images_per_prompt=2,
        sampler_name="DPM++ 2M",
        width=128,
        height=64,
    )
    result = engine.generate(request)
    for offset, image in enumerate(result.images):
        parsed = infotext.parse(image.infotext)
        assert parsed["Prompt"] == request.prompt
        assert parsed["Negative prompt"] == request.negative_prompt
        assert parsed["Seed"] == str(40 + offset)
        assert parsed["Steps"] == str(STEPS)
        assert (parsed["Size-1"], parsed["Size-2"]) == ("128", "64")
        assert parsed["Sampler"] == "DPM++ 2M"
        assert parsed["Schedule type"] == "Karras"
        assert parsed["CFG scale"] == "6.5"
        assert parsed["Model"] == "tiny"
        assert "Model hash" not in parsed
        assert parsed["RNG"] == "CPU"
        assert parsed["Version"] == "v1.10.1"


def test_infotext_keeps_number_types_and_optional_fields(engine):
    request = _request(
        guidance_scale=7,
        clip_skip=2,
        ensd=31337,
        subseed=9,
        subseed_strength=0.25,
        seed_resize_from_w=128,
        seed_resize_from_h=96,
        extra={"Hires upscale": 2},
    )
    text = engine.generate(request).images[0].infotext
    assert "CFG scale: 7," in text
    assert "Schedule type: Automatic" in text
    assert "Variation seed: 9, Variation seed strength: 0.25" in text
    assert "Seed resize from: 128x96" in text
    assert "Clip skip: 2, ENSD: 31337" in text
    assert text.endswith("Hires upscale: 2, Version: v1.10.1")


def test_infotext_eta_fields(engine):
    ddim = engine.generate(_request(sampler_name="DDIM", eta=0.5)).images[0].infotext
    assert "Eta DDIM: 0.5" in ddim
    ancestral = engine.generate(_request(eta=1.0)).images[0].infotext
    assert "Eta" not in ancestral


# -- diffusers folders -------------------------------------------------------------------


def test_saved_diffusers_folder_generates_the_same_pixels_as_tiny(tmp_path, baseline):
    build_tiny_pipeline().save_pretrained(tmp_path / "Stable-diffusion" / "foo")
    folder_engine = Engine(CheckpointLibrary(tmp_path))
    result = folder_engine.generate(_request(checkpoint="foo"))
    assert np.array_equal(_pixels(result), _pixels(baseline))
    assert result.model_name == "foo"
    assert infotext.parse(result.images[0].infotext)["Model"] == "foo"


# -- our sampling loops -------------------------------------------------------------------


ROUND_TRIP_SIZE = 32
SCHEDULES = [info.label for info in samplers.list_schedulers()]
ENSD_SAMPLERS = {info.name for info in samplers.list_samplers() if info.uses_ensd}


def _round_trip_request(sampler: str, schedule: str, case: int) -> GenerationRequest:
    """Varied settings; ENSD only where the infotext shows it (Restart/LCM use it silently, §8.5)."""
    varied = case % 3 == 0
    return GenerationRequest(
        prompt="a [red:blue:0.5] (cat:1.2)",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=6.5 if case % 2 else 7,
        width=ROUND_TRIP_SIZE,
        height=ROUND_TRIP_SIZE if case % 4 else ROUND_TRIP_SIZE + 16,
        seed=1000 + case,
        subseed=77 + case if varied else 0,
        subseed_strength=0.3 if varied else 0.0,
        sampler_name=sampler,
        scheduler=schedule,
        clip_skip=1 + case % 2,
        rng=("CPU", "NV", "GPU")[case % 3],
        ensd=31337 if sampler in ENSD_SAMPLERS else 0,
    )


def _request_from_infotext(parsed: dict) -> GenerationRequest:
    cfg = parsed["CFG scale"]
    return GenerationRequest(
        prompt=parsed["Prompt"],
        negative_prompt=parsed["Negative prompt"],
        num_inference_steps=int(parsed["Steps"]),
        guidance_scale=float(cfg) if "." in cfg else int(cfg),
        width=int(parsed["Size-1"]),
        height=int(parsed["Size-2"]),
        seed=int(parsed["Seed"]),
        subseed=int(parsed.get("Variation seed", 0)),
        subseed_strength=float(parsed.get("Variation seed strength", 0.0)),
        sampler_name=parsed["Sampler"],
        scheduler=parsed["Schedule type"],
        clip_skip=int(parsed["Clip skip"]),
        rng=parsed["RNG"],
        ensd=int(parsed.get("ENSD", 0)),
        checkpoint=parsed["Model"],
    )


@pytest.fixture
def finite_latents(monkeypatch):
    """Asserts that every latent the engine decodes is finite."""
    decode = engine_module.latents.decode
    seen = []

    def checked(vae, x):
        assert torch.isfinite(x).all()
        seen.append(x.shape)
        return decode(vae, x)

    monkeypatch.setattr(engine_module.latents, "decode", checked)
    return seen


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", samplers.sampler_names())
def test_infotext_round_trip_reproduces_pixels(engine, finite_latents, sampler, schedule):
    """Every sampler × schedule type: generate, write the infotext, read it back, rebuild the
    request from it and get the same pixels (which also proves runs are repeatable)."""
    case = samplers.sampler_names().index(sampler) * len(SCHEDULES) + SCHEDULES.index(schedule)
    request = _round_trip_request(sampler, schedule, case)
    first = engine.generate(request)
    parsed = infotext.parse(first.images[0].infotext)
    rebuilt = _request_from_infotext(parsed)
    assert parsed["Sampler"] == sampler
    second = engine.generate(rebuilt)
    assert np.array_equal(_pixels(first), _pixels(second))
    assert first.images[0].infotext == second.images[0].infotext
    assert len(finite_latents) == 2


def test_second_order_samplers_schedule_prompts_over_twice_the_steps(engine, monkeypatch):
    seen = []
    build = engine_module.conditioning.build_conds

    def spy(prompt, negative, steps, **kwargs):
        seen.append(steps)
        return build(prompt, negative, steps, **kwargs)

    monkeypatch.setattr(engine_module.conditioning, "build_conds", spy)
    engine.generate(_request(sampler_name="Heun", num_inference_steps=4))
    engine.generate(_request(sampler_name="Euler", num_inference_steps=4))
    assert seen == [8, 4]


def test_prompt_editing_and_composition_change_the_image(engine, baseline):
    cat = _pixels(baseline)
    # "dog" for calls 0-1 (where the image is decided), "cat" only at the last, tiny σ.
    edited = _pixels(engine.generate(_request(prompt="a [dog:cat:1]")))
    composed = _pixels(engine.generate(_request(prompt="a cat AND a dog:0.5")))
    assert not np.array_equal(edited, cat)
    assert not np.array_equal(composed, cat)
    # An editing step past the end never switches: the plain prompt's image.
    never = _pixels(engine.generate(_request(prompt="a [cat:dog:10]")))
    assert np.array_equal(never, cat)


def test_ddim_eta_draws_step_noise(engine):
    plain = _pixels(engine.generate(_request(sampler_name="DDIM")))
    with_eta = _pixels(engine.generate(_request(sampler_name="DDIM", eta=0.5)))
    assert not np.array_equal(plain, with_eta)


def test_cancel_is_checked_before_every_unet_call(engine, tiny_library):
    """DPM adaptive makes many UNet calls between its step callbacks; a stop still lands."""
    calls = []
    handle = tiny_library.load("tiny").unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(GenerationCancelled):
            engine.generate(_request(sampler_name="DPM adaptive"), should_stop=lambda: len(calls) >= 2)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_batch_equals_solo_with_composition_and_editing(engine):
    request = _request(
        prompt="a [cat:dog:1] AND red:0.7", negative_prompt="[ugly|blurry]", sampler_name="Heun"
    )
    batch = engine.generate(request.replace(num_images_per_prompt=2))
    solo = engine.generate(request.replace(seed=2))
    assert np.abs(_pixels(batch, 1) - _pixels(solo)).max() <= 1

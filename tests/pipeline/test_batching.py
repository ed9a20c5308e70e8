"""Micro-batching in the engine: requests from different users as one UNet batch, each
image its solo run's (up to the float rounding of a larger UNet batch: one level)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.batching import batch_key
from tests.pipeline.test_engine import _pixels, _request

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def _assert_each_equals_its_solo(engine, requests, previews=None) -> None:
    batched = engine.generate_batch(requests, on_preview=previews)
    assert len(batched) == len(requests)
    for request, result in zip(requests, batched, strict=True):
        solo = engine.generate(request)
        assert [image.seed for image in result.images] == [image.seed for image in solo.images]
        assert [image.infotext for image in result.images] == [image.infotext for image in solo.images]
        for index in range(len(solo.images)):
            assert np.abs(_pixels(result, index) - _pixels(solo, index)).max() <= 1


def test_requests_of_different_users_share_a_batch_and_keep_their_own_images(engine) -> None:
    requests = [
        _request(prompt="a cat", seed=11, guidance_scale=7),
        _request(
            prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry", seed=22, guidance_scale=4.5
        ),
        _request(
            prompt="a [red:blue:1] fox AND snow:0.6", seed=33, num_images_per_prompt=2, guidance_scale=9
        ),
        _request(prompt="a cat", seed=44, subseed=5, subseed_strength=0.4),
    ]
    assert len({batch_key(request) for request in requests}) == 1
    shown: list[tuple[int, list[bytes]]] = []
    engine.preview_every, before = 1, engine.preview_every
    try:
        _assert_each_equals_its_solo(engine, requests, previews=lambda step, pngs: shown.append((step, pngs)))
    finally:
        engine.preview_every = before
    # one preview per request at each previewed step
    assert shown and all(len(pngs) == len(requests) for _, pngs in shown)
    assert len({png for _, pngs in shown[:1] for png in pngs}) == len(requests)


def test_prompts_of_different_lengths_are_batched_alike(engine) -> None:
    long_prompt = ", ".join(f"word{i}" for i in range(90))  # two 75-token chunks
    requests = [
        _request(prompt=long_prompt, seed=5, sampler_name="DPM++ 2M", scheduler="Karras"),
        _request(
            prompt="short", negative_prompt=long_prompt, seed=6, sampler_name="DPM++ 2M", scheduler="Karras"
        ),
        # Automatic is DPM++ 2M's Karras: the same schedule runs
        _request(prompt="short", seed=7, sampler_name="DPM++ 2M", scheduler="Automatic"),
    ]
    assert len({batch_key(request) for request in requests}) == 1
    _assert_each_equals_its_solo(engine, requests)


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M SDE", "UniPC"])
def test_timestep_and_brownian_samplers_batch_per_image(engine, sampler) -> None:
    requests = [_request(sampler_name=sampler, seed=s, prompt=p) for s, p in ((3, "a cat"), (9, "a dog"))]
    _assert_each_equals_its_solo(engine, requests)


def test_the_hires_fix_batches_with_each_requests_own_second_pass_prompt(engine) -> None:
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6, "hr_second_pass_steps": 2}
    requests = [
        _request(prompt="a cat", seed=1, hr_prompt="a cat, detailed", **hires),
        _request(prompt="a dog", seed=2, **hires),
    ]
    _assert_each_equals_its_solo(engine, requests)


def test_what_shapes_the_sampling_keeps_requests_apart() -> None:
    base = _request()
    assert batch_key(base) == batch_key(base.replace(prompt="a dog", seed=9, guidance_scale=3, styles=("x",)))
    for change in (
        {"width": 128},
        {"num_inference_steps": 4},
        {"sampler_name": "Euler"},
        {"scheduler": "Karras"},
        {"clip_skip": 2},
        {"checkpoint": "other"},
        {"vae": "other.safetensors"},
        {"rng": "GPU"},
        {"ensd": 31337},
        {"s_noise": 0.9},
        {"enable_hr": True},
        {"prompt": "a cat <lora:style:0.5>"},
    ):
        assert batch_key(base.replace(**change)) != batch_key(base), change
    lora = base.replace(prompt="a cat <lora:style:0.5>")
    assert batch_key(lora) == batch_key(lora.replace(prompt="a dog <lora:style:0.5>"))
    assert batch_key(lora) != batch_key(lora.replace(prompt="a dog <lora:style:0.8>"))
    # alone: img2img (its own init image), DPM adaptive (steps follow the whole batch), a bad name
    assert batch_key(base.replace(init_image="x.png", denoising_strength=0.5)) is None
    assert batch_key(base.replace(sampler_name="DPM adaptive")) is None
    assert batch_key(base.replace(sampler_name="no such sampler")) is None
    # the engine takes canonical names only (/draw stores them): an alias runs alone, refused
    assert batch_key(base.replace(sampler_name="k_dpmpp_2m")) is None
    assert batch_key(base.replace(scheduler="karras")) is None


def test_requests_that_cannot_share_a_batch_are_refused(engine) -> None:
    with pytest.raises(ValueError, match="cannot share a batch"):
        engine.generate_batch([_request(), _request(num_inference_steps=2)])
    with pytest.raises(ValueError, match="cannot join a batch"):
        engine.generate_batch([_request(sampler_name="DPM adaptive")] * 2)
    assert engine.generate_batch([]) == []

"""What the engine passes each loop (PARITY-API.md "Sampler loops", rule 6) and A1111's
sampler settings in the infotext: written under A1111's names, read back by a paste, and
the pasted infotext reproducing the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bot.draw import SAMPLER_SETTING_OPTIONS
from bot.reruns import options_from_infotext
from pipeline import infotext, kdiffusion, samplers
from pipeline.request import GenerationRequest
from pipeline.sampler_args import loop_arguments, sigma_fields
from pipeline.sampling import SamplingContext

SIZE = 64
MODEL_RANGE = (0.029167532920837402, 14.614642143249512)

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat", seed=5, width=SIZE, height=SIZE, num_inference_steps=6, sampler_name="Euler"
    )
    return base.replace(**changes)


SETTINGS = {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 5.0, "s_noise": 1.01}


def test_churn_samplers_get_all_four_and_s_tmax_zero_means_infinity() -> None:
    sigmas = samplers.sigma_schedule("Euler", "Automatic", 6).sigmas
    for name in ("Euler", "Heun", "DPM2"):
        assert loop_arguments(name, _request(**SETTINGS), sigmas, img2img=False) == SETTINGS
    default = loop_arguments("Euler", _request(), sigmas, img2img=False)
    assert default == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


@pytest.mark.parametrize(
    "name", ["DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"]
)
def test_s_noise_samplers_get_only_s_noise(name: str) -> None:
    sigmas = samplers.sigma_schedule(name, "Automatic", 6).sigmas
    assert loop_arguments(name, _request(**SETTINGS), sigmas, img2img=False) == {"s_noise": 1.01}


@pytest.mark.parametrize("name", ["Euler a", "LMS", "DPM++ 2M", "Restart", "LCM"])
def test_other_k_diffusion_samplers_get_nothing(name: str) -> None:
    sigmas = samplers.sigma_schedule(name, "Automatic", 6).sigmas
    assert loop_arguments(name, _request(**SETTINGS), sigmas, img2img=False) == {}


def test_dpm_fast_and_adaptive_get_the_model_range_in_txt2img() -> None:
    sigmas = samplers.sigma_schedule("DPM fast", "Automatic", 7).sigmas
    # the table's float32 ends can differ in the last bit between CPUs' vector kernels
    ends = {"sigma_min": pytest.approx(MODEL_RANGE[0], rel=1e-6), "sigma_max": pytest.approx(MODEL_RANGE[1])}
    fast = loop_arguments("DPM fast", _request(), sigmas, img2img=False)
    assert fast == {"s_noise": 1.0, "n": 7, **ends}
    adaptive = loop_arguments("DPM adaptive", _request(), sigmas, img2img=False)
    assert adaptive == ends
    assert samplers.model_sigma_range("DPM fast") == pytest.approx(MODEL_RANGE, rel=1e-6)


def test_dpm_fast_in_img2img_gets_the_shortened_schedule_ends() -> None:
    sigmas = samplers.sigma_schedule("DPM fast", "Karras", 10).sigmas[4:]
    args = loop_arguments("DPM fast", _request(), sigmas, img2img=True)
    assert args["n"] == len(sigmas) - 1 == 6
    assert (args["sigma_min"], args["sigma_max"]) == (float(sigmas[-2]), float(sigmas[0]))


def test_dpm_fast_with_one_step_runs_on_the_model_range() -> None:
    """One step's schedule has no σ range of its own; the model's lets DPM fast run."""
    sigmas = samplers.sigma_schedule("DPM fast", "Automatic", 1).sigmas
    calls: list[float] = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma[0]))
        return x * 0.5

    ctx = SamplingContext(
        model=model,
        noise=lambda: torch.zeros(1, 4, 2, 2),
        extra=loop_arguments("DPM fast", _request(), sigmas, img2img=False),
    )
    kdiffusion.SAMPLERS["DPM fast"](torch.ones(1, 4, 2, 2), sigmas, ctx)
    assert calls == pytest.approx([MODEL_RANGE[1]])


def test_timestep_samplers_get_is_img2img_and_unipc_its_settings() -> None:
    assert loop_arguments("DDIM", _request(), None, img2img=True) == {"is_img2img": True}
    unipc = loop_arguments("UniPC", _request(uni_pc_order=2, uni_pc_variant="bh2"), None, img2img=False)
    assert unipc == {
        "is_img2img": False,
        "uni_pc_variant": "bh2",
        "uni_pc_order": 2,
        "uni_pc_skip_type": "time_uniform",
        "uni_pc_lower_order_final": True,
    }


def test_sigma_fields_name_what_differs_from_the_defaults() -> None:
    assert sigma_fields("Euler", _request()) == {}
    assert sigma_fields("Euler", _request(**SETTINGS)) == {
        "Sigma churn": 0.5,
        "Sigma tmin": 0.1,
        "Sigma tmax": 5.0,
        "Sigma noise": 1.01,
    }
    assert sigma_fields("DPM2 a", _request(**SETTINGS)) == {"Sigma noise": 1.01}
    assert sigma_fields("Euler a", _request(**SETTINGS)) == {}


def test_schedule_overrides_reach_explicit_schedules_and_the_infotext() -> None:
    plain = samplers.sigma_schedule("Euler", "Karras", 8)
    changed = samplers.sigma_schedule("Euler", "Karras", 8, sigma_min=0.1, sigma_max=10.0, rho=5.0)
    assert changed.infotext_fields == {
        "Schedule type": "Karras",
        "Schedule min sigma": 0.1,
        "Schedule max sigma": 10.0,
        "Schedule rho": 5.0,
    }
    assert float(changed.sigmas[0]) == pytest.approx(10.0) and float(changed.sigmas[-2]) == pytest.approx(0.1)
    # Karras with ρ = 5 from k-diffusion's formula
    ramp = torch.linspace(0, 1, 8)
    expected = (10.0 ** (1 / 5) + ramp * (0.1 ** (1 / 5) - 10.0 ** (1 / 5))) ** 5
    torch.testing.assert_close(changed.sigmas[:-1], expected)
    assert not torch.equal(plain.sigmas, changed.sigmas)
    # Automatic on a sampler with no default schedule uses the model's table: no override
    auto = samplers.sigma_schedule("Euler", "Automatic", 8, sigma_min=0.1, rho=5.0)
    assert auto.infotext_fields == {}
    # ρ only reaches schedulers that have one; a value equal to the model's end is none
    exponential = samplers.sigma_schedule("Euler", "Exponential", 8, rho=5.0, sigma_max=MODEL_RANGE[1])
    assert exponential.infotext_fields == {"Schedule type": "Exponential"}


ROUND_TRIP = {
    "s_churn": 0.75,
    "s_tmin": 0.2,
    "s_tmax": 3.5,
    "s_noise": 1.002,
    "schedule_sigma_min": 0.05,
    "schedule_sigma_max": 12.0,
    "schedule_rho": 6.0,
}


def test_infotext_fields_round_trip_through_a_paste() -> None:
    fields = {"Schedule type": "Karras", "Schedule min sigma": 0.05, "Schedule max sigma": 12.0}
    fields |= {"Schedule rho": 6.0, **sigma_fields("Euler", _request(**ROUND_TRIP))}
    text = infotext.format(
        infotext.InfotextParams(
            prompt="a cat", steps=6, sampler="Euler", cfg_scale=7, seed=5, width=64, height=64, extra=fields
        )
    )
    assert "Sigma churn: 0.75, Sigma tmin: 0.2, Sigma tmax: 3.5, Sigma noise: 1.002" in text
    _, options = options_from_infotext(text, None, with_model=False)
    assert {
        field: options[name] for name, field in SAMPLER_SETTING_OPTIONS if field in ROUND_TRIP
    } == ROUND_TRIP


def test_eta_ddim_is_read_back_as_the_request_eta() -> None:
    text = "a cat\nSteps: 6, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 64x64, Eta DDIM: 0.3"
    assert options_from_infotext(text, None, with_model=False)[1]["eta"] == 0.3


def test_a_pasted_infotext_with_the_settings_reproduces_the_image(engine) -> None:
    request = _request(scheduler="Karras", **ROUND_TRIP)
    first = engine.generate(request)
    text = first.images[0].infotext
    fields = infotext.parse(text)
    assert (fields["Sigma churn"], fields["Schedule rho"], fields["Schedule min sigma"]) == (
        "0.75",
        "6.0",
        "0.05",
    )
    _, options = options_from_infotext(text, None, with_model=False)
    pasted = _request(scheduler=options["scheduler"]).replace(
        **{field: options[name] for name, field in SAMPLER_SETTING_OPTIONS if field in ROUND_TRIP}
    )
    again = engine.generate(pasted)
    assert np.array_equal(np.asarray(again.images[0].image), np.asarray(first.images[0].image))
    plain = engine.generate(_request(scheduler="Karras"))
    assert not np.array_equal(np.asarray(plain.images[0].image), np.asarray(first.images[0].image))


def test_the_engine_passes_the_churn_settings_to_the_loop(engine, monkeypatch) -> None:
    seen: list[dict] = []
    euler = kdiffusion.SAMPLERS["Euler"]

    def spy(x, sigmas, ctx):
        seen.append({k: v for k, v in ctx.extra.items() if k != "eps_model_cfgpp"})
        return euler(x, sigmas, ctx)

    monkeypatch.setitem(kdiffusion.SAMPLERS, "Euler", spy)
    engine.generate(_request(**SETTINGS))
    assert seen == [SETTINGS]


def test_noise_fields_belong_to_img2img_and_hires() -> None:
    from pipeline.sampler_args import noise_fields

    assert noise_fields(_request(noise_multiplier=0.9, extra_noise=0.1)) == {}
    img2img = _request(init_image="x.png", noise_multiplier=0.9, extra_noise=0.1)
    assert noise_fields(img2img) == {"Noise multiplier": 0.9, "Extra noise": 0.1}
    assert noise_fields(_request(enable_hr=True, noise_multiplier=0.9, extra_noise=0.1)) == {
        "Extra noise": 0.1
    }


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_img2img_noise_settings_change_the_image_and_a_paste_reproduces_it(engine, tmp_path, sampler) -> None:
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (SIZE, SIZE), (30, 160, 220)).save(init)
    base = _request(sampler_name=sampler, init_image=str(init), denoising_strength=0.6)
    plain = engine.generate(base).images[0]
    noisy = engine.generate(base.replace(noise_multiplier=0.8, extra_noise=0.2)).images[0]
    assert "Noise multiplier: 0.8" in noisy.infotext and "Extra noise: 0.2" in noisy.infotext
    assert not np.array_equal(np.asarray(plain.image), np.asarray(noisy.image))
    _, options = options_from_infotext(noisy.infotext, None, with_model=False)
    pasted = base.replace(noise_multiplier=options["noise-multiplier"], extra_noise=options["extra-noise"])
    again = engine.generate(pasted).images[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(noisy.image))


def test_unipc_settings_are_written_when_not_a1111s_and_read_back() -> None:
    from pipeline.sampler_args import unipc_fields

    assert unipc_fields("UniPC", _request()) == {}
    assert unipc_fields("DDIM", _request(uni_pc_order=2)) == {}
    request = _request(sampler_name="UniPC", uni_pc_variant="bh2", uni_pc_order=2, uni_pc_skip_type="logSNR")
    fields = unipc_fields("UniPC", request)
    assert fields == {"UniPC variant": "bh2", "UniPC order": 2, "UniPC skip type": "logSNR"}
    text = infotext.format(
        infotext.InfotextParams(
            prompt="a cat", steps=6, sampler="UniPC", cfg_scale=7, seed=5, width=64, height=64, extra=fields
        )
    )
    _, options = options_from_infotext(text, None, with_model=False)
    assert (options["unipc-variant"], options["unipc-order"], options["unipc-skip-type"]) == (
        "bh2",
        2,
        "logSNR",
    )


def test_unipc_settings_reach_the_loop_and_change_the_image(engine) -> None:
    base = _request(sampler_name="UniPC", num_inference_steps=5)
    plain = engine.generate(base).images[0]
    other = engine.generate(base.replace(uni_pc_order=1)).images[0]
    assert "UniPC order: 1" in other.infotext
    assert not np.array_equal(np.asarray(plain.image), np.asarray(other.image))

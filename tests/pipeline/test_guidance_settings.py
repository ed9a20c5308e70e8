"""A1111's CFG denoiser settings (NGMS, Skip Early CFG, Pad conds, Pad conds v0) and
"Downcast alphas_cumprod" (A1111-SEMANTICS.md §7.2, §9.2, §10): what each does to the
denoiser's UNet calls, that the infotext names them only when they acted, and that a
pasted infotext reproduces the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bot.draw import GUIDANCE_OPTIONS
from bot.reruns import options_from_infotext
from pipeline import infotext, samplers
from pipeline.denoiser import CFGDenoiser, Guidance, PromptConds, sd_alphas_cumprod
from pipeline.request import GenerationRequest
from tests.pipeline.test_denoiser import FakeUNet, conds, emb, latents

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


# -- the denoiser ------------------------------------------------------------------------------


def _rows(unet: FakeUNet) -> list[int]:
    """Rows of each UNet call: 4 = cond and uncond of 2 images together, 2 = one of them."""
    return [int(call["x"].shape[0]) for call in unet.calls]


def test_ngms_skips_the_uncond_on_odd_calls_below_its_sigma() -> None:
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0)), 7, guidance=Guidance(ngms=2.0))
    x = latents()
    outs = [denoiser(x, torch.tensor([sigma, sigma])) for sigma in (5.0, 3.0, 1.0, 1.0)]
    # call 1 is odd but σ 3 ≥ 2; call 2 is even; call 3 is odd and below: skipped
    assert _rows(unet) == [4, 4, 4, 2]
    assert denoiser.infotext_fields == {"NGMS": 2.0}
    # the skipped call's result is the cond result unguided: CFG scale 1
    plain = CFGDenoiser(FakeUNet(), conds((1.0, 1.0)), 1)
    torch.testing.assert_close(outs[3], plain(x, torch.tensor([1.0, 1.0])))
    assert not torch.allclose(outs[2], outs[3])


def test_ngms_all_steps_skips_every_call_below_its_sigma() -> None:
    unet = FakeUNet()
    guidance = Guidance(ngms=2.0, ngms_all_steps=True)
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0)), 7, guidance=guidance)
    for sigma in (5.0, 1.0, 1.0):
        denoiser(latents(), torch.tensor([sigma, sigma]))
    assert _rows(unet) == [4, 2, 2]
    assert denoiser.infotext_fields == {"NGMS": 2.0, "NGMS all steps": True}


def test_ngms_below_every_sigma_changes_nothing_and_is_not_written() -> None:
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0)), 7, guidance=Guidance(ngms=0.01))
    for sigma in (5.0, 1.0):
        denoiser(latents(), torch.tensor([sigma, sigma]))
    assert _rows(unet) == [4, 4] and denoiser.infotext_fields == {}


def test_ngms_of_the_timestep_samplers_compares_the_timestep() -> None:
    """A1111's timestep samplers hand their CFG denoiser the UNet timestep where the
    k-diffusion ones hand σ, and NGMS compares whatever it received."""
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0)), 7, guidance=Guidance(ngms=10.0))
    for t in (951, 901, 11, 5):
        denoiser.eps_at_timestep(latents(), t)
    assert _rows(unet) == [4, 4, 4, 2]


def test_skip_early_cfg_skips_the_first_fraction_of_the_calls() -> None:
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0)), 7, guidance=Guidance(skip_early=0.5, total_steps=4))
    for _ in range(4):
        denoiser(latents(), torch.tensor([1.0, 1.0]))
    assert _rows(unet) == [2, 2, 2, 4]  # k / 4 ≤ 0.5 for k = 0, 1, 2
    assert denoiser.infotext_fields == {"Skip Early CFG": 0.5}


def test_a_skipped_uncond_takes_the_first_and_parts_result() -> None:
    unet = FakeUNet()
    denoiser = CFGDenoiser(
        unet, conds((1.0, 1.0), (3.0, 0.5)), 7, guidance=Guidance(skip_early=1.0, total_steps=1)
    )
    x, sigma = latents(), torch.tensor([1.0, 1.0])
    out = denoiser(x, sigma)
    assert _rows(unet) == [4]  # two parts of two images, no uncond rows
    as_uncond = CFGDenoiser(FakeUNet(), conds((1.0, 1.0), (3.0, 0.5), uncond=1.0), 7)
    torch.testing.assert_close(out, as_uncond(x, sigma))


def _long_conds(cond_tokens: int, uncond_tokens: int) -> PromptConds:
    return PromptConds(
        parts=(([(1, emb(1.0, cond_tokens))], 1.0),),
        uncond=[(1, emb(-1.0, uncond_tokens))],
        empty=emb(0.25),
    )


def test_pad_conds_pads_the_shorter_with_the_empty_prompt_for_one_call() -> None:
    unet = FakeUNet()
    CFGDenoiser(unet, _long_conds(154, 77), 7)(latents(), torch.tensor([1.0, 1.0]))
    assert [call["emb"].shape[1] for call in unet.calls] == [154, 77]  # A1111's default: two calls
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, _long_conds(154, 77), 7, guidance=Guidance(pad_conds=True))
    denoiser(latents(), torch.tensor([1.0, 1.0]))
    ((call),) = unet.calls
    uncond_rows = call["emb"][2:]
    assert call["emb"].shape[1] == 154
    assert torch.equal(uncond_rows[:, :77], torch.full((2, 77, 4), -1.0))
    assert torch.equal(uncond_rows[:, 77:], torch.full((2, 77, 4), 0.25))
    assert denoiser.infotext_fields == {"Pad conds": True}
    # a longer uncond pads the cond instead
    unet = FakeUNet()
    CFGDenoiser(unet, _long_conds(77, 231), 7, guidance=Guidance(pad_conds=True))(
        latents(), torch.tensor([1.0, 1.0])
    )
    ((call),) = unet.calls
    assert torch.equal(call["emb"][:2, 77:], torch.full((2, 154, 4), 0.25))


def test_pad_conds_v0_repeats_or_cuts_the_uncond() -> None:
    unet = FakeUNet()
    longer = PromptConds(
        parts=(([(1, emb(1.0, 154))], 1.0),),
        uncond=[(1, torch.cat([emb(-1.0), torch.full((1, 4), 5.0)])[1:])],
    )
    denoiser = CFGDenoiser(unet, longer, 7, guidance=Guidance(pad_conds_v0=True))
    denoiser(latents(), torch.tensor([1.0, 1.0]))
    ((call),) = unet.calls
    assert torch.equal(call["emb"][2:, 76:], torch.full((2, 78, 4), 5.0))  # the last vector repeated
    assert denoiser.infotext_fields == {"Pad conds v0": True}
    unet = FakeUNet()
    CFGDenoiser(unet, _long_conds(77, 154), 7, guidance=Guidance(pad_conds_v0=True))(
        latents(), torch.tensor([1.0, 1.0])
    )
    ((call),) = unet.calls
    assert call["emb"].shape[1] == 77


def test_pad_conds_of_equal_lengths_changes_nothing() -> None:
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, _long_conds(77, 77), 7, guidance=Guidance(pad_conds=True))
    denoiser(latents(), torch.tensor([1.0, 1.0]))
    assert _rows(unet) == [4] and denoiser.infotext_fields == {}


# -- Downcast alphas_cumprod ------------------------------------------------------------------


def test_downcast_alphas_cumprod_builds_the_table_from_float16() -> None:
    alphas = sd_alphas_cumprod(downcast=True)
    assert torch.equal(alphas, sd_alphas_cumprod().half().float())
    half = sd_alphas_cumprod().half()
    table = ((1 - half) / half) ** 0.5  # computed in float16, as k-diffusion does with it
    assert samplers.model_sigma_range("Euler", downcast=True) == (float(table[0]), float(table[-1]))
    assert samplers.model_sigma_range("Euler", downcast=True)[0] != pytest.approx(
        samplers.model_sigma_range("Euler")[0]
    )
    schedule = samplers.sigma_schedule("Euler", "Karras", 6, downcast=True)
    assert schedule.sigmas.dtype == torch.float32
    assert float(schedule.sigmas[0]) == pytest.approx(float(table[-1]), rel=1e-6)
    # the timestep of a table σ is its index in the downcast table
    # near the table's own σ's: k-diffusion compares a float32 log σ with the float16 logs
    t = samplers.sigma_to_timestep(table[[0, 500, 999]].float(), downcast=True)
    torch.testing.assert_close(t, torch.tensor([0.0, 500.0, 999.0]), atol=0.05, rtol=0)


# -- the engine: infotext, paste, pixels ------------------------------------------------------

SIZE = 64
LONG_PROMPT = "a cat, " * 20  # two chunks with the tiny byte-level tokenizer; the negative has one
# Padding an empty negative repeats its own chunk, which attention cannot tell from one
# copy (only float rounding differs); a non-empty one is padded with the empty prompt's
# chunk, which changes what the uncond attends to.
NEGATIVE = "blurry, lowres"
CONTEXT = ("prompt", "negative_prompt", "num_inference_steps")  # what a case's plain image shares


def _request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a cat", seed=11, width=SIZE, height=SIZE, num_inference_steps=3, sampler_name="Euler"
    )  # Euler's σ's: 14.6, 1.0, 0.03
    return base.replace(**changes)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image)


_PLAIN: dict[str, object] = {}


def _plain(engine, **context: str):
    key = repr(sorted(context.items()))
    if key not in _PLAIN:
        _PLAIN[key] = engine.generate(_request(**context))
    return _PLAIN[key]


CASES = [
    # NGMS above every σ of 6 steps: three (or all six) calls go without the negative, so
    # the change is well clear of any CPU's rounding (one call at σ 1.0 moved one level)
    pytest.param({"s_min_uncond": 20.0, "num_inference_steps": 6}, {"NGMS": "20.0"}, id="ngms"),
    pytest.param(
        {"s_min_uncond": 20.0, "s_min_uncond_all": True, "num_inference_steps": 6},
        {"NGMS": "20.0", "NGMS all steps": "True"},
        id="ngms-all-steps",
    ),
    pytest.param({"skip_early_cond": 0.5}, {"Skip Early CFG": "0.5"}, id="skip-early-cfg"),
    pytest.param(
        {"pad_cond_uncond": True, "prompt": LONG_PROMPT, "negative_prompt": NEGATIVE},
        {"Pad conds": "True"},
        id="pad-conds",
    ),
    pytest.param(
        {"pad_cond_uncond_v0": True, "prompt": LONG_PROMPT, "negative_prompt": NEGATIVE},
        {"Pad conds v0": "True"},
        id="pad-conds-v0",
    ),
    pytest.param({"downcast_alphas_cumprod": True}, {"Downcast alphas_cumprod": "True"}, id="downcast"),
]


@pytest.mark.parametrize(("changes", "fields"), CASES)
def test_each_setting_changes_the_image_is_written_and_a_paste_reproduces_it(engine, changes, fields) -> None:
    context = {key: value for key, value in changes.items() if key in CONTEXT}
    plain = _plain(engine, **context)
    request = _request(**changes)
    changed = engine.generate(request)
    assert not np.array_equal(_pixels(plain), _pixels(changed))
    parsed = infotext.parse(changed.images[0].infotext)
    assert {key: parsed.get(key) for key in fields} == fields
    assert not set(fields) & set(infotext.parse(plain.images[0].infotext))
    _, options = options_from_infotext(changed.images[0].infotext, None, with_model=False)
    pasted = _request(**context).replace(
        **{field: convert(options[name]) for name, field, convert in GUIDANCE_OPTIONS if name in options}
    )
    assert pasted == request  # the same request: the same pixels (shown once below)


def test_a_pasted_infotext_with_them_reproduces_the_pixels(engine) -> None:
    request = _request(s_min_uncond=10.0, skip_early_cond=0.2, downcast_alphas_cumprod=True)
    first = engine.generate(request).images[0]
    _, options = options_from_infotext(first.infotext, None, with_model=False)
    pasted = _request().replace(
        **{field: convert(options[name]) for name, field, convert in GUIDANCE_OPTIONS if name in options}
    )
    assert np.array_equal(_pixels(engine.generate(pasted)), np.asarray(first.image))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"pad_cond_uncond": True}, id="pad-conds-equal-lengths"),
        pytest.param({"s_min_uncond": 0.01}, id="ngms-below-every-sigma"),
    ],
)
def test_settings_that_do_not_act_leave_the_image_and_the_infotext(engine, changes) -> None:
    plain = _plain(engine)
    same = engine.generate(_request(**changes))
    assert np.array_equal(_pixels(plain), _pixels(same))
    assert same.images[0].infotext == plain.images[0].infotext


def test_ngms_and_downcast_reach_ddim(engine) -> None:
    """DDIM's denoiser compares NGMS with the timestep (so 10 only acts near the end) and
    runs on the downcast ᾱ."""
    base = _request(sampler_name="DDIM")  # calls at timesteps 999, 667, 334
    plain = engine.generate(base)
    assert "NGMS" not in engine.generate(base.replace(s_min_uncond=10.0)).images[0].infotext
    late = engine.generate(base.replace(s_min_uncond=700.0))
    assert "NGMS: 700.0" in late.images[0].infotext
    assert not np.array_equal(_pixels(plain), _pixels(late))
    downcast = engine.generate(base.replace(downcast_alphas_cumprod=True))
    assert "Downcast alphas_cumprod: True" in downcast.images[0].infotext
    assert not np.array_equal(_pixels(plain), _pixels(downcast))


def test_unipc_lower_order_final_is_written_when_off_and_read_back(engine) -> None:
    base = _request(sampler_name="UniPC", num_inference_steps=4)
    plain = engine.generate(base).images[0]
    off = engine.generate(base.replace(uni_pc_lower_order_final=False)).images[0]
    assert "UniPC lower order final" not in plain.infotext
    assert "UniPC lower order final: False" in off.infotext
    assert not np.array_equal(np.asarray(plain.image), np.asarray(off.image))
    _, options = options_from_infotext(off.infotext, None, with_model=False)
    assert options["unipc-lower-order-final"] == "False"

from __future__ import annotations

import math

import pytest
import torch

from pipeline import clip, conditioning, samplers
from pipeline.denoiser import (
    CFGPP_DIVISOR,
    CFGDenoiser,
    PromptConds,
    lcm_sigma_to_timestep,
    sd_alphas_cumprod,
)

C = 4  # toy embedding width


class FakeUNet:
    """Records every call; its output per row is ``x · 0.5 + mean(embedding row)``, so the
    result shows which conditioning each row saw."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, t, *, encoder_hidden_states, return_dict):
        assert return_dict is False
        self.calls.append({"x": x.clone(), "t": t.clone(), "emb": encoder_hidden_states.clone()})
        bias = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (x * 0.5 + bias,)


def emb(value: float, tokens: int = 77) -> torch.Tensor:
    return torch.full((tokens, C), float(value))


def conds(*parts: tuple[float, float], uncond: float = 0.0, tokens: int = 77) -> PromptConds:
    """Unscheduled conds: each part ``(embedding value, weight)``."""
    return PromptConds(
        parts=tuple(([(1, emb(value, tokens))], weight) for value, weight in parts),
        uncond=[(1, emb(uncond, tokens))],
    )


def latents(batch: int = 2) -> torch.Tensor:
    return torch.linspace(-1, 1, batch * 4 * 2 * 2).view(batch, 4, 2, 2)


# -- k-diffusion scalings -------------------------------------------------------------------------


def test_eps_scalings_and_continuous_timestep():
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((0.0, 1.0)), 7)
    x, sigma = latents(), torch.tensor([2.5, 0.7])
    out = denoiser(x, sigma)
    (call,) = unet.calls
    c_in = (1 / torch.sqrt(sigma**2 + 1)).view(-1, 1, 1, 1)
    assert torch.allclose(call["x"], torch.cat([x * c_in, x * c_in]))
    assert torch.allclose(call["t"], torch.cat([samplers.sigma_to_timestep(sigma)] * 2))
    assert not torch.equal(call["t"], call["t"].round())  # fractional, as A1111 feeds it
    # cond == uncond, so CFG is the identity: x − σ·eps with eps = 0.5·x·c_in
    expected = x - sigma.view(-1, 1, 1, 1) * (0.5 * x * c_in)
    assert torch.allclose(out, expected, atol=1e-6)


def test_v_prediction_scalings():
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((0.0, 1.0)), 7, prediction_type="v_prediction")
    x, sigma = latents(), torch.tensor([2.5, 0.7])
    out = denoiser(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    v = 0.5 * x / torch.sqrt(s**2 + 1)
    expected = x / (s**2 + 1) - v * s / torch.sqrt(s**2 + 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction type"):
        CFGDenoiser(FakeUNet(), conds((0.0, 1.0)), 7, prediction_type="sample")


def test_scalar_sigma_is_broadcast_per_image():
    unet = FakeUNet()
    CFGDenoiser(unet, conds((0.0, 1.0)), 7)(latents(3), torch.tensor(1.0))
    assert unet.calls[0]["t"].shape == (6,)


# -- CFG and AND ------------------------------------------------------------------------------------


def test_cfg_combines_in_denoised_space():
    unet = FakeUNet()
    x, sigma = latents(), torch.tensor([1.5, 1.5])
    out = CFGDenoiser(unet, conds((2.0, 1.0), uncond=-1.0), 7.5)(x, sigma)
    eps = 0.5 * x / math.sqrt(1.5**2 + 1)
    cond_x0, uncond_x0 = x - 1.5 * (eps + 2.0), x - 1.5 * (eps - 1.0)
    assert torch.allclose(out, uncond_x0 + (cond_x0 - uncond_x0) * 7.5, atol=1e-5)


def test_and_parts_are_weighted_per_image():
    unet = FakeUNet()
    x, sigma = latents(2), torch.tensor([1.0, 1.0])
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0), (3.0, 0.5), (-2.0, -0.25), uncond=0.5), 6)
    out = denoiser(x, sigma)
    # One call: 2 images × 3 parts, then the 2 unconds; image-major part order.
    (call,) = unet.calls
    assert call["x"].shape[0] == 8
    assert call["emb"][:6, 0, 0].tolist() == [1.0, 3.0, -2.0, 1.0, 3.0, -2.0]
    assert call["emb"][6:, 0, 0].tolist() == [0.5, 0.5]
    assert torch.allclose(call["x"][:3], x[:1].expand(3, -1, -1, -1) / math.sqrt(2))
    eps = 0.5 * x / math.sqrt(2)
    uncond = x - (eps + 0.5)
    expected = uncond.clone()
    for value, weight in ((1.0, 1.0), (3.0, 0.5), (-2.0, -0.25)):
        expected = expected + ((x - (eps + value)) - uncond) * (weight * 6)
    assert torch.allclose(out, expected, atol=1e-5)


def test_equal_lengths_share_one_unet_call():
    unet = FakeUNet()
    CFGDenoiser(unet, conds((1.0, 1.0), uncond=0.0, tokens=154), 7)(latents(), torch.tensor([1.0, 1.0]))
    assert len(unet.calls) == 1
    assert unet.calls[0]["emb"].shape == (4, 154, C)


def test_unequal_lengths_run_cond_and_uncond_separately():
    unet = FakeUNet()
    cond_set = PromptConds(parts=(([(1, emb(1.0, 154))], 1.0),), uncond=[(1, emb(0.0, 77))])
    CFGDenoiser(unet, cond_set, 7)(latents(), torch.tensor([1.0, 1.0]))
    assert [c["emb"].shape for c in unet.calls] == [(2, 154, C), (2, 77, C)]


def test_and_parts_of_unequal_length_repeat_their_last_vector():
    unet = FakeUNet()
    long_part = torch.cat([emb(1.0), emb(2.0)])
    short_part = emb(3.0)
    short_part[-1] = 9.0
    cond_set = PromptConds(parts=(([(1, long_part)], 1.0), ([(1, short_part)], 1.0)), uncond=[(1, emb(0.0))])
    CFGDenoiser(unet, cond_set, 7)(latents(1), torch.tensor([1.0]))
    first = unet.calls[0]["emb"]
    assert first.shape == (2, 154, C)
    assert torch.equal(first[1, 77:], torch.full((77, C), 9.0))


# -- scheduled conditioning -------------------------------------------------------------------------


def test_call_counter_selects_scheduled_conds_for_both_prompts():
    """``[cat:dog:2]``: cat for calls 0-2, dog afterwards; the negative switches at its own step."""
    unet = FakeUNet()
    schedule = [(2, emb(10.0)), (6, emb(20.0))]
    negative = [(4, emb(-1.0)), (6, emb(-2.0))]
    denoiser = CFGDenoiser(unet, PromptConds(parts=((schedule, 1.0),), uncond=negative), 7)
    for _ in range(6):
        denoiser(latents(1), torch.tensor([1.0]))
    used = [(c["emb"][0, 0, 0].item(), c["emb"][1, 0, 0].item()) for c in unet.calls]
    assert used == [(10, -1), (10, -1), (10, -1), (20, -1), (20, -1), (20, -2)]
    assert denoiser.calls == 6


def test_counter_past_the_schedule_falls_back_to_the_first_entry():
    unet = FakeUNet()
    schedule = [(1, emb(10.0)), (2, emb(20.0))]
    denoiser = CFGDenoiser(unet, PromptConds(parts=((schedule, 1.0),), uncond=[(1, emb(0.0))]), 7)
    for _ in range(4):
        denoiser(latents(1), torch.tensor([1.0]))
    assert [c["emb"][0, 0, 0].item() for c in unet.calls] == [10, 10, 20, 10]


def test_prompt_editing_with_the_real_parser(tiny_library):
    """End to end: ``[cat:dog:2]`` at 4 steps encodes two texts and switches after call 2."""
    pipe = tiny_library.load("tiny")
    encoded = conditioning.build_conds(
        "a [cat:dog:2]",
        "",
        4,
        chunk=lambda text: clip.chunk_prompt(text, _tokenizer(pipe))[0],
        encode=lambda chunks: clip.encode_chunks(pipe.text_encoder, chunks, emphasis="Ignore"),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    ((schedule, weight),) = encoded.parts
    assert weight == 1.0
    assert [end for end, _ in schedule] == [2, 4]
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, encoded, 7)
    for _ in range(4):
        denoiser(latents(1), torch.tensor([1.0]))
    seen = [c["emb"][0] for c in unet.calls]
    assert torch.equal(seen[0], schedule[0][1]) and torch.equal(seen[2], schedule[0][1])
    assert torch.equal(seen[3], schedule[1][1])
    assert not torch.equal(schedule[0][1], schedule[1][1])


def test_before_call_runs_before_every_unet_evaluation():
    seen = []
    unet = FakeUNet()
    denoiser = CFGDenoiser(unet, conds((1.0, 1.0)), 7, before_call=lambda: seen.append(len(unet.calls)))
    denoiser(latents(), torch.tensor([1.0, 1.0]))
    denoiser.eps_at_timestep(latents(), 500)
    assert seen == [0, 1]


# -- timestep view ------------------------------------------------------------------------------------


def test_eps_at_timestep_passes_x_and_t_unscaled():
    unet = FakeUNet()
    x = latents()
    eps = CFGDenoiser(unet, conds((2.0, 1.0), uncond=-1.0), 5)(x, torch.tensor([1.0, 1.0]))
    assert eps.shape == x.shape
    unet = FakeUNet()
    eps = CFGDenoiser(unet, conds((2.0, 1.0), uncond=-1.0), 5).eps_at_timestep(
        x, torch.tensor([951.0, 951.0])
    )
    assert torch.equal(unet.calls[0]["x"], torch.cat([x, x]))
    assert unet.calls[0]["t"].tolist() == [951.0] * 4
    assert torch.allclose(eps, (0.5 * x - 1.0) + 3.0 * 5)


def test_cfgpp_pair_scales_cfg_down_and_returns_uncond():
    unet = FakeUNet()
    x = latents()
    guided, uncond = CFGDenoiser(unet, conds((2.0, 1.0), uncond=-1.0), 5).eps_cfgpp(x, 500)
    assert torch.allclose(uncond, 0.5 * x - 1.0)
    assert torch.allclose(guided, uncond + 3.0 * (5 / CFGPP_DIVISOR))


def test_eps_at_timestep_converts_v_predictions():
    unet = FakeUNet()
    x = latents()
    eps = CFGDenoiser(unet, conds((0.0, 1.0)), 5, prediction_type="v_prediction").eps_at_timestep(x, 400)
    alpha = sd_alphas_cumprod()[400]
    assert torch.allclose(eps, alpha.sqrt() * 0.5 * x + (1 - alpha).sqrt() * x, atol=1e-6)


# -- tables ----------------------------------------------------------------------------------------------


def test_alphas_cumprod_matches_the_sigma_table():
    alphas = sd_alphas_cumprod()
    assert alphas.dtype == torch.float32 and alphas.shape == (1000,)
    sigma_max = ((1 - alphas[-1]) / alphas[-1]) ** 0.5
    assert float(sigma_max) == pytest.approx(14.614642, rel=1e-6)


def test_lcm_timesteps_land_on_the_original_50():
    to_t = lcm_sigma_to_timestep()
    alphas = sd_alphas_cumprod()
    sigmas = ((1 - alphas) / alphas) ** 0.5
    table = sigmas[19::20]
    assert torch.allclose(to_t(table), torch.arange(19, 1000, 20, dtype=torch.float32), atol=1e-3)
    between = to_t(torch.sqrt(table[10] * table[11]).reshape(1))
    assert 219 < float(between) < 239


def _tokenizer(pipe):
    return lambda texts: pipe.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

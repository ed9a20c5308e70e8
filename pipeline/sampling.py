"""The contract between the engine and the sampling loops.

A1111 drives k-diffusion's sampler functions with its own CFG denoiser, noise stream
and σ schedule (A1111-SEMANTICS.md §9); the timestep samplers (DDIM, DDIM CFG++, PLMS,
UniPC) walk integer UNet timesteps instead (§9.4). Both kinds are plain functions over
the callables below, so they can be tested with analytic toy models and the engine can
plug in the real UNet.

* ``pipeline.kdiffusion.SAMPLERS[name](x, sigmas, ctx) -> x0``: k-diffusion samplers.
  ``x`` is the start latent (``noise * sigmas[0]`` for txt2img). Each call of
  ``ctx.model`` is one CFG-denoiser call; ``ctx.noise()`` is one ``randn_like(x)`` draw
  (the per-image ImageRNG stream, §8.3).
* ``pipeline.timestep_samplers.SAMPLERS[name](x, timesteps, ctx) -> x0``: timestep
  samplers over ``ctx.eps_model`` and ``ctx.alphas_cumprod``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma[B]) -> denoised x0
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep[B]) -> eps
NoiseDraw = Callable[[], torch.Tensor]  # next per-step noise, shape of x
StepCallback = Callable[[int, int], None]  # (sampler step index, total sampler steps)


@dataclass
class SamplingContext:
    model: Denoiser | None = None
    eps_model: EpsModel | None = None
    alphas_cumprod: torch.Tensor | None = None  # (1000,) float32, the model's discrete ᾱ
    noise: NoiseDraw | None = None
    seeds: list[int] = field(default_factory=list)  # per-image seeds: Brownian-tree entropy
    rng_source: str = "CPU"  # for draws the Brownian tree makes per image (§8.5)
    eta: float | None = None  # None = the sampler's default (1.0 k-diffusion, 0.0 DDIM)
    solver_type: str | None = None  # "heun" for DPM++ 2M SDE Heun
    callback: StepCallback | None = None
    extra: dict[str, object] = field(default_factory=dict)  # sampler settings (s_churn, order ...)

    def step(self, index: int, total: int) -> None:
        if self.callback is not None:
            self.callback(index, total)

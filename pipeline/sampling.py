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

No loop reads a device tensor back to the host while it runs: on a GPU every such read
(``.item()``, ``float(t)``, ``if t > 0:``, ``.cpu()``) waits for the queued kernels to
finish, so the host could not queue the next step's work. What a loop decides on the
host (is σ_next 0, is σ in the churn range, which σ's the Brownian tree is asked about)
comes from host copies of its schedule, made once before the first step. Each model call
is announced with the host value of its noise level (``ctx.announce``), so the denoiser
can compare it (NGMS) without a read-back either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma[B]) -> denoised x0
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep[B]) -> eps
NoiseDraw = Callable[[], torch.Tensor]  # next per-step noise, shape of x
StepCallback = Callable[[int, int], None]  # (sampler step index, total sampler steps)
LevelHint = Callable[[float], None]  # the host value of the next model call's noise level


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
    level_hint: LevelHint | None = None  # told each model call's noise level before the call

    def announce(self, level: float | None) -> None:
        """Tell ``level_hint`` the next model call's noise level as a host float: σ for the
        k-diffusion loops, the UNet timestep for the timestep loops (None: not known on
        the host; the model reads it from the tensor if it needs it)."""
        if level is not None and self.level_hint is not None:
            self.level_hint(level)

    def step(self, index: int, total: int) -> None:
        if self.callback is not None:
            self.callback(index, total)


def host_values(values: Sequence[torch.Tensor]) -> list[float]:
    """Host copies of 0-d tensors, read back together: one wait on the device for all of
    them (made before a loop starts, so no step waits)."""
    if not values:
        return []
    return torch.stack([value.reshape(()) for value in values]).tolist()

"""What one request runs: its sampling passes (the first, and the hires fix) and the
infotext fields the passes' sampler and schedule add (A1111-SEMANTICS.md §9.3, §9.6);
a pass's CFG guidance settings and the infotext fields its denoisers note.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pipeline import hires, latents, samplers
from pipeline.denoiser import CFGDenoiser, Guidance
from pipeline.request import GenerationRequest

TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})
# A1111 hard-codes the VAE's 8x factor for latent sizes (§1 step 5).
LATENT_FACTOR = 8

# A1111's img2img UI default.
DEFAULT_IMG2IMG_STRENGTH = 0.75


@dataclass(frozen=True)
class SamplingPass:
    """One sampling pass: its sampler, steps, prompts and where in the schedule it starts.

    ``base_steps`` is set for the hires pass only: the first pass's denoiser-call total,
    which the hires prompt-editing timeline continues from (§3.2, §3.4). ``size`` is the
    (width, height) its conds are made for, which SDXL's size conditioning takes: the
    request's, or the hires target.
    """

    selection: samplers.SamplerSelection
    steps: int
    plan: latents.StepPlan
    prompt: str
    negative_prompt: str
    base_steps: int | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def info(self) -> samplers.SamplerInfo:
        return samplers.exact_info(self.selection.name)

    @property
    def call_steps(self) -> int:
        return self.steps * self.info.total_steps_multiplier


@dataclass(frozen=True)
class PassPlan:
    first: SamplingPass
    second: SamplingPass | None
    target: hires.HiresTarget | None
    fields: dict[str, Any]  # infotext fields img2img / hires add

    @property
    def total_steps(self) -> int:
        return self.first.steps + (self.second.steps if self.second is not None else 0)


def plan_passes(request: GenerationRequest) -> PassPlan:
    """Validate what the request asks for and lay out its passes (§9.6). Sampler and
    schedule names are taken exactly as /draw stores them (``UnknownSampler`` /
    ``UnknownScheduler`` otherwise); reading what a user typed is /draw's work."""
    selection = samplers.exact_selection(request.sampler_name, request.scheduler)
    steps = request.num_inference_steps
    size = (request.width, request.height)
    if request.init_image is not None:
        if request.enable_hr:
            raise ValueError("the hires fix is for txt2img; it cannot be combined with an init image")
        strength = _strength(request, DEFAULT_IMG2IMG_STRENGTH)
        plan = latents.img2img_plan(steps, strength)
        first = SamplingPass(selection, steps, plan, request.prompt, request.negative_prompt, size=size)
        return PassPlan(first, None, None, {"Denoising strength": strength})
    first = SamplingPass(
        selection, steps, latents.StepPlan(steps, steps), request.prompt, request.negative_prompt, size=size
    )
    if not request.enable_hr:
        return PassPlan(first, None, None, {})
    return _plan_hires(request, first)


def _plan_hires(request: GenerationRequest, first: SamplingPass) -> PassPlan:
    hires.check_upscaler(request.hr_upscaler)
    strength = _strength(request, hires.DEFAULT_DENOISING_STRENGTH)
    hr_selection = samplers.exact_selection(
        request.hr_sampler_name or request.sampler_name, request.hr_scheduler or request.scheduler
    )
    hr_steps = request.hr_second_pass_steps or first.steps
    target = hires.hires_target(
        request.width, request.height, request.hr_scale, request.hr_resize_x, request.hr_resize_y
    )
    second = SamplingPass(
        hr_selection,
        hr_steps,
        latents.hires_plan(hr_steps, strength),
        request.hr_prompt or request.prompt,
        request.hr_negative_prompt or request.negative_prompt,
        base_steps=first.call_steps,
        size=(target.width, target.height),
    )
    if target.width < LATENT_FACTOR or target.height < LATENT_FACTOR:
        raise ValueError(f"hires target {target.width}x{target.height} is too small")
    fields = hires.infotext_fields(
        denoising_strength=strength,
        scale=request.hr_scale,
        resize_x=request.hr_resize_x,
        resize_y=request.hr_resize_y,
        second_pass_steps=request.hr_second_pass_steps,
        upscaler=request.hr_upscaler,
        prompt=request.prompt,
        hr_prompt=request.hr_prompt,
        negative_prompt=request.negative_prompt,
        hr_negative_prompt=request.hr_negative_prompt,
        sampler=hr_selection.name if request.hr_sampler_name else None,
        schedule=request.hr_scheduler,
    )
    return PassPlan(first, second, target, fields)


def _strength(request: GenerationRequest, default: float) -> float:
    return default if request.denoising_strength is None else request.denoising_strength


@functools.lru_cache(maxsize=256)
def _cached_schedule_fields(
    sampler: str, schedule: str, steps: int, overrides: tuple[tuple[str, Any], ...]
) -> tuple[tuple[str, Any], ...]:
    return tuple(samplers.sigma_schedule(sampler, schedule, steps, **dict(overrides)).infotext_fields.items())


def schedule_overrides(request: GenerationRequest) -> dict[str, Any]:
    """The request's "Schedule min/max sigma", "Schedule rho" and "Downcast alphas_cumprod"
    as :func:`samplers.sigma_schedule` takes them."""
    return {
        "sigma_min": request.schedule_sigma_min,
        "sigma_max": request.schedule_sigma_max,
        "rho": request.schedule_rho,
        "downcast": request.downcast_alphas_cumprod,
    }


def schedule_fields(sampler: str, schedule: str, steps: int, **overrides: Any) -> dict[str, Any]:
    """What A1111's σ schedule adds to the infotext: the resolved ``Schedule type`` (Karras for
    DPM++ 2M on Automatic), the applied σ min/max/ρ overrides and Beta's alpha/beta.
    Timestep samplers compute no σ's."""
    if sampler in TIMESTEP_SAMPLERS:
        return {}
    return dict(_cached_schedule_fields(sampler, schedule, steps, tuple(sorted(overrides.items()))))


# k-diffusion samplers whose function takes eta (A1111 writes ``Eta`` when it is not 1).
_ETA_SAMPLERS = frozenset(
    {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    | {"DPM fast", "DPM adaptive"}
)
_DDIM_ETA_SAMPLERS = frozenset({"DDIM", "DDIM CFG++"})


def eta_fields(sampler: str, eta: float | None) -> dict[str, Any]:
    """``Eta`` / ``Eta DDIM`` when the request's eta differs from the setting's default (§9.3)."""
    if eta is None:
        return {}
    if sampler in _DDIM_ETA_SAMPLERS and eta != 0:
        return {"Eta DDIM": eta}
    if sampler in _ETA_SAMPLERS and eta != 1:
        return {"Eta": eta}
    return {}


def _guidance(request: GenerationRequest, total_steps: int) -> Guidance:
    return Guidance(
        ngms=request.s_min_uncond,
        ngms_all_steps=request.s_min_uncond_all,
        skip_early=request.skip_early_cond,
        total_steps=total_steps,
        pad_conds=request.pad_cond_uncond,
        pad_conds_v0=request.pad_cond_uncond_v0,
    )


def _note(notes: list[dict[str, Any]], members: list[CFGDenoiser]) -> None:
    """Each member's infotext fields of this pass, added to what earlier passes noted."""
    for noted, member in zip(notes, members, strict=True):
        noted.update(member.infotext_fields)

"""The keyword arguments A1111 v1.10.1 passes to each sampler loop, and the infotext fields
its sampler settings add (A1111-SEMANTICS.md §9; PARITY-API.md "Sampler loops", rule 6).

A1111 passes its "Sigma churn/tmin/tmax/noise" settings only to the k-diffusion functions
that take them (Euler, Heun and DPM2 take all four; DPM fast, DPM2 a, DPM++ 2S a and the
SDE samplers take ``s_noise``), writes each one that differs from k-diffusion's default to
the infotext, and gives DPM fast and DPM adaptive their σ range explicitly: the model's
table ends for txt2img, the ends of the shortened schedule for img2img and hires.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline import samplers
from pipeline.request import GenerationRequest

CHURN_SAMPLERS = frozenset({"Euler", "Heun", "DPM2"})
_S_NOISE_SAMPLERS = CHURN_SAMPLERS | {
    "DPM fast",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
}
_RANGE_SAMPLERS = frozenset({"DPM fast", "DPM adaptive"})
_UNIPC = "UniPC"


def s_tmax(request: GenerationRequest) -> float:
    """The "Sigma tmax" setting as the loops take it: 0 means no upper bound."""
    return request.s_tmax or math.inf


def loop_arguments(
    name: str, request: GenerationRequest, sigmas: torch.Tensor | None, *, img2img: bool
) -> dict[str, Any]:
    """What A1111 puts in the sampler call's keyword arguments for ``name`` (``ctx.extra``).

    ``sigmas`` is the schedule the loop runs (already shortened for img2img/hires); None
    for the timestep samplers.
    """
    args: dict[str, Any] = {}
    if name in CHURN_SAMPLERS:
        args.update(s_churn=request.s_churn, s_tmin=request.s_tmin, s_tmax=s_tmax(request))
    if name in _S_NOISE_SAMPLERS:
        args["s_noise"] = request.s_noise
    if name in _RANGE_SAMPLERS and sigmas is not None:
        args.update(_sigma_range(name, sigmas, img2img=img2img, downcast=request.downcast_alphas_cumprod))
    if sigmas is None:
        args["is_img2img"] = img2img
    if name == _UNIPC:
        args.update(
            uni_pc_variant=request.uni_pc_variant,
            uni_pc_order=request.uni_pc_order,
            uni_pc_skip_type=request.uni_pc_skip_type,
            uni_pc_lower_order_final=request.uni_pc_lower_order_final,
        )
    return args


def _sigma_range(name: str, sigmas: torch.Tensor, *, img2img: bool, downcast: bool) -> dict[str, Any]:
    steps = int(sigmas.shape[0]) - 1
    if img2img:
        lo, hi = float(sigmas[-2]), float(sigmas[0])
    else:
        lo, hi = samplers.model_sigma_range(name, downcast=downcast)
    args: dict[str, Any] = {"sigma_min": lo, "sigma_max": hi}
    if name == "DPM fast":
        args["n"] = steps
    return args


def sigma_fields(name: str, request: GenerationRequest) -> dict[str, Any]:
    """ "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise": each setting the sampler
    takes whose value differs from k-diffusion's default, in A1111's order."""
    fields: dict[str, Any] = {}
    if name in CHURN_SAMPLERS:
        if request.s_churn != 0.0:
            fields["Sigma churn"] = request.s_churn
        if request.s_tmin != 0.0:
            fields["Sigma tmin"] = request.s_tmin
        if s_tmax(request) != math.inf:
            fields["Sigma tmax"] = request.s_tmax
    if name in _S_NOISE_SAMPLERS and request.s_noise != 1.0:
        fields["Sigma noise"] = request.s_noise
    return fields


def noise_fields(request: GenerationRequest) -> dict[str, Any]:
    """ "Noise multiplier" (img2img's start noise, when not 1) and "Extra noise" (added to
    the start latent of img2img and the hires pass, when > 0)."""
    fields: dict[str, Any] = {}
    if request.init_image is not None and request.noise_multiplier != 1.0:
        fields["Noise multiplier"] = request.noise_multiplier
    if (request.init_image is not None or request.enable_hr) and request.extra_noise > 0:
        fields["Extra noise"] = request.extra_noise
    return fields


_UNIPC_DEFAULTS = {
    "UniPC variant": "bh1",
    "UniPC order": 3,
    "UniPC skip type": "time_uniform",
    "UniPC lower order final": True,
}


def unipc_fields(name: str, request: GenerationRequest) -> dict[str, Any]:
    """UniPC's settings under the names A1111's paste reads them by, when they differ from
    A1111's defaults (A1111 itself does not record them, so its images always have those)."""
    if name != _UNIPC:
        return {}
    values = {
        "UniPC variant": request.uni_pc_variant,
        "UniPC order": request.uni_pc_order,
        "UniPC skip type": request.uni_pc_skip_type,
        "UniPC lower order final": request.uni_pc_lower_order_final,
    }
    return {key: value for key, value in values.items() if value != _UNIPC_DEFAULTS[key]}


def downcast_fields(request: GenerationRequest) -> dict[str, Any]:
    """ "Downcast alphas_cumprod: True" when the option is on (A1111 writes it only then)."""
    return {"Downcast alphas_cumprod": True} if request.downcast_alphas_cumprod else {}

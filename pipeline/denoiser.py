"""A1111's CFG denoiser over a diffusers UNet (A1111-SEMANTICS.md §9.3, §10).

The sampling loops (``pipeline.kdiffusion``, ``pipeline.timestep_samplers``) only see a
denoiser ``(x, σ) -> x0`` or an eps model ``(x, t) -> eps``; everything that makes the
images A1111's lives here: k-diffusion's eps/v scalings with the *continuous* UNet
timestep t(σ), classifier-free guidance over composable (``AND``) prompts, and the call
counter ``k`` that picks the scheduled conditioning of prompt editing and alternation
(§3.4), for the negative prompt too.

One denoiser serves one sampling pass: the counter starts at 0, so the hires pass gets a
fresh one.

SDXL conds are :class:`PooledCond` (tokens and the pooled text vector, scheduled
together); with them ``PromptConds.time_ids`` holds the pass's size ids, and every UNet
call gets both as diffusers' ``added_cond_kwargs``, for cond and uncond alike.

Instruct-pix2pix checkpoints add a third row per image, the negative prompt without the
image, when their Image CFG scale is not 1 (``pipeline.edit_model``).

The rows of a UNet call (the conds expanded to the batch, padded, and joined when cond
and uncond share a call), :class:`UnetCall`, :class:`PooledCond` and running the calls
are in :mod:`pipeline.unet_calls`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import edit_model, samplers
from pipeline.errors import EditModelAndPrompt
from pipeline.prompts import scheduled_at
from pipeline.unet_calls import (  # noqa: F401  (re-exported: conditioning and tests import PooledCond here)
    Cond,
    PooledCond,
    Steps,
    UnetCall,
    _batch_key,
    _drive,
    _expand,
    _Prepared,
    _run_unet,
    _tokens,
)

logger = logging.getLogger(__name__)


# An encoded prompt schedule: ``[(end_at_call, cond), …]`` as ``scheduled_at`` reads it; a
# cond is ``(T, C)`` tokens, or a ``PooledCond`` for SDXL.
Schedule = Sequence[tuple[int, Cond]]
SigmaToTimestep = Callable[[torch.Tensor], torch.Tensor]

# DDIM CFG++ guides with cfg / 12.5 (§9.1).
CFGPP_DIVISOR = 12.5

_LCM_SKIP = 20  # LCM's 50 original timesteps are 19, 39, …, 999


@dataclass(frozen=True)
class PromptConds:
    """A request's conditioning for one pass: the positive prompt's ``AND`` parts with
    their weights, and the negative prompt (never split, §1 step 4)."""

    parts: tuple[tuple[Schedule, float], ...]
    uncond: Schedule
    # SDXL: [original h, w, crop top, left, target h, w] for every UNet call of the pass.
    time_ids: torch.Tensor | None = None
    # the empty prompt's encoding (one 77-token chunk), which "Pad conds" pads with
    empty: Cond | None = None


@dataclass(frozen=True)
class Guidance:
    """A1111's settings that change the CFG denoiser's passes (§7.2, §10).

    ``ngms`` ("Negative Guidance minimum sigma"): on odd calls, or on every call with
    ``ngms_all_steps``, the negative prompt's pass is skipped while the call's noise level
    (σ for k-diffusion samplers, the UNet timestep for the timestep samplers: what the
    denoiser receives) is below it. ``skip_early`` ("Skip Early CFG"): it is skipped on the
    calls ``k`` with ``k / total_steps <= skip_early`` (checked first), where ``total_steps``
    is the pass's sampler steps times the sampler's step multiplier. A skipped pass leaves
    the uncond result equal to the first ``AND`` part's cond result, so guidance is off.

    ``pad_conds`` ("Pad prompt/negative prompt"): cond and uncond of different token lengths
    get the shorter one padded with the empty prompt's encoding, so they share one UNet
    call; ``pad_conds_v0`` (old infotexts' "Pad conds v0", which wins) instead repeats the
    uncond's last vector or cuts the uncond to the cond's length.
    """

    ngms: float = 0.0
    ngms_all_steps: bool = False
    skip_early: float = 0.0
    total_steps: int = 0
    pad_conds: bool = False
    pad_conds_v0: bool = False


def sd_alphas_cumprod(*, downcast: bool = False) -> torch.Tensor:
    """The SD1/SD2/SDXL ᾱ table as A1111 keeps it: β and the product in float64, stored as
    float32; ``downcast`` ("Downcast alphas_cumprod") gives the float16 values (as float32)."""
    return samplers.sd_alphas_cumprod(downcast=downcast).float()


def lcm_sigma_to_timestep(*, downcast: bool = False) -> SigmaToTimestep:
    """t(σ) for LCM: the continuous index τ in LCM's 50-entry σ table, as UNet timestep 20τ + 19.

    The table's own σ's land exactly on the original timesteps (σ of 19, 39, …, 999); σ's
    between them interpolate in log σ like the full table does.
    """
    alphas = samplers.sd_alphas_cumprod(downcast=downcast)
    table = (((1 - alphas) / alphas) ** 0.5)[_LCM_SKIP - 1 :: _LCM_SKIP].log().float()
    on_device: dict[torch.device, torch.Tensor] = {}  # the table where σ's come from, copied once

    def convert(sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = on_device.get(sigma.device)
        if log_sigmas is None:
            log_sigmas = on_device[sigma.device] = table.to(sigma.device)
        log_sigma = sigma.float().log().reshape(-1)
        count = torch.searchsorted(log_sigmas, log_sigma, right=True)
        low = (count - 1).clamp(0, log_sigmas.shape[0] - 2)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        tau = low.float() + w
        return (tau * _LCM_SKIP + (_LCM_SKIP - 1)).reshape(sigma.shape)

    return convert


class CFGDenoiser:
    """Classifier-free guidance as A1111 does it, over a diffusers ``UNet2DConditionModel``.

    ``before_call`` runs before every UNet evaluation (the engine checks for cancellation
    there); ``calls`` is the counter ``k`` of §3.4.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        conds: PromptConds,
        cfg_scale: float,
        *,
        prediction_type: str = "epsilon",
        sigma_to_timestep: SigmaToTimestep = samplers.sigma_to_timestep,
        before_call: Callable[[], None] | None = None,
        image_cond: torch.Tensor | None = None,
        guidance: Guidance | None = None,
        downcast: bool = False,
        image_cfg_scale: float | None = None,
    ) -> None:
        if not conds.parts:
            raise ValueError("the positive prompt needs at least one part")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
        self.unet = unet
        self.conds = conds
        self.cfg_scale = float(cfg_scale)
        self.v_prediction = prediction_type == "v_prediction"
        self.sigma_to_timestep = sigma_to_timestep
        self.before_call = before_call
        # (B, C', H, W) channels an inpainting UNet takes after the latents (A1111's c_concat)
        self.image_cond = image_cond
        # an edit model's Image CFG scale when it is not 1: a third row, the uncond with
        # zeros for the image channels, and A1111's three-way combination
        self.image_cfg_scale = edit_model.three_way_scale(image_cfg_scale)
        if self.image_cfg_scale is not None:
            if image_cond is None:
                raise ValueError("an Image CFG scale needs the image channels (image_cond)")
            if len(conds.parts) > 1:
                raise EditModelAndPrompt()
        self.guidance = guidance if guidance is not None else Guidance()
        if self.guidance.pad_conds and not self.guidance.pad_conds_v0 and conds.empty is None:
            raise ValueError("Pad conds needs the empty prompt's encoding (PromptConds.empty)")
        self.downcast = downcast  # "Downcast alphas_cumprod": the float16 ᾱ for eps conversions
        # infotext fields A1111 adds while sampling: NGMS, Skip Early CFG (when a pass was
        # skipped), Pad conds (when the latest call padded)
        self.infotext_fields: dict[str, Any] = {}
        self.calls = 0
        # What the latest call saw and returned, kept by reference only: a live preview
        # turns it into x0 when one is asked for (``latest_x0``), so steps without a
        # preview pay nothing.
        self._latest: tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | int] | None = None
        self._weights = [float(weight) for _, weight in conds.parts]
        self._prepared: dict[tuple, _Prepared] = {}
        self._alphas: torch.Tensor | None = None
        self._next_level: float | None = None

    def expect_level(self, level: float) -> None:
        """The host value of the next call's noise level (σ, or the UNet timestep), from
        the sampler loop's host copy of its schedule (``SamplingContext.level_hint``): NGMS
        compares it instead of reading the call's tensor back, a wait on the device."""
        self._next_level = level

    def _level(self, value: torch.Tensor) -> Callable[[], float]:
        """The call's noise level for NGMS, read only if NGMS asks for it: the announced
        host value, else the first image's value read back from the tensor."""
        hinted, self._next_level = self._next_level, None
        if hinted is not None:
            return lambda: hinted
        return lambda: float(value[0])

    # -- k-diffusion view ------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Denoised x0 for latents ``x`` (B, C, H, W) at noise levels ``sigma`` (B,)."""
        return _drive(self.x0_steps(x, sigma), self._run_calls, self.before_call)

    def x0_steps(self, x: torch.Tensor, sigma: torch.Tensor) -> Steps:
        """``__call__`` as steps: yields the UNet calls it needs and is sent their outputs
        (how ``BatchedDenoiser`` runs several requests' calls as one)."""
        sigma = _per_image(sigma, x).to(device=x.device, dtype=torch.float32)
        t = self.sigma_to_timestep(sigma).to(x.device)
        c_in = _view(torch.rsqrt(sigma * sigma + 1.0), x)
        cond_out, uncond_out, blank_out = yield from self._evaluate(x * c_in, t, self._level(sigma))
        cond_x0 = self._denoised(x.unsqueeze(1), _view(sigma, x).unsqueeze(1), cond_out)
        uncond_x0 = self._denoised(x, _view(sigma, x), uncond_out)
        blank_x0 = None if blank_out is None else self._denoised(x, _view(sigma, x), blank_out)
        denoised = self._combine(cond_x0, uncond_x0, self.cfg_scale, blank_x0)
        self._latest = ("x0", denoised, x, 0)
        return denoised

    def latest_x0(self) -> torch.Tensor | None:
        """The denoised latents of the latest call (None before the first): k-diffusion
        loops get them from the call itself; for the timestep loops they follow from the
        guided eps at that call's ᾱ."""
        if self._latest is None:
            return None
        kind, out, x, t = self._latest
        if kind == "x0":
            return out
        alpha = self._alphas_at(_per_image(torch.as_tensor(t), x).to(x.device), x)
        return (x - (1 - alpha).sqrt() * out) / alpha.sqrt()

    def _denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """k-diffusion's eps scalings (c_skip 1, c_out −σ), or the v ones with σ_data 1."""
        if not self.v_prediction:
            return x - sigma * out
        scale = sigma * sigma + 1.0
        return x / scale - out * sigma * torch.rsqrt(scale)

    # -- timestep view ---------------------------------------------------------------------

    def eps_at_timestep(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Guided eps for the timestep samplers: ``x`` is at ᾱ scale, ``t`` a UNet timestep."""
        return _drive(self.eps_steps(x, t), self._run_calls, self.before_call)

    def eps_steps(self, x: torch.Tensor, t: torch.Tensor | int) -> Steps:
        cond_eps, uncond_eps, blank_eps = yield from self._eps(x, t)
        eps = self._combine(cond_eps, uncond_eps, self.cfg_scale, blank_eps)
        self._latest = ("eps", eps, x, t)
        return eps

    def eps_cfgpp(self, x: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM CFG++'s pair: eps guided with cfg / 12.5, and the unconditional eps."""
        return _drive(self.eps_cfgpp_steps(x, t), self._run_calls, self.before_call)

    def eps_cfgpp_steps(self, x: torch.Tensor, t: torch.Tensor | int) -> Steps:
        """With the three-way guidance the fully unconditional eps is the blank row's."""
        cond_eps, uncond_eps, blank_eps = yield from self._eps(x, t)
        eps = self._combine(cond_eps, uncond_eps, self.cfg_scale / CFGPP_DIVISOR, blank_eps)
        self._latest = ("eps", eps, x, t)
        return eps, uncond_eps if blank_eps is None else blank_eps

    def _eps(self, x: torch.Tensor, t: torch.Tensor | int) -> Steps:
        t = _per_image(torch.as_tensor(t), x).to(x.device)
        cond_out, uncond_out, blank_out = yield from self._evaluate(x, t, self._level(t))
        if not self.v_prediction:
            return cond_out, uncond_out, blank_out
        # eps = √ᾱ·v + √(1−ᾱ)·x for a v-prediction at ᾱ scale.
        alpha = self._alphas_at(t, x)
        root, root_1m = alpha.sqrt(), (1 - alpha).sqrt()
        cond_eps = root.unsqueeze(1) * cond_out + (root_1m * x).unsqueeze(1)
        blank_eps = None if blank_out is None else root * blank_out + root_1m * x
        return cond_eps, root * uncond_out + root_1m * x, blank_eps

    def _alphas_at(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ᾱ at UNet timesteps ``t``, looked up on the device (the table is copied there once)."""
        if self._alphas is None or self._alphas.device != x.device:
            self._alphas = sd_alphas_cumprod(downcast=self.downcast).to(x.device)
        return _view(self._alphas[t.to(x.device).round().long()], x)

    # -- guidance ----------------------------------------------------------------------------

    def _combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, scale: float, blank: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``uncond + Σ_j (cond_j − uncond)·(w_j·scale)`` per image; ``cond`` is (B, J, …).

        With an edit model's ``blank`` row (the uncond without the image): A1111's
        ``blank + scale·(cond − uncond) + image_cfg·(uncond − blank)``, in its order."""
        result = uncond if blank is None else blank
        for j, weight in enumerate(self._weights):
            result = result + (cond[:, j] - uncond) * (weight * scale)
        if blank is not None:
            result = result + (uncond - blank) * self.image_cfg_scale
        return result

    def _evaluate(self, x_in: torch.Tensor, t: torch.Tensor, level: Callable[[], float]) -> Steps:
        """Raw UNet outputs for call ``k``: conds (B, J, C, H, W), uncond (B, C, H, W) and,
        with the three-way guidance, the blank uncond (B, C, H, W; else None), float32.

        Cond and uncond share one UNet call when their token lengths are equal (§10).
        ``level`` gives the call's σ (or timestep) as NGMS compares it.
        """
        k = self.calls
        self.calls += 1
        batch, parts = x_in.shape[0], len(self._weights)
        prepared = self._prepare(k, batch)
        self._note_padding(prepared.padded)
        dtype = prepared.cond.dtype
        latents = x_in
        if self.image_cond is not None:
            x_in = torch.cat([x_in, self.image_cond.to(x_in)], dim=1)
        x_cond, t_cond = x_in, t
        if parts > 1:
            x_cond, t_cond = x_in.repeat_interleave(parts, 0), t.repeat_interleave(parts)
        if self._skips_uncond(k, level):
            (out,) = yield [UnetCall(x_cond, t_cond, prepared.cond, dtype, prepared.cond_added)]
            cond_out = out.unflatten(0, (batch, parts))
            return cond_out, cond_out[:, 0], None  # the first part's result stands in for the uncond
        x_uncond, t_uncond = x_in, t
        if self.image_cfg_scale is not None:  # the uncond rows twice: with the image, then blank
            assert self.image_cond is not None
            x_uncond = torch.cat([x_in, edit_model.blank_rows(latents, self.image_cond)])
            t_uncond = torch.cat([t, t])
        if prepared.joint is not None:
            x_joint, t_joint = torch.cat([x_cond, x_uncond]), torch.cat([t_cond, t_uncond])
            (out,) = yield [UnetCall(x_joint, t_joint, prepared.joint, dtype, prepared.joint_added)]
            cond_out, uncond_out = out[: batch * parts], out[batch * parts :]
        else:
            cond_out, uncond_out = yield [
                UnetCall(x_cond, t_cond, prepared.cond, dtype, prepared.cond_added),
                UnetCall(x_uncond, t_uncond, prepared.uncond, dtype, prepared.uncond_added),
            ]
        blank_out = None
        if self.image_cfg_scale is not None:
            uncond_out, blank_out = uncond_out[:batch], uncond_out[batch:]
        return cond_out.unflatten(0, (batch, parts)), uncond_out, blank_out

    def _skips_uncond(self, k: int, level: Callable[[], float]) -> bool:
        """Whether call ``k`` skips the negative prompt's pass (Skip Early CFG, then NGMS)."""
        g = self.guidance
        if g.skip_early != 0 and g.total_steps > 0 and k / g.total_steps <= g.skip_early:
            self.infotext_fields["Skip Early CFG"] = g.skip_early
            return True
        three_way = self.image_cfg_scale is not None  # A1111 applies no NGMS to it
        if (k % 2 or g.ngms_all_steps) and g.ngms > 0 and not three_way and level() < g.ngms:
            self.infotext_fields["NGMS"] = g.ngms
            if g.ngms_all_steps:
                self.infotext_fields["NGMS all steps"] = True
            return True
        return False

    def _note_padding(self, padded: str | None) -> None:
        """A1111 reports the padding of the pass's latest call."""
        for flag in ("Pad conds", "Pad conds v0"):
            self.infotext_fields.pop(flag, None)
        if padded is not None:
            self.infotext_fields[padded] = True

    def _run_calls(self, calls: list[UnetCall]) -> list[torch.Tensor]:
        return [_run_unet(self.unet, call) for call in calls]

    def _prepare(self, k: int, batch: int) -> _Prepared:
        chosen = [scheduled_at(schedule, k) for schedule, _ in self.conds.parts]
        uncond = scheduled_at(self.conds.uncond, k)
        key = (*(id(c) for c in chosen), id(uncond), batch)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = _expand(
                chosen, uncond, batch, self.conds.time_ids, padding=self._padding(),
                uncond_rows=batch * (1 if self.image_cfg_scale is None else 2),
            )  # fmt: skip
        return prepared

    def _padding(self) -> tuple[str, torch.Tensor | None] | None:
        if self.guidance.pad_conds_v0:
            return ("Pad conds v0", None)
        if self.guidance.pad_conds:
            assert self.conds.empty is not None
            return ("Pad conds", _tokens(self.conds.empty))
        return None


class BatchedDenoiser:
    """Several requests' denoisers as one batch (micro-batching): latents rows are the
    members' rows in order (``sizes`` each); every member keeps its own conds, CFG scale,
    ``AND`` weights and call counter, and their UNet calls of one evaluation run together,
    one UNet call per embedding shape. Each image is computed as in its solo run; only
    the float rounding of a larger UNet batch can differ.
    """

    def __init__(
        self,
        members: Sequence[CFGDenoiser],
        sizes: Sequence[int],
        *,
        before_call: Callable[[], None] | None = None,
    ) -> None:
        if not members or len(members) != len(sizes):
            raise ValueError("a batch needs one size per member denoiser")
        self.members = list(members)
        self.sizes = [int(size) for size in sizes]
        self.unet = members[0].unet
        self.before_call = before_call

    def expect_level(self, level: float) -> None:
        for member in self.members:
            member.expect_level(level)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigmas = _per_image(sigma, x).split(self.sizes)
        steps = [
            m.x0_steps(part, s) for m, part, s in zip(self.members, x.split(self.sizes), sigmas, strict=True)
        ]
        return torch.cat(self._together(steps))

    def eps_at_timestep(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        ts = _per_image(torch.as_tensor(t), x).split(self.sizes)
        steps = [
            m.eps_steps(part, s) for m, part, s in zip(self.members, x.split(self.sizes), ts, strict=True)
        ]
        return torch.cat(self._together(steps))

    def eps_cfgpp(self, x: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        ts = _per_image(torch.as_tensor(t), x).split(self.sizes)
        parts = zip(self.members, x.split(self.sizes), ts, strict=True)
        pairs = self._together([m.eps_cfgpp_steps(part, s) for m, part, s in parts])
        return torch.cat([eps for eps, _ in pairs]), torch.cat([uncond for _, uncond in pairs])

    def latest_x0(self) -> torch.Tensor | None:
        latest = [member.latest_x0() for member in self.members]
        if any(x0 is None for x0 in latest):
            return None
        return torch.cat(latest)  # type: ignore[arg-type]

    def _together(self, steps: list[Steps]) -> list[Any]:
        """Drive every member's evaluation in lockstep, their UNet calls run together."""
        results: list[Any] = [None] * len(steps)
        pending = {index: next(step) for index, step in enumerate(steps)}
        while pending:
            if self.before_call is not None:
                self.before_call()
            outputs = self._run_calls(list(pending.values()))
            for index, out in zip(list(pending), outputs, strict=True):
                try:
                    pending[index] = steps[index].send(out)
                except StopIteration as done:
                    results[index] = done.value
                    del pending[index]
        return results

    def _run_calls(self, wanted: list[list[UnetCall]]) -> list[list[torch.Tensor]]:
        """Each member's calls, grouped by what can share a UNet batch (embedding shape,
        extra conditioning, dtype) and run one call per group; outputs split back."""
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for member, calls in enumerate(wanted):
            for position, call in enumerate(calls):
                groups.setdefault(_batch_key(call), []).append((member, position))
        outputs: list[list[torch.Tensor]] = [[torch.empty(0)] * len(calls) for calls in wanted]
        for places in groups.values():
            calls = [wanted[m][p] for m, p in places]
            if len(calls) == 1:
                out = _run_unet(self.unet, calls[0])
                pieces = [out]
            else:
                joined = UnetCall(
                    torch.cat([c.x for c in calls]),
                    torch.cat([c.t for c in calls]),
                    torch.cat([c.emb for c in calls]),
                    calls[0].dtype,
                    None if calls[0].added is None else {
                        key: torch.cat([c.added[key] for c in calls])  # type: ignore[index]
                        for key in calls[0].added
                    },
                )  # fmt: skip
                pieces = list(_run_unet(self.unet, joined).split([c.x.shape[0] for c in calls]))
            for (member, position), piece in zip(places, pieces, strict=True):
                outputs[member][position] = piece
        return outputs


def _per_image(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar σ or t broadcast to one value per image."""
    if value.dim() == 0:
        return value.expand(x.shape[0])
    return value.reshape(-1)


def _view(per_image: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting against ``x``."""
    return per_image.reshape(-1, *([1] * (x.dim() - 1)))

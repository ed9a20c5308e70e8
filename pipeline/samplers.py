"""A1111's sampler and schedule tables, name resolution and σ/timestep schedules (§9).

The bot accepts sampler names the way A1111 v1.10.1 does, so an infotext pasted from the
webui reproduces the same image: exact names only, legacy "DPM++ 2M Karras"-style suffixes,
a silent fallback to DPM++ 2M (§9.1). The schedules are computed here, from the noise
table and Schedule type formulas of :mod:`pipeline.noise_schedules`, rather than taken
from diffusers because diffusers' schedulers interpolate σ linearly and compute β in
float32, which is close to A1111 but not equal (§9.2).

Everything is derived from the model's discrete noise table with A1111's default
settings, apart from the schedule's σ min/max/ρ overrides and "Downcast alphas_cumprod"
(``downcast=True``: ᾱ is cast to float16 and the σ table and its logarithms are computed
in float16, as k-diffusion does when A1111 hands it the downcast ᾱ; off by default, set by
pre-v1.7.0-225 infotexts). Not modelled: "old karras sigmas", "Always discard
next-to-last sigma", and quantized k-diffusion timesteps. The sampling loops themselves
live elsewhere; this module only says which σ's and timesteps they visit.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import UnknownSampler, UnknownScheduler

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from pipeline.noise_schedules import _NoiseTable
    from pipeline.request import GenerationRequest

logger = logging.getLogger(__name__)

DEFAULT_SAMPLER = "DPM++ 2M"


def __getattr__(name: str) -> Any:
    """``sd_alphas_cumprod`` of :mod:`pipeline.noise_schedules`, imported when first asked
    for: the tables and name resolution here need no torch, so a bot answers its first
    commands before torch is loaded."""
    if name == "sd_alphas_cumprod":
        from pipeline.noise_schedules import sd_alphas_cumprod

        return sd_alphas_cumprod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Samplers that A1111 drives with integer UNet timesteps instead of a σ schedule (§9.4).
_TIMESTEP_SAMPLERS = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")
_DDIM_LIKE_LOOPS = ("DDIM", "DDIM CFG++")


# --------------------------------------------------------------------------------------
# Registration tables (§9.1)


@dataclass(frozen=True)
class SamplerInfo:
    """One A1111 sampler as registered: its name, aliases and option flags."""

    name: str
    aliases: tuple[str, ...]
    default_scheduler: str | None
    second_order: bool
    uses_ensd: bool
    discard_penultimate_sigma: bool
    brownian_noise: bool
    solver_type: str | None

    @property
    def total_steps_multiplier(self) -> int:
        """Factor on the prompt-schedule step count: 2nd-order samplers call the UNet twice per step."""
        return 2 if self.second_order else 1


@dataclass(frozen=True)
class SchedulerInfo:
    """One "Schedule type": internal name, UI/infotext label, suffix aliases and default ρ."""

    name: str
    label: str
    aliases: tuple[str, ...]
    default_rho: float | None


def _sampler(
    name: str,
    aliases: tuple[str, ...],
    scheduler: str | None = None,
    *,
    second_order: bool = False,
    uses_ensd: bool = False,
    discard: bool = False,
    brownian: bool = False,
    solver_type: str | None = None,
) -> SamplerInfo:
    """Absent options are false/None, as in A1111's registration dicts."""
    return SamplerInfo(
        name=name,
        aliases=aliases,
        default_scheduler=scheduler,
        second_order=second_order,
        uses_ensd=uses_ensd,
        discard_penultimate_sigma=discard,
        brownian_noise=brownian,
        solver_type=solver_type,
    )


# UI order: the 15 k-diffusion samplers, the 4 timestep samplers, then LCM.
_SAMPLERS: tuple[SamplerInfo, ...] = (
    _sampler("DPM++ 2M", ("k_dpmpp_2m",), "karras"),
    _sampler("DPM++ SDE", ("k_dpmpp_sde",), "karras", second_order=True, brownian=True),
    _sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "exponential", brownian=True),
    _sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "exponential", brownian=True, solver_type="heun"),
    _sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), "karras", second_order=True, uses_ensd=True),
    _sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "exponential", discard=True, brownian=True),
    _sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
    _sampler("Euler", ("k_euler",)),
    _sampler("LMS", ("k_lms",)),
    _sampler("Heun", ("k_heun",), second_order=True),
    _sampler("DPM2", ("k_dpm_2",), "karras", second_order=True, discard=True),
    _sampler("DPM2 a", ("k_dpm_2_a",), "karras", second_order=True, uses_ensd=True, discard=True),
    _sampler("DPM fast", ("k_dpm_fast",), uses_ensd=True),
    _sampler("DPM adaptive", ("k_dpm_ad",), uses_ensd=True),
    _sampler("Restart", ("restart",), "karras", second_order=True),
    _sampler("DDIM", ("ddim",)),
    _sampler("DDIM CFG++", ("ddim_cfgpp",)),
    _sampler("PLMS", ("plms",)),
    _sampler("UniPC", ("unipc",)),
    _sampler("LCM", ("k_lcm",)),
)

# List order matters: it is also the order of the legacy-suffix scan in `resolve`.
_SCHEDULERS: tuple[SchedulerInfo, ...] = (
    SchedulerInfo("automatic", "Automatic", (), None),
    SchedulerInfo("uniform", "Uniform", (), None),
    SchedulerInfo("karras", "Karras", (), 7.0),
    SchedulerInfo("exponential", "Exponential", (), None),
    SchedulerInfo("polyexponential", "Polyexponential", (), 1.0),
    SchedulerInfo("sgm_uniform", "SGM Uniform", ("SGMUniform",), None),
    SchedulerInfo("kl_optimal", "KL Optimal", (), None),
    SchedulerInfo("align_your_steps", "Align Your Steps", (), None),
    SchedulerInfo("simple", "Simple", (), None),
    SchedulerInfo("normal", "Normal", (), None),
    SchedulerInfo("ddim", "DDIM", (), None),
    SchedulerInfo("beta", "Beta", (), None),
)

_AUTOMATIC = _SCHEDULERS[0]
_SAMPLERS_BY_NAME = {s.name: s for s in _SAMPLERS}
_SCHEDULERS_BY_NAME = {s.name: s for s in _SCHEDULERS}
_SCHEDULERS_BY_LABEL = {s.label: s for s in _SCHEDULERS}
# A1111's explicit "Schedule type" lookup: internal names and labels, never aliases.
_SCHEDULERS_BY_KEY = {**_SCHEDULERS_BY_NAME, **_SCHEDULERS_BY_LABEL}


def list_samplers() -> list[SamplerInfo]:
    """A1111's 20 samplers in UI order; the first is the default and the fallback."""
    return list(_SAMPLERS)


def list_schedulers() -> list[SchedulerInfo]:
    """A1111's 12 schedule types in list order (also the legacy-suffix scan order)."""
    return list(_SCHEDULERS)


def get_sampler(name: str) -> SamplerInfo:
    """A lenient lookup: an exact sampler name, or a name/alias in any case.

    Accepting aliases and other cases mirrors A1111's lenient lookups (X/Y/Z, "Prompts
    from file"); it is for reading what a user typed (:func:`select_sampler`). Generation
    takes canonical names only (:func:`exact_selection`). Anything else raises
    :class:`~pipeline.errors.UnknownSampler` rather than silently running another sampler.
    """
    if isinstance(name, str):
        found = _SAMPLERS_BY_NAME.get(name)
        if found is not None:
            return found
        lowered = name.lower()
        for info in _SAMPLERS:
            if lowered == info.name.lower() or lowered in info.aliases:
                return info
    raise UnknownSampler(str(name), [s.name for s in _SAMPLERS])


# --------------------------------------------------------------------------------------
# Name resolution (§9.1)


def _cut_legacy_suffixes(name: str) -> tuple[str, SchedulerInfo | None]:
    """Strip "<sampler> <schedule>" suffixes the way pre-v1.9 names are read.

    Each scheduler gets one chance, in list order, to cut its label, internal name or an
    alias off the end; the last scheduler that cut wins. That order is why
    "Euler SGM Uniform" loses " Uniform" first and ends up unknown.
    """
    found: SchedulerInfo | None = None
    for scheduler in _SCHEDULERS:
        for option in (scheduler.label, scheduler.name, *scheduler.aliases):
            suffix = " " + option
            if name.endswith(suffix):
                found = scheduler
                name = name[: -len(suffix)]
                break
    return name, found


def _explicit_scheduler(scheduler: object) -> SchedulerInfo:
    """An explicit Schedule type: label or internal name, anything else means Automatic."""
    if isinstance(scheduler, str):
        return _SCHEDULERS_BY_KEY.get(scheduler, _AUTOMATIC)
    return _AUTOMATIC


def _resolve_infos(sampler_name: object, scheduler: object) -> tuple[SamplerInfo, SchedulerInfo]:
    """Sampler and requested scheduler as generation sees them (Automatic left unexpanded)."""
    chosen = _explicit_scheduler(scheduler)
    exact = _SAMPLERS_BY_NAME.get(sampler_name) if isinstance(sampler_name, str) else None
    if exact is not None:
        return exact, chosen  # no canonical name ends in a schedule suffix: nothing to cut
    name = sampler_name if isinstance(sampler_name, str) and sampler_name else DEFAULT_SAMPLER
    base, cut = _cut_legacy_suffixes(name)
    if cut is not None:
        chosen = cut
    info = _SAMPLERS_BY_NAME.get(base)
    if info is None:
        logger.debug("unknown sampler %r: using %s", sampler_name, DEFAULT_SAMPLER)
        info = _SAMPLERS_BY_NAME[DEFAULT_SAMPLER]
    return info, chosen


def resolve(
    sampler_name: str | None, scheduler: str | None = None, *, convert_automatic: bool = False
) -> tuple[str, str]:
    """``(sampler name, scheduler label)`` by A1111's rules; never raises.

    ``convert_automatic=True`` is what pasting an infotext does: a schedule equal to the
    sampler's own default is shown as "Automatic" so the UI stays on the default.
    """
    info, chosen = _resolve_infos(sampler_name, scheduler)
    if convert_automatic and info.default_scheduler == chosen.name:
        chosen = _AUTOMATIC
    return info.name, chosen.label


def effective_scheduler(sampler_name: str | None, scheduler: str | None = None) -> SchedulerInfo:
    """The schedule generation actually computes: Automatic expanded to the sampler's default.

    Returns the Automatic entry only when the sampler has no default, i.e. when the
    k-diffusion default schedule is used (and no "Schedule type" is written). Never raises.
    """
    return _expand_automatic(*_resolve_infos(sampler_name, scheduler))


def sampler_names() -> list[str]:
    return [info.name for info in _SAMPLERS]


@dataclass(frozen=True)
class SamplerSelection:
    """A request's sampler as generation uses it.

    ``schedule`` is the Schedule type as requested (after a legacy name suffix such as
    " Karras" is applied), what the infotext shows; ``effective_schedule`` is the one that
    runs, "Automatic" expanded to the sampler's default (DPM++ 2M -> Karras).
    """

    name: str
    schedule: str
    effective_schedule: str


def select_sampler(sampler_name: str, scheduler: str = "Automatic") -> SamplerSelection:
    """Accept an A1111 sampler name or alias in any case, or a legacy name with a schedule
    suffix ("DPM++ 2M Karras").

    A1111 silently runs DPM++ 2M for a name it does not know; a bot should say so instead,
    hence ``UnknownSampler`` listing the real names.
    """
    try:
        lookup = get_sampler(sampler_name).name
    except UnknownSampler:
        resolved, _label = resolve(sampler_name, scheduler)
        if not sampler_name.startswith(resolved + " "):
            raise UnknownSampler(sampler_name, sampler_names()) from None
        lookup = sampler_name
    name, schedule = resolve(lookup, scheduler)
    effective = effective_scheduler(lookup, scheduler).label
    return SamplerSelection(name=name, schedule=schedule, effective_schedule=effective)


def exact_selection(sampler_name: str, scheduler: str = "Automatic") -> SamplerSelection:
    """The engine's lookup: a canonical sampler name and Schedule type label, as
    :func:`select_sampler` returns them and a stored request holds them; two dict lookups,
    nothing lenient (no aliases, no other case, no legacy suffix). Its input can be a
    stored row or a request from elsewhere, so anything else is refused:
    ``UnknownSampler`` / ``UnknownScheduler`` listing the names there are."""
    info = _SAMPLERS_BY_NAME.get(sampler_name) if isinstance(sampler_name, str) else None
    if info is None:
        raise UnknownSampler(str(sampler_name), sampler_names())
    chosen = _SCHEDULERS_BY_LABEL.get(scheduler) if isinstance(scheduler, str) else None
    if chosen is None:
        raise UnknownScheduler(str(scheduler), list(_SCHEDULERS_BY_LABEL))
    return SamplerSelection(info.name, chosen.label, _expand_automatic(info, chosen).label)


def exact_info(sampler_name: str) -> SamplerInfo:
    """The registration of a canonical sampler name (``UnknownSampler`` for anything else)."""
    info = _SAMPLERS_BY_NAME.get(sampler_name)
    if info is None:
        raise UnknownSampler(str(sampler_name), sampler_names())
    return info


def read_schedule(text: str) -> str | None:
    """A Schedule type as a user may write it (label, internal name or alias, any case) as
    its label; None when it names none."""
    folded = text.strip().casefold()
    for info in _SCHEDULERS:
        if folded in (info.label.casefold(), info.name.casefold(), *(a.casefold() for a in info.aliases)):
            return info.label
    return None


def canonical_names(sampler_name: str, scheduler: str) -> tuple[str, str]:
    """A stored pair as /draw stores it now (:func:`select_sampler`'s name and schedule):
    canonical names as they are (two dict lookups), an older row's alias, other case or
    legacy name ("k_euler_a", "euler a", "DPM++ 2M Karras") read the lenient way. What
    cannot be read is returned unchanged, for the engine to refuse."""
    if sampler_name in _SAMPLERS_BY_NAME and scheduler in _SCHEDULERS_BY_LABEL:
        return sampler_name, scheduler
    label = read_schedule(str(scheduler)) or scheduler
    try:
        selection = select_sampler(str(sampler_name).strip(), label)
    except UnknownSampler:
        return sampler_name, label
    return selection.name, selection.schedule


def with_canonical_names(request: GenerationRequest) -> GenerationRequest:
    """``request`` with :func:`canonical_names` for its sampler and hires sampler: the
    request itself when it already has them (every row /draw stores)."""
    fields: dict[str, Any] = {}
    fields["sampler_name"], fields["scheduler"] = canonical_names(request.sampler_name, request.scheduler)
    hr_schedule = request.hr_scheduler
    if request.hr_sampler_name:
        fields["hr_sampler_name"], hr_schedule = canonical_names(
            request.hr_sampler_name, hr_schedule or "Automatic"
        )
        if request.hr_scheduler is None and hr_schedule == "Automatic":
            hr_schedule = None  # "the first pass's schedule" stays that
    elif hr_schedule:
        hr_schedule = read_schedule(hr_schedule) or hr_schedule
    fields["hr_scheduler"] = hr_schedule
    changes = {name: value for name, value in fields.items() if getattr(request, name) != value}
    return request.replace(**changes) if changes else request


def _expand_automatic(info: SamplerInfo, chosen: SchedulerInfo) -> SchedulerInfo:
    if chosen is _AUTOMATIC and info.default_scheduler is not None:
        return _SCHEDULERS_BY_NAME[info.default_scheduler]
    return chosen


def ensd_in_infotext(sampler_name: str, eta: float | None = None) -> bool:
    """Whether a non-zero ENSD is written (§8.5): ``uses_ensd`` and an effective eta ≠ 0.

    The flag is not the same as "ENSD changes the image" (Restart, LCM, DDIM with eta are
    affected but never show it); the infotext only follows the flag.
    """
    info, _ = _resolve_infos(sampler_name, None)
    if eta is None:
        eta = _default_eta(info)
    if eta == 0:
        return False
    return info.uses_ensd


def _default_eta(info: SamplerInfo) -> float:
    """The eta settings' defaults: "Eta for DDIM" 0, "Eta for k-diffusion samplers" 1."""
    return 0.0 if info.name in _TIMESTEP_SAMPLERS else 1.0


# --------------------------------------------------------------------------------------
# The model's discrete noise table (§9.2, §9.3)


def _table_for(info: SamplerInfo, downcast: bool = False) -> _NoiseTable:
    from pipeline.noise_schedules import _lcm_table, _sd_table

    return _lcm_table(downcast) if info.name == "LCM" else _sd_table(downcast)


def model_sigma_range(sampler: str, *, downcast: bool = False) -> tuple[float, float]:
    """(σ_min, σ_max) of the model's noise table as the sampler sees it (the table's ends)."""
    info, _ = _resolve_infos(sampler, "Automatic")
    table = _table_for(info, downcast)
    return table.sigma_min, table.sigma_max


def sigma_to_timestep(sigmas: torch.Tensor, *, downcast: bool = False) -> torch.Tensor:
    """The continuous UNet timestep t(σ) of the SD table, elementwise (§9.3).

    Fractional, because k-diffusion samplers visit σ's between the training timesteps.
    t(σ_max) = 999, t(σ_min) = 0, and σ's outside the table clamp to those ends (σ = 0 → 0).
    ``downcast``: the table of "Downcast alphas_cumprod". The lookup runs on σ's device.
    """
    import torch

    from pipeline.noise_schedules import _sd_table

    sigmas = torch.as_tensor(sigmas)
    return _sd_table(downcast).to(sigmas.device).sigma_to_t(sigmas)


def sigma_to_timestep_on(
    device: str | torch.device, *, downcast: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`sigma_to_timestep` for σ's on ``device``, the table copied there once: every
    lookup then stays on the device, with no copy either way (a denoiser makes one per call)."""
    from pipeline.noise_schedules import _sd_table

    return _sd_table(downcast).to(device).sigma_to_t


# --------------------------------------------------------------------------------------
# Schedules (§9.2)


@dataclass
class SigmaSchedule:
    """The σ's a k-diffusion sampler visits, and the infotext fields choosing them adds."""

    sigmas: torch.Tensor
    infotext_fields: dict[str, Any] = field(default_factory=dict)


def _check_steps(steps: int) -> int:
    value = operator.index(steps)
    if value < 1:
        raise ValueError(f"steps must be >= 1, got {value}")
    return value


def sigma_schedule(
    sampler: str,
    scheduler: str,
    steps: int,
    *,
    sdxl: bool = False,
    sigma_min: float = 0.0,
    sigma_max: float = 0.0,
    rho: float = 0.0,
    downcast: bool = False,
) -> SigmaSchedule:
    """A1111's ``get_sigmas`` for one sampler and Schedule type.

    ``sigma_min``, ``sigma_max`` and ``rho`` are the settings "Schedule min sigma", "Schedule
    max sigma" and "Schedule rho" (0 = the model's σ range, the scheduler's own ρ). As in
    A1111 they only reach an explicit scheduler (not Automatic on a sampler without a
    default), a value equal to the model's end is not an override, ρ only reaches Karras
    and Polyexponential, and each applied override adds its infotext field.

    Names resolve as in generation (:func:`resolve`), so unknown text means Automatic and
    an unknown sampler means DPM++ 2M. ``downcast`` is "Downcast alphas_cumprod" (the
    model's σ table from a float16 ᾱ; the schedule stays float32). Discarding samplers get the schedule for
    ``steps + 1`` with the next-to-last σ removed. The timestep samplers (DDIM, PLMS, …)
    never ask A1111 for σ's; for them this is the schedule of a sampler with no default.
    Raises ``ValueError`` for ``steps < 1`` (``TypeError`` if it is not an integer).
    """
    import torch

    from pipeline.noise_schedules import (
        _BETA_DIST_ALPHA,
        _BETA_DIST_BETA,
        _SCHEDULE_FUNCTIONS,
        _ScheduleInput,
    )

    steps = _check_steps(steps)
    info, requested = _resolve_infos(sampler, scheduler)
    chosen = _expand_automatic(info, requested)
    n = steps + 1 if info.discard_penultimate_sigma else steps
    table = _table_for(info, downcast)
    fields: dict[str, Any] = {}
    if chosen is _AUTOMATIC:
        sigmas = table.default_sigmas(n)
    else:
        fields["Schedule type"] = chosen.label
        lo, hi = table.sigma_min, table.sigma_max
        if sigma_min != 0 and sigma_min != lo:
            lo = fields["Schedule min sigma"] = sigma_min
        if sigma_max != 0 and sigma_max != hi:
            hi = fields["Schedule max sigma"] = sigma_max
        schedule_args: dict[str, float] = {}
        if chosen.default_rho is not None and rho != 0 and rho != chosen.default_rho:
            schedule_args["rho"] = fields["Schedule rho"] = rho
        if chosen.name == "beta":
            fields["Beta schedule alpha"] = _BETA_DIST_ALPHA
            fields["Beta schedule beta"] = _BETA_DIST_BETA
        inputs = _ScheduleInput(n, table, lo, hi, bool(sdxl))
        sigmas = _SCHEDULE_FUNCTIONS[chosen.name](inputs, **schedule_args).float()
    if info.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return SigmaSchedule(sigmas=sigmas, infotext_fields=fields)


# --------------------------------------------------------------------------------------
# Timestep samplers (§9.4)


def _timestep_sampler(sampler: str, allowed: tuple[str, ...]) -> str:
    if sampler not in allowed:
        raise ValueError(f"{sampler!r} is not one of the timestep samplers {', '.join(allowed)}")
    return sampler


def timesteps(sampler: str, steps: int) -> list[int]:
    """Ascending UNet timesteps of DDIM, DDIM CFG++, PLMS and UniPC.

    Spacing ``1000 // steps`` from 1, so there are more than ``steps`` of them when 1000 is
    not divisible (30 → 31); at 501+ steps the last one is clipped to 999 and repeats.
    Raises ``ValueError`` for other samplers and for ``steps`` outside 1 … 1000 (A1111's
    spacing is 0 above 1000).
    """
    from pipeline.noise_schedules import _TRAIN_TIMESTEPS

    _timestep_sampler(sampler, _TIMESTEP_SAMPLERS)
    steps = _check_steps(steps)
    stride = _TRAIN_TIMESTEPS // steps
    if stride == 0:
        raise ValueError(f"steps must be <= {_TRAIN_TIMESTEPS} for {sampler}, got {steps}")
    return [min(t + 1, _TRAIN_TIMESTEPS - 1) for t in range(0, _TRAIN_TIMESTEPS, stride)]


def unet_call_timesteps(sampler: str, steps: int) -> list[int]:
    """The timestep of every UNet call of A1111's DDIM, DDIM CFG++ and PLMS loops, in order.

    The loops stop above the lowest timestep, which only serves as the last update's
    target: DDIM makes ``len(timesteps) - 1`` calls. PLMS adds one call in its first
    iteration, at the next lower timestep. UniPC picks its own times → ``ValueError``.
    """
    _timestep_sampler(sampler, ("DDIM", "DDIM CFG++", "PLMS"))
    ts = timesteps(sampler, steps)
    descending = ts[:0:-1]
    if sampler in _DDIM_LIKE_LOOPS or not descending:
        return descending
    return [descending[0], ts[-2], *descending[1:]]

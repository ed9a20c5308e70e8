"""From /draw options to a validated ``DrawRequest``, and back (for rerolls and re-runs).

The order of DESIGN.md §2: defaults fill the draft, ``modify_request`` hooks edit it, and
only then is it frozen and range-checked, so a style cannot smuggle in a value the
limits forbid.
"""

from __future__ import annotations

import difflib
import random
from typing import Any

from bot.errors import OptionValueError, UserError
from bot.i18n import Msg
from bot.options import MAX_SEED, check_prompt_length
from bot.scoped_names import split_names
from bot.settings import Settings
from bot.types import Actor, DrawRequest, RequestDraft
from pipeline.request import GenerationRequest

A1111_RANDOM_SEED_LIMIT = 4294967294  # random.randrange bound A1111 uses for seed -1


def random_seed() -> int:
    return random.randrange(A1111_RANDOM_SEED_LIMIT)


def new_draft(
    prompt: str, options: dict[str, Any], settings: Settings, parent_id: str | None = None
) -> RequestDraft:
    """The draft with config defaults under the user's options."""
    filled = default_options(settings)
    filled.update(options)
    negative = filled.pop("negative", None)
    return RequestDraft(
        prompt=prompt,
        negative_prompt=settings.defaults.negative_prompt if negative is None else negative,
        options=filled,
        parent_id=parent_id,
    )


def default_options(settings: Settings) -> dict[str, Any]:
    """/draw's options before the user's: ``[defaults]`` and the default checkpoint."""
    d = settings.defaults
    return {
        "negative": d.negative_prompt, "steps": d.steps, "cfg": d.cfg_scale, "size": (d.width, d.height),
        "image-cfg": d.image_cfg_scale, "seed": -1, "subseed": -1, "subseed-strength": 0.0,
        "sampler": d.sampler, "scheduler": d.scheduler,
        "batch": d.batch_size, "count": d.count, "checkpoint": settings.engine.default_checkpoint, "vae": None,
        "clip-skip": d.clip_skip, "rng": d.rng, "ensd": d.ensd, "eta": None, "seed-resize-from": (0, 0),
        "denoise": None, "hires": False, "hr-scale": 2.0, "hr-steps": 0, "hr-upscaler": "Latent",
        "hr-resize": (0, 0), "hr-prompt": "", "hr-negative": "", "hr-sampler": None, "hr-scheduler": None,
        "init-image": None, "s-churn": d.s_churn, "s-tmin": d.s_tmin, "s-tmax": d.s_tmax, "s-noise": d.s_noise,
        "schedule-sigma-min": d.schedule_sigma_min, "schedule-sigma-max": d.schedule_sigma_max,
        "schedule-rho": d.schedule_rho, "noise-multiplier": d.noise_multiplier, "extra-noise": d.extra_noise,
        "unipc-variant": d.uni_pc_variant, "unipc-order": d.uni_pc_order, "unipc-skip-type": d.uni_pc_skip_type,
        "ngms": d.s_min_uncond, "ngms-all-steps": d.s_min_uncond_all, "skip-early-cfg": d.skip_early_cond,
        "pad-conds": d.pad_cond_uncond, "pad-conds-v0": d.pad_cond_uncond_v0,
        "downcast-alphas-cumprod": d.downcast_alphas_cumprod,
        "unipc-lower-order-final": str(d.uni_pc_lower_order_final),
    }  # fmt: skip


def join_parts(base: str, parts: list[tuple[int, str]]) -> str:
    texts = [base] if base else []
    texts += [text for _, text in sorted(parts, key=lambda part: part[0]) if text]
    return ", ".join(texts)


def lora_tags(names: str | None) -> list[tuple[int, str]]:
    """``--lora a, b:0.6``: A1111's ``<lora:a>`` and ``<lora:b:0.6>`` tags, added after the
    prompt (the weight is 1 unless given), so the infotext shows them as A1111 would."""
    return [(0, f"<lora:{name}>") for name in split_names(names or "")]


def freezes_from_memory(draft: RequestDraft, library: Any) -> bool:
    """Whether ``freeze`` reads no file and waits on no lock, so that it may run on the
    event loop: no VAE or network to find in the models folder, and the checkpoint known
    to the library with its hashes (``answers_from_memory``)."""
    opts = draft.options
    if opts.get("vae") or opts.get("lora"):
        return False
    texts = (draft.prompt, opts.get("hr-prompt") or "", *(text for _, text in draft.prompt_parts))
    if any("<" in text for text in texts):
        return False
    answers = getattr(library, "answers_from_memory", None)
    return answers is not None and answers(opts["checkpoint"])


def freeze(draft: RequestDraft, actor: Actor, settings: Settings, library: Any) -> DrawRequest:
    """Validate the draft and resolve everything (seeds, sampler, checkpoint) into a request."""
    limits = settings.limits
    opts = draft.options
    prompt = join_parts(draft.prompt, draft.prompt_parts + lora_tags(opts.get("lora")))
    negative = join_parts(draft.negative_prompt, draft.negative_parts)
    check_prompt_length("prompt", prompt, limits)
    check_prompt_length("negative prompt", negative, limits)
    _check_prompt_syntax(prompt)
    _check_prompt_syntax(negative)
    width, height = opts["size"]
    batch, count = opts["batch"], opts["count"]
    seed = opts["seed"] if opts["seed"] != -1 else random_seed()
    subseed = opts["subseed"] if opts["subseed"] != -1 else random_seed()
    images = batch * count
    for name, value in (("seed", seed), ("subseed", subseed)):
        if value + images - 1 > MAX_SEED:
            raise OptionValueError("error.seed_range", name=name, value=value, max=MAX_SEED - images + 1)
    sampler, scheduler = resolve_sampler(opts["sampler"], opts["scheduler"])
    checkpoint = resolve_checkpoint(library, opts["checkpoint"])
    if _is_edit_model(library, checkpoint):
        _check_edit_request(checkpoint, prompt, opts)
    vae = resolve_vae(library, opts["vae"])
    network_files = check_networks(library, prompt, opts["hr-prompt"])
    hr_sampler = hr_scheduler = None
    if opts["hr-sampler"]:
        hr_sampler, hr_scheduler = resolve_sampler(opts["hr-sampler"], opts["hr-scheduler"] or "Automatic")
    elif opts["hr-scheduler"]:
        hr_scheduler = resolve_scheduler(opts["hr-scheduler"])
    if opts["hires"]:
        if opts["init-image"]:
            raise OptionValueError("error.hires_img2img")
        if opts["denoise"] == 0:
            raise OptionValueError("error.out_of_range", name="denoise", value=0, min=0.01, max=1)
        _check_hires_size(width, height, opts, limits)
    denoise = opts["denoise"]
    if denoise is None and (opts["hires"] or opts["init-image"]):
        denoise = 0.7 if opts["hires"] else 0.75  # A1111's defaults for hires fix and img2img
    resize_w, resize_h = opts["seed-resize-from"]
    hr_x, hr_y = opts["hr-resize"]
    generation = GenerationRequest(
        prompt=prompt, negative_prompt=negative, num_inference_steps=opts["steps"], guidance_scale=opts["cfg"],
        image_cfg_scale=opts["image-cfg"], width=width, height=height, seed=seed, subseed=subseed,
        subseed_strength=float(opts["subseed-strength"]),
        num_images_per_prompt=batch, sampler_name=sampler, scheduler=scheduler, checkpoint=checkpoint, vae=vae,
        clip_skip=opts["clip-skip"], rng=opts["rng"], ensd=opts["ensd"],
        eta=_eta(opts["eta"], sampler, settings),
        **{field: float(opts[name]) for name, field in SAMPLER_SETTING_OPTIONS},
        **{field: opts[name] for name, field in UNIPC_OPTIONS},
        **{field: convert(opts[name]) for name, field, convert in GUIDANCE_OPTIONS},
        uni_pc_lower_order_final=opts["unipc-lower-order-final"] == "True",
        seed_resize_from_w=resize_w, seed_resize_from_h=resize_h, init_image=opts["init-image"],
        denoising_strength=None if denoise is None else float(denoise), enable_hr=bool(opts["hires"]),
        hr_scale=float(opts["hr-scale"]), hr_upscaler=opts["hr-upscaler"], hr_second_pass_steps=opts["hr-steps"],
        hr_resize_x=hr_x, hr_resize_y=hr_y, hr_prompt=opts["hr-prompt"], hr_negative_prompt=opts["hr-negative"],
        hr_sampler_name=hr_sampler, hr_scheduler=hr_scheduler,
        styles=tuple(draft.styles), negative_presets=tuple(draft.negative_presets), network_files=network_files,
    )  # fmt: skip
    extra = {k: v for k, v in opts.items() if k not in _OPTION_FIELDS}
    return DrawRequest(
        generation=generation, count=count, actor=actor, options=extra, parent_id=draft.parent_id
    )


def options_from_request(request: GenerationRequest, count: int = 1) -> dict[str, Any]:
    """The options that rebuild ``request`` through /draw (rerolls, infotext re-runs)."""
    return {
        "negative": request.negative_prompt, "steps": request.num_inference_steps, "cfg": request.guidance_scale,
        "image-cfg": request.image_cfg_scale, "size": (request.width, request.height), "seed": request.seed,
        "subseed": request.subseed,
        "subseed-strength": request.subseed_strength, "sampler": request.sampler_name,
        "scheduler": request.scheduler, "batch": request.num_images_per_prompt, "count": count,
        "checkpoint": request.checkpoint, "vae": request.vae, "clip-skip": request.clip_skip, "rng": request.rng, "ensd": request.ensd,
        "eta": request.eta, "seed-resize-from": (request.seed_resize_from_w, request.seed_resize_from_h),
        "denoise": request.denoising_strength, "hires": request.enable_hr, "hr-scale": request.hr_scale,
        "hr-steps": request.hr_second_pass_steps, "hr-upscaler": request.hr_upscaler,
        "hr-resize": (request.hr_resize_x, request.hr_resize_y), "hr-prompt": request.hr_prompt,
        "hr-negative": request.hr_negative_prompt, "hr-sampler": request.hr_sampler_name,
        "hr-scheduler": request.hr_scheduler, "init-image": request.init_image,
        **{name: getattr(request, field) for name, field in SAMPLER_SETTING_OPTIONS},
        **{name: getattr(request, field) for name, field in UNIPC_OPTIONS},
        **{name: getattr(request, field) for name, field, _ in GUIDANCE_OPTIONS},
        "unipc-lower-order-final": str(request.uni_pc_lower_order_final),
    }  # fmt: skip


# /draw options of A1111's sampler settings -> GenerationRequest fields
SAMPLER_SETTING_OPTIONS = (
    ("s-churn", "s_churn"),
    ("s-tmin", "s_tmin"),
    ("s-tmax", "s_tmax"),
    ("s-noise", "s_noise"),
    ("schedule-sigma-min", "schedule_sigma_min"),
    ("schedule-sigma-max", "schedule_sigma_max"),
    ("schedule-rho", "schedule_rho"),
    ("noise-multiplier", "noise_multiplier"),
    ("extra-noise", "extra_noise"),
)
# /draw options of A1111's UniPC settings (kept as typed: str, int, bool)
UNIPC_OPTIONS = (
    ("unipc-variant", "uni_pc_variant"),
    ("unipc-order", "uni_pc_order"),
    ("unipc-skip-type", "uni_pc_skip_type"),
)


# /draw options of A1111's CFG denoiser and noise-table settings -> GenerationRequest fields
GUIDANCE_OPTIONS = (
    ("ngms", "s_min_uncond", float),
    ("ngms-all-steps", "s_min_uncond_all", bool),
    ("skip-early-cfg", "skip_early_cond", float),
    ("pad-conds", "pad_cond_uncond", bool),
    ("pad-conds-v0", "pad_cond_uncond_v0", bool),
    ("downcast-alphas-cumprod", "downcast_alphas_cumprod", bool),
)


# options that become GenerationRequest fields; the rest stay in DrawRequest.options for plugins
_OPTION_FIELDS = frozenset(options_from_request(GenerationRequest(prompt="", seed=0))) - {"negative"}


def _eta(value: Any, sampler: str, settings: Settings) -> float | None:
    """The request's eta: the option, else the [defaults] setting for the sampler's kind
    ("Eta for DDIM" / "Eta for k-diffusion samplers"); None where that is A1111's default."""
    if value is not None:
        return float(value)
    d = settings.defaults
    setting, a1111_default = (
        (d.eta_ddim, 0.0) if sampler in ("DDIM", "DDIM CFG++") else (d.eta_ancestral, 1.0)
    )
    return None if setting == a1111_default else float(setting)


def _check_hires_size(width: int, height: int, opts: dict[str, Any], limits: Any) -> None:
    """The second pass's size (A1111 §9.6: resize values win over the scale) within the limits."""
    rx, ry = opts["hr-resize"]
    if rx and ry:
        target = (rx, ry)
    elif rx or ry:
        target = (rx, round(rx * height / width)) if rx else (round(ry * width / height), ry)
    else:
        target = (int(width * opts["hr-scale"]), int(height * opts["hr-scale"]))
    if max(target) > limits.max_size or target[0] * target[1] > limits.max_hires_pixels:
        raise OptionValueError(
            "error.hires_too_large", width=target[0], height=target[1], max_size=limits.max_size,
            max_pixels=limits.max_hires_pixels,
        )  # fmt: skip


def resolve_sampler(name: str, scheduler: str) -> tuple[str, str]:
    """A sampler by name or alias (any case), or a legacy "<sampler> <schedule>" name, as
    its canonical name and Schedule type label: the request stores those, and the engine
    takes them as they are (``pipeline.samplers.exact_selection``), without reading them again.

    Unlike A1111's silent fallback to DPM++ 2M, the bot refuses a name it does not know:
    a typo should not quietly change the picture.
    """
    from pipeline import samplers

    try:
        selection = samplers.select_sampler(name.strip(), resolve_scheduler(scheduler))
    except samplers.UnknownSampler as exc:
        raise UserError(exc.key, **{**exc.params, "suggestion": sampler_suggestion(name)}) from None
    return selection.name, selection.schedule


def sampler_suggestion(name: str) -> Msg | str:
    """ "Did you mean ...?" with the closest sampler name (``euler_a`` -> Euler a), or ""."""
    from pipeline import samplers

    def folded(text: str) -> str:
        return " ".join(text.replace("_", " ").replace("-", " ").casefold().split())

    names = {folded(s.name): s.name for s in samplers.list_samplers()}
    for info in samplers.list_samplers():
        for alias in getattr(info, "aliases", ()):
            names.setdefault(folded(alias), info.name)
    close = difflib.get_close_matches(folded(name), list(names), n=1, cutoff=0.6)
    return Msg("error.did_you_mean", {"match": names[close[0]]}) if close else ""


def resolve_scheduler(name: str) -> str:
    from pipeline import samplers

    label = samplers.read_schedule(name)
    if label is not None:
        return label
    labels = [info.label for info in samplers.list_schedulers()]
    raise UserError("error.unknown_scheduler", name=name, available=", ".join(labels))


def resolve_checkpoint(library: Any, name: str) -> str:
    from pipeline.errors import UnknownCheckpoint

    try:
        return library.resolve(name).name
    except UnknownCheckpoint as exc:
        raise UserError(exc.key, **exc.params) from None


def _is_edit_model(library: Any, checkpoint: str) -> bool:
    """Whether the scan found an instruct-pix2pix UNet (the engine checks again once the
    checkpoint is loaded, for files the scan could not tell)."""
    return bool(getattr(library.resolve(checkpoint), "is_edit_model", False))


def _check_edit_request(checkpoint: str, prompt: str, opts: dict[str, Any]) -> None:
    """What an instruct-pix2pix checkpoint cannot run, refused before anything is queued:
    text to image, and ``AND`` with an Image CFG scale other than 1 (both as in A1111)."""
    from pipeline.conditioning import positive_parts

    if not opts["init-image"]:
        raise UserError("error.edit_model_needs_image", checkpoint=checkpoint)
    if opts["image-cfg"] != 1 and len(positive_parts(prompt)) > 1:
        raise UserError("error.edit_model_and")


def resolve_vae(library: Any, name: str | None) -> str | None:
    """A VAE file's name in ``<models_dir>/VAE`` (any case, with or without its extension);
    refused here rather than when the job runs, so the user learns at once what exists."""
    from pipeline.networks import UnknownNetwork
    from pipeline.vae import find_vae, vae_names

    if not name:
        return None
    models_dir = getattr(library, "models_dir", None)
    try:
        path = find_vae(models_dir, name.strip())
    except UnknownNetwork:
        available = ", ".join(vae_names(models_dir)) or "-"
        raise UserError("error.unknown_network", kind="VAE", name=name, available=available) from None
    return path.stem  # the name vae_names lists it under


def check_networks(library: Any, *prompts: str) -> dict[str, str]:
    """Every ``<lora:...>``/``<hypernet:...>`` a prompt tags exists in the models folder and
    is well formed; refused before anything is queued, with the names that exist. Returns
    the files they resolved to (``GenerationRequest.network_files``): the engine loads
    those without resolving the names again."""
    from pipeline.networks import NetworkLibrary, UnknownNetwork

    if not any(text and "<" in text for text in prompts):
        return {}
    networks = NetworkLibrary(getattr(library, "models_dir", None))
    try:
        return networks.resolve_prompt(*prompts)
    except UnknownNetwork as exc:
        raise UserError(exc.key, **exc.params) from None
    except ValueError as exc:
        raise UserError("error.network_tag", detail=str(exc)) from None


def _check_prompt_syntax(text: str) -> None:
    from pipeline.errors import PromptSyntaxError
    from pipeline.prompts import parse_attention

    try:
        parse_attention(text)
    except PromptSyntaxError as exc:
        raise UserError("error.prompt_syntax", detail=str(exc)) from None

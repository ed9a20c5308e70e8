"""The contract between the bot and the engine.

A ``GenerationRequest`` is one job: one batch of ``num_images_per_prompt`` images with
every effective parameter resolved (no ``-1`` seeds, no defaults left to fill). It is
stored as is, so a job re-run after a restart produces the same pixels.

Field names mirror diffusers' ``__call__`` arguments where diffusers has one; the rest
use A1111's names (``sampler_name``, ``subseed``, ``ensd`` ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RNG_SOURCES = ("GPU", "CPU", "NV")
# Hires-fix upscalers: A1111's latent interpolation modes and PIL's pixel resamplers.
HIRES_UPSCALERS = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
    "Lanczos",
    "Nearest",
)


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: int | float = 7  # kept as the user typed it: 7 -> "7", 7.0 -> "7.0"
    # instruct-pix2pix checkpoints' "Image CFG scale" (A1111's UI default; kept as typed)
    image_cfg_scale: int | float = 1.5
    width: int = 512
    height: int = 512
    seed: int  # seed of image 0 of this batch
    subseed: int = 0  # variation seed of image 0 of this batch
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    num_images_per_prompt: int = 1  # A1111's batch size
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    checkpoint: str = "tiny"
    # a VAE file in <models_dir>/VAE by name; None = the checkpoint's own (or its <name>.vae.*)
    vae: str | None = None
    clip_skip: int = 1
    rng: str = "CPU"
    ensd: int = 0
    eta: float | None = None
    # A1111's sampler settings (§9.3), k-diffusion's defaults; s_tmax 0 means no bound
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    # "Schedule min sigma" / "Schedule max sigma" / "Schedule rho": 0 = the model's / scheduler's
    schedule_sigma_min: float = 0.0
    schedule_sigma_max: float = 0.0
    schedule_rho: float = 0.0
    noise_multiplier: float = 1.0  # img2img "Noise multiplier"
    extra_noise: float = 0.0  # "Extra noise" of img2img and the hires pass
    uni_pc_variant: str = "bh1"
    uni_pc_order: int = 3
    uni_pc_skip_type: str = "time_uniform"
    uni_pc_lower_order_final: bool = True
    # CFG denoiser settings (§7.2, §10): "Negative Guidance minimum sigma" (0 = off) and its
    # "all steps" option, "Skip Early CFG" (a fraction of the calls, 0 = off), "Pad
    # prompt/negative prompt" and old infotexts' "Pad conds v0"
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False
    downcast_alphas_cumprod: bool = False  # "Downcast alphas_cumprod": ᾱ in float16 (§9.2)
    styles: tuple[str, ...] = ()
    negative_presets: tuple[str, ...] = ()  # names of the presets in the negative prompt; not in the infotext
    # img2img: a PNG/JPEG/WebP file path and A1111's denoising strength (§9.6)
    init_image: str | None = None
    denoising_strength: float | None = None
    # hires fix (§9.6): a second pass at hr_scale (or hr_resize_x/y) with its own steps
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0  # 0 = the first pass's steps
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_prompt: str = ""  # "" = the prompt
    hr_negative_prompt: str = ""
    hr_sampler_name: str | None = None  # None = "Use same sampler"
    hr_scheduler: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # extra infotext fields, in order
    # the networks the prompts tag, as the request's maker resolved them: "lora:<name as
    # tagged>" / "hypernet:<name>" -> its file relative to Lora/ or hypernetworks/, which
    # the engine loads without resolving the name again (pipeline.networks.NetworkLibrary)
    network_files: dict[str, str] = field(default_factory=dict)

    def image_seeds(self) -> list[int]:
        """Per-image seeds: ``seed + i``, or ``seed`` for all when a variation is on (A1111 §1)."""
        if self.subseed_strength:
            return [self.seed] * self.num_images_per_prompt
        return [self.seed + i for i in range(self.num_images_per_prompt)]

    def image_subseeds(self) -> list[int]:
        return [self.subseed + i for i in range(self.num_images_per_prompt)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe and lossless (ints stay ints, floats stay floats); containers are
        copied, so the dict shares nothing mutable with the request."""
        data = {name: _plain(getattr(self, name)) for name in _FIELD_NAMES}
        data["styles"] = list(self.styles)
        data["negative_presets"] = list(self.negative_presets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        values = {k: v for k, v in data.items() if k in _FIELD_SET}
        values["styles"] = tuple(values.get("styles", ()))
        values["negative_presets"] = tuple(values.get("negative_presets", ()))
        return cls(**values)

    def replace(self, **changes: Any) -> GenerationRequest:
        """A copy with ``changes``, as ``dataclasses.replace`` makes it (no field is copied
        deeper, nothing is checked again), at a fraction of its cost: every job of a /draw
        is one."""
        unknown = changes.keys() - _FIELD_SET
        if unknown:
            raise TypeError(f"GenerationRequest has no field {', '.join(sorted(unknown))}")
        copy = object.__new__(GenerationRequest)
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerationRequest))
_FIELD_SET = frozenset(_FIELD_NAMES)


def _plain(value: Any) -> Any:
    """``value`` with its dicts, lists and tuples copied, as ``dataclasses.asdict`` copies
    them (the values inside are plain JSON ones: nothing else needs a deep copy)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    seed: int
    subseed: int
    infotext: str


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    model_name: str
    model_hash: str | None
    device_seconds: float  # time spent on the device for this batch (billing, stats)

"""The txt2img engine: one ``GenerationRequest`` in, one batch of images out.

A thin diffusers wrapper (STYLE.md §8): diffusers runs the UNet loop, while the parts
where A1111 parity lives are ours: the prompt conditioning (A1111's 75-token chunks,
emphasis and clip skip, ``pipeline.clip``), the initial noise (A1111's per-image seeds,
variations and RNG sources, ``pipeline.rng``) and the infotext (``pipeline.infotext``).

Samplers map to "the closest diffusers scheduler" of A1111-SEMANTICS.md §9.1/§9.2; the
images are therefore the same family as A1111's, not bit-identical (an exact sampling loop
is separate work). What *is* exact: the same request always gives the same pixels, and
image ``i`` of a batch equals a solo run with that image's seed.

``Engine.generate`` is synchronous and meant for the device thread; it must never run on
the event loop.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pipeline import clip, extra_networks, infotext, rng, samplers
from pipeline.checkpoints import CheckpointInfo, CheckpointLibrary
from pipeline.errors import GenerationCancelled, OutOfMemory, UnknownSampler
from pipeline.request import GeneratedImage, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

VERSION = "v1.10.1"
LATENT_CHANNELS = 4
# A1111 hard-codes the VAE's 8x factor for latent sizes (§1 step 5).
LATENT_FACTOR = 8

ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]

_OOM_MARKERS = ("out of memory", "Unable to find a valid cuDNN algorithm", "can't allocate memory")


# --------------------------------------------------------------------------------------
# Sampler -> diffusers scheduler (A1111-SEMANTICS.md §9.1 "closest diffusers", §9.2)


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class and the config overrides that approximate one A1111
    sampler + schedule; ``approximate`` marks the samplers diffusers has no equivalent for."""

    class_name: str
    options: tuple[tuple[str, Any], ...] = ()
    approximate: bool = False


_KDIFF = (("timestep_spacing", "linspace"),)
_TIMESTEP = (("timestep_spacing", "leading"), ("steps_offset", 1))

# Samplers without a diffusers counterpart use the nearest family (logged as approximate).
_SAMPLER_SCHEDULERS: dict[str, SchedulerChoice] = {
    "DPM++ 2M": SchedulerChoice("DPMSolverMultistepScheduler", _KDIFF),
    "DPM++ SDE": SchedulerChoice("DPMSolverSDEScheduler", _KDIFF),
    "DPM++ 2M SDE": SchedulerChoice(
        "DPMSolverMultistepScheduler", (*_KDIFF, ("algorithm_type", "sde-dpmsolver++"))
    ),
    "DPM++ 2M SDE Heun": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        (*_KDIFF, ("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun")),
        approximate=True,
    ),
    "DPM++ 2S a": SchedulerChoice(
        "DPMSolverSinglestepScheduler", (*_KDIFF, ("solver_order", 2)), approximate=True
    ),
    "DPM++ 3M SDE": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        (*_KDIFF, ("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3)),
        approximate=True,
    ),
    "Euler a": SchedulerChoice("EulerAncestralDiscreteScheduler", _KDIFF),
    "Euler": SchedulerChoice("EulerDiscreteScheduler", _KDIFF),
    "LMS": SchedulerChoice("LMSDiscreteScheduler", _KDIFF),
    "Heun": SchedulerChoice("HeunDiscreteScheduler", _KDIFF),
    "DPM2": SchedulerChoice("KDPM2DiscreteScheduler", _KDIFF),
    "DPM2 a": SchedulerChoice("KDPM2AncestralDiscreteScheduler", _KDIFF),
    "DPM fast": SchedulerChoice("DPMSolverSinglestepScheduler", _KDIFF, approximate=True),
    "DPM adaptive": SchedulerChoice("DPMSolverSinglestepScheduler", _KDIFF, approximate=True),
    "Restart": SchedulerChoice("HeunDiscreteScheduler", _KDIFF, approximate=True),
    "DDIM": SchedulerChoice("DDIMScheduler", _TIMESTEP),
    "DDIM CFG++": SchedulerChoice("DDIMScheduler", _TIMESTEP, approximate=True),
    "PLMS": SchedulerChoice("PNDMScheduler", (*_TIMESTEP, ("skip_prk_steps", True)), approximate=True),
    "UniPC": SchedulerChoice("UniPCMultistepScheduler", _TIMESTEP, approximate=True),
    "LCM": SchedulerChoice("LCMScheduler"),
}

# Schedule type label -> config overrides (§9.2's table). Polyexponential with its default
# rho 1 is Exponential up to rounding; KL Optimal, Align Your Steps and DDIM need explicit
# sigmas, which most diffusers schedulers cannot take, so they keep the sampler's spacing.
_SCHEDULE_OPTIONS: dict[str, tuple[tuple[str, Any], ...]] = {
    "Automatic": (),
    "Uniform": (("timestep_spacing", "linspace"),),
    "Normal": (("timestep_spacing", "linspace"),),
    "Karras": (("use_karras_sigmas", True),),
    "Exponential": (("timestep_spacing", "linspace"), ("use_exponential_sigmas", True)),
    "Polyexponential": (("timestep_spacing", "linspace"), ("use_exponential_sigmas", True)),
    "SGM Uniform": (("timestep_spacing", "trailing"),),
    "Simple": (("timestep_spacing", "trailing"),),
    "Beta": (("timestep_spacing", "linspace"), ("use_beta_sigmas", True)),
}

# Samplers that ignore the Schedule type (A1111's timestep samplers).
_TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})


def scheduler_choice(sampler_name: str, schedule_label: str) -> SchedulerChoice:
    """The diffusers scheduler for a canonical sampler name and a resolved schedule label."""
    base = _SAMPLER_SCHEDULERS.get(sampler_name)
    if base is None:
        raise UnknownSampler(sampler_name, samplers.sampler_names())
    if sampler_name in _TIMESTEP_SAMPLERS:
        return base
    options = dict(base.options)
    options.update(_SCHEDULE_OPTIONS.get(schedule_label, ()))
    return SchedulerChoice(base.class_name, tuple(options.items()), base.approximate)


def build_scheduler(choice: SchedulerChoice, base_config: Any) -> Any:
    """Instantiate ``choice`` from a checkpoint's scheduler config (betas, prediction type).

    Options the class does not take are dropped rather than passed, so one table serves
    every scheduler; ``final_sigmas_type="zero"`` is set wherever it exists (§9.2).
    """
    choice = _available(choice)
    cls = _scheduler_class(choice.class_name)
    known = _init_keys(cls)
    options = {k: v for k, v in choice.options if k in known}
    if "final_sigmas_type" in known:
        options["final_sigmas_type"] = "zero"
        if "lower_order_final" in known:
            # diffusers forces this for a zero final sigma anyway, with a warning each time.
            options["lower_order_final"] = True
    if choice.approximate:
        logger.info("sampler approximated by diffusers %s %s", choice.class_name, options)
    # Keys of another scheduler class (PNDM's skip_prk_steps ...) would only produce warnings.
    config = {k: v for k, v in dict(base_config).items() if k in known or k.startswith("_")}
    return cls.from_config(config, **options)


def _available(choice: SchedulerChoice) -> SchedulerChoice:
    """diffusers' DPM++ SDE needs torchsde, an optional extra; without it the multistep SDE
    solver is the nearest family."""
    if choice.class_name != "DPMSolverSDEScheduler":
        return choice
    from diffusers.utils import is_torchsde_available

    if is_torchsde_available():
        return choice
    logger.warning("torchsde is not installed; DPM++ SDE runs as diffusers' multistep SDE solver")
    options = (*choice.options, ("algorithm_type", "sde-dpmsolver++"))
    return SchedulerChoice("DPMSolverMultistepScheduler", options, approximate=True)


def _init_keys(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _scheduler_class(class_name: str) -> type:
    import diffusers

    return getattr(diffusers, class_name)


# --------------------------------------------------------------------------------------
# Progress and cancellation


class _StepTracker:
    """Turns diffusers' step callbacks into the user's step count.

    diffusers calls back ``pipe.num_timesteps`` times, which is not the step count for
    every scheduler (PNDM calls n+1 times, Heun 2n-1); the user asked for ``total`` steps,
    so callbacks are scaled onto 1..total and only increases are reported.
    """

    def __init__(self, total: int, on_progress: ProgressCallback | None, should_stop: StopCheck | None):
        self.total = total
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.reported = 0

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def report(self, step: int) -> None:
        step = min(step, self.total)
        if step <= self.reported:
            return
        self.reported = step
        if self.on_progress is not None:
            self.on_progress(step, self.total)

    def finish(self) -> None:
        self.report(self.total)

    def callback(self, pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        calls = max(int(getattr(pipe, "num_timesteps", 0) or 0), index + 1)
        self.report((index + 1) * self.total // calls)
        if index + 1 < calls and self.stop_requested():
            # Raising here (rather than only setting pipe._interrupt) also skips the VAE
            # decode of an image nobody will see.
            pipe._interrupt = True
            raise GenerationCancelled()
        return {}


# --------------------------------------------------------------------------------------
# A loaded checkpoint and what the engine caches for it


_CHUNK_CACHE_SIZE = 64


@dataclass
class _LoadedModel:
    """A checkpoint prepared for this engine's device, with what is worth keeping per model:
    one scheduler instance per sampler choice and the chunked token ids of recent prompts
    (rerolls and batches repeat prompts; the encoder output is not cached, since networks
    applied later may change the text encoder)."""

    info: CheckpointInfo
    pipe: StableDiffusionPipeline
    base_scheduler_config: Any
    schedulers: dict[SchedulerChoice, Any] = field(default_factory=dict)
    chunks: OrderedDict[str, list[clip.PromptChunk]] = field(default_factory=OrderedDict)

    def scheduler(self, choice: SchedulerChoice) -> Any:
        cached = self.schedulers.get(choice)
        if cached is None:
            cached = build_scheduler(choice, self.base_scheduler_config)
            self.schedulers[choice] = cached
        return cached

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.pipe.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def chunk(self, text: str) -> list[clip.PromptChunk]:
        cached = self.chunks.get(text)
        if cached is not None:
            self.chunks.move_to_end(text)
            return cached
        chunks, _count = clip.chunk_prompt(text, self.tokenize)
        self.chunks[text] = chunks
        if len(self.chunks) > _CHUNK_CACHE_SIZE:
            self.chunks.popitem(last=False)
        return chunks

    def encode(self, text: str, clip_skip: int) -> torch.Tensor:
        """``(1, 77*k, C)`` conditioning for ``text`` (A1111 chunking, emphasis, clip skip)."""
        return clip.encode_chunks(
            self.pipe.text_encoder, self.chunk(text), clip_skip=clip_skip, pad_id=self.pad_id
        )

    @property
    def pad_id(self) -> int | None:
        """SD2-style tokenizers pad with their own id after the first EOS; SD1 pads with EOS."""
        pad = self.pipe.tokenizer.pad_token_id
        return None if pad in (None, clip.EOS_ID) else pad


def _default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPUs (A1111's default), full precision elsewhere (fp16 on a CPU is slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _OOM_MARKERS)


# --------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs txt2img requests on one device, one at a time."""

    def __init__(self, library: CheckpointLibrary, *, device: str = "cpu", dtype: torch.dtype | None = None):
        self.library = library
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else _default_dtype(self.device)
        self._lock = threading.Lock()
        self._models: dict[str, _LoadedModel] = {}

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> GenerationResult:
        """Generate one batch. Raises ``UnknownCheckpoint``, ``UnknownSampler``,
        ``CheckpointLoadError``, ``OutOfMemory`` or ``GenerationCancelled``.

        ``device_seconds`` covers the whole call on this thread, a model load included.
        """
        started = time.perf_counter()
        sampler = samplers.select_sampler(request.sampler_name, request.scheduler)
        tracker = _StepTracker(request.num_inference_steps, on_progress, should_stop)
        with self._lock:
            model = self._model(request.checkpoint)
            if tracker.stop_requested():
                raise GenerationCancelled()
            batch = self._run_guarded(model, request, sampler, tracker)
        tracker.finish()
        texts = self._infotexts(request, model.info, sampler, batch.extra)
        seeds, subseeds = request.image_seeds(), request.image_subseeds()
        images = [
            GeneratedImage(image=image, seed=seed, subseed=subseed, infotext=text)
            for image, seed, subseed, text in zip(batch.images, seeds, subseeds, texts, strict=True)
        ]
        return GenerationResult(
            images=images,
            model_name=model.info.name,
            model_hash=model.info.sha256,
            device_seconds=time.perf_counter() - started,
        )

    # -- model -------------------------------------------------------------------------

    def _model(self, name: str) -> _LoadedModel:
        info = self.library.resolve(name)
        pipe = self.library.load(info.name)
        model = self._models.get(info.name)
        if model is not None and model.pipe is pipe:
            return model
        # Forget models the library has dropped so their weights can be freed.
        loaded = set(self.library.loaded_names())
        self._models = {k: v for k, v in self._models.items() if k in loaded}
        model = _LoadedModel(info=info, pipe=self._prepare(pipe), base_scheduler_config=pipe.scheduler.config)
        self._models[info.name] = model
        return model

    def _prepare(self, pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
        if pipe.device != self.device or pipe.dtype != self.dtype:
            pipe.to(self.device, self.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- one batch -----------------------------------------------------------------------

    def _run_guarded(
        self,
        model: _LoadedModel,
        request: GenerationRequest,
        sampler: samplers.SamplerSelection,
        tracker: _StepTracker,
    ) -> _Batch:
        oom_detail = None
        try:
            return self._run(model, request, sampler, tracker)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            oom_detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Outside the except block, so the traceback's frames (and their tensors) are gone.
        self._release_memory()
        raise OutOfMemory(oom_detail)

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _run(
        self,
        model: _LoadedModel,
        request: GenerationRequest,
        sampler: samplers.SamplerSelection,
        tracker: _StepTracker,
    ) -> _Batch:
        pipe = model.pipe
        scheduler = model.scheduler(scheduler_choice(sampler.name, sampler.effective_schedule))
        if pipe.scheduler is not scheduler:
            pipe.scheduler = scheduler
        extra: dict[str, Any] = {}
        with torch.inference_mode():
            cond, uncond, padded = self._conditioning(model, request)
            if padded:
                extra["Pad conds"] = True
            latents, generators = self._noise(request)
            output = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=float(request.guidance_scale),
                width=request.width,
                height=request.height,
                eta=0.0 if request.eta is None else float(request.eta),
                latents=latents,
                generator=generators,
                callback_on_step_end=tracker.callback,
            )
        return _Batch(images=list(output.images), extra=extra)

    def _conditioning(
        self, model: _LoadedModel, request: GenerationRequest
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(prompt_embeds, negative_prompt_embeds, padded)`` for the whole batch.

        Every image of a request shares its prompt, so the text is encoded once. Extra-network
        tags are cut from the positive prompt (§1 step 3, §5); the networks themselves are
        applied elsewhere.
        """
        prompt, _networks = extra_networks.parse(request.prompt)
        cond = model.encode(prompt, request.clip_skip)
        uncond = model.encode(request.negative_prompt, request.clip_skip)
        padded = cond.shape[1] != uncond.shape[1]
        if padded:
            # diffusers runs cond and uncond in one UNet call, which needs equal lengths;
            # A1111 pads with the empty prompt's encoding when asked to (§7.2 "Pad conds").
            cond, uncond = clip.match_lengths(cond, uncond, model.encode("", request.clip_skip))
        batch = request.num_images_per_prompt
        dtype = model.pipe.unet.dtype
        cond = cond.to(self.device, dtype).expand(batch, -1, -1)
        uncond = uncond.to(self.device, dtype).expand(batch, -1, -1)
        return cond, uncond, padded

    def _noise(self, request: GenerationRequest) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial latents from A1111's ImageRNG and one generator per image for step noise.

        The step generators continue each image's own stream as A1111 does (§8.3): with ENSD
        they start fresh at ``seed + ENSD``; without it they skip the draw the initial noise
        took, so step noise is not a copy of the starting noise.
        """
        shape = (LATENT_CHANNELS, request.height // LATENT_FACTOR, request.width // LATENT_FACTOR)
        seeds = request.image_seeds()
        source = rng.effective_source(request.rng, self.device)
        image_rng = rng.ImageRNG(
            shape,
            seeds,
            subseeds=request.image_subseeds(),
            subseed_strength=request.subseed_strength,
            seed_resize_from_h=request.seed_resize_from_h,
            seed_resize_from_w=request.seed_resize_from_w,
            source=source,
            ensd=request.ensd,
        )
        latents = image_rng.next().to(self.device, self.dtype)
        generator_device = self.device if source == "GPU" else torch.device("cpu")
        generators = [_step_generator(seed, request.ensd, shape, generator_device) for seed in seeds]
        return latents, generators

    # -- infotext ------------------------------------------------------------------------

    def _infotexts(
        self,
        request: GenerationRequest,
        info: CheckpointInfo,
        sampler: samplers.SamplerSelection,
        batch_extra: dict,
    ) -> list[str]:
        extra = _schedule_fields(sampler.name, sampler.schedule, request.num_inference_steps)
        extra.update(_eta_fields(sampler.name, request.eta))
        extra.update(batch_extra)
        extra.update(request.extra)
        texts = []
        for seed, subseed in zip(request.image_seeds(), request.image_subseeds(), strict=True):
            params = infotext.InfotextParams(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                steps=request.num_inference_steps,
                sampler=sampler.name,
                schedule_type=sampler.schedule,
                cfg_scale=request.guidance_scale,
                seed=seed,
                subseed=subseed,
                subseed_strength=request.subseed_strength,
                seed_resize_from_w=request.seed_resize_from_w,
                seed_resize_from_h=request.seed_resize_from_h,
                width=request.width,
                height=request.height,
                model_hash=info.sha256,
                model_name=info.name,
                clip_skip=request.clip_skip,
                ensd=request.ensd,
                eta=request.eta,
                rng=request.rng,
                extra=extra,
                version=VERSION,
            )
            texts.append(infotext.format(params))
        return texts


@dataclass
class _Batch:
    images: list[Any]
    extra: dict[str, Any]


def _step_generator(seed: int, ensd: int, shape: tuple[int, ...], device: torch.device) -> torch.Generator:
    generator = torch.Generator(device).manual_seed((seed + ensd) % 2**64)
    if ensd == 0:
        torch.randn((1, *shape), generator=generator, device=device)
    return generator


@functools.lru_cache(maxsize=256)
def _cached_schedule_fields(sampler: str, schedule: str, steps: int) -> tuple[tuple[str, Any], ...]:
    return tuple(samplers.sigma_schedule(sampler, schedule, steps).infotext_fields.items())


def _schedule_fields(sampler: str, schedule: str, steps: int) -> dict[str, Any]:
    """What A1111's σ schedule adds to the infotext: the resolved ``Schedule type`` (Karras for
    DPM++ 2M on Automatic) and Beta's alpha/beta. Timestep samplers compute no σ's."""
    if sampler in _TIMESTEP_SAMPLERS:
        return {}
    return dict(_cached_schedule_fields(sampler, schedule, steps))


# k-diffusion samplers whose function takes eta (A1111 writes ``Eta`` when it is not 1).
_ETA_SAMPLERS = frozenset(
    {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    | {"DPM fast", "DPM adaptive"}
)
_DDIM_ETA_SAMPLERS = frozenset({"DDIM", "DDIM CFG++"})


def _eta_fields(sampler: str, eta: float | None) -> dict[str, Any]:
    """``Eta`` / ``Eta DDIM`` when the request's eta differs from the setting's default (§9.3)."""
    if eta is None:
        return {}
    if sampler in _DDIM_ETA_SAMPLERS and eta != 0:
        return {"Eta DDIM": eta}
    if sampler in _ETA_SAMPLERS and eta != 1:
        return {"Eta": eta}
    return {}

"""The engine: one ``GenerationRequest`` in, one batch of images out.

diffusers provides the models (tokenizer, text encoder, UNet, VAE); the generation itself
follows A1111 (A1111-SEMANTICS.md §1): our conditioning (chunks, emphasis, clip skip,
prompt editing, ``AND``; ``pipeline.conditioning``), A1111's per-image noise
(``pipeline.rng``), its σ schedules and timesteps (``pipeline.samplers``), its sampling
loops (``pipeline.kdiffusion``, ``pipeline.timestep_samplers``) driven through its CFG
denoiser (``pipeline.denoiser``), img2img and the hires fix with A1111's step arithmetic
(``pipeline.latents``, ``pipeline.hires``) and the infotext (``pipeline.image_infotext``,
``pipeline.infotext``).

Guarantees: the same request always gives the same pixels, and image ``i`` of a batch
equals a solo run with that image's seed (every image's conds are evaluated alike; only
float rounding of batched UNet calls differs).

``Engine.generate`` is synchronous and meant for the device thread; it must never run on
the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline import (
    batching,
    conditioning,
    edit_model,
    hires,
    kdiffusion,
    latents,
    memory,
    oom,
    rng,
    sampler_args,
    samplers,
    sdxl,
    timestep_samplers,
    vae,
)
from pipeline.checkpoints import EMBEDDINGS_SUBDIR, CheckpointLibrary
from pipeline.denoiser import BatchedDenoiser, CFGDenoiser, lcm_sigma_to_timestep, sd_alphas_cumprod
from pipeline.embeddings import EmbeddingDatabase
from pipeline.errors import EditModelNeedsImage, GenerationCancelled
from pipeline.hashing import short_hash
from pipeline.image_infotext import image_infotexts
from pipeline.latents import _noised_at_timestep
from pipeline.loaded_model import _LoadedModel, _SeparateVae, _vae_swapped
from pipeline.networks import ActiveNetworks, NetworkLibrary
from pipeline.passes import (
    LATENT_FACTOR,
    TIMESTEP_SAMPLERS,
    PassPlan,
    SamplingPass,
    _guidance,
    _note,
    plan_passes,
    schedule_overrides,
)
from pipeline.progress import BatchPreviewCallback, ProgressCallback, StopCheck, _Progress
from pipeline.request import GeneratedImage, GenerationRequest, GenerationResult
from pipeline.sampling import SamplingContext

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4

PreviewCallback = Callable[[int, bytes], None]  # (user step, PNG bytes of the batch's preview)
SamplerLoop = Callable[..., torch.Tensor]


def sampler_loop(name: str) -> SamplerLoop:
    """The A1111 sampling loop of a canonical sampler name (all 20 have one)."""
    if name in TIMESTEP_SAMPLERS:
        return timestep_samplers.SAMPLERS[name]
    return kdiffusion.SAMPLERS[name]


# --------------------------------------------------------------------------------------
# What the engine keeps per loaded checkpoint

_Member = tuple[GenerationRequest, PassPlan]  # a request of a (micro-)batch and its passes

# Separate VAEs kept loaded (each is ~160 MB for SD); an override is usually reused.
_VAE_CACHE_SIZE = 2


def _default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPUs (A1111's default), full precision elsewhere (fp16 on a CPU is slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs txt2img, img2img and hires-fix requests on one device, one at a time."""

    def __init__(
        self,
        library: CheckpointLibrary,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        memory_settings: memory.MemorySettings | None = None,
        preview_every: int = 0,
        compile: bool = False,
        channels_last: bool = False,
        compile_backend: str = "inductor",
    ):
        """``memory_settings``: memory mode, attention, VAE precision, tiling, budget and OOM
        retry (``pipeline.memory``); a byte budget, where there is one, becomes the library's.
        ``compile``: the UNet runs through ``torch.compile`` (in the normal memory mode; each
        new shape compiles once and is cached); ``channels_last``: the UNet's weights in
        channels-last layout (faster convolutions on most GPUs)."""
        self.compile = compile
        self.compile_backend = compile_backend
        self.channels_last = channels_last
        self.library = library
        self.preview_every = preview_every  # user steps between live previews (0: none)
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else _default_dtype(self.device)
        self.memory = memory.DeviceMemory(self.device, self.dtype, memory_settings)
        if self.memory.residency is not None:
            library.residency = self.memory.residency
        self._lock = threading.Lock()
        self._models: dict[str, _LoadedModel] = {}
        folder = library.models_dir / EMBEDDINGS_SUBDIR if library.models_dir is not None else None
        self.embeddings = EmbeddingDatabase(folder)
        self.networks = NetworkLibrary(library.models_dir)
        self._vaes: OrderedDict[tuple[str, str], _SeparateVae] = OrderedDict()

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> GenerationResult:
        """Generate one batch. Raises ``UnknownCheckpoint``, ``UnknownSampler``,
        ``CheckpointLoadError``, ``UnknownNetwork``, ``OutOfMemory``, ``GenerationCancelled``,
        or ``ValueError`` for img2img/hires settings out of range or a malformed network tag.

        ``device_seconds`` covers the whole call on this thread, a model load included.
        """
        previews = None if on_preview is None else lambda step, pngs: on_preview(step, pngs[0])
        (result,) = self.generate_batch(
            [request], on_progress=on_progress, should_stop=should_stop, on_preview=previews
        )
        return result

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        on_preview: BatchPreviewCallback | None = None,
    ) -> list[GenerationResult]:
        """Several requests that may share a UNet batch (equal ``batching.batch_key``, from
        any users) run as one: each keeps its own prompt, negative prompt, CFG scale, seeds
        and noise, so each image is its solo run's (up to the float rounding of a larger
        UNet batch). One result per request, in order; progress and stops are the batch's,
        previews one per request. Raises as ``generate`` does, and ``ValueError`` for
        requests that cannot share a batch.

        ``device_seconds`` is shared among the requests by their image counts.
        """
        if not requests:
            return []
        if len(requests) > 1:
            keys = {batching.batch_key(request) for request in requests}
            if len(keys) != 1:
                raise ValueError("these requests cannot share a batch (see pipeline.batching.batch_key)")
            if None in keys:
                raise ValueError("this request cannot join a batch (see pipeline.batching.batch_key)")
        started = time.perf_counter()
        if should_stop is not None and should_stop():
            raise GenerationCancelled()  # stopped before it began (its claim was refused): load nothing
        lead = requests[0]
        jobs = [plan_passes(request) for request in requests]
        active = self.networks.for_prompt(lead.prompt, lead.network_files)
        sizes = [request.num_images_per_prompt for request in requests]
        progress = _Progress(
            jobs[0].total_steps, on_progress, should_stop, on_preview, self.preview_every,
            sizes=sizes if len(requests) > 1 else (),
        )  # fmt: skip
        with self._lock, self.library.in_use(lead.checkpoint):
            model = self._model(lead.checkpoint)
            if edit_model.is_edit_unet(model.pipe.unet) and any(r.init_image is None for r in requests):
                raise EditModelNeedsImage(model.info.name)
            separate = self._separate_vae(model, lead.vae)
            progress.check()
            with _vae_swapped(model.pipe, separate):
                images, notes = self._run_guarded(
                    model, list(zip(requests, jobs, strict=True)), progress, active
                )
        progress.finish()
        seconds = time.perf_counter() - started
        results = []
        for request, job, size, noted in zip(requests, jobs, sizes, notes, strict=True):
            own, images = images[:size], images[size:]
            texts = image_infotexts(request, model, job, active, self.embeddings, separate, noted)
            seeds, subseeds = request.image_seeds(), request.image_subseeds()
            results.append(
                GenerationResult(
                    images=[
                        GeneratedImage(image=image, seed=seed, subseed=subseed, infotext=text)
                        for image, seed, subseed, text in zip(own, seeds, subseeds, texts, strict=True)
                    ],
                    model_name=model.info.name,
                    model_hash=model.info.sha256,
                    device_seconds=seconds * size / sum(sizes),
                )
            )
        return results

    def warm_up(self, checkpoint: str) -> float:
        """Load ``checkpoint`` and run one tiny generation with it, so that the first
        user's job pays for neither (imports, the model load, the device's first kernels).
        Returns the seconds it took. An instruct-pix2pix checkpoint edits a grey image."""
        started = time.perf_counter()
        request = GenerationRequest(
            prompt="", seed=0, num_inference_steps=1, width=64, height=64, checkpoint=checkpoint,
            sampler_name="Euler",
        )  # fmt: skip
        with self._lock:
            edit = edit_model.is_edit_unet(self._model(checkpoint).pipe.unet)
        with edit_model.grey_image(64, 64) if edit else contextlib.nullcontext() as init:
            self.generate(request.replace(init_image=init))
        return time.perf_counter() - started

    def resident(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` is loaded on this engine's device (a queue with several
        devices gives a job to the one that has its checkpoint, when it can)."""
        return self.library.is_loaded(checkpoint)

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
        model = _LoadedModel(
            info=info, pipe=self._prepare(pipe), base_scheduler_config=pipe.scheduler.config,
            embeddings=self.embeddings,
        )  # fmt: skip
        model.unet = pipe.unet
        if self.compile and self.memory.settings.mode == "normal":  # offload hooks would break graphs
            model.unet = torch.compile(pipe.unet, backend=self.compile_backend, dynamic=False)
        self._models[info.name] = model
        return model

    def _separate_vae(self, model: _LoadedModel, name: str | None) -> _SeparateVae | None:
        """The VAE file a request runs with: ``name`` from ``<models_dir>/VAE``, else the
        checkpoint's ``<name>.vae.*`` file; None keeps the checkpoint's own VAE.

        Raises ``UnknownNetwork`` (kind ``vae``) for a name not in the folder and
        ``ValueError`` for a file whose weights do not fit the model's VAE."""
        path = vae.find_vae(self.library.models_dir, name) if name else model.info.vae_path
        if path is None:
            return None
        config = dict(model.pipe.vae.config)
        key = (str(Path(path).resolve()), repr(sorted(config.items())))
        cached = self._vaes.get(key)
        if cached is not None:
            self._vaes.move_to_end(key)
            return cached
        loaded = vae.load_vae(path, config=config).to(self.device, model.pipe.vae.dtype)
        cached = _SeparateVae(path=Path(path), model=loaded, short_hash=short_hash(path, "vae"))
        self._vaes[key] = cached
        while len(self._vaes) > _VAE_CACHE_SIZE:
            self._vaes.popitem(last=False)
        logger.info("loaded VAE %s", path)
        return cached

    def _prepare(self, pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
        self.memory.prepare(pipe)
        if self.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- one batch -----------------------------------------------------------------------

    def _run_guarded(
        self, model: _LoadedModel, members: list[_Member], progress: _Progress, active: ActiveNetworks,
    ) -> tuple[list[Any], list[dict[str, Any]]]:  # fmt: skip
        """Run with the requests' networks applied (removed again however the run ends); out
        of memory, run once more in the next lower memory mode with VAE tiling, if allowed.
        Returns the images and, per request, the infotext fields its sampling added."""
        oom_detail = ""
        for number, (mode, tiling) in enumerate(self.memory.attempts()):
            if number:
                logger.warning(
                    "out of memory (%s); retrying once in %s mode with VAE tiling", oom_detail, mode
                )
            try:
                with (
                    self.memory.attempt(model.pipe, mode, tiling),
                    active.applied(model.pipe, device=self.device),
                    torch.inference_mode(),
                ):
                    notes: list[dict[str, Any]] = [{} for _ in members]
                    return self._run(model, members, progress, notes), notes
            except Exception as exc:
                if not oom.is_oom(exc):
                    raise
                oom_detail = oom.describe(exc)
            # Outside the except block, so the traceback's frames (and their tensors) are gone.
            oom.release_memory(self.device)
        request, job = members[0]
        target = (job.target.width, job.target.height) if job.target is not None else None
        raise oom.out_of_memory(oom_detail, request, target)

    def _run(
        self, model: _LoadedModel, members: list[_Member], progress: _Progress, notes: list[dict[str, Any]]
    ) -> list[Any]:
        """The images; ``notes`` (one dict per member) get the infotext fields sampling adds."""
        request, job = members[0]
        shape = (LATENT_CHANNELS, request.height // LATENT_FACTOR, request.width // LATENT_FACTOR)
        init = edit = None
        if request.init_image is not None:
            init, edit = self._init_latents(model, request)
        first = [(request, job.first) for request, job in members]
        x = self._sample(model, first, shape, init, progress, 0, notes, edit)
        if job.second is not None and job.target is not None:
            x = self._hires_pass(model, members, x, progress, notes)
        return self._decode(model, x)

    def _hires_pass(
        self,
        model: _LoadedModel,
        members: list[_Member],
        x: torch.Tensor,
        progress: _Progress,
        notes: list[dict[str, Any]],
    ) -> torch.Tensor:
        """Upscale the first pass, crop it to the target and denoise it again (§9.6)."""
        request, job = members[0]
        assert job.second is not None and job.target is not None
        progress.check()
        if request.hr_upscaler in hires.LATENT_UPSCALERS:
            upscaled = hires.upscale_latents(x, request.hr_upscaler, job.target)
        else:
            images = hires.upscale_images(self._decode(model, x), request.hr_upscaler, job.target)
            upscaled = self.memory.encode(model.pipe.vae, latents.images_to_tensor(images))
        start = hires.crop_latents(upscaled, job.target).to(self.device, torch.float32)
        second = [(request, job.second) for request, job in members]
        return self._sample(model, second, tuple(start.shape[1:]), start, progress, job.first.steps, notes)

    def _init_latents(
        self, model: _LoadedModel, request: GenerationRequest
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The init image's latents, one copy per image of the batch, and for an
        instruct-pix2pix model the image's unscaled latents (its image channels; else None)."""
        assert request.init_image is not None
        image = latents.load_init_image(request.init_image, request.width, request.height)
        mean = self.memory.encode(model.pipe.vae, latents.images_to_tensor([image]), scaled=False)
        encoded = (mean * model.pipe.vae.config.scaling_factor).to(self.device)
        edit = mean.to(self.device) if edit_model.is_edit_unet(model.pipe.unet) else None
        return encoded.expand(request.num_images_per_prompt, -1, -1, -1), edit

    def _decode(self, model: _LoadedModel, x: torch.Tensor) -> list[Any]:
        return latents.to_pil(self.memory.decode(model.pipe.vae, x))

    def _image_rng(self, request: GenerationRequest, shape: tuple[int, ...]) -> rng.ImageRNG:
        """Per-image noise at ``shape``; the hires pass gets a fresh one with the same seeds (§8.6)."""
        return rng.ImageRNG(
            shape,
            request.image_seeds(),
            subseeds=request.image_subseeds(),
            subseed_strength=request.subseed_strength,
            seed_resize_from_h=request.seed_resize_from_h,
            seed_resize_from_w=request.seed_resize_from_w,
            source=rng.effective_source(request.rng, self.device),
            ensd=request.ensd,
            device=self.device,
        )

    def _sample(
        self,
        model: _LoadedModel,
        passes: list[tuple[GenerationRequest, SamplingPass]],
        shape: tuple[int, ...],
        start: torch.Tensor | None,
        progress: _Progress,
        offset: int,
        notes: list[dict[str, Any]],
        edit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass: noise, conds, denoiser and the sampler's loop; returns the latents.

        ``passes`` holds one (request, pass) per member of a micro-batch (one for a lone
        request): each brings its own noise, conds and CFG scale, its rows in order; the
        rest (sampler, schedule, steps, settings) is equal among them and read from the first.
        ``start`` is the clean latent img2img and hires continue from (None for txt2img);
        the pass reports user steps ``offset+1 …`` and the denoiser checks for a stop
        before every UNet call (DPM adaptive makes many between its step callbacks).
        ``edit``: an instruct-pix2pix model's image channels (the init image's unscaled latents).
        """
        request, step_pass = passes[0]
        name = step_pass.selection.name
        loop = sampler_loop(name)
        image_rngs = [self._image_rng(member, shape) for member, _ in passes]

        def next_noise() -> torch.Tensor:
            return torch.cat([image_rng.next() for image_rng in image_rngs])

        noise = next_noise()
        if start is not None and step_pass.base_steps is None and request.noise_multiplier != 1.0:
            noise = noise * request.noise_multiplier  # img2img only, not the hires pass
        with self.memory.using(*memory.text_encoders(model.pipe)):
            conds = [self._conds(model, member, member_pass) for member, member_pass in passes]
        sizes = [member.num_images_per_prompt for member, _ in passes]
        downcast = request.downcast_alphas_cumprod
        to_timestep = (
            lcm_sigma_to_timestep(downcast=downcast)
            if name == "LCM"
            else samplers.sigma_to_timestep_on(self.device, downcast=downcast)
        )
        # A1111's total_steps of the pass: the sampler steps it runs, doubled for 2nd order
        total_steps = step_pass.plan.run_steps * step_pass.info.total_steps_multiplier
        members = [
            CFGDenoiser(
                model.unet,
                member_conds,
                member.guidance_scale,
                prediction_type=model.prediction_type,
                sigma_to_timestep=to_timestep,
                before_call=progress.check,
                image_cond=(
                    self._inpainting_cond(model, member_noise)
                    if edit is None
                    else edit_model.image_conditioning(edit, member.num_images_per_prompt)
                ),
                guidance=_guidance(member, total_steps),
                downcast=downcast,
                image_cfg_scale=None if edit is None else member.image_cfg_scale,
            )
            for (member, _), member_conds, member_noise in zip(passes, conds, noise.split(sizes), strict=True)
        ]
        denoiser: CFGDenoiser | BatchedDenoiser = members[0]
        if len(members) > 1:
            denoiser = BatchedDenoiser(members, sizes, before_call=progress.check)
        progress.previews_from(denoiser.latest_x0, sdxl=model.is_sdxl)
        seeds = [seed for member, _ in passes for seed in member.image_seeds()]
        ctx = SamplingContext(
            model=denoiser,
            eps_model=denoiser.eps_at_timestep,
            alphas_cumprod=sd_alphas_cumprod(downcast=downcast),
            noise=next_noise,
            seeds=seeds,
            rng_source=rng.effective_source(request.rng, self.device),
            eta=request.eta,
            solver_type=step_pass.info.solver_type,
            callback=progress.span(offset, step_pass.steps),
            extra={"eps_model_cfgpp": denoiser.eps_cfgpp},
            level_hint=denoiser.expect_level,
        )
        plan = step_pass.plan
        if name in TIMESTEP_SAMPLERS:
            ctx.extra.update(sampler_args.loop_arguments(name, request, None, img2img=start is not None))
            timesteps = samplers.timesteps(name, plan.schedule_steps)
            timesteps = timesteps[: len(timesteps) - plan.start_index]
            x = noise
            if start is not None:
                x = _noised_at_timestep(start, noise, ctx.alphas_cumprod, timesteps[-1])
                if request.extra_noise > 0:
                    alpha = float(ctx.alphas_cumprod[timesteps[-1]])
                    x = x + noise * request.extra_noise * alpha**0.5
            with self.memory.using(model.pipe.unet):
                x = loop(x, timesteps, ctx)
            _note(notes, members)
            return x
        schedule = samplers.sigma_schedule(
            name,
            step_pass.selection.schedule,
            plan.schedule_steps,
            sdxl=model.is_sdxl,
            **schedule_overrides(request),
        )
        sigmas = schedule.sigmas[plan.start_index :]
        ctx.extra.update(sampler_args.loop_arguments(name, request, sigmas, img2img=start is not None))
        sigmas = sigmas.to(self.device)
        x = noise * sigmas[0] if start is None else start + noise * sigmas[0]
        if start is not None and request.extra_noise > 0:
            x = x + noise * request.extra_noise
        with self.memory.using(model.pipe.unet):
            x = loop(x, sigmas, ctx)
        _note(notes, members)
        return x

    def _inpainting_cond(self, model: _LoadedModel, noise: torch.Tensor) -> torch.Tensor | None:
        """The extra UNet input of an inpainting checkpoint (more input channels than
        latent ones) when no mask is given, as A1111 fills it for txt2img and for img2img
        at the default mask weight 1: a mask channel of ones, then the latents of a
        mid-grey image (0 in the VAE's [-1, 1] range). None for other checkpoints."""
        unet_channels = int(model.pipe.unet.config.in_channels)
        if unet_channels <= noise.shape[1]:
            return None
        batch, _, height, width = noise.shape
        grey = torch.zeros(1, 3, height * LATENT_FACTOR, width * LATENT_FACTOR)
        encoded = self.memory.encode(model.pipe.vae, grey).to(noise.device, torch.float32)
        mask = torch.ones(batch, 1, height, width, device=noise.device)
        cond = torch.cat([mask, encoded.expand(batch, -1, -1, -1)], dim=1)
        if noise.shape[1] + cond.shape[1] != unet_channels:
            raise ValueError(f"a UNet with {unet_channels} input channels is not an SD inpainting model")
        return cond

    def _conds(self, model: _LoadedModel, request: GenerationRequest, step_pass: SamplingPass) -> Any:
        first_pass = step_pass.base_steps is None
        return conditioning.build_conds(
            step_pass.prompt,
            step_pass.negative_prompt,
            step_pass.call_steps if first_pass else step_pass.base_steps,
            chunk=model.chunk,
            encode=functools.partial(model.encode_raw, clip_skip=request.clip_skip),
            device=self.device,
            dtype=model.pipe.unet.dtype,
            hires_steps=None if first_pass else step_pass.call_steps,
            time_ids=sdxl.time_ids(*step_pass.size) if model.is_sdxl else None,
            zero_empty_negative=model.is_sdxl,
            with_empty=request.pad_cond_uncond and not request.pad_cond_uncond_v0,
        )

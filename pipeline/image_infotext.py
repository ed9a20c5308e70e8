"""What the engine writes into each image: A1111's infotext of a finished request (§12.1),
from the request, the checkpoint, the passes it ran, its networks, embeddings and VAE, and
the fields sampling noted."""

from __future__ import annotations

from typing import Any

from pipeline import edit_model, extra_networks, infotext, sampler_args
from pipeline.embeddings import EmbeddingDatabase, ti_hashes_field
from pipeline.loaded_model import _LoadedModel, _SeparateVae
from pipeline.networks import ActiveNetworks
from pipeline.passes import PassPlan, eta_fields, schedule_fields, schedule_overrides
from pipeline.request import GenerationRequest

VERSION = "v1.10.1"  # the A1111 version the infotext claims


def image_infotexts(
    request: GenerationRequest,
    model: _LoadedModel,
    job: PassPlan,
    active: ActiveNetworks,
    embeddings: EmbeddingDatabase,
    separate: _SeparateVae | None = None,
    noted: dict[str, Any] | None = None,
) -> list[str]:
    """One infotext per image of ``request``, in A1111's field order."""
    info = model.info
    sampler = job.first.selection
    extra = schedule_fields(
        sampler.name, sampler.schedule, request.num_inference_steps, **schedule_overrides(request)
    )
    used = embeddings.used(
        [*model.chunk(extra_networks.parse(request.prompt)[0]), *model.chunk(request.negative_prompt)]
    )
    extra.update(job.fields)
    extra.update(active.infotext_fields())  # A1111 order: Hires *, Lora hashes, TI hashes
    if used:
        extra["TI hashes"] = ti_hashes_field(used)
    extra.update(sampler_args.noise_fields(request))
    extra.update(eta_fields(sampler.name, request.eta))
    extra.update(sampler_args.sigma_fields(sampler.name, request))
    extra.update(sampler_args.unipc_fields(sampler.name, request))
    extra.update(sampler_args.downcast_fields(request))
    extra.update(noted or {})
    extra.update(request.extra)
    vae_fields = separate.infotext_fields if separate is not None else {}
    texts = []
    for seed, subseed in zip(request.image_seeds(), request.image_subseeds(), strict=True):
        params = infotext.InfotextParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            steps=request.num_inference_steps,
            sampler=sampler.name,
            schedule_type=sampler.schedule,
            cfg_scale=request.guidance_scale,
            image_cfg_scale=request.image_cfg_scale if edit_model.is_edit_unet(model.pipe.unet) else None,
            seed=seed,
            subseed=subseed,
            subseed_strength=request.subseed_strength,
            seed_resize_from_w=request.seed_resize_from_w,
            seed_resize_from_h=request.seed_resize_from_h,
            width=request.width,
            height=request.height,
            model_hash=info.sha256,
            model_name=info.model_name,
            clip_skip=request.clip_skip,
            ensd=request.ensd,
            eta=request.eta,
            rng=request.rng,
            extra=extra,
            version=VERSION,
            **vae_fields,
        )
        texts.append(infotext.format(params))
    return texts

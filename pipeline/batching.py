"""Which requests can share one UNet batch (micro-batching across users).

Requests share a batch when everything that shapes the sampling is equal: checkpoint,
VAE, networks and their strengths, size, steps, sampler, schedule and every sampler
setting, CLIP skip, RNG source, ENSD, the hires fix. What each request keeps for itself:
prompt, negative prompt (and the hires pass's), CFG scale, seeds, variation seed and
strength, seed resize, batch size, styles, presets and extra infotext fields. Each image
then gets its own noise and conds, so it is its solo run's image.

Not batched: img2img (each has its own init image) and DPM adaptive (its step sizes follow
the error of the whole batch, so a neighbour would change an image).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import networks, samplers
from pipeline.errors import UnknownSampler, UnknownScheduler
from pipeline.request import GenerationRequest

# GenerationRequest fields each member of a batch keeps for itself.
PER_REQUEST_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "guidance_scale",
        "image_cfg_scale",  # used by instruct-pix2pix models only, whose img2img never batches
        "seed",
        "subseed",
        "subseed_strength",
        "seed_resize_from_w",
        "seed_resize_from_h",
        "num_images_per_prompt",
        "styles",
        "negative_presets",
        "extra",
        "hr_prompt",
        "hr_negative_prompt",
    }
)
# Samplers whose steps depend on the whole batch.
UNBATCHED_SAMPLERS = frozenset({"DPM adaptive"})


def batch_key(request: GenerationRequest) -> str | None:
    """Equal keys: the requests can run as one batch. None: this one runs alone."""
    if request.init_image is not None:
        return None
    try:
        first = samplers.exact_selection(request.sampler_name, request.scheduler)
        second = samplers.exact_info(request.hr_sampler_name or request.sampler_name)
        loras, hypernets = networks.network_tags(request.prompt)
    except (UnknownSampler, UnknownScheduler, ValueError):
        return None  # refused by the engine alone, with its own error
    if first.name in UNBATCHED_SAMPLERS or (request.enable_hr and second.name in UNBATCHED_SAMPLERS):
        return None
    shared: dict[str, Any] = {
        key: value for key, value in request.to_dict().items() if key not in PER_REQUEST_FIELDS
    }
    shared["sampler_name"], shared["scheduler"] = first.name, first.effective_schedule
    shared["networks"] = [repr(tag) for tag in (*loras, *hypernets)]
    return json.dumps(shared, sort_keys=True, default=str)

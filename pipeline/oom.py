"""Out-of-memory errors with what the bot needs to advise the user (smaller size, batch, hires)."""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from pipeline.errors import OutOfMemory

logger = logging.getLogger(__name__)

__all__ = ["out_of_memory", "release_memory"]


def release_memory(device: torch.device) -> None:
    """Free what a failed job left behind, so the next job starts with the memory it had."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(detail: str, request: Any, hires_size: tuple[int, int] | None = None) -> OutOfMemory:
    """``OutOfMemory`` whose params also say what the job asked for.

    Params: ``detail``; ``width``, ``height``, ``batch_size`` (images per batch);
    ``hires_width``/``hires_height`` (0 without the hires fix); ``megapixels`` of the largest
    pass times the batch size (the figure that drives memory use).
    """
    hires_width, hires_height = hires_size or (0, 0)
    largest = max(request.width * request.height, hires_width * hires_height)
    error = OutOfMemory(detail)
    error.params.update(
        width=request.width,
        height=request.height,
        batch_size=request.num_images_per_prompt,
        hires_width=hires_width,
        hires_height=hires_height,
        megapixels=round(largest * request.num_images_per_prompt / 1e6, 2),
    )
    logger.warning("out of memory (%s) at %s", detail, error.params)
    return error

"""Out-of-memory errors: how to recognise one, and what the bot needs to advise the user.

A job that runs out of memory is retried once in a lower memory mode when the engine
allows it (``pipeline.memory``); if it fails again, :func:`out_of_memory` carries the
size, batch and hires figures the user's message suggests lowering.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from pipeline.errors import OutOfMemory

logger = logging.getLogger(__name__)

__all__ = ["describe", "is_oom", "out_of_memory", "release_memory"]

# CUDA's allocator, cuDNN when it has no workspace left, and the CPU allocator.
OOM_MARKERS = ("out of memory", "Unable to find a valid cuDNN algorithm", "can't allocate memory")


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory failure (of any device), as opposed to a bug."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in OOM_MARKERS)


def describe(exc: BaseException) -> str:
    """The first line of the error, which names what failed to allocate."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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

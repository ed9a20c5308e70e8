"""The engine's error types.

``PromptSyntaxError`` and ``AxisValueError`` are part of the A1111 parity contract
(PARITY-API.md): raised exactly where A1111 fails on the same text.

``EngineError`` subclasses carry a message ``key`` and ``params`` so the bot can show a
translated message without the engine knowing about locales.
"""

from __future__ import annotations

from typing import Any


class PromptSyntaxError(ValueError):
    """Prompt text that A1111 fails on (e.g. an unparsable emphasis weight)."""


class AxisValueError(ValueError):
    """X/Y/Z axis text that A1111 rejects."""


class EngineError(Exception):
    """An engine failure the user can act on; ``key`` names a message in the catalogs."""

    key = "engine.error"

    def __init__(self, message: str, **params: Any) -> None:
        super().__init__(message)
        self.params = params


class UnknownCheckpoint(EngineError):
    """A request named a checkpoint the library does not have."""

    key = "error.unknown_checkpoint"

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(
            f"unknown checkpoint {name!r}; available: {', '.join(available) or '(none)'}",
            name=name,
            available=", ".join(available) or "-",
        )


class UnknownSampler(EngineError):
    key = "error.unknown_sampler"

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(
            f"unknown sampler {name!r}; available: {', '.join(available)}",
            name=name,
            available=", ".join(available),
            suggestion="",  # the bot adds its "did you mean"
        )


class UnknownScheduler(EngineError):
    """A request's Schedule type is not one of A1111's labels (the engine takes them exactly)."""

    key = "error.unknown_scheduler"

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(
            f"unknown schedule type {name!r}; available: {', '.join(available)}",
            name=name,
            available=", ".join(available),
        )


class CheckpointLoadError(EngineError):
    """A checkpoint exists but could not be loaded (corrupt, unsafe, wrong layout)."""

    key = "error.checkpoint_load"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"could not load checkpoint {name!r}: {reason}", name=name, reason=reason)


class EditModelNeedsImage(EngineError):
    """Text to image with an instruct-pix2pix checkpoint, which only edits an init image."""

    key = "error.edit_model_needs_image"

    def __init__(self, checkpoint: str) -> None:
        super().__init__(
            f"checkpoint {checkpoint!r} is an instruct-pix2pix model: it edits an image, attach one",
            checkpoint=checkpoint,
        )


class EditModelAndPrompt(EngineError):
    """``AND`` in the prompt of an instruct-pix2pix job with an Image CFG scale other than 1
    (A1111 refuses the combination too)."""

    key = "error.edit_model_and"

    def __init__(self) -> None:
        super().__init__("AND is not supported by instruct-pix2pix checkpoints unless Image CFG scale is 1")


class OutOfMemory(EngineError):
    key = "error.out_of_memory"

    def __init__(self, detail: str) -> None:
        super().__init__(f"out of memory: {detail}", detail=detail)


class GenerationCancelled(Exception):
    """Raised on the device thread when a running job is cancelled; not a failure."""

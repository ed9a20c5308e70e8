"""Progress, live previews and stop checks of one engine call (:class:`_Progress`).

The engine's sampling passes report their sampler steps here; they become the user's
steps (a pass may run fewer or more sampler steps than it covers), a live preview every
few steps and a cancellation check between UNet calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from pipeline import previews
from pipeline.errors import GenerationCancelled
from pipeline.sampling import StepCallback

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
# a micro-batch's previews: (user step, one PNG per request, in order)
BatchPreviewCallback = Callable[[int, list[bytes]], None]
StopCheck = Callable[[], bool]


class _Progress:
    """Maps each pass's sampler steps onto the user's steps and checks for cancellation.

    ``total`` is what the user asked for: the steps, plus the hires steps when the hires
    fix runs. A pass covering user steps ``offset+1 … offset+length`` reports its sampler
    step ``index`` of ``count`` as ``offset + (index+1)·length // count``; only increases
    are reported.
    """

    def __init__(
        self,
        total: int,
        on_progress: ProgressCallback | None,
        should_stop: StopCheck | None,
        on_preview: BatchPreviewCallback | None = None,
        preview_every: int = 0,
        sizes: Sequence[int] = (),
    ):
        self.total = total
        self.sizes = list(sizes)  # images per member of a micro-batch: one preview each
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.reported = 0
        # A preview every ``preview_every`` user steps (0: none), made before the progress
        # report of that step so both can travel together; the last step gets none (the
        # result follows at once).
        self.on_preview = on_preview if preview_every > 0 else None
        self.preview_every = preview_every
        self.previewed = 0
        self._latents: Callable[[], torch.Tensor | None] | None = None
        self._sdxl = False

    def previews_from(self, latents: Callable[[], torch.Tensor | None], *, sdxl: bool) -> None:
        """Where the current pass's denoised latents come from (its denoiser)."""
        self._latents, self._sdxl = latents, sdxl

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def check(self) -> None:
        if self.stop_requested():
            raise GenerationCancelled()

    def report(self, step: int) -> None:
        step = min(step, self.total)
        if step <= self.reported:
            return
        first, self.reported = self.reported + 1, step
        if self.on_preview is not None and step < self.total and step - self.previewed >= self.preview_every:
            self._preview(step)
        if self.on_progress is not None:
            # A pass with fewer sampler steps than user steps (DDIM's schedule, img2img's
            # denoising share) jumps ahead; users still see every step, up to the total.
            for passed in range(first, step + 1):
                self.on_progress(passed, self.total)

    def _preview(self, step: int) -> None:
        latents = self._latents() if self._latents is not None else None
        if latents is None:
            return
        self.previewed = step
        try:
            parts = latents.split(self.sizes) if self.sizes else [latents]
            pngs = [previews.batch_preview_png(part, sdxl=self._sdxl) for part in parts]
        except Exception:  # a preview is a nicety: the job goes on without them
            logger.exception("live preview failed; no more previews for this job")
            self.on_preview = None
            return
        assert self.on_preview is not None
        self.on_preview(step, pngs)

    def finish(self) -> None:
        self.report(self.total)

    def span(self, offset: int, length: int) -> StepCallback:
        def on_step(index: int, count: int) -> None:
            self.report(offset + (index + 1) * length // max(count, 1))
            if self.reported < self.total:
                self.check()

        return on_step

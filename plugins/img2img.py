"""img2img actions: refine a result through img2img."""

from __future__ import annotations

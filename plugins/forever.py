"""Generate forever: keep drawing new seeds of one request until stopped, capped or out of quota."""

from __future__ import annotations

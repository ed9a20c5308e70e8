"""Negative-prompt presets: named negative prompts (the NAI list ships as ``nai``), --preset and per-user/chat defaults."""

from __future__ import annotations

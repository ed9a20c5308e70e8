"""Atelier's generation engine.

Usable on its own: nothing here imports ``bot`` or a chat library. Heavy libraries
(torch, diffusers, transformers) are imported by the modules that need them, never by
this package's ``__init__``.
"""

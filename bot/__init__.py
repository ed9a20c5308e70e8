"""Atelier's platform-neutral core: service, commands, plugin host, adapters and CLI."""

__version__ = "0.1.0"

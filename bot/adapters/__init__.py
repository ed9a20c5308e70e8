"""Adapters translate between a platform and the core; they never decide anything."""

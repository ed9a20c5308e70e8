"""Seed variations: V-buttons on results, subtle and strong variation strengths, lineage threads."""

from __future__ import annotations

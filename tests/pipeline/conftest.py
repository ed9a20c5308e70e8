"""Pipeline test fixtures.

``tiny_library`` and ``tiny_engine`` (session-scoped, CPU, built-in ``tiny`` model only)
come from ``tests/conftest.py``; ``engine`` is the name pipeline tests use for the latter,
so the whole session shares one tiny pipeline (importing torch/diffusers and the first
call at each shape are the expensive parts, not building it).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def engine(tiny_engine: Any) -> Any:
    """The session's CPU engine over ``tiny_library``; it swaps schedulers on the shared pipeline."""
    return tiny_engine

"""Pipeline test fixtures.

``tiny_library`` and ``tiny_engine`` (session-scoped, CPU, built-in ``tiny`` model only)
come from ``tests/conftest.py``; ``engine`` is the name pipeline tests use for the latter,
so the whole session shares one tiny pipeline (importing torch/diffusers and the first
call at each shape are the expensive parts, not building it).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def a1111_dir(tmp_path_factory: Any) -> Any:
    """``build_a1111_models`` in a folder of the module's own."""
    from tests.pipeline.a1111_layout import build_a1111_models

    return build_a1111_models(tmp_path_factory.mktemp("a1111"))


@pytest.fixture(scope="session")
def engine(tiny_engine: Any) -> Any:
    """The session's CPU engine over ``tiny_library``; it swaps schedulers on the shared pipeline."""
    return tiny_engine


def bf16_generate(engine, request):
    """``engine.generate`` in bfloat16, skipped where torch's CPU kernels for it are off (its
    bfloat16 packing needs AVX-512, which ``ATEN_CPU_CAPABILITY=default`` turns off)."""
    import pytest

    try:
        return engine.generate(request)
    except RuntimeError as exc:
        if "avx512" in str(exc):
            pytest.skip(f"bfloat16 CPU kernels unavailable: {exc}")
        raise

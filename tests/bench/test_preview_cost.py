"""bench/preview_cost.py keeps working (one short round on the CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "preview_cost.py"


def test_a_short_run_reports_the_preview_share_of_a_step(capsys):
    spec = importlib.util.spec_from_file_location("bench_preview_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--rounds", "2", "--warmup", "1", "--steps", "3", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "preview / step" in out and "(4 previews)" in out

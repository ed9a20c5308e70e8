"""bench/preview_cost.py keeps working (one short round on the CPU)."""

from __future__ import annotations

from tests.bench import load_bench


def test_a_short_run_reports_the_preview_share_of_a_step(capsys):
    module = load_bench("preview_cost")
    assert module.main(["--rounds", "2", "--warmup", "1", "--steps", "3", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "preview / step" in out and "(4 previews)" in out

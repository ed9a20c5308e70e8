"""bench/gpu.py dry-runs on the CPU: the same code, the tiny modules, a row per batch size."""

from __future__ import annotations

import json

from tests.bench import load_bench


def test_the_dry_run_measures_every_batch_size_and_counts_the_flops(capsys):
    module = load_bench("gpu")
    assert module.main(["--tiny", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4", "8"]
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT gpu ")]
    figures = json.loads(line.removeprefix("RESULT gpu "))
    assert figures["tflop_per_image"] > 0
    assert all(figures[f"batch{b}"]["atelier_images_per_s"] > 0 for b in (1, 4, 8))

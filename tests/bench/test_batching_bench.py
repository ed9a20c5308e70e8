"""bench/batching.py keeps working (one short round on the CPU)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "batching.py"


def test_a_short_run_reports_the_speed_up_and_compares_every_image(capsys):
    spec = importlib.util.spec_from_file_location("bench_batching", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--rounds", "1", "--users", "3", "--steps", "2", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"speed-up \(one at a time / batched, median of per-round ratios\): \d+\.\d\dx", out), (
        out
    )
    found = re.search(r"equal to their solo run: (\d+) of 3; largest channel difference: (\d+) level", out)
    assert found and int(found.group(2)) <= 1, out

"""bench/batching.py keeps working (one short round on the CPU)."""

from __future__ import annotations

import re

from tests.bench import load_bench


def test_a_short_run_reports_the_speed_up_and_compares_every_image(capsys):
    module = load_bench("batching")
    assert module.main(["--rounds", "1", "--users", "3", "--steps", "2", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"speed-up \(one at a time / batched, median of per-round ratios\): \d+\.\d\dx", out), (
        out
    )
    found = re.search(r"equal to their solo run: (\d+) of 3; largest channel difference: (\d+) level", out)
    assert found and int(found.group(2)) <= 1, out

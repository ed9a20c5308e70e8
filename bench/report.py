"""What every benchmark shares: one machine-readable line with its figures.

A benchmark prints what it measured for people, and then ``result(name, figures)``
prints one line ``RESULT <name> <json>`` that ``bench/run.py`` (``make bench``) collects
into its table. Ratios are against a baseline run in the same process, each the median
of per-round ratios, so a busy machine moves both sides alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

PREFIX = "RESULT "


def result(name: str, figures: dict[str, Any]) -> None:
    print(PREFIX + name + " " + json.dumps(figures, sort_keys=True), flush=True)


def pin_threads() -> int:
    """Torch threads as ``ATELIER_BENCH_THREADS`` says (default: all cores), the same in
    every benchmark of a run; returns the number used."""
    import torch

    threads = int(os.environ.get("ATELIER_BENCH_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def parse(output: str) -> dict[str, dict[str, Any]]:
    """The ``RESULT`` lines of a benchmark's output, by name."""
    found = {}
    for line in output.splitlines():
        if line.startswith(PREFIX):
            name, _, data = line[len(PREFIX) :].partition(" ")
            found[name] = json.loads(data)
    return found

"""bench/device_idle.py and bench/queue_throughput.py keep working (a few jobs on SQLite, and
on PostgreSQL through the shared queue)."""

from __future__ import annotations

import re

import pytest

from tests.bench import load_bench


def test_a_short_run_reports_how_busy_the_device_was(capsys):
    args = ["--jobs", "4", "--busy-ms", "1", "--size", "16", "--rounds", "1"]
    assert load_bench("device_idle").main(args) == 0
    assert "device busy   median" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["sqlite", "sqlite-batched"])
def test_a_short_run_reports_jobs_per_second_and_submit_latency(capsys, backend):
    args = ["--jobs", "6", "--clients", "2", "--warmup", "2", "--backend", backend]
    assert load_bench("queue_throughput").main(args) == 0
    out = capsys.readouterr().out
    assert f"{backend}:" in out and "jobs/s" in out and "submit -> queued" in out and "one submit" in out
    assert f"RESULT queue_{backend.replace('-', '_')} " in out


@pytest.mark.parametrize("backend", ["procrastinate", "procrastinate-worker"])
def test_the_shared_queue_bench_runs_through_a_worker(capsys, backend):
    """In the bench's process, or in a worker process of its own (held whole, SIGSTOP, while
    a submit's statements are counted)."""
    from tests.conftest import POSTGRES_URL

    if not POSTGRES_URL:
        pytest.skip("the shared queue needs PostgreSQL (ATELIER_TEST_POSTGRES_URL)")
    args = ["--jobs", "6", "--clients", "2", "--warmup", "2", "--backend", backend]
    assert load_bench("queue_throughput").main(args) == 0
    out = capsys.readouterr().out
    assert f"{backend}:" in out and "jobs/s" in out
    # a submit: the reservation and the job rows, one transaction (the small reads are kept)
    statements, commits = re.search(r"one submit +([\d.]+) statements, ([\d.]+) commits", out).groups()
    assert float(statements) <= 2.5 and float(commits) <= 1.2
    assert ("worker CPU per job" in out) == (backend == "procrastinate-worker")


def test_the_bench_run_collects_every_figure_into_a_table(tmp_path):
    import json

    out = tmp_path / "out"
    only = ["--only", "bot_latency", "--only", "device_idle"]
    assert load_bench("run").main(["--quick", "--out", str(out), *only]) == 0
    data = json.loads((out / "benchmarks.json").read_text(encoding="utf-8"))
    assert set(data["figures"]) == {"bot_latency", "device_idle"}
    assert data["figures"]["bot_latency"]["p99_ms"] > 0
    table = (out / "benchmarks.md").read_text(encoding="utf-8")
    (device_row,) = [line for line in table.splitlines() if line.startswith("| device busy")]
    assert "not run" not in device_row and "%" in device_row

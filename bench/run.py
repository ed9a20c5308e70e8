"""Every CPU benchmark in one run (``make bench``, ``atelier bench``): a table in markdown
and JSON.

Each benchmark runs in a process of its own with the same pinned torch threads
(``ATELIER_BENCH_THREADS``, default all cores) and prints its figures as a ``RESULT``
line (bench/report.py); every ratio is against a baseline run in the same process, the
median of per-round ratios. PostgreSQL figures are added when ``ATELIER_TEST_POSTGRES_URL``
is set. ``--quick`` runs each with the least work, to check that they all run.

Usage: ``python bench/run.py [--out bench-results] [--quick] [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name, script, arguments (full run), arguments (--quick)
BENCHES: list[tuple[str, str, list[str], list[str]]] = [
    ("engine_overhead", "engine_overhead.py", ["--rounds", "12", "--size", "64", "--steps", "8"],
     ["--rounds", "1", "--warmup", "1", "--size", "32", "--steps", "2"]),
    ("batching", "batching.py", ["--rounds", "3", "--size", "128", "--steps", "6"],
     ["--rounds", "1", "--users", "2", "--size", "32", "--steps", "2"]),
    ("preview_cost", "preview_cost.py", ["--rounds", "10", "--size", "128", "--steps", "8"],
     ["--rounds", "1", "--warmup", "1", "--size", "32", "--steps", "2"]),
    ("device_idle", "device_idle.py", ["--jobs", "50", "--busy-ms", "20", "--rounds", "2"],
     ["--jobs", "4", "--busy-ms", "1", "--size", "16", "--rounds", "1"]),
    ("queue_throughput", "queue_throughput.py", ["--jobs", "300", "--clients", "4"],
     ["--jobs", "6", "--clients", "2", "--warmup", "2", "--backend", "sqlite"]),
    ("bot_latency", "bot_latency.py", ["--users", "50", "--rounds", "3"], ["--users", "3", "--rounds", "1"]),
    ("startup", "startup.py", ["--rounds", "2"], ["--rounds", "1"]),
]  # fmt: skip

# what each figure is, for the table: (benchmark, key, label, format, target)
ROWS = [
    ("engine_overhead", "ratio", "engine / plain diffusers, same work (64x64, 8 steps)", "{:.3f}", "<= 1.05"),
    ("batching", "speedup", "micro-batching: 8 users one at a time / batched (128x128)", "{:.2f}x", ">= 2x"),
    ("batching", "max_difference", "batched vs solo image, largest channel difference", "{:d} level", "<= 1"),
    ("preview_cost", "fraction", "one live preview / one step (128x128)", "{:.1%}", "< 2 %"),
    ("device_idle", "busy_fraction", "device busy, 50 jobs of 20 ms back to back", "{:.1%}", ">= 95 %"),
    ("queue_sqlite", "jobs_per_s", "queue throughput, SQLite (no-op engine)", "{:.0f} jobs/s", ">= 300"),
    ("queue_sqlite", "queued_p99_ms", "submit -> queued p99, SQLite", "{:.0f} ms", "< 50 ms"),
    ("queue_sqlite_batched", "jobs_per_s", "queue throughput, SQLite, compatible jobs in micro-batches",
     "{:.0f} jobs/s", ">= 300"),
    ("queue_postgres", "jobs_per_s", "queue throughput, PostgreSQL, local queue", "{:.0f} jobs/s", ">= 300"),
    ("queue_procrastinate", "jobs_per_s", "queue throughput, PostgreSQL + procrastinate", "{:.0f} jobs/s",
     ">= 300"),
    ("queue_procrastinate", "queued_p99_ms", "submit -> queued p99, procrastinate", "{:.0f} ms", "< 50 ms"),
    ("queue_procrastinate_worker", "jobs_per_s", "queue throughput, procrastinate, worker in its own process",
     "{:.0f} jobs/s", ">= 300"),
    ("queue_procrastinate_worker", "queued_p99_ms", "submit -> queued p99, procrastinate, worker process",
     "{:.0f} ms", "< 50 ms"),
    ("bot_latency", "p50_ms", "command -> first message p50, 50 users at once", "{:.0f} ms", ""),
    ("bot_latency", "p99_ms", "command -> first message p99, 50 users at once", "{:.0f} ms", "< 3 s"),
    ("startup", "first_reply_s", "process start -> first reply", "{:.2f} s", ""),
    ("startup", "first_image_s", "process start -> first image (tiny, 4 steps)", "{:.2f} s", ""),
    ("startup", "idle_rss_mib", "memory, idle after start", "{:.0f} MiB", ""),
    ("startup", "peak_rss_mib", "memory, peak with tiny drawn", "{:.0f} MiB", ""),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from report import parse

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "ATELIER_BENCH_THREADS": os.environ.get("ATELIER_BENCH_THREADS") or str(os.cpu_count() or 1),
    }
    figures: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    failed: list[str] = []
    began = time.perf_counter()
    for name, script, full, quick in BENCHES:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(HERE / script), *(quick if args.quick else full)],
            capture_output=True, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        seconds[name] = time.perf_counter() - started
        found = parse(done.stdout)
        if done.returncode != 0 or not found:
            failed.append(name)
            print(f"{name}: failed (exit {done.returncode})\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        figures.update(found)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    total = time.perf_counter() - began
    machine = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}",
        "python": platform.python_version(),
        "threads": env["ATELIER_BENCH_THREADS"],
        "seconds": round(total, 1),
        "quick": args.quick,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(
        json.dumps({"run": machine, "seconds": seconds, "figures": figures}, indent=2), encoding="utf-8"
    )
    table = _table(figures, machine)
    (args.out / "benchmarks.md").write_text(table, encoding="utf-8")
    print(table)
    return 1 if failed else 0


def _table(figures: dict[str, dict], machine: dict) -> str:
    lines = [
        f"Run {machine['when']} on {machine['machine']}, Python {machine['python']}, "
        f"{machine['threads']} torch threads, {machine['seconds']:.0f} s in all.",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
    ]
    for bench, key, label, form, target in ROWS:
        value = figures.get(bench, {}).get(key)
        shown = "not run" if value is None else form.format(value)
        lines.append(f"| {label} | {shown} | {target} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Cold start and memory: a fresh `atelier console` process from its start to its first
reply and to its first image, and how much memory it holds idle and after drawing.

Each round starts a new process (SQLite in a temporary folder, the built-in ``tiny``
checkpoint, ``[engine] warm_up`` as configured), sends ``/help`` and then a small
``/draw``, and reads the process's resident memory from /proc: after the first reply
(idle) and its peak after the image (the checkpoint loaded and used). Prints medians.

Usage: ``python bench/startup.py [--rounds 3] [--warm-up true|false]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-up", choices=("true", "false"), default="true")
    return parser.parse_args(argv)


def _memory_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _round(tmp: Path, warm_up: str) -> dict[str, float]:
    config = tmp / "config.toml"
    config.write_text(
        f'[bot]\ndata_dir = "{tmp / "data"}"\n'
        f'[engine]\ndevice = "cpu"\nwarm_up = {warm_up}\nmodels_dir = "{tmp / "models"}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "ATELIER_CONFIG": str(config), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ATELIER_DATABASE_URL", None)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "console", "--json", "--user", "bench"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    figures: dict[str, float] = {}
    try:
        process.stdin.write("/help\n")
        process.stdin.flush()
        for line in process.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") in ("reply", "error") and "first_reply_s" not in figures:
                figures["first_reply_s"] = time.perf_counter() - started
                time.sleep(0.5)  # a warm-up that runs beside the first reply ends
                figures["idle_rss_mib"] = _memory_mib(process.pid, "VmRSS")
                process.stdin.write("/draw a lighthouse --steps 4 --size 64x64 --seed 1\n")
                process.stdin.flush()
            elif event.get("event") == "finished":
                figures["first_image_s"] = time.perf_counter() - started
                figures["peak_rss_mib"] = _memory_mib(process.pid, "VmHWM")
                break
        process.stdin.close()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return figures


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import result

    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(_round(Path(tmp), args.warm_up))
    figures = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"rounds={args.rounds} warm_up={args.warm_up} (a new process each round, SQLite, tiny)")
    print(f"start -> first reply   median {figures['first_reply_s']:.2f} s")
    print(f"start -> first image   median {figures['first_image_s']:.2f} s")
    print(f"memory idle            median {figures['idle_rss_mib']:.0f} MiB resident")
    print(f"memory peak (drawn)    median {figures['peak_rss_mib']:.0f} MiB")
    result("startup", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

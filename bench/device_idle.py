"""How much of the wall time is the device busy while short jobs run back to back?

Runs a real App (store on a SQLite file, service, built-in plugins, LocalQueue) whose
device is a runner that is busy ``--busy-ms`` per job (a sleep: the GIL is free, as
while torch runs) and returns one ``--size`` image with detail, so saving the PNG costs
what a real one does. Each round lines ``--jobs`` jobs up behind a held one, lets them
run, and measures from the first job's start on the device to the last one's end: the
busy fraction is the device's time over that wall time (target 95 % or more); the gap
is the mean idle time between two jobs.

Usage: ``python bench/device_idle.py [--jobs 50] [--busy-ms 20] [--size 256] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--busy-ms", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as tmp:
        fractions, gaps = asyncio.run(_bench(Path(tmp), args))
    print(
        f"jobs={args.jobs} busy={args.busy_ms:g} ms size={args.size}x{args.size} rounds={args.rounds} (sqlite)"
    )
    print(f"device busy   median {100 * statistics.median(fractions):.1f} % of wall time (target >= 95 %)")
    print(f"              rounds {', '.join(f'{100 * f:.1f} %' for f in fractions)}")
    print(f"gap per job   median {1000 * statistics.median(gaps):.2f} ms")
    from report import result

    result(
        "device_idle",
        {"busy_fraction": statistics.median(fractions), "gap_ms": 1000 * statistics.median(gaps),
         "jobs": args.jobs, "busy_ms": args.busy_ms},
    )  # fmt: skip
    return 0


async def _bench(tmp: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    from queue_app import ACTOR, StandInRunner, bench_app, hold_device

    runner = StandInRunner(args.busy_ms / 1000, args.size)
    fractions, gaps = [], []
    async with bench_app(tmp, runner) as app:
        await app.service.handle_line("/draw warm up", ACTOR)
        await app.idle()
        for round_index in range(args.rounds):
            await hold_device(app, runner)
            for k in range(args.jobs):
                await app.service.handle_line(f"/draw a lighthouse --seed {round_index * 1000 + k}", ACTOR)
            first = len(runner.spans) + 1  # after the held job
            runner.gate.set()
            await app.idle()
            spans = runner.spans[first:]
            assert len(spans) == args.jobs, len(spans)
            wall = spans[-1][1] - spans[0][0]
            busy = sum(end - start for start, end in spans)
            fractions.append(busy / wall)
            gaps.append((wall - busy) / (len(spans) - 1))
    return fractions, gaps


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())

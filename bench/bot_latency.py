"""How soon does a user get an answer? The bot path from a command to the first message.

Runs a real App (store on a SQLite file, service, built-in plugins, LocalQueue) whose
device is a stand-in that returns one small image at once, and the delivery layer with
an adapter that only records when each message is handed to it (a chat platform's send
would follow). ``--users`` simulated users each send ``/draw`` at the same moment,
``--rounds`` times; the latency is from a user's command to the delivery of its first
message (the acknowledgement a chat platform shows). Prints p50 and p99 over all
commands and the per-round p99s.

Usage: ``python bench/bot_latency.py [--users 50] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


class RecordingAdapter:
    """A platform that accepts every message at once and notes when it got it."""

    platform = "console"

    def __init__(self) -> None:
        self.first: dict[str, float] = {}  # chat -> when its first message was handed over
        self._numbers = iter(range(1, 10**9))

    def limits(self, route):  # noqa: ANN001, ANN201
        from bot.adapters.base import Limits

        return Limits(progress_interval=2.0)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def deliver(self, message):  # noqa: ANN001, ANN201
        from bot.types import MessageRef

        self.first.setdefault(message.route.chat_id, time.perf_counter())
        return MessageRef(message.route, str(next(self._numbers)))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import result

    with tempfile.TemporaryDirectory() as tmp:
        latencies, round_p99 = asyncio.run(_bench(Path(tmp), args))
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"users={args.users} rounds={args.rounds} (sqlite, a stand-in device)")
    print(f"command -> first message   p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    print(f"per-round p99              {', '.join(f'{x * 1000:.0f} ms' for x in round_p99)}")
    result("bot_latency", {"p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "users": args.users})
    return 0


async def _bench(tmp: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    from queue_app import StandInRunner, bench_app

    from bot.delivery import Delivery
    from bot.types import Actor

    latencies: list[float] = []
    round_p99: list[float] = []
    async with bench_app(tmp, StandInRunner()) as app:
        adapter = RecordingAdapter()
        delivery = Delivery(app, adapter)
        delivery.start()
        try:
            for number in range(args.rounds + 1):  # the first round warms up
                adapter.first.clear()
                actors = [
                    Actor("console", f"u{number}-{i}", f"User {i}", chat_id=f"c{number}-{i}")
                    for i in range(args.users)
                ]
                sent: dict[str, float] = {}

                await asyncio.gather(*(_command(delivery, actor, sent) for actor in actors))
                await app.idle()
                await delivery.idle()
                if number == 0:
                    continue
                these = sorted(adapter.first[chat] - sent[chat] for chat in sent)
                latencies.extend(these)
                round_p99.append(these[min(len(these) - 1, int(0.99 * len(these)))])
        finally:
            await delivery.stop()
    return latencies, round_p99


async def _command(delivery, actor, sent: dict[str, float]) -> None:  # noqa: ANN001
    sent[actor.chat_id] = time.perf_counter()
    await delivery.command(f"/draw a lighthouse number {actor.user_id}", actor)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())

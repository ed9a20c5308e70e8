"""A worker App for the queue benches in a process of its own: the shared queue's other
side, as ``atelier worker`` runs it on a GPU host, with a no-op device (a stand-in that
returns one 8x8 image at once; bench/queue_app.py). Prints ``ready`` once it takes jobs;
SIGTERM stops it.

Usage: ``python bench/queue_worker.py --url postgresql+asyncpg://... --data DIR``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path


async def _serve(url: str, data: Path) -> None:
    from queue_app import StandInRunner, bench_settings

    from bot.app import build_app
    from pipeline.checkpoints import CheckpointLibrary

    settings = bench_settings(data, "worker", url, shared=True)
    worker = build_app(settings, engines=[StandInRunner()], library=CheckpointLibrary(None), worker=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.url, args.data))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())

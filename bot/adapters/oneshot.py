"""``atelier generate``: one /draw through the adapter contract, its first image to a file.

The smallest adapter: no limits, nothing shown while the job runs; the result's PNG
(read through the image store like on any platform) is written to the output path, and
a refusal or a failure is kept for the CLI to print.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bot.adapters.base import Limits, Outgoing
from bot.delivery import Delivery
from bot.types import Failed, MessageRef, Reply, Route


class OneShotAdapter:
    platform = "console"

    def __init__(self, app: Any, output: Path) -> None:
        self.app = app
        self.output = output
        self.delivery = Delivery(app, self)
        self.errors: list[str] = []
        self.written: Path | None = None

    def limits(self, route: Route) -> Limits:
        return Limits()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to disconnect."""

    async def deliver(self, message: Outgoing) -> MessageRef:
        source = message.source
        if isinstance(source, Reply) and source.error:
            self.errors.append(message.text)
        elif isinstance(source, Failed):
            locale = source.actor.locale
            self.errors.append(self.app.translator.t(locale, source.key, **source.params))
        elif message.kind == "finished" and self.written is None and message.files:
            data = message.files[0].data or b""
            await asyncio.to_thread(_write, self.output, data)
            self.written = self.output
        return MessageRef(message.route, "-")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

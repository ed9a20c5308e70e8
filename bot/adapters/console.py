"""The console adapter: commands on stdin, one line (or one JSON object) per event on stdout.

It is the reference adapter for scripts and tests: ``atelier console --json`` prints
every reply and job event as a JSON object. At end of input it waits until every queued
job (its own and those recovered from an earlier run) has ended, then exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from bot.events import event_json, event_text, reply_json, reply_text
from bot.types import Actor, JobEvent, Reply


class ConsoleAdapter:
    def __init__(self, app: Any, actor: Actor, *, json_mode: bool = False, out: TextIO | None = None) -> None:
        self.app = app
        self.actor = actor
        self.json_mode = json_mode
        self.out = out or sys.stdout

    def emit(self, data: dict[str, Any] | str) -> None:
        line = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
        self.out.write(line + "\n")
        self.out.flush()

    def on_event(self, event: JobEvent) -> None:
        translator = self.app.translator
        self.emit(event_json(event, translator) if self.json_mode else event_text(event, translator))

    def show(self, replies: list[Reply]) -> None:
        translator, locale = self.app.translator, self.actor.locale
        for reply in replies:
            self.emit(
                reply_json(reply, translator, locale)
                if self.json_mode
                else reply_text(reply, translator, locale)
            )

    async def run_lines(self, lines: Any) -> None:
        """Handle each line of an async iterable, then wait for the queue to drain."""
        async for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            self.show(await self.app.service.handle_line(line, self.actor, {"console": True}))
        await self.app.idle()

    async def run(self, stdin: TextIO | None = None) -> None:
        """Start the App (recovered jobs' events included), serve stdin, stop the App."""
        stream = stdin or sys.stdin
        unsubscribe = self.app.bus.subscribe(self.on_event)
        try:
            recovered = await self.app.start()
            if not self.json_mode and stream.isatty():
                self.show([Reply("console.ready"), Reply("console.noise_note")])
            if recovered:
                self.show([Reply("console.recovered", {"count": recovered})])
            await self.run_lines(_read_lines(stream))
        finally:
            unsubscribe()
            await self.app.stop()


async def _read_lines(stream: TextIO) -> Any:
    """Read a blocking text stream on a thread, so the event loop keeps serving jobs."""
    while True:
        line = await asyncio.to_thread(stream.readline)
        if not line:
            return
        yield line

"""The console adapter: commands on stdin, one line (or one JSON object) per event on stdout.

It is the reference adapter for scripts and tests: ``atelier console --json`` prints
every reply and job event as a JSON object. At end of input it waits until every queued
job (its own and those recovered from an earlier run) has ended, then exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from bot.events import event_json, event_text, reply_json, reply_text
from bot.types import Actor, Attachment, JobEvent, Reply


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
        """Handle each command, then wait for the queue to drain.

        A line ending in a backslash continues on the next one (a pasted multi-line
        infotext); ``--attach PATH`` at the end of a command attaches that file, the
        console's equivalent of a Discord attachment or a Telegram photo.
        """
        pending: list[str] = []
        async for raw in lines:
            line = raw.rstrip("\r\n")
            if line.endswith("\\"):
                pending.append(line[:-1])
                continue
            text = "\n".join([*pending, line]).strip()
            pending = []
            if not text or text.startswith("#"):
                continue
            text, attachments = _attachments(text)
            self.show(await self.app.service.handle_line(text, self.actor, {"console": True}, attachments))
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


def _attachments(text: str) -> tuple[str, tuple[Attachment, ...]]:
    head, sep, path = text.rpartition(" --attach ")
    if not sep:
        return text, ()
    file = Path(path.strip().strip('"'))
    data = file.read_bytes() if file.is_file() else b""
    return head, (Attachment(file.name, data),)


async def _read_lines(stream: TextIO) -> Any:
    """Read a blocking text stream on a thread, so the event loop keeps serving jobs."""
    while True:
        line = await asyncio.to_thread(stream.readline)
        if not line:
            return
        yield line

"""The console adapter: commands on stdin, one line (or one JSON object) per event on stdout.

It is the reference adapter for scripts and tests: ``atelier console --json`` prints
every reply and job event as a JSON object. At end of input it waits until every queued
job (its own and those recovered from an earlier run) has ended, then exits.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import sys
from typing import Any, TextIO

from bot.errors import UserError
from bot.events import event_json, event_text, reply_json, reply_text
from bot.options import shown
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
        async for text in commands(lines):
            await self.handle(text)
        await self.app.idle()

    async def handle(self, text: str) -> list[Reply]:
        """One command: its replies are printed and returned.

        Never raises: whatever one line does, the console goes on to the next, so an
        unexpected error becomes the usual "something went wrong (ref ...)" reply.
        """
        try:
            replies = await self._replies(text)
            self.show(replies)
        except Exception as exc:
            replies = [self.app.service.error_reply(exc, self.actor)]
            self.show(replies)
        return replies

    async def _replies(self, text: str) -> list[Reply]:
        text, path = split_attach(text)
        attachments: tuple[Attachment, ...] = ()
        if path is not None:
            limit = self.app.settings.limits.max_upload_bytes
            try:
                attachments = (await asyncio.to_thread(read_attachment, path, limit),)
            except UserError as exc:
                return [Reply(exc.key, exc.params, error=True)]
        return await self.app.service.handle_line(text, self.actor, {"console": True}, attachments)

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


async def commands(lines: Any) -> Any:
    """The commands in a stream of raw lines: continued lines joined, blanks and
    ``#`` comments skipped."""
    pending: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        text = "\n".join([*pending, line]).strip()
        pending = []
        if text and not text.startswith("#"):
            yield text


def split_attach(text: str) -> tuple[str, str | None]:
    """``/pnginfo --attach a.png`` -> ``("/pnginfo", "a.png")``; the path is None without one."""
    head, sep, path = text.rpartition(" --attach ")
    if not sep:
        return text, None
    return head, path.strip().strip('"')


def read_attachment(path: str, max_bytes: int) -> Attachment:
    """A local file as an upload, read on a worker thread.

    Only a regular file is read, and at most ``max_bytes + 1`` bytes of it, so a file
    over the upload cap is refused (by the service's one check) without being held
    whole. Opening does not block on a FIFO, and the type is checked again on the open
    file, so a path swapped for a device after the first check is not read either. Every
    failure is a translated ``UserError`` naming the path.
    """
    name = shown(path)
    if not path:
        raise UserError("console.attach_missing", path=name)
    try:
        # a device is refused before it is opened: opening some (tapes, terminals) acts
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UserError("console.attach_not_a_file", path=name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except ValueError:  # a NUL character: no path can hold one
        raise UserError("console.attach_missing", path=name) from None
    except OSError as exc:
        raise _open_error(exc, name) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError("console.attach_not_a_file", path=name)
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:  # e.g. /proc/self/mem: a regular file whose reads fail (EIO)
        raise UserError("console.attach_unreadable", path=name, error=_errno_name(exc)) from None
    finally:
        os.close(fd)
    return Attachment(os.path.basename(path) or name, b"".join(chunks))


def _open_error(exc: OSError, name: str) -> UserError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return UserError("console.attach_missing", path=name)
    if exc.errno == errno.ENAMETOOLONG:
        return UserError("console.attach_name_too_long", path=name)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UserError("console.attach_denied", path=name)
    return UserError("console.attach_unreadable", path=name, error=_errno_name(exc))


def _errno_name(exc: OSError) -> str:
    """``EIO``: the same in every language, where the OS's own text is English."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


async def _read_lines(stream: TextIO) -> Any:
    """Read a blocking text stream on a thread, so the event loop keeps serving jobs."""
    while True:
        line = await asyncio.to_thread(stream.readline)
        if not line:
            return
        yield line

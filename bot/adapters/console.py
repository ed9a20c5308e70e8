"""The console adapter: commands on stdin, one line (or one JSON object) per message on stdout.

It is the reference adapter for scripts and tests: ``atelier console --json`` prints
every reply and job event as a JSON object (bot/adapters/console_render.py). It is built
on the adapter contract like any chat platform (bot/adapters/base.py): no throttling, no
paging, no upload limits, and every message, edits included, is a new line. At end of
input it waits until every queued job (its own and those recovered from an earlier run)
has ended and been printed, then exits.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import stat
import sys
from typing import Any, TextIO

from bot.adapters.base import Limits, Outgoing
from bot.adapters.console_render import message_json, message_text, write_outbox
from bot.commands import split_command
from bot.delivery import Delivery
from bot.errors import NotFound, UserError
from bot.options import shown
from bot.types import Actor, Attachment, JobEvent, MessageRef, OutgoingFile, Reply, Route


class ConsoleAdapter:
    platform = "console"

    def __init__(
        self,
        app: Any,
        actor: Actor,
        *,
        json_mode: bool = False,
        out: TextIO | None = None,
        route: Route | None = None,
    ) -> None:
        self.app = app
        self.actor = actor
        self.route = route or Route.of(actor)
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.delivery = Delivery(app, self)
        self._numbers = itertools.count(1)

    # the adapter contract ------------------------------------------------------------------------

    def limits(self, route: Route) -> Limits:
        return Limits()  # a terminal: every step, every button, any file

    def accepts(self, event: JobEvent) -> bool:
        """A terminal is one user's. With a shared queue every bot process hears every
        job's events, so it shows only its user's; with the local queue it shows what its
        own process runs (its user's jobs, and any it took over from a process that died)."""
        return not self.app.shared_queue or event.actor.user_id == self.actor.user_id

    async def start(self) -> None:
        """Nothing to connect to: stdin is read by ``run``."""

    async def stop(self) -> None:
        """Nothing to disconnect."""

    async def deliver(self, message: Outgoing) -> MessageRef:
        if message.kind == "progress":
            paths: list[str] = []  # a preview is for chat platforms; the console prints the step
        else:
            paths = [await self._path(file) for file in message.files]
        translator = self.app.translator
        self.emit(
            message_json(message, paths, translator)
            if self.json_mode
            else message_text(message, paths, translator, self.actor.locale)
        )
        where = Route(message.route.platform, message.route.chat_id, message.route.thread_id)
        return MessageRef(where, str(next(self._numbers)))

    async def _path(self, file: OutgoingFile) -> str:
        """A stored image at its local path; anything else written to the outbox."""
        local = getattr(self.app.images, "path", None)
        if file.image_id is not None and local is not None:
            try:
                return str(await local(file.image_id))
            except NotFound:
                pass
        if file.data is None:
            return ""
        folder = self.app.settings.bot.data_dir / "outbox"
        return str(await asyncio.to_thread(write_outbox, folder, file.name, file.data))

    # the terminal ---------------------------------------------------------------------------------

    def emit(self, data: dict[str, Any] | str) -> None:
        line = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
        self.out.write(line + "\n")
        self.out.flush()

    async def show(self, replies: list[Reply]) -> None:
        await self.delivery.send(replies, self.actor, self.route)

    async def run_lines(self, lines: Any) -> None:
        """Handle each command, then wait for the queue to drain and its events to print.

        A paste is one message: lines that arrive together with a command line (see
        ``commands``) are its text, so a pasted A1111 infotext reaches /draw or /pnginfo
        whole. A line ending in a backslash continues on the next one; ``--attach PATH``
        at the end of a command attaches that file, the console's equivalent of a Discord
        attachment or a Telegram photo.
        """
        async for text in commands(lines):
            await self.handle(text)
        await self.app.idle()
        await self.delivery.idle()

    async def handle(self, text: str) -> list[Reply]:
        """One command: its replies are printed and returned.

        Never raises: whatever one line does, the console goes on to the next, so an
        unexpected error becomes the usual "something went wrong (ref ...)" reply.
        """
        try:
            if split_command(text) is None:
                # a chat message that is no command starts nothing; say how it was read
                replies = [Reply("error.not_a_command", {"text": shown(text)}, error=True)]
                await self.show(replies)
                return replies
            text, path = split_attach(text)
            attachments: tuple[Attachment, ...] = ()
            if path is not None:
                limit = self.app.settings.limits.max_upload_bytes
                try:
                    attachments = (await asyncio.to_thread(read_attachment, path, limit),)
                except UserError as exc:
                    replies = [Reply(exc.key, exc.params, error=True)]
                    await self.show(replies)
                    return replies
            return await self.delivery.command(text, self.actor, self.route, attachments)
        except Exception as exc:
            replies = [self.app.service.error_reply(exc, self.actor)]
            await self.show(replies)
            return replies

    async def run(self, stdin: TextIO | None = None) -> None:
        """Start the App (recovered jobs' events included), serve stdin, stop the App."""
        stream = stdin or sys.stdin
        self.delivery.start()
        try:
            recovered = await self.app.start()
            await self.start()
            if not self.json_mode and stream.isatty():
                await self.show([Reply("console.ready"), Reply("console.noise_note")])
            if recovered:
                await self.show([Reply("console.recovered", {"count": recovered})])
            await self.run_lines(_read_lines(stream))
        finally:
            await self.stop()
            await self.delivery.stop()
            await self.app.stop()


PASTE_BURST_S = 0.05  # lines this close behind a command line came with it (a paste)


async def commands(lines: Any, burst: float = PASTE_BURST_S) -> Any:
    """The commands in a stream of raw lines, blanks and ``#`` comments skipped.

    A terminal hands a paste over line by line. Lines that do not start with ``/`` and
    arrive within ``burst`` seconds after a command line (or after a line already joined
    to it) belong to that command: a pasted three-line infotext is one text. A line
    ending in a backslash continues on the next one whenever it comes.
    """
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for raw in lines:
                await queue.put(raw)
        finally:
            await queue.put(None)

    task = asyncio.create_task(pump())
    held: str | None = None  # a command line that a paste may still continue
    continued: list[str] = []
    try:
        while True:
            if held is not None and not continued:
                try:
                    raw = await asyncio.wait_for(queue.get(), burst)
                except TimeoutError:
                    yield held
                    held = None
                    continue
            else:
                raw = await queue.get()
            if raw is None:
                break
            line = raw.rstrip("\r\n")
            if line.endswith("\\"):
                continued.append(line[:-1])
                continue
            text = "\n".join([*continued, line])
            continued = []
            stripped = text.strip()
            if held is not None and stripped and not stripped.startswith(("/", "#")):
                held += "\n" + stripped
                continue
            if held is not None:
                yield held
                held = None
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("/"):
                held = stripped
            else:
                yield stripped
        rest = "\n".join(continued).strip()
        if held is not None:
            yield held + ("\n" + rest if rest else "")
        elif rest and not rest.startswith("#"):
            yield rest
    finally:
        task.cancel()


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

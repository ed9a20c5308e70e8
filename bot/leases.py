"""Which process holds a job: an owner id per App, leases kept alive by a heartbeat.

DESIGN.md §5: every open job row names the process holding it and a lease that process
renews. Another process takes a job over only when its lease ran out, or when its owner
ran on this machine and has exited, so a second process on the same database never runs
a live one's jobs, and a restart after a crash on the same machine need not wait.

Leases compare the clocks of the processes sharing the database: across machines, keep
them in step (NTP) to well under ``[queue] lease_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.service import Service

log = logging.getLogger(__name__)


@functools.cache
def _process_space() -> str | None:
    """Processes with the same key see the same process ids: one boot of one machine, one
    PID namespace (each container has its own). None where it cannot be told."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:12]


def new_owner_id() -> str:
    """``host:pid:space:random``: readable in the database, unique per App (a restarted
    process, or a second App in one process, is a new owner)."""
    host = socket.gethostname()[:64].replace(":", "-") or "host"
    return f"{host}:{os.getpid()}:{_process_space() or '-'}:{secrets.token_hex(4)}"


def owner_gone(owner: str) -> bool:
    """True only when ``owner`` ran in this process space and its process no longer exists.
    Any doubt (another machine or container, a pid now used by another process, this very
    process) answers False: then only the lease running out frees its jobs."""
    parts = owner.rsplit(":", 3)
    space = _process_space()
    if len(parts) != 4 or space is None or parts[2] != space or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


class Heartbeat:
    """Renews this App's leases every third of the lease and, when ``adopt``, takes over
    the jobs of processes that are gone (``Service.recover``) on the same beat."""

    def __init__(self, service: Service, lease_seconds: float) -> None:
        self.service = service
        self.interval = lease_seconds / 3
        self._task: asyncio.Task[None] | None = None

    def start(self, *, adopt: bool) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._beat(adopt), name="lease-heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _beat(self, adopt: bool) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.service.renew_leases()
                if adopt:
                    adopted = await self.service.recover()
                    if adopted:
                        log.info("took over %d job(s) of a process that is gone", adopted)
            except Exception:  # the database may be away for a moment: try again next beat
                log.exception("lease heartbeat failed")

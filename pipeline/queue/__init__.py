"""Job queues: where stored jobs wait for a device.

``JobQueue`` is the protocol the bot talks to; ``LocalQueue`` runs jobs in-process with
one worker per device. The store, not the queue, is the source of truth: a queue may be
rebuilt from the queued and interrupted rows after a restart.
"""

from pipeline.queue.base import Job, JobListener, JobQueue
from pipeline.queue.local import LocalQueue

__all__ = ["Job", "JobListener", "JobQueue", "LocalQueue"]

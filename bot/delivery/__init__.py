"""The core's delivery layer: one per adapter, the same for every platform.

Adapters translate (bot/adapters/base.py); this layer decides how the core's answers
and job events reach a conversation:

- it subscribes to the App's bus once and keeps the events whose route is on the
  adapter's platform, rendered in the actor's language (``render``);
- one conversation (platform, chat, thread) is one queue, delivered in order by one
  task: a command's answer never overtakes the "queued" message published before it;
- every job has one tracked message (stored on its row, so it outlives a restart, with
  the further pages of its buttons attached):
  progress edits it, the result edits it (the adapter may replace it instead), notices
  about the job or its group answer it;
- progress is throttled per conversation (or per chat, where the adapter's limits say
  so) with the adapter's interval for the route, and coalesced: only a job's newest step waits, a final event never waits behind it;
- buttons are paged to the platform's limits, with tokens for ids too long (``pages``);
  files are fitted to its upload limits (``fitting``);
- a send that fails is retried a bounded number of times (waiting what ``RetryAfter``
  asks), and an edit that fails is sent as a new message;
- a chain of variations (``thread_key``) gets a thread of its own where the platform has
  threads: the first variation opens it under the chain's first result, and every later
  one is posted there, also after a restart.
"""

from bot.delivery.layer import Delivery

__all__ = ["Delivery"]

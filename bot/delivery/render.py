"""What an event or a reply says, in the user's language, before any platform's limits.

The same for every adapter: the delivery layer pages a draft's actions and fits its files
afterwards, for the platform at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.i18n import Translator
from bot.types import (
    Action,
    Cancelled,
    Deleted,
    Failed,
    Finished,
    JobEvent,
    Notice,
    OutgoingFile,
    Progress,
    Queued,
    Reply,
    Started,
)


@dataclass(frozen=True)
class Draft:
    """One message's content: ``show_id`` names the generation its images come from (a
    note about a file too big for the chat points there)."""

    kind: str
    text: str
    files: tuple[OutgoingFile, ...] = ()
    actions: tuple[Action, ...] = ()
    spoiler: bool = False
    show_id: str | None = None


def event_draft(event: JobEvent, translator: Translator) -> Draft:
    locale, short = event.actor.locale, event.generation_id
    if isinstance(event, Queued):
        return Draft(event.kind, translator.t(locale, "event.queued", id=short, position=event.position))
    if isinstance(event, Started):
        return Draft(event.kind, translator.t(locale, "event.started", id=short))
    if isinstance(event, Progress):
        text = translator.t(locale, "event.progress", id=short, step=event.step, total=event.total)
        preview = (
            (OutgoingFile(f"{short}-preview.png", "image", data=event.preview),) if event.preview else ()
        )
        return Draft(event.kind, text, preview)
    if isinstance(event, Finished):
        seeds = ", ".join(str(image.seed) for image in event.images)
        files = tuple(
            OutgoingFile(f"{short}-{n}.png", "image", image_id=image.id)
            for n, image in enumerate(event.images, start=1)
        )
        text = translator.t(locale, "event.done", id=short, seeds=seeds)
        return Draft(event.kind, text, files, event.actions, event.spoiler, show_id=short)
    if isinstance(event, Failed):
        reason = translator.t(locale, event.key, **event.params)
        return Draft(event.kind, translator.t(locale, "event.failed", id=short, reason=reason))
    if isinstance(event, Cancelled):
        return Draft(event.kind, translator.t(locale, "event.cancelled", id=short))
    if isinstance(event, Deleted):
        return Draft(event.kind, translator.t(locale, "event.deleted", id=short))
    if isinstance(event, Notice):
        draft = reply_draft(event.reply, translator, locale)
        return Draft(event.kind, draft.text, draft.files, draft.actions, show_id=short)
    return Draft(event.kind, f"[{short}] {event.kind}")


def reply_draft(reply: Reply, translator: Translator, locale: str) -> Draft:
    kind = "error" if reply.error else "reply"
    text = translator.t(locale, reply.key, **reply.params)
    return Draft(kind, text, tuple(reply.files), tuple(reply.actions))

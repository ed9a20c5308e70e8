"""The delivery layer itself (see the package's docstring): a queue per conversation,
the tracked message of each job, throttled progress, bounded retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bot.adapters.base import Adapter, Limits, Outgoing, RetryAfter
from bot.delivery.fitting import fit_files
from bot.delivery.pages import page_actions
from bot.delivery.render import Draft, event_draft, reply_draft
from bot.types import (
    Actor,
    Attachment,
    Cancelled,
    Deleted,
    Failed,
    Finished,
    Invocation,
    JobEvent,
    MessageRef,
    Notice,
    Progress,
    Reply,
    Route,
)
from models.base import utcnow
from models.delivery_store import TOKEN_PREFIX, DeliveryStore

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

FINAL = (Finished, Failed, Cancelled)
THROTTLE_MEMORY = 256  # throttles kept before those that have run out are dropped
ENDS_MEMORY = 4096  # jobs whose end this layer has taken, kept to take each one once

Destination = tuple[str, str | None, str | None]  # platform, chat, thread: one conversation


@dataclass
class _Item:
    """A message waiting in a conversation: a job's event, or the replies to a command
    (``done`` resolves once they were sent)."""

    event: JobEvent | None = None
    replies: tuple[Actor, Route, list[Reply]] | None = None
    done: asyncio.Future[None] | None = None


@dataclass
class _Conversation:
    key: Destination
    throttle: tuple[str | None, ...]  # the conversations sharing its progress interval
    queue: deque[_Item] = field(default_factory=deque)
    progress: dict[str, Progress] = field(default_factory=dict)  # job -> its newest waiting step
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Delivery:
    attempts = 3  # sends of one message before it is given up
    max_retry_wait = 60.0  # the longest one RetryAfter may hold a message back (seconds)

    def __init__(self, app: App, adapter: Adapter) -> None:
        self.app = app
        self.adapter = adapter
        self.store = DeliveryStore(app.store)
        self._conversations: dict[Destination, _Conversation] = {}
        self._throttles: dict[tuple[str | None, ...], float] = {}  # -> loop time before which no progress
        self._messages: dict[str, MessageRef] = {}  # open jobs' messages; the store keeps all
        # job -> whether its end came from a replay (bot/replay.py): a live end and a
        # replayed one of the same job are shown once
        self._ends: dict[str, bool] = {}
        self._unsubscribe: Any = None

    # what adapters call -------------------------------------------------------------------------

    def start(self) -> None:
        """Take the bus's events from now on: call it before ``App.start`` so the events of
        jobs recovered at start, and the ends that never reached their chat, reach their
        conversations too."""
        if self._unsubscribe is None:
            self._unsubscribe = self.app.bus.subscribe(self._on_event)
            self.app.replay.serve(self.adapter.platform)

    async def stop(self) -> None:
        """No more events; what is queued still goes out (waiting progress is dropped)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            self.app.replay.leave(self.adapter.platform)
        for conversation in self._conversations.values():
            conversation.progress.clear()
            conversation.wake.set()
        await self.idle()

    async def idle(self) -> None:
        """Wait until everything queued so far has been delivered."""
        while tasks := [c.task for c in self._conversations.values() if c.task is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, invocation: Invocation) -> list[Reply]:
        """Run a command and deliver its replies where it came from; returns the replies."""
        replies = await self.app.service.handle(invocation)
        await self.send(replies, invocation.actor, invocation.route)
        return replies

    async def command(
        self, line: str, actor: Actor, route: Route | None = None, attachments: tuple[Attachment, ...] = ()
    ) -> list[Reply]:
        """A command typed as text ("/draw a cat --steps 4"), answered at ``route``."""
        route = route or Route.of(actor)
        replies = await self.app.service.handle_line(line, actor, route, attachments)
        await self.send(replies, actor, route)
        return replies

    async def press(self, button_id: str, actor: Actor, route: Route | None = None) -> list[Reply]:
        """A button press: ``button_id`` as delivered in ``Outgoing.buttons`` (an action id
        or its token). ``route`` is where the button was: the variation it starts joins
        that conversation."""
        route = route or Route.of(actor)
        action = await self.action_of(button_id)
        if action is None:
            replies = [Reply("error.unknown_action", error=True)]
        else:
            replies = await self.app.service.run_action(action, actor, route)
        await self.send(replies, actor, route)
        return replies

    async def action_of(self, button_id: str) -> str | None:
        if button_id.startswith(TOKEN_PREFIX):
            return await self.store.action(button_id)
        return button_id

    async def send(self, replies: list[Reply], actor: Actor, route: Route) -> None:
        """Deliver replies at ``route``, after what is already queued there."""
        if not replies:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(route, _Item(replies=(actor, route, replies), done=done))
        await done

    # the queue of each conversation --------------------------------------------------------------

    def _on_event(self, event: JobEvent) -> None:
        if event.route.platform != self.adapter.platform:
            return
        accepts = getattr(self.adapter, "accepts", None)
        if accepts is not None and not accepts(event):
            return
        conversation = self._conversation(event.route)
        if isinstance(event, Progress) and self.adapter.limits(event.route).progress_interval > 0:
            conversation.progress[event.generation_id] = event  # a newer step replaces it in place
            self._wake(conversation)
            return
        if isinstance(event, FINAL):
            if not self._first_end(event.generation_id, replayed=self.app.replay.replaying):
                return
            conversation.progress.pop(event.generation_id, None)
        self._enqueue(event.route, _Item(event=event))

    def _first_end(self, job: str, *, replayed: bool) -> bool:
        """Whether to show this end: not when the job's end was taken already and either
        of the two is a replay (the same end, live and from the sweep)."""
        seen = self._ends.get(job)
        if seen is not None and (replayed or seen):
            return False
        self._ends[job] = replayed
        if len(self._ends) > ENDS_MEMORY:
            del self._ends[next(iter(self._ends))]
        return True

    def _conversation(self, route: Route) -> _Conversation:
        """The conversation of ``route``. Its progress is throttled with the others of its
        chat where the adapter says the interval holds per chat (forum topics of one
        Telegram group), else on its own."""
        key = route.destination
        conversation = self._conversations.get(key)
        if conversation is None:
            per_chat = self.adapter.limits(route).progress_per_chat
            throttle = (route.platform, route.chat_id) if per_chat else key
            conversation = self._conversations[key] = _Conversation(key, throttle)
        return conversation

    def _enqueue(self, route: Route, item: _Item) -> None:
        conversation = self._conversation(route)
        conversation.queue.append(item)
        self._wake(conversation)

    def _wake(self, conversation: _Conversation) -> None:
        conversation.wake.set()
        if conversation.task is None:
            conversation.task = asyncio.create_task(
                self._work(conversation), name=f"deliver {conversation.key}"
            )

    async def _work(self, conversation: _Conversation) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if conversation.queue:
                    await self._send(conversation, conversation.queue.popleft())
                elif conversation.progress:
                    now = loop.time()
                    wait = self._throttles.get(conversation.throttle, 0.0) - now
                    if wait > 0:  # a new event wakes it: a final one goes out at once
                        conversation.wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(conversation.wake.wait(), wait)
                        continue
                    step = conversation.progress.pop(next(iter(conversation.progress)))
                    # the turn is taken now: a conversation sharing the throttle waits for
                    # this step's send, not only for its end
                    interval = self.adapter.limits(step.route).progress_interval
                    self._throttles[conversation.throttle] = now + interval
                    await self._send(conversation, _Item(event=step))
                else:
                    return
        finally:
            conversation.task = None
            if not conversation.queue and not conversation.progress:
                if self._conversations.get(conversation.key) is conversation:
                    del self._conversations[conversation.key]
                self._drop_throttles(conversation.throttle, loop.time())

    def _drop_throttles(self, throttle: tuple[str | None, ...], now: float) -> None:
        """Forget a throttle that has run out (it holds nothing back any more); once many
        are kept, every one that has."""
        if self._throttles.get(throttle, now) <= now:
            self._throttles.pop(throttle, None)
        if len(self._throttles) > THROTTLE_MEMORY:
            for key, until in list(self._throttles.items()):
                if until <= now:
                    del self._throttles[key]

    async def _send(self, conversation: _Conversation, item: _Item) -> None:
        """Deliver one item; nothing it raises stops the conversation's queue."""
        try:
            if item.event is not None:
                await self._send_event(conversation, item.event)
            elif item.replies is not None:
                await self._send_replies(conversation, *item.replies)
        except Exception:
            log.exception("delivery to %s failed", self.adapter.platform)
        finally:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)

    # composing and sending ------------------------------------------------------------------------

    async def _send_replies(
        self, conversation: _Conversation, actor: Actor, route: Route, replies: list[Reply]
    ) -> None:
        route = route.usable(utcnow())
        for reply in replies:
            draft = reply_draft(reply, self.app.translator, actor.locale)
            await self._send_draft(conversation, draft, actor.locale, route=route, source=reply)

    async def _send_event(self, conversation: _Conversation, event: JobEvent) -> None:
        job = event.generation_id
        if isinstance(event, Deleted):
            await self._send_deleted(conversation, event)
            return
        if isinstance(event, FINAL):
            conversation.progress.pop(job, None)  # a step that had to wait never follows the end
        tracked = await self._tracked(job)
        draft = event_draft(event, self.app.translator)
        placement: dict[str, Any]
        if isinstance(event, Notice):
            placement = {"route": self._where(event.route, tracked), "reply_to": tracked}
        elif tracked is not None:
            placement = {"route": self._where(event.route, tracked), "edit": tracked}
        else:
            placement = await self._first_placement(event)
        ref = await self._send_draft(
            conversation,
            draft,
            event.actor.locale,
            source=event,
            generation_id=job,
            progress=event if isinstance(event, Progress) else None,
            **placement,
        )
        if ref is not None and not isinstance(event, Notice):
            await self._track(job, ref)
            if tracked is None and event.thread_key and ref.route.thread_id:
                await self._keep_thread(event.thread_key, ref.route)
        if isinstance(event, FINAL):
            self._messages.pop(job, None)  # the store has it for later notices
            # shown, or given up after the retries: a restart does not send it again
            await self.store.end_delivered(job)

    async def _send_deleted(self, conversation: _Conversation, event: Deleted) -> None:
        """The message that showed a deleted generation is replaced (the adapter may remove
        it instead); nothing is sent when no message showed it on this platform."""
        tracked = self._messages.pop(event.generation_id, None) or event.message
        if tracked is None or tracked.route.platform != self.adapter.platform:
            return
        draft = event_draft(event, self.app.translator)
        message = Outgoing(
            tracked.route, draft.kind, draft.text, event.generation_id, edit=tracked, source=event
        )
        try:
            await self.adapter.deliver(message)
        except Exception:  # already gone, or no access: nothing left to show
            log.warning("could not remove the message of deleted %s", event.generation_id, exc_info=True)

    async def _send_draft(
        self,
        conversation: _Conversation,
        draft: Draft,
        locale: str,
        *,
        route: Route,
        source: Any,
        generation_id: str | None = None,
        edit: MessageRef | None = None,
        reply_to: MessageRef | None = None,
        open_thread: bool = False,
        progress: Progress | None = None,
    ) -> MessageRef | None:
        """Page the actions, fit the files, send the message and any further pages of
        buttons (answering it). Returns the message that shows the draft, its pages among
        the messages attached to it: they leave with it when its job is deleted."""
        limits = self.adapter.limits(route)
        translator = self.app.translator
        fitted = await fit_files(draft.files, limits, self.app.images, draft.show_id, notes=progress is None)
        text = "\n".join([draft.text, *(translator.t(locale, n.key, **n.params) for n in fitted.notes)])
        pages = await page_actions(draft.actions, limits, translator, locale, self.store)
        message = Outgoing(
            route, draft.kind, text, generation_id, fitted.files, pages[0], edit, reply_to, open_thread,
            draft.spoiler, source,
        )  # fmt: skip
        ref = await self._deliver(conversation, message, limits, progress)
        if ref is None:
            return None
        attached = [*ref.attached]
        if edit is not None:  # what was sent with the message before stays with it
            attached += [m for m in edit.attached if m not in attached]
        for number, page in enumerate(pages[1:], start=2):
            more = translator.t(locale, "delivery.more_actions", page=number, pages=len(pages))
            extra = Outgoing(
                ref.route, "actions", more, generation_id, buttons=page, reply_to=ref, source=source
            )
            sent = await self._deliver(conversation, extra, limits)
            if sent is not None:
                attached += [m for m in (sent.message_id, *sent.attached) if m not in attached]
        return replace(ref, attached=tuple(attached))

    async def _deliver(
        self, conversation: _Conversation, message: Outgoing, limits: Limits, progress: Progress | None = None
    ) -> MessageRef | None:
        """Send with bounded retries; None when it could not be sent (logged). A step
        the platform asks to hold back waits for the next turn instead, unless a newer
        step of its job came meanwhile."""
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.attempts + 1):
            try:
                ref = await self.adapter.deliver(message)
            except RetryAfter as exc:
                wait = min(max(exc.seconds, 0.0), self.max_retry_wait)
                held = self._throttles.get(conversation.throttle, 0.0)
                self._throttles[conversation.throttle] = max(held, loop.time() + wait)
                if progress is not None:
                    conversation.progress.setdefault(progress.generation_id, progress)
                    return None
                if attempt < self.attempts:
                    await asyncio.sleep(wait)
            except Exception:
                if message.edit is not None:  # deleted, or too old to edit: a new message then
                    log.warning("editing %s failed; sending it as a new message", message.kind, exc_info=True)
                    message = replace(message, edit=None)
                elif progress is not None or attempt == self.attempts:
                    log.exception("could not deliver %s of %s", message.kind, message.generation_id)
                    return None
            else:  # every message sent counts against the interval
                self._throttles[conversation.throttle] = loop.time() + limits.progress_interval
                return ref
        log.error(
            "gave up delivering %s of %s after %d tries", message.kind, message.generation_id, self.attempts
        )
        return None

    # where a job's messages go ---------------------------------------------------------------------

    async def _tracked(self, generation_id: str) -> MessageRef | None:
        ref = self._messages.get(generation_id)
        if ref is None:
            stored = await self.store.message(generation_id)
            if stored is not None:
                ref = MessageRef.from_json(stored)
        return ref

    async def _track(self, generation_id: str, ref: MessageRef) -> None:
        if self._messages.get(generation_id) != ref:
            self._messages[generation_id] = ref
            await self.store.keep_message(generation_id, ref.to_json())

    def _where(self, route: Route, tracked: MessageRef | None) -> Route:
        """The event's own route (with its interaction token while it lasts) where the
        job's message is in that conversation; else the conversation of the message."""
        if tracked is None or tracked.route.destination == route.destination:
            return route.usable(utcnow())
        return tracked.route

    async def _first_placement(self, event: JobEvent) -> dict[str, Any]:
        """Where a job's first message goes: its route, or its chain's thread."""
        route = event.route.usable(utcnow())
        key = event.thread_key
        if key is None or not self.adapter.limits(route).threads:
            return {"route": route}
        stored = await self.store.thread_route(self.adapter.platform, key)
        if stored is not None:
            return {"route": Route.from_json(stored)}
        anchor = await self._tracked(key)
        if route.thread_id is not None or anchor is None:
            return {"route": route}
        return {"route": route, "reply_to": anchor, "open_thread": True}

    async def _keep_thread(self, thread_key: str, where: Route) -> None:
        thread = Route(where.platform, where.chat_id, where.thread_id, is_private=where.is_private)
        await self.store.keep_thread_route(self.adapter.platform, thread_key, thread.to_json())

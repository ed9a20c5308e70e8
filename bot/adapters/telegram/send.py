"""Sending what the delivery layer hands over, the way Telegram shows it.

Telegram cannot turn a text message into a photo, so a job's tracked message changes
kind once: the "queued" text is replaced by a photo message at the first preview (or at
the result) and the text message is deleted. A result is its image as a photo (the
preview the delivery layer fitted, or the PNG itself), a caption with the effective
parameters (at most 1024 characters) and the inline keyboard, followed by the original
PNG as a document, which Telegram keeps byte for byte (the infotext intact). A batch
is a media group of photos and one of documents, under a message with the keyboard.

Nothing is remembered here: the reference returned for a job's message says whether it
shows a photo (``media``) and names the photos and documents sent with it
(``attached``); the delivery layer stores it on the job's row, so a later process edits
the message the right way and removes everything of a deleted result.

Every call is retried here, not by the delivery layer, so that a message of several
calls is never sent twice: a 429 waits its ``retry_after``, a 5xx is tried again, a 413
sends a smaller file. Only a progress step is handed back (``RetryAfter``): the
conversation's next turn brings a newer one.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaDocument,
    InputMediaPhoto,
    ReplyParameters,
)
from telegram.error import BadRequest, NetworkError, TimedOut
from telegram.error import RetryAfter as TelegramRetryAfter

from bot.adapters.base import DeliveryFailed, Outgoing, RetryAfter
from bot.delivery.fitting import shrink
from bot.i18n import clipped
from bot.types import Finished, MessageRef, OutgoingFile, Route

log = logging.getLogger(__name__)

CAPTION_LIMIT = 1024  # characters of a photo's or document's caption
TEXT_LIMIT = 4096  # characters of a text message
MEDIA_GROUP_LIMIT = 10  # items of one media group
ATTEMPTS = 4  # calls of one method before a message is given up
MAX_WAIT = 60.0  # the longest one retry_after is waited here (seconds)
SERVER_ERROR_WAIT = 1.0  # before calling again after a 5xx or a timeout

T = TypeVar("T")


def waited(exc: TelegramRetryAfter) -> float:
    """Seconds to wait, whichever type this version of the library gives them in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int today, timedelta in a later major version
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def too_large(exc: Exception) -> bool:
    text = str(exc).lower()
    return "too large" in text or "413" in text


def result_caption(message: Outgoing) -> str:
    """The message's text, then the effective parameters of a result, within a caption."""
    text = message.text
    if isinstance(message.source, Finished) and message.source.images:
        infotext = message.source.images[0].infotext
        room = CAPTION_LIMIT - len(text) - 1
        if infotext and room > 20:
            text = f"{text}\n{clipped(infotext, room)}"
    return clipped(text, CAPTION_LIMIT)


def keyboard(message: Outgoing) -> InlineKeyboardMarkup | None:
    if not message.buttons:
        return None
    rows = [[InlineKeyboardButton(b.label, callback_data=b.id) for b in row] for row in message.buttons]
    return InlineKeyboardMarkup(rows)


class Sender:
    """One ``deliver`` call's worth of Bot API calls, with Telegram's retries."""

    def __init__(self, bot: Any) -> None:
        self.bot = bot
        self.media = False  # whether the message shown now is a photo
        self.attached: list[str] = []  # the job's other messages: a batch's photos, the originals

    async def deliver(self, message: Outgoing) -> MessageRef:
        route = message.route
        where = Route(route.platform, route.chat_id, route.thread_id, is_private=route.is_private)
        if message.kind == "deleted" and message.edit is not None and await self._remove(where, message.edit):
            return message.edit
        photos = [f for f in message.files if f.kind == "image"]
        documents = [f for f in message.files if f.kind == "document"]
        if message.kind == "finished":
            documents = self._originals(photos, documents)
        progress = message.kind == "progress"
        if message.edit is not None:
            self.media, self.attached = message.edit.media, list(message.edit.attached)
            shown = await self._edit(message, where, photos, progress)
        else:
            shown = await self._send(message, where, photos, progress)
        if documents:
            await self._documents(where, documents, shown, message)
        return MessageRef(where, shown, media=self.media, attached=tuple(self.attached))

    async def _remove(self, where: Route, shown: MessageRef) -> bool:
        """A deleted result leaves the chat: its message and every message sent with it
        (a batch's photos, the originals), whichever process sent them. False when
        Telegram refused (a message older than 48 hours in a group): the message is then
        edited to say it was deleted."""
        chat = int(where.chat_id or 0)
        try:
            await self._call(lambda: self.bot.delete_message(chat, int(shown.message_id)))
        except (BadRequest, NetworkError) as exc:
            log.info("could not delete the message of a deleted result: %s", exc)
            return False
        for other in shown.attached:
            await self._forget(where, other)
        return True

    # the message itself --------------------------------------------------------------------------

    async def _send(self, message: Outgoing, where: Route, photos: list[OutgoingFile], progress: bool) -> str:
        answer = message.reply_to.message_id if message.reply_to else message.route.reply_to_message_id
        if len(photos) == 1:
            return await self._photo(message, where, photos[0], answer, progress)
        if len(photos) > 1:
            answer = await self._album(message, where, photos, answer)
        sent = await self._call(
            lambda: self.bot.send_message(
                int(where.chat_id or 0),
                clipped(message.text, TEXT_LIMIT),
                reply_markup=keyboard(message),
                **self._placement(where, answer),
            ),
            progress,
        )
        self.media = False
        return str(sent.message_id)

    async def _edit(self, message: Outgoing, where: Route, photos: list[OutgoingFile], progress: bool) -> str:
        assert message.edit is not None
        target = message.edit.message_id
        has_photo = message.edit.media
        chat = int(where.chat_id or 0)
        if len(photos) == 1 and not has_photo:
            # a text message cannot become a photo: the photo takes its place
            shown = await self._photo(message, where, photos[0], message.route.reply_to_message_id, progress)
            await self._forget(where, target)
            return shown
        if len(photos) == 1:
            media = InputMediaPhoto(
                photos[0].data or b"",
                caption=result_caption(message),
                filename=photos[0].name,
                has_spoiler=message.spoiler,
            )
            await self._quietly(
                lambda: self.bot.edit_message_media(
                    media, chat_id=chat, message_id=int(target), reply_markup=keyboard(message)
                ),
                progress,
            )
            return target
        if photos:
            await self._album(message, where, photos, target)
        if has_photo:
            call = lambda: self.bot.edit_message_caption(  # noqa: E731
                chat_id=chat,
                message_id=int(target),
                caption=result_caption(message),
                reply_markup=keyboard(message),
            )
        else:
            call = lambda: self.bot.edit_message_text(  # noqa: E731
                clipped(message.text, TEXT_LIMIT),
                chat_id=chat,
                message_id=int(target),
                reply_markup=keyboard(message),
            )
        await self._quietly(call, progress)
        return target

    async def _photo(
        self, message: Outgoing, where: Route, photo: OutgoingFile, answer: str | None, progress: bool
    ) -> str:
        async def send(data: bytes, name: str) -> Any:
            return await self.bot.send_photo(
                int(where.chat_id or 0),
                data,
                caption=result_caption(message),
                filename=name,
                has_spoiler=message.spoiler,
                reply_markup=keyboard(message),
                **self._placement(where, answer),
            )

        sent = await self._upload(send, photo, progress)
        self.media = True
        return str(sent.message_id)

    async def _album(
        self, message: Outgoing, where: Route, photos: list[OutgoingFile], answer: str | None
    ) -> str:
        """The photos of a batch as media groups (attached to the job's message);
        returns the first photo's id."""
        first = answer
        for start in range(0, len(photos), MEDIA_GROUP_LIMIT):
            chunk = photos[start : start + MEDIA_GROUP_LIMIT]
            media = [
                InputMediaPhoto(p.data or b"", filename=p.name, has_spoiler=message.spoiler) for p in chunk
            ]
            sent = await self._call(
                lambda media=media: self.bot.send_media_group(
                    int(where.chat_id or 0), media, **self._placement(where, answer)
                )
            )
            self.attached.extend(str(m.message_id) for m in sent)
            if start == 0 and sent:
                first = str(sent[0].message_id)
        return first or ""

    async def _documents(
        self, where: Route, documents: list[OutgoingFile], shown: str, message: Outgoing
    ) -> None:
        """The original files, answering the message that shows them; never dropped."""
        if len(documents) == 1:
            (document,) = documents

            async def send(data: bytes, name: str) -> Any:
                return await self.bot.send_document(
                    int(where.chat_id or 0),
                    data,
                    filename=name,
                    disable_content_type_detection=True,
                    **self._placement(where, shown),
                )

            sent = await self._upload(send, document, False)
            self.attached.append(str(sent.message_id))
            return
        for start in range(0, len(documents), MEDIA_GROUP_LIMIT):
            chunk = documents[start : start + MEDIA_GROUP_LIMIT]
            media = [InputMediaDocument(d.data or b"", filename=d.name) for d in chunk]
            try:
                group = await self._call(
                    lambda media=media: self.bot.send_media_group(
                        int(where.chat_id or 0), media, **self._placement(where, shown)
                    )
                )
                self.attached.extend(str(m.message_id) for m in group)
            except NetworkError as exc:
                if not too_large(exc):
                    raise
                for document in chunk:  # one by one: each falls back to a smaller file alone
                    await self._documents(where, [document], shown, message)

    # the calls ---------------------------------------------------------------------------------

    async def _upload(
        self, send: Callable[[bytes, str], Awaitable[T]], file: OutgoingFile, progress: bool
    ) -> T:
        """Send a file; when Telegram finds it too large (413), a smaller JPEG of it."""
        data, name = file.data or b"", file.name
        try:
            return await self._call(lambda: send(data, name), progress)
        except NetworkError as exc:
            if not too_large(exc) or not data:
                raise
        smaller = await asyncio.to_thread(shrink, data, max(len(data) // 2, 1))
        if smaller is None:
            raise DeliveryFailed(f"{name} is too large for this chat, even made smaller")
        log.warning(
            "%s was too large for Telegram (%d bytes); sending a %d-byte JPEG", name, len(data), len(smaller)
        )
        stem = name.rsplit(".", 1)[0]
        return await self._call(lambda: send(smaller, f"{stem}-smaller.jpg"), progress)

    async def _call(self, call: Callable[[], Awaitable[T]], progress: bool = False) -> T:
        """One Bot API call: 429 waited, 5xx and timeouts tried again. A progress step is
        not waited for: ``RetryAfter`` tells the delivery layer to hold the conversation."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await call()
            except TelegramRetryAfter as exc:
                wait = waited(exc)
                if progress or attempt == ATTEMPTS:
                    raise RetryAfter(wait) from exc
                log.info("Telegram asks to wait %.1f s", wait)
                await asyncio.sleep(min(wait, MAX_WAIT))
            except (TimedOut, NetworkError) as exc:
                if isinstance(exc, BadRequest) or too_large(exc) or progress or attempt == ATTEMPTS:
                    raise
                log.warning("Telegram call failed (%s); trying again", exc)
                await asyncio.sleep(SERVER_ERROR_WAIT * attempt)
        raise AssertionError("unreachable")

    async def _quietly(self, call: Callable[[], Awaitable[Any]], progress: bool) -> None:
        """An edit; one that changes nothing is no failure."""
        try:
            await self._call(call, progress)
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():
                raise

    async def _forget(self, where: Route, message_id: str) -> None:
        """Delete a message another one replaced; one already gone is fine."""
        try:
            await self.bot.delete_message(int(where.chat_id or 0), int(message_id))
        except Exception as exc:  # noqa: BLE001  (the replacement is sent; this is tidying)
            log.info("could not delete replaced message %s: %s", message_id, exc)

    # helpers -------------------------------------------------------------------------------------

    def _originals(self, photos: list[OutgoingFile], documents: list[OutgoingFile]) -> list[OutgoingFile]:
        """A result's PNGs as documents too: a photo is recompressed, a document is not.
        Those the fitting already attached (beside a smaller preview) are not doubled."""
        have = {d.image_id for d in documents if d.image_id}
        extra = [
            OutgoingFile(p.name, "document", data=p.data, image_id=p.image_id)
            for p in photos
            if p.image_id and p.image_id not in have and p.name.endswith(".png")
        ]
        return documents + extra

    def _placement(self, where: Route, answer: str | None) -> dict[str, Any]:
        placement: dict[str, Any] = {}
        if where.thread_id is not None:
            placement["message_thread_id"] = int(where.thread_id)
        if answer:
            placement["reply_parameters"] = ReplyParameters(int(answer), allow_sending_without_reply=True)
        return placement

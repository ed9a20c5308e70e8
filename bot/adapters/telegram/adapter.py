"""The Telegram adapter: python-telegram-bot's Application inside Atelier's App.

The Application is started by hand (initialize, start, then long polling or a webhook),
never with ``run_polling``, which would own the event loop and the signals that
``atelier run`` handles. Updates are handled concurrently, so a button press is
answered while a command is still being stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from telegram import BotCommand, Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, CallbackQueryHandler, ContextTypes, MessageHandler, filters

from bot.adapters.base import Limits, Outgoing
from bot.adapters.telegram.inbound import (
    ATTACHMENT_COMMANDS,
    PLATFORM,
    actor_of,
    addressed,
    command_line,
    route_of,
)
from bot.adapters.telegram.send import Sender
from bot.delivery import Delivery
from bot.errors import UserError
from bot.inputs import size_text
from bot.options import shown
from bot.platforms import telegram_commands
from bot.runner import StartError
from bot.types import Attachment, MessageRef, Route

log = logging.getLogger(__name__)

PHOTO_BYTES = 10 * 1024 * 1024  # Telegram shows photos up to 10 MB
DOCUMENT_BYTES = 50 * 1024 * 1024  # the public Bot API's upload limit
LOCAL_DOCUMENT_BYTES = 2000 * 1024 * 1024  # a self-hosted Bot API server's
ADMIN_CACHE_SECONDS = 300.0  # how long a chat administrator check is trusted
COMMAND_LANGUAGES = (("en", None), ("zh-CN", "zh"))  # our locale, Telegram's language_code


class TelegramAdapter:
    platform = PLATFORM

    def __init__(self, app: Any, settings: Any) -> None:
        self.app = app
        self.settings = settings
        self.config = settings.telegram
        secrets = settings.secrets
        builder = Application.builder().token(secrets.telegram_token or "").concurrent_updates(True)
        if secrets.telegram_base_url:
            builder = builder.base_url(secrets.telegram_base_url)
        if secrets.telegram_base_file_url:
            builder = builder.base_file_url(secrets.telegram_base_file_url)
        self.api_url = secrets.telegram_base_url or "https://api.telegram.org/bot"
        self.document_bytes = LOCAL_DOCUMENT_BYTES if secrets.telegram_base_url else DOCUMENT_BYTES
        self.application = builder.build()
        self.application.add_handler(
            MessageHandler(
                (filters.COMMAND | filters.CaptionRegex(r"^/")) & ~filters.UpdateType.EDITED, self._on_message
            )
        )
        self.application.add_handler(CallbackQueryHandler(self._on_press))
        self.application.add_error_handler(self._on_error)
        self.delivery = Delivery(app, self)
        self.username: str | None = None
        self._admins: dict[tuple[str, str], tuple[float, bool]] = {}

    # the adapter contract ------------------------------------------------------------------------

    def limits(self, route: Route) -> Limits:
        return Limits(
            progress_interval=1.0 if route.is_private else 3.0,
            progress_per_chat=True,  # a group's limit is the chat's: its forum topics count together
            buttons_per_row=5,
            action_id_bytes=64,
            image_bytes=PHOTO_BYTES,
            document_bytes=self.document_bytes,
        )

    async def start(self) -> None:
        try:
            await self.application.initialize()  # getMe: the token is checked here
        except InvalidToken as exc:
            raise StartError(
                f"Telegram refused the bot token in ATELIER_TELEGRAM_TOKEN ({exc}); "
                "copy it again from @BotFather"
            ) from None
        except (NetworkError, TelegramError) as exc:
            raise StartError(f"cannot reach the Telegram Bot API at {self.api_url}: {exc}") from None
        self.username = self.application.bot.username
        await self._set_commands()
        self.delivery.start()  # before the App starts: recovered jobs' events reach the chats
        await self.application.start()
        updater = self.application.updater
        assert updater is not None
        allowed = [Update.MESSAGE, Update.CALLBACK_QUERY]
        try:
            if self.config.webhook_url:
                await updater.start_webhook(
                    listen=self.config.webhook_listen,
                    port=self.config.webhook_port,
                    webhook_url=self.config.webhook_url,
                    secret_token=self.settings.secrets.telegram_webhook_secret,
                    allowed_updates=allowed,
                )
            else:
                await updater.start_polling(timeout=self.config.poll_timeout, allowed_updates=allowed)
        except (RuntimeError, OSError, TelegramError) as exc:  # no webhook extra, a port in use, refused
            await self.stop()
            raise StartError(f"Telegram updates could not start: {exc}") from None
        log.info("Telegram: serving as @%s", self.username)

    async def stop(self) -> None:
        updater = self.application.updater
        if updater is not None and updater.running:
            await updater.stop()
        if self.application.running:
            await self.application.stop()  # waits for the updates being handled
        await self.delivery.stop()  # what is queued still goes out
        await self.application.shutdown()

    async def deliver(self, message: Outgoing) -> MessageRef:
        return await Sender(self.application.bot).deliver(message)

    # updates -------------------------------------------------------------------------------------

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = update.effective_message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None or not self._allowed(chat.id):
            return
        text = message.text or message.caption or ""
        name = addressed(text, self.username)
        if name is None:
            return
        await self._app_started()
        actor = actor_of(user, chat, self.settings.bot.locale, await self._roles(chat, user.id))
        route = route_of(message)
        try:
            attachments: tuple[Attachment, ...] = ()
            if message.text is None and name in ATTACHMENT_COMMANDS:
                attachments = await self._attachments(message)
            line = "/help" if name == "start" else command_line(text)  # what Telegram sends first
            await self.delivery.command(line, actor, route, attachments)
        except Exception as exc:
            await self.delivery.send([self.app.service.error_reply(exc, actor)], actor, route)

    async def _on_press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        try:
            await query.answer()  # first: the button stops spinning whatever follows
        except TelegramError as exc:
            log.info("answering a button press failed: %s", exc)
        message = query.message
        if message is None or not query.data or not hasattr(message, "chat"):
            return
        if not self._allowed(message.chat.id):
            return
        await self._app_started()
        actor = actor_of(query.from_user, message.chat, self.settings.bot.locale)
        actor = replace(actor, roles=await self._roles(message.chat, query.from_user.id))
        route = route_of(message)  # a variation answers the result whose button was pressed
        try:
            await self.delivery.press(query.data, actor, route)
        except Exception as exc:
            await self.delivery.send([self.app.service.error_reply(exc, actor)], actor, route)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("handling a Telegram update failed", exc_info=context.error)

    async def _app_started(self) -> None:
        """Updates waiting since the bot was off arrive as soon as polling starts, which is
        before the App has upgraded the database and started (``atelier run`` starts
        the adapters first); they wait for it."""
        while not self.app.started:  # noqa: ASYNC110  (the App has a flag, no event)
            await asyncio.sleep(0.05)

    # who, where, what --------------------------------------------------------------------------------

    def _allowed(self, chat_id: int) -> bool:
        return not self.config.allowed_chats or chat_id in self.config.allowed_chats

    async def _roles(self, chat: Any, user_id: int) -> frozenset[str]:
        """Configured ids moderate everywhere; a chat's administrators in that chat."""
        if user_id in self.config.moderators:
            return frozenset({"moderator"})
        if chat.type == "private":
            return frozenset()
        key, now = (str(chat.id), str(user_id)), time.monotonic()
        cached = self._admins.get(key)
        if cached is None or now - cached[0] > ADMIN_CACHE_SECONDS:
            try:
                member = await self.application.bot.get_chat_member(chat.id, user_id)
                cached = (now, member.status in ("administrator", "creator"))
            except TelegramError as exc:
                log.info("could not check whether %s administers chat %s: %s", user_id, chat.id, exc)
                cached = (now, False)
            self._admins[key] = cached
        return frozenset({"moderator", "admin"}) if cached[1] else frozenset()

    async def _attachments(self, message: Any) -> tuple[Attachment, ...]:
        """A photo (its largest size) or a document, read at most to the upload limit."""
        limit = self.settings.limits.max_upload_bytes
        if message.photo:
            source, name, kind = message.photo[-1], "photo.jpg", "image/jpeg"
        elif message.document is not None:
            source = message.document
            name, kind = source.file_name or "file", source.mime_type
        else:
            return ()
        if source.file_size and source.file_size > limit:
            raise UserError("error.upload_too_large", name=shown(name), max=size_text(limit))
        file = await source.get_file()
        data = bytes(await file.download_as_bytearray())
        return (Attachment(name, data, kind),)

    async def _set_commands(self) -> None:
        """The command menu in English (the default) and Chinese (for ``zh`` users)."""
        for locale, language in COMMAND_LANGUAGES:
            commands = [
                BotCommand(name, description[:256])
                for name, description in telegram_commands(self.app, locale)
            ]
            try:
                await self.application.bot.set_my_commands(commands, language_code=language)
            except TelegramError as exc:
                log.warning("setting the %s command menu failed: %s", locale, exc)

"""The Discord adapter: discord.py's client in, the delivery layer's messages out.

It holds no state that matters across a restart: a button's custom_id is the action id
(or the delivery layer's token for it), a job's message is tracked by the delivery layer
in the store, the command tree's hash is in the store. What it keeps in memory is only a
cache: which deferred slash commands still show "thinking" (their first answer fills that
message) and each channel's upload limit as the last interaction there said.

Sending: while an interaction's token lasts (15 minutes), answers and job messages go
through the interaction's webhook; after that, or when the webhook refuses the token,
through the channel with the bot's token, mentioning the user on a result. A message in
a thread, and the thread a chain of variations opens under its first result, always use
the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from dataclasses import replace
from datetime import timedelta
from typing import Any

import discord
import yarl

from bot.adapters.base import DeliveryFailed, Limits, Outgoing, RetryAfter
from bot.adapters.discord.interactions import Interactions
from bot.adapters.discord.tree import register
from bot.delivery import Delivery
from bot.runner import StartError
from bot.types import Failed, Finished, MessageRef, Route
from models.base import utcnow

log = logging.getLogger(__name__)

PLATFORM = "discord"
DEFAULT_UPLOAD = 10 * 1024 * 1024  # Discord's limit without server boosts
MAX_CONTENT = 2000
MAX_LABEL = 80
MAX_EMBED = 4096
INVALID_TOKEN = 50027  # "Invalid Webhook Token": the interaction's 15 minutes are over
UNKNOWN_MESSAGE = 10008
THREAD_NAME = 100
ORIGINAL = "@original"  # the message of a deferred interaction


def point_at(api_base: str | None, gateway_url: str | None) -> None:
    """Talk to a Discord REST proxy or a test server instead of Discord itself."""
    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class DiscordAdapter:
    platform = PLATFORM
    ready_timeout = 60.0
    progress_interval = 2.0  # seconds between two progress edits of one channel

    def __init__(self, app: Any, settings: Any, token: str) -> None:
        self.app = app
        self.settings = settings.discord
        self._token = token
        self.delivery = Delivery(app, self)
        self.client = discord.Client(intents=discord.Intents(guilds=True), guild_ready_timeout=0.5)
        self.interactions = Interactions(self)
        self.client.event(self.on_interaction)
        self.deferred: set[str] = set()  # slash commands whose "thinking" message is unused
        self.upload_limits: dict[str, int] = {}  # channel id -> bytes
        self.dead_tokens: set[str] = set()  # tokens Discord refused: the channel from now on
        self._task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        # set once the App has started: an interaction that comes earlier (deferred at
        # once) waits for it, as the store may not even exist before
        self.serving = asyncio.Event()

    # the adapter contract ---------------------------------------------------------------------

    def limits(self, route: Route) -> Limits:
        upload = self.upload_limits.get(route.thread_id or route.chat_id or "", DEFAULT_UPLOAD)
        return Limits(
            progress_interval=self.progress_interval,
            buttons_per_row=5,
            rows_per_message=5,
            action_id_bytes=100,  # custom_id
            image_bytes=upload,
            document_bytes=upload,
            threads=not route.is_private,
        )

    async def start(self) -> None:
        await self.login()
        self.delivery.start()
        self._task = asyncio.create_task(self.client.connect(reconnect=True), name="discord gateway")
        ready = asyncio.create_task(self.client.wait_until_ready())
        await asyncio.wait(
            {self._task, ready}, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not ready.done():
            ready.cancel()
            problem = self._task.exception() if self._task.done() else "no answer from the gateway"
            await self.stop()
            raise StartError(f"Discord's gateway refused the connection: {problem}")
        self._sync_task = asyncio.create_task(self._sync_once_started(), name="discord commands")

    async def login(self) -> None:
        """Check the token with Discord's REST API (the gateway comes after)."""
        point_at(self.settings.api_base, self.settings.gateway_url)
        try:
            await self.client.login(self._token)
        except discord.LoginFailure:
            await self.client.close()
            raise StartError("Discord refused the token in ATELIER_DISCORD_TOKEN") from None
        except (OSError, discord.HTTPException) as exc:
            await self.client.close()
            raise StartError(f"cannot reach Discord ({discord.http.Route.BASE}): {exc}") from None

    async def _sync_once_started(self) -> None:
        """Register the tree once the App is up (its store migrated): adapters start first."""
        while not self.app.started:  # noqa: ASYNC110  (the App has no event to wait on)
            await asyncio.sleep(0.05)
        self.serving.set()
        try:
            await self.sync()
        except Exception:
            log.exception("registering the slash commands failed; the ones registered before still work")

    async def sync(self, *, guild: str | None = None, force: bool = False) -> bool:
        """Register the slash commands when they changed (``force``: anyway)."""
        application_id = self.client.application_id
        if application_id is None:
            application_id = (await self.client.application_info()).id
        return await register(self.app, self.client.http, application_id, guild=guild, force=force)

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(BaseException):
                await self._sync_task
        await self.delivery.stop()
        await self.client.close()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        await self.interactions.handle(interaction)

    # sending ------------------------------------------------------------------------------------

    async def deliver(self, message: Outgoing) -> MessageRef:
        try:
            return await self._deliver(message)
        except discord.HTTPException as exc:
            if exc.status == 429:
                raise RetryAfter(float(getattr(exc, "retry_after", 1.0) or 1.0)) from exc
            if exc.status in (401, 403, 404):
                raise DeliveryFailed(str(exc)) from exc
            raise

    async def _deliver(self, message: Outgoing) -> MessageRef:
        if message.kind == "deleted":
            return await self._remove(message)
        if message.edit is not None:
            edit_route = self._usable(message.edit.route)
            if edit_route.interaction_token and not message.open_thread:
                try:
                    return await self._webhook_edit(edit_route, message)
                except discord.HTTPException as exc:
                    if not self._token_gone(exc, edit_route):
                        raise
            return await self._channel_edit(message)
        route = self._usable(message.route)
        if route.interaction_token and not message.open_thread:
            try:
                return await self._webhook_send(route, message)
            except discord.HTTPException as exc:
                if not self._token_gone(exc, route):
                    raise
        return await self._channel_send(message)

    def _usable(self, route: Route) -> Route:
        """The route with its interaction token while it lasts, else without."""
        route = route.usable(utcnow())
        if route.interaction_token in self.dead_tokens:
            return replace(route, interaction_token=None, token_expires_at=None)
        return route

    def _token_gone(self, exc: discord.HTTPException, route: Route) -> bool:
        """Whether Discord refused the interaction's token (its 15 minutes are over)."""
        if exc.code == INVALID_TOKEN or exc.status == 401:
            self.dead_tokens.add(route.interaction_token or "")
            self.deferred.discard(route.interaction_token or "")
            return True
        return exc.status == 404 and message_gone(exc)

    async def _webhook_send(self, route: Route, message: Outgoing) -> MessageRef:
        webhook = self._webhook(route)
        token = route.interaction_token or ""
        error = message.kind == "error"
        if token in self.deferred:
            self.deferred.discard(token)
            if not error:  # the first answer fills the "thinking" message
                content = self._content(message, edit=True)
                sent = await webhook.edit_message(ORIGINAL, **content)  # type: ignore[arg-type]
                _forget(content)
                return self._ref(route, sent.id, token=True)
            await webhook.delete_message(ORIGINAL)  # type: ignore[arg-type]  # errors: only their user sees them
        content = self._content(message)
        sent = await webhook.send(wait=True, ephemeral=error, **content)
        _forget(content)
        return self._ref(route, sent.id, token=not error)

    async def _webhook_edit(self, route: Route, message: Outgoing) -> MessageRef:
        assert message.edit is not None
        content = self._content(message, edit=True)
        sent = await self._webhook(route).edit_message(int(message.edit.message_id), **content)
        _forget(content)
        return MessageRef(message.edit.route, str(sent.id))

    async def _channel_send(self, message: Outgoing) -> MessageRef:
        route = message.route
        channel_id = route.thread_id or route.chat_id
        if message.open_thread and message.reply_to is not None:
            anchor = message.reply_to.route
            channel = await self._channel(anchor.thread_id or anchor.chat_id)
            partial = channel.get_partial_message(int(message.reply_to.message_id))
            thread = await partial.create_thread(name=_thread_name(message))
            channel_id = str(thread.id)
            route = Route(PLATFORM, route.chat_id, channel_id)
        channel = await self._channel(channel_id)
        reference = message.reply_to.message_id if message.reply_to else route.reply_to_message_id
        content = self._content(message)
        if reference and not message.open_thread:
            content["reference"] = discord.MessageReference(
                message_id=int(reference), channel_id=int(channel_id or 0), fail_if_not_exists=False
            )
        sent = await channel.send(**content)
        _forget(content)
        where = Route(PLATFORM, route.chat_id, route.thread_id, is_private=route.is_private)
        return MessageRef(where, str(sent.id))

    async def _channel_edit(self, message: Outgoing) -> MessageRef:
        assert message.edit is not None
        where = message.edit.route
        channel = await self._channel(where.thread_id or where.chat_id)
        content = self._content(message, edit=True)
        await channel.get_partial_message(int(message.edit.message_id)).edit(**content)
        _forget(content)
        plain = Route(PLATFORM, where.chat_id, where.thread_id, is_private=where.is_private)
        return MessageRef(plain, message.edit.message_id)

    async def _remove(self, message: Outgoing) -> MessageRef:
        """A deleted generation's message goes away, and every message sent with it (its
        further pages of buttons), through the webhook while its token lasts."""
        assert message.edit is not None
        shown = message.edit
        for message_id in (shown.message_id, *shown.attached):
            await self._remove_one(shown.route, int(message_id))
        return shown

    async def _remove_one(self, route: Route, message_id: int) -> None:
        where = self._usable(route)
        try:
            if where.interaction_token:
                try:
                    await self._webhook(where).delete_message(message_id)
                    return
                except discord.HTTPException as exc:
                    if not self._token_gone(exc, where):
                        raise
            channel = await self._channel(where.thread_id or where.chat_id)
            await channel.get_partial_message(message_id).delete()
        except discord.NotFound:
            pass

    # pieces -------------------------------------------------------------------------------------

    def _webhook(self, route: Route) -> discord.Webhook:
        application_id = self.client.application_id or 0
        webhook = discord.Webhook.partial(application_id, route.interaction_token or "", client=self.client)
        webhook.type = discord.WebhookType.application  # an interaction's: ephemeral messages allowed
        return webhook

    def _ref(self, route: Route, message_id: int, *, token: bool) -> MessageRef:
        where = Route(
            PLATFORM,
            route.chat_id,
            route.thread_id,
            interaction_token=route.interaction_token if token else None,
            token_expires_at=route.token_expires_at if token else None,
            is_private=route.is_private,
        )
        return MessageRef(where, str(message_id))

    async def _channel(self, channel_id: str | None) -> Any:
        if not channel_id:
            raise DeliveryFailed("no channel to post in")
        found = self.client.get_channel(int(channel_id))
        if found is None:
            try:
                found = await self.client.fetch_channel(int(channel_id))
            except discord.HTTPException:
                found = self.client.get_partial_messageable(int(channel_id))
        return found

    def _view(self, message: Outgoing) -> discord.ui.View | None:
        if not message.buttons:
            return None
        view = discord.ui.View(timeout=None)
        for row, buttons in enumerate(message.buttons):
            for button in buttons:
                danger = button.id.startswith("delete:")
                style = discord.ButtonStyle.danger if danger else discord.ButtonStyle.secondary
                view.add_item(
                    discord.ui.Button(
                        label=button.label[:MAX_LABEL], custom_id=button.id, row=row, style=style
                    )
                )
        return view

    def _content(self, message: Outgoing, *, edit: bool = False) -> dict[str, Any]:
        """The message's text, files, embed and buttons as discord.py takes them; an edit
        replaces all of them."""
        text = message.text
        # a further page of a result's buttons is no result of its own: no mention, no embed
        source = message.source if message.kind != "actions" else None
        user = getattr(getattr(source, "actor", None), "user_id", None)
        if user and isinstance(source, Finished | Failed):
            text = f"<@{user}> {text}"  # the seed's "notify when generation completes"
        files = [
            discord.File(io.BytesIO(file.data or b""), filename=file.name, spoiler=message.spoiler)
            for file in message.files
        ]
        data: dict[str, Any] = {
            "content": text[:MAX_CONTENT],
            "attachments" if edit else "files": files,
            "allowed_mentions": discord.AllowedMentions(users=True, everyone=False, roles=False),
        }
        if isinstance(source, Finished):
            data["embed"] = _parameters_embed(source)
        elif edit:
            data["embeds"] = []
        view = self._view(message)
        if view is not None or edit:
            data["view"] = view
        return data


def _forget(content: dict[str, Any]) -> None:
    """discord.py keeps a sent view to dispatch its presses; presses reach the interaction
    listener instead, so nothing stays in memory."""
    view = content.get("view")
    if view is not None:
        view.stop()


def _parameters_embed(event: Finished) -> discord.Embed:
    """The effective parameters of a result, as the images' infotext says them."""
    texts = [image.infotext for image in event.images]
    description = "\n\n".join(dict.fromkeys(texts))
    return discord.Embed(description=description[:MAX_EMBED] or None)


def _thread_name(message: Outgoing) -> str:
    return f"variations of {message.reply_to.message_id if message.reply_to else ''}"[:THREAD_NAME]


def message_gone(exc: discord.HTTPException) -> bool:
    return exc.code == UNKNOWN_MESSAGE


def token_expiry() -> Any:
    """When a token received now stops working (a little before Discord's 15 minutes)."""
    return utcnow() + timedelta(minutes=14, seconds=30)

"""A fake Discord (gateway, REST and CDN) on 127.0.0.1 for the real discord.py client.

The gateway says HELLO, answers IDENTIFY with READY and a GUILD_CREATE per guild, ACKs
heartbeats and dispatches the interactions a test makes (slash commands, button presses,
modal submits, autocomplete). REST keeps channels' messages with their attachments'
bytes, records every request, answers interaction callbacks, webhook followups and edits
(an interaction token expires after 15 minutes of the fake's clock), registers command
trees, opens threads, and can be told to fail a route once (429 with ``retry_after``,
5xx). Attachments a user sends are served from the fake CDN.

discord.py compares the REST ``Content-Type`` exactly with ``application/json``; the
answers here send exactly that.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.serving import serve

APP_ID = "900000000000000001"
BOT_ID = "900000000000000002"
BOT_USER = {"id": BOT_ID, "username": "atelier", "discriminator": "0", "global_name": "Atelier",
            "avatar": None, "bot": True}  # fmt: skip
TOKEN_LIFETIME = 15 * 60
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
ALL_TEXT = (1 << 10) | (1 << 11) | (1 << 15) | (1 << 16)  # view, send, attach, history


@dataclass
class Request:
    method: str
    path: str
    body: Any
    files: dict[str, bytes]
    at: float


@dataclass
class Failure:
    status: int
    retry_after: float = 0.0


@dataclass
class Interaction:
    id: str
    token: str
    created: float
    channel_id: str = ""
    responded: bool = False
    response: dict[str, Any] | None = None


@dataclass
class Guild:
    id: str
    name: str = "Atelier Club"
    owner_id: str = "1"
    roles: dict[str, int] = field(default_factory=dict)  # role id -> permissions
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    upload_limit: int = 10 * 1024 * 1024


def snowflake(counter: itertools.count) -> str:
    return str(1_000_000_000_000_000 + next(counter))


def user_json(user_id: str, name: str = "user") -> dict[str, Any]:
    return {
        "id": user_id,
        "username": name,
        "discriminator": "0",
        "global_name": name.title(),
        "avatar": None,
    }


class FakeDiscord:
    """``async with FakeDiscord(tokens=("t",)) as dc:`` -> ``dc.api_base`` / ``dc.gateway_url``."""

    def __init__(self, *, tokens: tuple[str, ...] = ("fake-token",)) -> None:
        self.tokens = set(tokens)
        self.requests: list[Request] = []
        self.messages: dict[str, dict[str, Any]] = {}  # message id -> message (with "channel_id")
        self.files: dict[str, bytes] = {}  # attachment id -> bytes
        self.cdn_fetches: list[str] = []  # attachment ids, in the order they were downloaded
        self.commands: dict[str, list[dict[str, Any]]] = {}  # "global" or guild id -> registered tree
        self.interactions: dict[str, Interaction] = {}  # token -> interaction
        self.guilds: dict[str, Guild] = {}
        self.dm_channels: dict[str, str] = {}  # channel id -> user id
        self.failures: list[tuple[re.Pattern[str], Failure]] = []
        self.clock_offset = 0.0  # seconds added to the fake's clock (expire interaction tokens)
        self._ids = itertools.count(1)
        self._sequence = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._identified = asyncio.Event()
        self.identifications = 0  # IDENTIFYs answered: a restarted bot identifies again
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- server --------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/{attachment}/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def now(self) -> float:
        return time.time() + self.clock_offset

    # -- what tests set up and do -----------------------------------------------------------------

    def guild(self, guild_id: str = "700000000000000001", **kwargs: Any) -> Guild:
        if guild_id not in self.guilds:
            guild = Guild(guild_id, **kwargs)
            guild.roles.setdefault(guild_id, ALL_TEXT)  # @everyone
            self.guilds[guild_id] = guild
        return self.guilds[guild_id]

    def channel(
        self, guild_id: str, channel_id: str, *, name: str = "art", nsfw: bool = False
    ) -> dict[str, Any]:
        guild = self.guild(guild_id)
        channel = {"id": channel_id, "type": 0, "guild_id": guild_id, "name": name, "position": 0,
                   "nsfw": nsfw, "permission_overwrites": [], "parent_id": None}  # fmt: skip
        guild.channels[channel_id] = channel
        return channel

    def fail_next(self, method: str, path_pattern: str, status: int, *, retry_after: float = 0.0) -> None:
        """The next request whose "METHOD /path" matches ``path_pattern`` fails once."""
        self.failures.append((re.compile(rf"^{method} {path_pattern}$"), Failure(status, retry_after)))

    async def wait_identified(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._identified.wait(), timeout)

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> Any:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
        return predicate()

    def add_attachment(self, data: bytes, filename: str, content_type: str = "image/png") -> dict[str, Any]:
        attachment_id = snowflake(self._ids)
        self.files[attachment_id] = data
        url = f"http://127.0.0.1:{self.port}/cdn/{attachment_id}/{filename}"
        return {"id": attachment_id, "filename": filename, "size": len(data), "url": url, "proxy_url": url,
                "content_type": content_type, "width": 64, "height": 64}  # fmt: skip

    async def slash(
        self,
        name: str,
        options: list[dict[str, Any]] | None = None,
        *,
        user: dict[str, Any],
        guild_id: str | None = None,
        channel_id: str | None = None,
        roles: tuple[str, ...] = (),
        locale: str = "en-US",
        attachments: dict[str, dict[str, Any]] | None = None,
        command_type: int = 2,
    ) -> Interaction:
        """A slash command (``command_type`` 2) or its autocomplete request (4); in a guild
        channel when ``guild_id`` is given, else in a DM channel with ``user``."""
        data: dict[str, Any] = {"id": snowflake(self._ids), "name": name, "type": 1, "options": options or []}
        if attachments:
            data["resolved"] = {"attachments": attachments}
        return await self._interact(command_type, data, user, guild_id, channel_id, roles, locale, None)

    async def click(
        self,
        message_id: str,
        custom_id: str,
        *,
        user: dict[str, Any],
        roles: tuple[str, ...] = (),
        locale: str = "en-US",
    ) -> Interaction:
        message = self.messages[message_id]
        channel = message["channel_id"]
        guild_id = self._guild_of(channel)
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interact(3, data, user, guild_id, channel, roles, locale, message)

    async def submit_modal(
        self,
        custom_id: str,
        values: dict[str, str],
        *,
        user: dict[str, Any],
        guild_id: str | None,
        channel_id: str,
        message_id: str | None = None,
        locale: str = "en-US",
    ) -> Interaction:
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]} for k, v in values.items()
        ]
        data = {"custom_id": custom_id, "components": rows}
        message = self.messages.get(message_id) if message_id else None
        return await self._interact(5, data, user, guild_id, channel_id, (), locale, message)

    def in_channel(self, channel_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m["channel_id"] == channel_id]

    def sent(self, method: str, path_pattern: str) -> list[Request]:
        pattern = re.compile(rf"^{path_pattern}$")
        return [r for r in self.requests if r.method == method and pattern.match(r.path)]

    # -- gateway ---------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        await socket.send_str(
            json.dumps({"op": 10, "d": {"heartbeat_interval": 40_000}, "s": None, "t": None})
        )
        try:
            async for message in socket:
                if message.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(message.data)
                if payload["op"] == 1:
                    await socket.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
                elif payload["op"] == 2:
                    token = payload["d"]["token"]
                    if token.removeprefix("Bot ") not in self.tokens:
                        await socket.close(code=4004, message=b"Authentication failed.")
                        break
                    await self._ready(socket)
        finally:
            self._sockets.remove(socket)
        return socket

    async def _ready(self, socket: web.WebSocketResponse) -> None:
        ready = {"v": 10, "user": BOT_USER, "session_id": "fake-session", "shard": [0, 1],
                 "resume_gateway_url": self.gateway_url, "application": {"id": APP_ID, "flags": 0},
                 "guilds": [{"id": g, "unavailable": True} for g in self.guilds]}  # fmt: skip
        await self._dispatch(socket, "READY", ready)
        for guild in self.guilds.values():
            await self._dispatch(socket, "GUILD_CREATE", self._guild_json(guild))
        self._identified.set()
        self.identifications += 1
        async with self._changed:
            self._changed.notify_all()

    async def _dispatch(self, socket: web.WebSocketResponse, event: str, data: Any) -> None:
        await socket.send_str(json.dumps({"op": 0, "t": event, "s": next(self._sequence), "d": data}))

    def _guild_json(self, guild: Guild) -> dict[str, Any]:
        roles = [{"id": rid, "name": "@everyone" if rid == guild.id else f"role{rid}", "color": 0,
                  "hoist": False, "position": 0, "permissions": str(perms), "managed": False,
                  "mentionable": False, "flags": 0} for rid, perms in guild.roles.items()]  # fmt: skip
        return {"id": guild.id, "name": guild.name, "owner_id": guild.owner_id, "roles": roles,
                "channels": list(guild.channels.values()), "threads": [], "members": [], "emojis": [],
                "stickers": [], "features": [], "member_count": 2, "large": False, "unavailable": False,
                "premium_tier": 0, "afk_timeout": 300, "verification_level": 0,
                "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0,
                "system_channel_flags": 0, "preferred_locale": "en-US", "nsfw_level": 0,
                "joined_at": datetime.now(UTC).isoformat()}  # fmt: skip

    async def _interact(
        self,
        kind: int,
        data: dict[str, Any],
        user: dict[str, Any],
        guild_id: str | None,
        channel_id: str | None,
        roles: tuple[str, ...],
        locale: str,
        message: dict[str, Any] | None,
    ) -> Interaction:
        interaction = Interaction(snowflake(self._ids), f"itoken-{next(self._ids)}", self.now())
        self.interactions[interaction.token] = interaction
        payload: dict[str, Any] = {
            "id": interaction.id, "application_id": APP_ID, "type": kind, "token": interaction.token,
            "version": 1, "data": data, "locale": locale, "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id or user["id"]},
            "context": 0 if guild_id else 1, "attachment_size_limit": 10 * 1024 * 1024,
            "app_permissions": str(ALL_TEXT),
        }  # fmt: skip
        if guild_id is not None:
            guild = self.guild(guild_id)
            channel_id = (
                channel_id
                or next(iter(guild.channels), None)
                or self.channel(guild_id, snowflake(self._ids))["id"]
            )
            channel = guild.channels.get(channel_id) or self._thread_json(channel_id)
            permissions = guild.roles[guild_id]
            for role in roles:
                permissions |= guild.roles.get(role, 0)
            if user["id"] == guild.owner_id:
                permissions |= ADMINISTRATOR
            payload.update(
                guild_id=guild_id, channel_id=channel_id, channel=channel, guild_locale="en-US",
                guild={"id": guild_id, "locale": "en-US", "features": []},
                member={"user": user, "roles": list(roles), "joined_at": datetime.now(UTC).isoformat(),
                        "deaf": False, "mute": False, "flags": 0, "permissions": str(permissions)},
                attachment_size_limit=guild.upload_limit,
            )  # fmt: skip
        else:
            channel_id = channel_id or f"8{user['id']}"
            self.dm_channels[channel_id] = user["id"]
            payload.update(channel_id=channel_id, channel={"id": channel_id, "type": 1}, user=user)
        if message is not None:
            payload["message"] = message
        interaction.channel_id = channel_id
        for socket in self._sockets:
            await self._dispatch(socket, "INTERACTION_CREATE", payload)
        return interaction

    def _thread_json(self, channel_id: str) -> dict[str, Any]:
        for message in self.messages.values():
            thread = message.get("thread")
            if thread and thread["id"] == channel_id:
                return thread
        raise KeyError(channel_id)

    def _guild_of(self, channel_id: str) -> str | None:
        for guild in self.guilds.values():
            if channel_id in guild.channels:
                return guild.id
        try:
            return self._thread_json(channel_id)["guild_id"]
        except KeyError:
            return None

    # -- REST ------------------------------------------------------------------------------------

    async def _cdn(self, request: web.Request) -> web.Response:
        self.cdn_fetches.append(request.match_info["attachment"])
        data = self.files.get(request.match_info["attachment"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body, files = await _read_body(request)
        self.requests.append(Request(request.method, path, body, files, time.monotonic()))
        try:
            authorization = request.headers.get("Authorization", "")
            interaction_route = path.startswith(("/interactions/", "/webhooks/"))
            if not interaction_route and authorization.removeprefix("Bot ") not in self.tokens:
                return _json({"message": "401: Unauthorized", "code": 0}, 401)
            for index, (pattern, failure) in enumerate(self.failures):
                if pattern.match(f"{request.method} {path}"):
                    del self.failures[index]
                    if failure.status == 429:
                        return _json(
                            {"message": "You are being rate limited.", "retry_after": failure.retry_after,
                             "global": False}, 429,
                            {"Retry-After": str(failure.retry_after), "X-RateLimit-Scope": "user"},
                        )  # fmt: skip
                    return _json({"message": "Server error", "code": 0}, failure.status)
            return await self._route(request.method, path, body, files)
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _route(self, method: str, path: str, body: Any, files: dict[str, bytes]) -> web.Response:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return _json(BOT_USER)
        if path == "/oauth2/applications/@me":
            return _json({"id": APP_ID, "name": "Atelier", "description": "", "icon": None, "bot_public": True,
                          "bot_require_code_grant": False, "owner": user_json("1", "owner"),
                          "verify_key": "0" * 64, "flags": 0, "team": None})  # fmt: skip
        if path in ("/gateway", "/gateway/bot"):
            return _json({"url": self.gateway_url, "shards": 1,
                          "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0,
                                                  "max_concurrency": 1}})  # fmt: skip
        if parts[0] == "applications" and "commands" in parts:
            scope = parts[3] if parts[2] == "guilds" else "global"
            if method == "PUT":
                self.commands[scope] = [
                    {**c, "id": snowflake(self._ids), "application_id": APP_ID, "version": "1"} for c in body
                ]
            return _json(self.commands.get(scope, []))
        if parts[0] == "interactions" and parts[-1] == "callback":
            return self._callback(parts[1], parts[2], body, files)
        if parts[0] == "webhooks":
            return self._webhook(method, parts, body, files)
        if parts[0] == "channels":
            return self._channel(method, parts, body, files)
        return _json({"message": f"no route {method} {path} in this fake", "code": 0}, 404)

    def _callback(self, interaction_id: str, token: str, body: Any, files: dict[str, bytes]) -> web.Response:
        interaction = self.interactions.get(token)
        if interaction is None or interaction.responded:
            return _json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        if self.now() - interaction.created > 3:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        interaction.responded = True
        interaction.response = body
        result: dict[str, Any] = {"interaction": {"id": interaction_id, "type": 2,
                                                  "response_message_loading": body["type"] == 5}}  # fmt: skip
        if body["type"] in (4, 5, 7):
            message = self._store_message(
                self._interaction_channel(interaction), body.get("data") or {}, files, interaction=interaction
            )
            result["resource"] = {"type": body["type"], "message": message}
        return _json(result)

    def _webhook(self, method: str, parts: list[str], body: Any, files: dict[str, bytes]) -> web.Response:
        token = parts[2]
        interaction = self.interactions.get(token)
        if interaction is None or self.now() - interaction.created > TOKEN_LIFETIME:
            return _json({"message": "Invalid Webhook Token", "code": 50027}, 401)
        channel = self._interaction_channel(interaction)
        if method == "POST":
            return _json(self._store_message(channel, body, files, interaction=interaction))
        message_id = parts[4]
        if message_id == "@original":
            message_id = self._original_id(interaction)
            if message_id is None:
                return _json({"message": "Unknown Message", "code": 10008}, 404)
        if method == "PATCH":
            return self._edit(message_id, body, files)
        if method == "DELETE":
            self.messages.pop(message_id, None)
            return web.Response(status=204)
        return _json(self.messages[message_id])

    def _channel(self, method: str, parts: list[str], body: Any, files: dict[str, bytes]) -> web.Response:
        channel_id = parts[1]
        if len(parts) == 3 and parts[2] == "messages" and method == "POST":
            return _json(self._store_message(channel_id, body, files))
        if len(parts) >= 4 and parts[2] == "messages":
            message_id = parts[3]
            if message_id not in self.messages:
                return _json({"message": "Unknown Message", "code": 10008}, 404)
            if len(parts) == 5 and parts[4] == "threads" and method == "POST":
                thread = {"id": snowflake(self._ids), "type": 11, "guild_id": self._guild_of(channel_id),
                          "parent_id": channel_id, "name": body.get("name", "thread"), "owner_id": BOT_ID,
                          "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                              "archive_timestamp": datetime.now(UTC).isoformat(),
                                              "locked": False}, "message_count": 0,
                          "member_count": 1, "rate_limit_per_user": 0, "flags": 0}  # fmt: skip
                self.messages[message_id]["thread"] = thread
                return _json(thread)
            if method == "PATCH":
                return self._edit(message_id, body, files)
            if method == "DELETE":
                del self.messages[message_id]
                return web.Response(status=204)
            return _json(self.messages[message_id])
        if len(parts) == 2 and method == "GET":
            if channel_id in self.dm_channels:
                return _json(
                    {"id": channel_id, "type": 1, "recipients": [user_json(self.dm_channels[channel_id])]}
                )
            for guild in self.guilds.values():
                if channel_id in guild.channels:
                    return _json(guild.channels[channel_id])
            return _json(self._thread_json(channel_id))
        return _json({"message": f"no route {method} /{'/'.join(parts)} in this fake", "code": 0}, 404)

    def _interaction_channel(self, interaction: Interaction) -> str:
        return interaction.channel_id

    def _original_id(self, interaction: Interaction) -> str | None:
        for message in self.messages.values():
            if message.get("interaction_token") == interaction.token and message.get("original"):
                return message["id"]
        return None

    def _store_message(
        self,
        channel_id: str,
        body: dict[str, Any],
        files: dict[str, bytes],
        *,
        interaction: Interaction | None = None,
    ) -> dict[str, Any]:
        message_id = snowflake(self._ids)
        message = {
            "id": message_id, "channel_id": channel_id, "author": BOT_USER, "content": body.get("content") or "",
            "timestamp": datetime.now(UTC).isoformat(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "embeds": body.get("embeds") or [],
            "components": body.get("components") or [], "pinned": False, "type": 0,
            "flags": body.get("flags") or 0, "attachments": self._attachments(body, files),
        }  # fmt: skip
        mentioned = re.findall(r"<@!?(\d+)>", message["content"])
        message["mentions"] = [user_json(uid) for uid in mentioned]
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
        if interaction is not None:
            message["interaction_token"] = interaction.token
            message["original"] = self._original_id(interaction) is None
        self.messages[message_id] = message
        return message

    def _attachments(self, body: dict[str, Any], files: dict[str, bytes]) -> list[dict[str, Any]]:
        out = []
        for index, entry in enumerate(body.get("attachments") or []):
            data = files.get(f"files[{entry.get('id', index)}]")
            if data is not None:  # a new upload; entries naming stored attachments are kept by _edit
                out.append(self.add_attachment(data, entry.get("filename", f"file{index}")))
        return out

    def _edit(self, message_id: str, body: dict[str, Any], files: dict[str, bytes]) -> web.Response:
        message = self.messages.get(message_id)
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        for key in ("content", "embeds", "components", "flags"):
            if key in body:
                message[key] = body[key] or ([] if key != "content" else "")
        if "attachments" in body:
            kept = {str(a.get("id")) for a in body["attachments"]}
            old = [a for a in message["attachments"] if a["id"] in kept]
            message["attachments"] = old + self._attachments(body, files)
        message["edited_timestamp"] = datetime.now(UTC).isoformat()
        return _json(message)


async def _read_body(request: web.Request) -> tuple[Any, dict[str, bytes]]:
    files: dict[str, bytes] = {}
    if request.content_type.startswith("multipart/"):
        body: Any = {}
        reader = await request.multipart()
        async for part in reader:
            if part.name == "payload_json":
                body = json.loads(await part.text())
            else:
                files[part.name] = await part.read()
        return body, files
    raw = await request.read()
    return (json.loads(raw) if raw else None), files


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )

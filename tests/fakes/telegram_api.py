"""A fake Telegram Bot API on 127.0.0.1 for the real python-telegram-bot client.

It speaks the HTTP API the library uses (``POST /bot<token>/<method>``, downloads from
``/file/bot<token>/<path>``): requests are form-encoded or multipart, every non-string
value arrives JSON-encoded, and answers are ``{"ok": true, "result": ...}``. It keeps the
chats' messages, records every call for assertions, serves long polls from a queue of
updates a test puts in, and can be told to fail a method once (429 with ``retry_after``,
413, 5xx) to show the bot honours it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.serving import serve

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Atelier", "username": "atelier_bot"}
LONG_POLL_CAP = 1.0  # seconds a getUpdates may wait here, so stopping is quick
FILE_LIMIT = 50 * 1024 * 1024  # the public Bot API's upload limit for documents
PHOTO_LIMIT = 10 * 1024 * 1024


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    at: float
    file_names: dict[str, str] = field(default_factory=dict)
    status: int = 200  # what the fake answered: a failure told by fail_next keeps its status


@dataclass
class Failure:
    status: int
    retry_after: int | None = None
    description: str = ""


@dataclass
class Chat:
    id: int
    type: str = "private"  # private, group, supergroup
    title: str | None = None
    is_forum: bool = False
    admins: set[int] = field(default_factory=set)

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.type == "private":
            data["first_name"] = "User"
        else:
            data["title"] = self.title or f"chat {self.id}"
        if self.is_forum:
            data["is_forum"] = True
        return data


def user_json(user_id: int, name: str = "User", language_code: str | None = "en") -> dict[str, Any]:
    data: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": name, "username": name.lower()}
    if language_code:
        data["language_code"] = language_code
    return data


class FakeTelegram:
    """``async with FakeTelegram() as tg:`` -> ``tg.base_url`` / ``tg.base_file_url``."""

    def __init__(self, *, tokens: tuple[str, ...] = ("123456:TEST",)) -> None:
        self.tokens = set(tokens)
        self.calls: list[Call] = []
        self.chats: dict[int, Chat] = {}
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # (chat id, message id) -> message
        self.files: dict[str, bytes] = {}  # file_id -> bytes (uploads and what tests send)
        self.commands: dict[tuple[str, str], list[dict[str, str]]] = {}  # (scope, language) -> commands
        self.failures: dict[str, list[Failure]] = defaultdict(list)
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self._new_update = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._names: dict[str, str] = {}
        self.port = 0

    # -- server --------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._new_update.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- what tests do -------------------------------------------------------------------------------

    def chat(self, chat_id: int, **kwargs: Any) -> Chat:
        if chat_id not in self.chats:
            self.chats[chat_id] = Chat(chat_id, **kwargs)
        return self.chats[chat_id]

    def fail_next(
        self, method: str, status: int, *, retry_after: int | None = None, description: str = ""
    ) -> None:
        """The next call of ``method`` fails once as Telegram would answer it."""
        self.failures[method].append(Failure(status, retry_after, description))

    def send_text(
        self,
        chat_id: int,
        user: dict[str, Any],
        text: str,
        *,
        thread_id: int | None = None,
        reply_to: int | None = None,
        caption_file: tuple[str, bytes, str] | None = None,
    ) -> dict[str, Any]:
        """A user's message; a leading ``/command`` gets its bot_command entity, as the app
        sends it. ``caption_file`` = (kind "photo"/"document", bytes, file name): the text
        becomes that attachment's caption."""
        chat = self.chat(chat_id)
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat.json(),
            "from": user,
        }
        entities = []
        if text.startswith("/"):
            length = len(text.split()[0]) if text.split() else 1
            entities.append({"type": "bot_command", "offset": 0, "length": _utf16_len(text[:length])})
        if caption_file is None:
            message["text"] = text
            if entities:
                message["entities"] = entities
        else:
            kind, data, name = caption_file
            file_id = self._store_file(data)
            if kind == "photo":
                message["photo"] = [
                    {
                        "file_id": file_id,
                        "file_unique_id": file_id,
                        "width": 64,
                        "height": 64,
                        "file_size": len(data),
                    }
                ]
            else:
                message["document"] = {
                    "file_id": file_id, "file_unique_id": file_id, "file_name": name,
                    "mime_type": "image/png" if name.endswith(".png") else "application/octet-stream",
                    "file_size": len(data),
                }  # fmt: skip
            if text:
                message["caption"] = text
                if entities:
                    message["caption_entities"] = entities
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
        if reply_to is not None:
            message["reply_to_message"] = self.messages[(chat_id, reply_to)]
        self.messages[(chat_id, message["message_id"])] = message
        self._push({"message": message})
        return message

    def press(self, chat_id: int, message_id: int, user: dict[str, Any], data: str) -> str:
        """A press on an inline keyboard button; returns the callback query id."""
        query_id = str(next(self._callback_ids))
        self._push(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "chat_instance": str(chat_id),
                    "data": data,
                    "message": self.messages[(chat_id, message_id)],
                }
            }
        )
        return query_id

    def sent(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if (method is None or c.method == method)
            and (chat_id is None or str(c.params.get("chat_id")) == str(chat_id))
        ]

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> Any:
        """Until ``predicate()`` is truthy (checked after every call); returns its value."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
        return predicate()

    def keyboard(self, message: dict[str, Any]) -> list[str]:
        markup = message.get("reply_markup") or {}
        return [b.get("callback_data") for row in markup.get("inline_keyboard", []) for b in row]

    # -- the API -------------------------------------------------------------------------------------

    def _push(self, update: dict[str, Any]) -> None:
        update["update_id"] = next(self._update_ids)
        self._updates.append(update)
        self._new_update.set()

    def _store_file(self, data: bytes) -> str:
        file_id = f"file{next(self._file_ids)}"
        self.files[file_id] = data
        return file_id

    async def _api(self, request: web.Request) -> web.Response:
        token, method = request.match_info["token"], request.match_info["method"]
        if token not in self.tokens:
            return _error(401, "Unauthorized")
        params, files, names = await _read_params(request)
        call = Call(method, params, files, time.monotonic(), names)
        self.calls.append(call)
        self._names = names
        try:
            failures = self.failures.get(method)
            if failures:
                failure = failures.pop(0)
                call.status = failure.status
                extra = {"parameters": {"retry_after": failure.retry_after}} if failure.retry_after else {}
                description = failure.description or {
                    429: f"Too Many Requests: retry after {failure.retry_after}",
                    413: "Request Entity Too Large",
                }.get(failure.status, "Internal Server Error")
                return _error(failure.status, description, **extra)
            handler = getattr(self, "_m_" + method, None)
            if handler is None:
                return _error(404, f"Not Found: method {method} is not in this fake")
            result = await handler(params, files)
            if isinstance(result, web.Response):
                return result
            return _ok(result)
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] not in self.tokens:
            return web.Response(status=401)
        data = self.files.get(request.match_info["path"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _m_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return {**BOT_USER, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}  # fmt: skip

    async def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_setWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        offset = int(params.get("offset") or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates:
            self._new_update.clear()
            timeout = min(float(params.get("timeout") or 0), LONG_POLL_CAP)
            try:
                await asyncio.wait_for(self._new_update.wait(), timeout)
            except TimeoutError:
                pass
        limit = int(params.get("limit") or 100)
        return [u for u in self._updates if u["update_id"] >= offset][:limit]

    async def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        scope = (params.get("scope") or {}).get("type", "default")
        self.commands[(scope, params.get("language_code") or "")] = params["commands"]
        return True

    async def _m_getMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        scope = (params.get("scope") or {}).get("type", "default")
        return self.commands.get((scope, params.get("language_code") or ""), [])

    async def _m_sendChatAction(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_getChatAdministrators(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat = self.chat(int(params["chat_id"]))
        return [
            {"status": "administrator", "user": user_json(uid), "can_be_edited": False,
             "is_anonymous": False, "can_manage_chat": True, "can_delete_messages": True,
             "can_manage_video_chats": False, "can_restrict_members": True, "can_promote_members": False,
             "can_change_info": True, "can_invite_users": True, "can_post_stories": False,
             "can_edit_stories": False, "can_delete_stories": False}
            for uid in sorted(chat.admins)
        ]  # fmt: skip

    async def _m_getChatMember(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat = self.chat(int(params["chat_id"]))
        user_id = int(params["user_id"])
        status = "administrator" if user_id in chat.admins else "member"
        member: dict[str, Any] = {"status": status, "user": user_json(user_id)}
        if status == "administrator":
            member.update(
                can_be_edited=False, is_anonymous=False, can_manage_chat=True, can_delete_messages=True,
                can_manage_video_chats=False, can_restrict_members=True, can_promote_members=False,
                can_change_info=True, can_invite_users=True, can_post_stories=False,
                can_edit_stories=False, can_delete_stories=False,
            )  # fmt: skip
        return member

    async def _m_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        file_id = params["file_id"]
        if file_id not in self.files:
            return _error(400, "Bad Request: invalid file_id")
        return {"file_id": file_id, "file_unique_id": file_id, "file_size": len(self.files[file_id]),
                "file_path": file_id}  # fmt: skip

    async def _m_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._new_message(params, text=params["text"])

    async def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = self._upload(params, files, "photo")
        if isinstance(data, web.Response):
            return data
        if len(data) > PHOTO_LIMIT:
            return _error(400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
        file_id = self._store_file(data)
        photo = [
            {"file_id": file_id, "file_unique_id": file_id, "width": 64, "height": 64, "file_size": len(data)}
        ]
        return self._new_message(params, photo=photo, caption=params.get("caption"))

    async def _m_sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = self._upload(params, files, "document")
        if isinstance(data, web.Response):
            return data
        if len(data) > FILE_LIMIT:
            return _error(413, "Request Entity Too Large")
        file_id = self._store_file(data)
        name = next(iter(self._names.values()), "file")
        document = {"file_id": file_id, "file_unique_id": file_id, "file_size": len(data), "file_name": name}
        return self._new_message(params, document=document, caption=params.get("caption"))

    async def _m_sendMediaGroup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        out = []
        for item in params["media"]:
            ref = item["media"]
            data = files.get(ref.removeprefix("attach://")) if isinstance(ref, str) else None
            if data is None:
                return _error(400, "Bad Request: wrong file identifier")
            file_id = self._store_file(data)
            kind = item["type"]
            body: dict[str, Any] = {"caption": item.get("caption")}
            if kind == "photo":
                body["photo"] = [{"file_id": file_id, "file_unique_id": file_id, "width": 64, "height": 64}]
            else:
                body["document"] = {"file_id": file_id, "file_unique_id": file_id, "file_size": len(data)}
            out.append(self._new_message(params, **body))
        return out

    async def _m_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._edit(params, text=params["text"])

    async def _m_editMessageCaption(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._edit(params, caption=params.get("caption"))

    async def _m_editMessageReplyMarkup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._edit(params)

    async def _m_editMessageMedia(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        media = params["media"]
        data = files.get(str(media.get("media", "")).removeprefix("attach://"))
        if data is None:
            return _error(400, "Bad Request: wrong file identifier")
        file_id = self._store_file(data)
        changes: dict[str, Any] = {"caption": media.get("caption")}
        if media["type"] == "photo":
            changes["photo"] = [{"file_id": file_id, "file_unique_id": file_id, "width": 64, "height": 64}]
        else:
            changes["document"] = {"file_id": file_id, "file_unique_id": file_id, "file_size": len(data)}
        return self._edit(params, **changes)

    async def _m_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        key = (int(params["chat_id"]), int(params["message_id"]))
        if key not in self.messages:
            return _error(400, "Bad Request: message to delete not found")
        del self.messages[key]
        return True

    # -- helpers -------------------------------------------------------------------------------

    def _upload(self, params: dict[str, Any], files: dict[str, bytes], field_name: str) -> Any:
        value = params.get(field_name)
        if field_name in files:
            return files[field_name]
        if isinstance(value, str) and value.startswith("attach://") and value[9:] in files:
            return files[value[9:]]
        if isinstance(value, str) and value in self.files:
            return self.files[value]
        return _error(400, f"Bad Request: there is no {field_name} in the request")

    def _new_message(self, params: dict[str, Any], **body: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        chat = self.chat(chat_id, type="private" if chat_id > 0 else "supergroup")
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat.json(),
            "from": BOT_USER,
            **{k: v for k, v in body.items() if v is not None},
        }
        if params.get("message_thread_id") is not None:
            message["message_thread_id"] = int(params["message_thread_id"])
            message["is_topic_message"] = True
        reply = params.get("reply_parameters") or {}
        reply_id = reply.get("message_id") or params.get("reply_to_message_id")
        if reply_id is not None and (chat_id, int(reply_id)) in self.messages:
            message["reply_to_message"] = self.messages[(chat_id, int(reply_id))]
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        self.messages[(chat_id, message["message_id"])] = message
        return message

    def _edit(self, params: dict[str, Any], **changes: Any) -> Any:
        key = (int(params["chat_id"]), int(params["message_id"]))
        message = self.messages.get(key)
        if message is None:
            return _error(400, "Bad Request: message to edit not found")
        new_markup = params.get("reply_markup")
        unchanged = all(message.get(k) == v for k, v in changes.items()) and (
            new_markup is None or message.get("reply_markup") == new_markup
        )
        if unchanged:
            return _error(400, "Bad Request: message is not modified")
        for name in ("photo", "document"):
            if name in changes:
                message.pop("photo", None)
                message.pop("document", None)
        message.update({k: v for k, v in changes.items() if v is not None})
        if new_markup is not None:
            message["reply_markup"] = new_markup
        message["edit_date"] = int(time.time())
        return message


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """Form fields with JSON-encoded values decoded, uploaded files and their file names."""
    params: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    names: dict[str, str] = {}
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if part.filename is not None:
                files[part.name] = await part.read()
                names[part.name] = part.filename
            else:
                params[part.name] = _decode(await part.text())
    elif request.content_type == "application/json":
        params = await request.json()
    else:
        for key, value in (await request.post()).items():
            params[key] = _decode(value) if isinstance(value, str) else value
    return params, files, names


def _decode(value: str) -> Any:
    """Objects, lists and booleans arrive JSON-encoded; plain strings (a text "5" too) and
    ids stay strings (the handlers convert ids)."""
    if value[:1] in ("{", "[") or value in ("true", "false"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _ok(result: Any) -> web.Response:
    return web.Response(
        body=json.dumps({"ok": True, "result": result}).encode(), content_type="application/json"
    )


def _error(status: int, description: str, **extra: Any) -> web.Response:
    body = {"ok": False, "error_code": status, "description": description, **extra}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")

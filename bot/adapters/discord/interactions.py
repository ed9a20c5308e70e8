"""Discord interactions turned into core calls: slash commands, button presses and
autocomplete requests, read from the raw interaction (no command tree, no stored views:
a button pressed after a restart arrives here like any other).

A slash command is deferred before anything else (Discord's 3 seconds), then its values
are put back into the text grammar (``command_line``) and run as an ``Invocation``. The
actor carries the interaction's language (Chinese for zh-CN and zh-TW), the moderator
role (administrators, Manage Server, the configured role ids) and the channel's NSFW
flag; the route carries the interaction token for as long as it lasts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from ulid import ULID

from bot.autocomplete import complete
from bot.errors import NotFound, UserError
from bot.inputs import size_text
from bot.options import shown
from bot.platforms import FILE, command_line
from bot.types import Actor, Attachment, Invocation, Reply, Route

if TYPE_CHECKING:
    from bot.adapters.discord.adapter import DiscordAdapter

log = logging.getLogger(__name__)

REMIX = "remix:"  # the action Discord asks the new prompt for, in a form
PROMPT_FIELD = "prompt"
MAX_PROMPT = 4000  # a text input's limit
SUBCOMMAND_TYPES = (1, 2)
USER_TYPE = 6
ATTACHMENT_TYPE = 11


def locale_of(interaction: discord.Interaction) -> str:
    return "zh-CN" if str(interaction.locale).startswith("zh") else "en"


class Interactions:
    def __init__(self, adapter: DiscordAdapter) -> None:
        self.adapter = adapter
        self.app = adapter.app

    async def handle(self, interaction: discord.Interaction) -> None:
        kind = interaction.type
        try:
            if kind == discord.InteractionType.autocomplete:
                await self._complete(interaction)
                return
            if kind not in (
                discord.InteractionType.application_command,
                discord.InteractionType.component,
                discord.InteractionType.modal_submit,
            ):
                return
            if not self._allowed(interaction):
                text = self.app.translator.t(locale_of(interaction), "discord.not_here")
                await interaction.response.send_message(text, ephemeral=True)
                return
            if kind == discord.InteractionType.application_command:
                await self._command(interaction)
            elif kind == discord.InteractionType.modal_submit:
                await self._remix(interaction)
            else:
                await self._press(interaction)
        except Exception:
            await self._unexpected(interaction)

    def _allowed(self, interaction: discord.Interaction) -> bool:
        allowed = self.adapter.settings.allowed_guilds
        return not allowed or interaction.guild_id is None or str(interaction.guild_id) in allowed

    async def _command(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)  # first, before any database or GPU work
        self.adapter.deferred.add(interaction.token)
        await self.adapter.serving.wait()
        data: dict[str, Any] = dict(interaction.data or {})
        path, values = _read(data)
        node = _node(self.app, path)
        actor, route = self.who(interaction)
        attachments: list[Attachment] = []
        refused: Reply | None = None
        if node is None:
            command, text = path[0], ""
        else:
            command, text = command_line(node, values)
            upload = values.get(FILE)
            if upload is not None:
                try:
                    attachments.append(await self._download(data, str(upload)))
                except UserError as exc:  # a file over the upload cap, refused before it is fetched
                    refused = Reply(exc.key, exc.params, error=True)
        if refused is not None:
            await self.adapter.delivery.send([refused], actor, route)
        else:
            await self.adapter.delivery.handle(Invocation(command, text, actor, route, tuple(attachments)))
        if interaction.token in self.adapter.deferred:  # nothing answered: no "thinking" left behind
            self.adapter.deferred.discard(interaction.token)
            await interaction.delete_original_response()

    async def _press(self, interaction: discord.Interaction) -> None:
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        if custom_id.startswith(REMIX) and " " not in custom_id:
            await self._remix_form(interaction, custom_id)
            return
        await interaction.response.defer()  # the pressed message stays as it is
        await self.adapter.serving.wait()
        message = interaction.message
        actor, route = self.who(interaction, reply_to=str(message.id) if message else None)
        await self.adapter.delivery.press(custom_id, actor, route)

    async def _remix_form(self, interaction: discord.Interaction, action: str) -> None:
        """Remix asks for the new prompt in a form, filled with the result's own."""
        await self.adapter.serving.wait()
        locale = locale_of(interaction)
        actor, _ = self.who(interaction)
        try:
            prompt = (await self.app.service.visible(action.removeprefix(REMIX), actor)).request.prompt
        except NotFound:
            prompt = ""  # the command answers "not found" once the form is sent
        t = self.app.translator.t
        modal = discord.ui.Modal(title=t(locale, "discord.remix_title"), custom_id=action, timeout=None)
        field = discord.ui.TextInput(
            label=t(locale, "discord.remix_prompt"),
            custom_id=PROMPT_FIELD,
            default=prompt[:MAX_PROMPT] or None,
            style=discord.TextStyle.paragraph,
            max_length=MAX_PROMPT,
        )
        modal.add_item(field)
        await interaction.response.send_modal(modal)
        modal.stop()  # its answer reaches this listener, not discord.py's modal store

    async def _remix(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await self.adapter.serving.wait()
        data: dict[str, Any] = dict(interaction.data or {})
        action = str(data.get("custom_id", ""))
        if not action.startswith(REMIX):
            return
        prompt = _field_value(data.get("components") or [], PROMPT_FIELD) or ""
        message = interaction.message
        actor, route = self.who(interaction, reply_to=str(message.id) if message else None)
        text = f"{action.removeprefix(REMIX)} {prompt.strip()}".strip()
        await self.adapter.delivery.handle(Invocation("remix", text, actor, route))

    async def _complete(self, interaction: discord.Interaction) -> None:
        await self.adapter.serving.wait()
        path, values, focused = _read_focused(dict(interaction.data or {}))
        node = _node(self.app, path)
        field = next((f for f in node.fields if f.name == focused), None) if node else None
        choices = []
        if field is not None and field.autocomplete:
            actor, _ = self.who(interaction)
            found = await complete(self.app, field.autocomplete, actor, str(values.get(focused, "")))
            choices = [discord.app_commands.Choice(name=c.name, value=c.value) for c in found]
        await interaction.response.autocomplete(choices)

    async def _download(self, data: dict[str, Any], attachment_id: str) -> Attachment:
        """The uploaded file; one whose size (as Discord states it) is over ``[limits]
        max_upload_bytes`` is refused before a byte of it is fetched."""
        found = (data.get("resolved") or {}).get("attachments", {}).get(attachment_id) or {}
        name = str(found.get("filename", "image.png"))
        limit = self.app.settings.limits.max_upload_bytes
        size = found.get("size")
        if isinstance(size, int) and size > limit:
            raise UserError("error.upload_too_large", name=shown(name), max=size_text(limit))
        content = await self.adapter.client.http.get_from_cdn(found["url"])
        return Attachment(name, content, found.get("content_type"))

    async def _unexpected(self, interaction: discord.Interaction) -> None:
        """A fault of the bot's, not of the request: the user gets a reference to quote,
        the log the trace."""
        ref = str(ULID())[-8:]
        log.exception("discord interaction failed (ref %s)", ref)
        text = self.app.translator.t(locale_of(interaction), "error.internal", ref=ref)
        try:
            if interaction.token in self.adapter.deferred:  # only its user sees the error
                self.adapter.deferred.discard(interaction.token)
                await interaction.delete_original_response()
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            elif interaction.type != discord.InteractionType.autocomplete:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell the user about ref %s", ref)

    # who and where --------------------------------------------------------------------------------

    def who(self, interaction: discord.Interaction, reply_to: str | None = None) -> tuple[Actor, Route]:
        from bot.adapters.discord.adapter import PLATFORM, token_expiry

        channel = interaction.channel
        channel_id = str(interaction.channel_id) if interaction.channel_id else None
        parent = getattr(channel, "parent_id", None)
        in_thread = isinstance(channel, discord.Thread) and parent is not None
        chat_id = str(parent) if in_thread else channel_id
        guild_id = str(interaction.guild_id) if interaction.guild_id else None
        if channel_id:
            self.adapter.upload_limits[channel_id] = interaction.filesize_limit
        user = interaction.user
        actor = Actor(
            platform=PLATFORM,
            user_id=str(user.id),
            name=user.display_name,
            locale=locale_of(interaction),
            chat_id=chat_id,
            guild_id=guild_id,
            roles=frozenset(self._roles(interaction)),
            nsfw_allowed=_nsfw(channel),
        )
        route = Route(
            PLATFORM,
            chat_id,
            channel_id if in_thread else None,
            reply_to_message_id=reply_to,
            interaction_token=interaction.token,
            token_expires_at=token_expiry(),
            is_private=guild_id is None,
        )
        return actor, route

    def _roles(self, interaction: discord.Interaction) -> set[str]:
        if interaction.guild_id is None:
            return set()
        permissions = interaction.permissions
        roles = {str(role.id) for role in getattr(interaction.user, "roles", [])}
        configured = set(self.adapter.settings.moderator_roles)
        if permissions.administrator or permissions.manage_guild or roles & configured:
            return {"moderator"}
        return set()


def _nsfw(channel: Any) -> bool:
    check = getattr(channel, "is_nsfw", None)
    try:
        return bool(check()) if check is not None else False
    except AttributeError:  # a thread whose parent is not cached
        return False


def _node(app: Any, path: list[str]) -> Any:
    from bot.adapters.discord.tree import find_node

    return find_node(app, path) if path else None


def _field_value(components: list[Any], custom_id: str) -> str | None:
    """A form field's value, however deep Discord nests it (rows, labels)."""
    for component in components:
        if not isinstance(component, dict):
            continue
        if component.get("custom_id") == custom_id and "value" in component:
            return str(component["value"])
        nested = component.get("components") or ([component["component"]] if "component" in component else [])
        found = _field_value(nested, custom_id)
        if found is not None:
            return found
    return None


def _read(data: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The command's path (name, subcommands) and its field values by name."""
    path, values, _ = _read_focused(data)
    return path, values


def _read_focused(data: dict[str, Any]) -> tuple[list[str], dict[str, Any], str | None]:
    path = [str(data.get("name", ""))]
    options = data.get("options") or []
    while len(options) == 1 and options[0].get("type") in SUBCOMMAND_TYPES:
        path.append(str(options[0]["name"]))
        options = options[0].get("options") or []
    values: dict[str, Any] = {}
    focused = None
    for option in options:
        value = option.get("value")
        if option.get("type") == USER_TYPE:
            value = f"<@{value}>"
        values[str(option["name"])] = value
        if option.get("focused"):
            focused = str(option["name"])
    return path, values, focused

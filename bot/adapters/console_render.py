"""How the console shows a delivered message: one line of text, or one JSON object.

The console is a terminal: files are shown as paths. A stored image is shown at its
path in the local images folder; any other file (an export, a grid, or an image of a
store that is not local) is written once under ``<data_dir>/outbox/<ULID>/<name>`` and
shown there. The JSON fields are the console's interface for scripts and tests
(tests/scenario.py): "event", "id", "text", and per kind "position", "step"/"total",
"images" (id, path, seed, width, height, infotext), "actions", "spoiler", "key",
"files", plus a reply's own ``data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ulid import ULID

from bot.adapters.base import Outgoing, flat_buttons
from bot.i18n import Translator
from bot.types import Failed, Finished, Notice, Progress, Queued, Reply


def write_outbox(folder: Path, name: str, data: bytes) -> Path:
    """On a worker thread: a fresh folder per file, so the file keeps its own name (an
    A1111 styles.csv must be called so)."""
    path = folder / str(ULID()) / (Path(name).name or "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def message_text(message: Outgoing, paths: list[str], translator: Translator, locale: str = "en") -> str:
    """A message for a person at a terminal: its text, where its files are, and its
    buttons as the commands that press them (``/vary ID.2``)."""
    source = message.source
    if isinstance(source, Finished):
        text = translator.t(
            source.actor.locale, "event.finished", id=source.generation_id, paths=" ".join(paths)
        )
        paths = []
    elif isinstance(source, Notice):
        text = f"[{source.generation_id}] {message.text}"
    else:
        text = message.text
    lines = [text]
    if paths:
        lines.append(translator.t(locale, "console.files", paths="\n  ".join(paths)))
    commands = [f"{b.label}: {typed_command(b.id)}" for b in flat_buttons(message)]
    if commands:
        lines.append(translator.t(locale, "console.actions", actions="\n  ".join(commands)))
    return "\n".join(lines)


def typed_command(action_id: str) -> str:
    """What to type for a button: ``vary:ID.2`` -> ``/vary ID.2``."""
    name, _, argument = action_id.partition(":")
    return f"/{name} {argument}".rstrip()


def message_json(message: Outgoing, paths: list[str], translator: Translator) -> dict[str, Any]:
    source = message.source
    actions = [{"id": b.id, "label": b.label} for b in flat_buttons(message)]
    if isinstance(source, Reply):
        return _reply_json(source, message.text, paths, actions)
    data: dict[str, Any] = {
        "event": message.kind,
        "id": message.generation_id,
        "text": _event_text(message, paths, translator),
    }
    if isinstance(source, Queued):
        data["position"] = source.position
    elif isinstance(source, Progress):
        data.update(step=source.step, total=source.total)
    elif isinstance(source, Finished):
        by_id = {file.image_id: path for file, path in zip(message.files, paths, strict=True)}
        data["images"] = [
            {
                "id": i.id,
                "path": by_id.get(i.id, ""),
                "seed": i.seed,
                "width": i.width,
                "height": i.height,
                "infotext": i.infotext,
            }
            for i in source.images
        ]
        data["actions"] = actions
        data["spoiler"] = source.spoiler
    elif isinstance(source, Failed):
        data["key"] = source.key
    elif isinstance(source, Notice):
        data.update(_reply_json(source.reply, message.text, paths, actions))
        data.update(event="notice", id=source.generation_id, error=source.reply.error)
    return data


def _event_text(message: Outgoing, paths: list[str], translator: Translator) -> str:
    """The one-line text of an event in JSON mode (paths and actions have their own fields)."""
    source = message.source
    if isinstance(source, Finished):
        return translator.t(
            source.actor.locale, "event.finished", id=source.generation_id, paths=" ".join(paths)
        )
    if isinstance(source, Notice):
        return f"[{source.generation_id}] {message.text}" + (f" {' '.join(paths)}" if paths else "")
    return message.text


def _reply_json(reply: Reply, text: str, paths: list[str], actions: list[dict[str, str]]) -> dict[str, Any]:
    data: dict[str, Any] = {"event": "error" if reply.error else "reply", "key": reply.key, "text": text}
    if paths:
        data["files"] = paths
    if actions:
        data["actions"] = actions
    data.update(reply.data)
    return data

"""Results and their children: which image an ``ID`` or ``ID.N`` names, and the chain of
requests a result grew from (variations, refines and forever runs share these).
"""

from __future__ import annotations

import re
from typing import Any

from bot.errors import OptionValueError, UserError
from bot.options import parse_int, shown
from bot.types import Actor, Argument
from models.records import GenerationRecord, ImageRecord

MAX_LINEAGE = 10_000  # parent links followed at most (a guard; chains are acyclic)
_TARGET = re.compile(r"^\s*([0-9A-Za-z]+)(?:\.(\d+))?\s*$")
IMAGE = Argument("image", "image", "arg.image")  # ID or ID.N


async def pick_image(app: Any, actor: Actor, text: str) -> tuple[GenerationRecord, ImageRecord]:
    """The result and image an ``ID`` or ``ID.N`` names, when the actor may see it and it
    has finished (its images exist)."""
    match = _TARGET.match(text)
    if match is None:
        raise UserError("variations.bad_target", value=shown(text))
    record = await app.service.visible(match.group(1), actor)
    if record.status != "finished" or not record.images:
        raise UserError("variations.unfinished", id=record.id, status=record.status)
    number = parse_int(match.group(2) or "1") or 0
    if not 1 <= number <= len(record.images):
        value = shown(match.group(2) or "1")
        raise OptionValueError("variations.bad_index", id=record.id, value=value, max=len(record.images))
    return record, record.images[number - 1]


async def lineage(app: Any, record: GenerationRecord) -> list[GenerationRecord]:
    """The chain from the root to ``record``, root first (a deleted ancestor ends it)."""
    chain = [record]
    seen = {record.id}
    while chain[-1].parent_id and chain[-1].parent_id not in seen and len(chain) < MAX_LINEAGE:
        parent = await app.store.get(chain[-1].parent_id)
        if parent is None:
            break
        chain.append(parent)
        seen.add(parent.id)
    return chain[::-1]


async def thread_key_of(app: Any, record: GenerationRecord) -> str:
    """The thread key of ``record``'s chain: its root's id."""
    return record.thread_key or (await lineage(app, record))[0].id

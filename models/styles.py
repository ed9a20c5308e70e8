"""Tables of saved styles and negative-prompt presets, per user, chat or guild.

A scope is the one ``models.preferences`` uses: ``("user", "discord:123")``, ``("chat",
"telegram:-100")`` or ``("guild", "discord:42")``. Names are unique per scope without
regard to case (``name_key`` is the casefolded name); ``name`` keeps the spelling the
user chose. Rows are listed by ``id``, which is the order of an A1111 ``styles.csv``:
replacing a style's texts keeps its row, so it keeps its place.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime, utcnow

NAME_LENGTH = 64  # the column size; the configured limit may only be lower


class _ScopedName:
    """A name unique (case-insensitively, by ``name_key``) within one scope, and who made it.
    Each table declares its own unique constraint (a constraint object belongs to one table)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))
    scope_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    name_key: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_by: Mapped[str] = mapped_column(String(96))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class SavedStyle(_ScopedName, Base):
    __tablename__ = "styles"
    __table_args__ = (UniqueConstraint("scope", "scope_id", "name_key"),)

    prompt: Mapped[str] = mapped_column(Text, default="")
    negative_prompt: Mapped[str] = mapped_column(Text, default="")


class SavedPreset(_ScopedName, Base):
    __tablename__ = "negative_presets"
    __table_args__ = (UniqueConstraint("scope", "scope_id", "name_key"),)

    negative_prompt: Mapped[str] = mapped_column(Text)

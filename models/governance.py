"""Tables of quotas and moderation: usage per period, the billing ledger, per-user budget
overrides, bans, word rules and the audit log.

Users are named by their platform key (``"discord:123"``), not by ``users.id``: a
moderator may ban or set the budget of someone who never drew, and a ban must outlive
the deletion of the user's history. Scopes are ``"global"`` or a guild/chat key
(``"discord:guild:1"``, ``"telegram:chat:-100"``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, JSONType, UTCDateTime, utcnow


class QuotaUsage(Base):
    """One user's usage in one scope and one budget period.

    ``images_reserved``/``jobs_open`` count admitted jobs that have not ended yet;
    admission raises them with one conditional UPDATE, so concurrent requests can never
    admit more than the budget. ``bonus_*`` are moderators' grants for this period.
    """

    __tablename__ = "quota_usage"
    __table_args__ = (UniqueConstraint("user_key", "scope", "period"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_key: Mapped[str] = mapped_column(String(96))
    scope: Mapped[str] = mapped_column(String(96))
    period: Mapped[str] = mapped_column(String(24))  # e.g. "day:2026-05-01"
    images_used: Mapped[int] = mapped_column(Integer, default=0)
    images_reserved: Mapped[int] = mapped_column(Integer, default=0)
    jobs_open: Mapped[int] = mapped_column(Integer, default=0)
    seconds_used: Mapped[float] = mapped_column(Float, default=0.0)
    bonus_images: Mapped[int] = mapped_column(Integer, default=0)
    bonus_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class QuotaLedger(Base):
    """How each job's reservation ended; the primary key makes billing happen once."""

    __tablename__ = "quota_ledger"

    generation_id: Mapped[str] = mapped_column(String(26), primary_key=True)
    user_key: Mapped[str] = mapped_column(String(96), index=True)
    scope: Mapped[str] = mapped_column(String(96))
    period: Mapped[str] = mapped_column(String(24))
    outcome: Mapped[str] = mapped_column(String(12))  # finished, failed, cancelled
    images: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QuotaOverride(Base):
    """A moderator-set budget for one user in one scope (None = the configured value)."""

    __tablename__ = "quota_overrides"
    __table_args__ = (UniqueConstraint("user_key", "scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_key: Mapped[str] = mapped_column(String(96))
    scope: Mapped[str] = mapped_column(String(96))
    images: Mapped[int | None] = mapped_column(Integer)
    gpu_seconds: Mapped[float | None] = mapped_column(Float)
    set_by: Mapped[str] = mapped_column(String(96))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Ban(Base):
    __tablename__ = "bans"
    __table_args__ = (UniqueConstraint("user_key", "scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_key: Mapped[str] = mapped_column(String(96))
    scope: Mapped[str] = mapped_column(String(96))
    reason: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    banned_by: Mapped[str] = mapped_column(String(96))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WordRule(Base):
    """A blocked word or regular expression, added at runtime by a moderator."""

    __tablename__ = "word_rules"
    __table_args__ = (UniqueConstraint("scope", "kind", "pattern"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(96))
    kind: Mapped[str] = mapped_column(String(8))  # "word" or "regex"
    pattern: Mapped[str] = mapped_column(Text)
    added_by: Mapped[str] = mapped_column(String(96))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEntry(Base):
    """Every moderator action, and every refused attempt at one (``allowed`` false)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_scope_created", "scope", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    actor_key: Mapped[str] = mapped_column(String(96))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(String(96))
    allowed: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

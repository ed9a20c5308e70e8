"""Tables. Every schema change is an Alembic revision in ``migrations/versions``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false as sa_false

from models.base import Base, JSONType, UTCDateTime, utcnow

STATUSES = ("queued", "running", "finished", "failed", "cancelled")
OPEN_STATUSES = ("queued", "running")
ENDED_STATUSES = ("finished", "failed", "cancelled")


class User(Base):
    """One identity on one platform; the same person on Discord and Telegram is two rows."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(128), default="")
    locale: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    generations: Mapped[list[Generation]] = relationship(back_populates="user", lazy="raise")


class Generation(Base):
    """One job: one batch of images with every effective parameter.

    ``params`` is the whole ``GenerationRequest`` (lossless: 7 and 7.0 stay apart); the
    columns beside it repeat the fields people search and sort by.
    """

    __tablename__ = "generations"
    __table_args__ = (
        Index("ix_generations_status_created", "status", "created_at"),
        Index("ix_generations_user_created", "user_id", "created_at"),
        # /show's children, lineage walks; only results that have a parent are in it (most
        # have none), so a job's status changes write one index entry fewer
        Index(
            "ix_generations_parent_id",
            "parent_id",
            postgresql_where=text("parent_id IS NOT NULL"),
            sqlite_where=text("parent_id IS NOT NULL"),
        ),
        # a heartbeat renews one owner's open jobs; recovery looks for open jobs whose lease ran out
        Index("ix_generations_owner_status", "owner", "status"),
        Index("ix_generations_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)  # ULID
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("generations.id", ondelete="SET NULL"))
    group_id: Mapped[str] = mapped_column(String(26), index=True)  # the invocation that made it
    group_index: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(16), default="txt2img")
    plan: Mapped[str] = mapped_column(String(16), default="draw")
    label: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(12), default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    checkpoint: Mapped[str] = mapped_column(String(255))
    sampler_name: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    model_hash: Mapped[str | None] = mapped_column(String(64))
    chat_id: Mapped[str | None] = mapped_column(String(64))
    guild_id: Mapped[str | None] = mapped_column(String(64))
    # Where the job answers (bot.types.Route as JSON): platform, chat, thread, message to
    # reply to, interaction token. ``thread_key`` is the root id of a chain of variations
    # (posted in one thread), ``forever_run`` the run a forever job belongs to.
    route: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # (No index: nothing looks jobs up by either, and each index costs every status change.)
    thread_key: Mapped[str | None] = mapped_column(String(64))
    forever_run: Mapped[str | None] = mapped_column(String(64))
    # The platform message that shows the job (bot.types.MessageRef as JSON), once sent:
    # later events edit it and notices answer it, also after a restart.
    message_ref: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    actor_roles: Mapped[list[str]] = mapped_column(JSONType, default=list)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    spoiler: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_key: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # the values of a failed job's message (``error_key``), JSON-safe, to say it again later
    error_params: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    device_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # when the job's end (finished, failed, cancelled) reached its conversation, or the
    # delivery layer gave up on it; NULL on an ended job: its end is still to be shown
    end_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The process holding an open job ("host:pid:random") and until when; NULL = nobody: any
    # process may take it. Another process takes a held job only after its lease ran out.
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(back_populates="generations", lazy="raise")
    images: Mapped[list[Image]] = relationship(
        back_populates="generation", lazy="raise", order_by="Image.index", cascade="all, delete-orphan"
    )


class Image(Base):
    """One image of a generation; the PNG carries the same infotext."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("generation_id", "index"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True)  # ULID
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the images directory
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    subseed: Mapped[int] = mapped_column(BigInteger, default=0)
    infotext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    generation: Mapped[Generation] = relationship(back_populates="images", lazy="raise")


class ImageData(Base):
    """A finished image's PNG bytes, for the database image store ([queue] image_store =
    "database"): written by the worker that finished the job, read by any host."""

    __tablename__ = "image_data"

    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class StoredInput(Base):
    """An uploaded init image (``<sha256>.png``), so a worker on another host can read it."""

    __tablename__ = "stored_inputs"

    name: Mapped[str] = mapped_column(String(80), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RelayPayload(Base):
    """A job event too large for a PostgreSQL notification (a preview, a grid): the
    notification names the row and the listening processes read it from here."""

    __tablename__ = "relay_payloads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

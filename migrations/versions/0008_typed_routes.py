"""Typed routes: generations.route replaces the reply_to dict; thread_key, forever_run and
message_ref columns; action_tokens and thread_routes for the delivery layer.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10 09:00:00

Existing rows keep what they meant: ``reply_to["thread"]`` becomes ``thread_key``,
``reply_to["forever"]`` becomes ``forever_run``, and the route is the job's platform (its
user's) and chat. The console's own keys ({"console": true}, {"cli": true}) are dropped:
a route says where to answer, not which adapter asked.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

_users = sa.table("users", sa.column("id", sa.Integer), sa.column("platform", sa.String))


def _generations(*json_columns: str) -> Any:
    return sa.table(
        "generations",
        sa.column("id", sa.String),
        sa.column("user_id", sa.Integer),
        sa.column("chat_id", sa.String),
        sa.column("thread_key", sa.String),
        sa.column("forever_run", sa.String),
        *(sa.column(name, JSON) for name in json_columns),
    )


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("route", JSON, nullable=True))
        batch_op.add_column(sa.Column("thread_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("forever_run", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("message_ref", JSON, nullable=True))
        batch_op.create_index("ix_generations_thread_key", ["thread_key"], unique=False)
        batch_op.create_index("ix_generations_forever_run", ["forever_run"], unique=False)
    table = _generations("reply_to", "route")
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(table.c.id, table.c.chat_id, table.c.reply_to, _users.c.platform).join(
            _users, _users.c.id == table.c.user_id
        )
    ).all()
    for job_id, chat_id, reply_to, platform in rows:
        old = reply_to or {}
        route: dict[str, Any] = {"platform": platform}
        if chat_id is not None:
            route["chat_id"] = chat_id
        connection.execute(
            sa.update(table)
            .where(table.c.id == job_id)
            .values(
                route=route,
                thread_key=_text(old.get("thread")),
                forever_run=_text(old.get("forever")),
            )
        )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.alter_column("route", existing_type=JSON, nullable=False)
        batch_op.drop_column("reply_to")
    op.create_table(
        "action_tokens",
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_action_tokens")),
    )
    op.create_table(
        "thread_routes",
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("thread_key", sa.String(length=64), nullable=False),
        sa.Column("route", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("platform", "thread_key", name=op.f("pk_thread_routes")),
    )


def downgrade() -> None:
    op.drop_table("thread_routes")
    op.drop_table("action_tokens")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reply_to", JSON, nullable=True))
    table = _generations("reply_to")
    connection = op.get_bind()
    for job_id, thread_key, forever_run in connection.execute(
        sa.select(table.c.id, table.c.thread_key, table.c.forever_run)
    ).all():
        old = {"thread": thread_key, "forever": forever_run}
        connection.execute(
            sa.update(table)
            .where(table.c.id == job_id)
            .values(reply_to={k: v for k, v in old.items() if v is not None})
        )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.alter_column("reply_to", existing_type=JSON, nullable=False)
        batch_op.drop_index("ix_generations_forever_run")
        batch_op.drop_index("ix_generations_thread_key")
        batch_op.drop_column("message_ref")
        batch_op.drop_column("forever_run")
        batch_op.drop_column("thread_key")
        batch_op.drop_column("route")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:64]

"""Generations remember when their end reached the conversation (``end_delivered_at``)
and the values of a failed job's message (``error_params``), so an end a restart or a
lost connection kept from its user is shown at the next start.

Jobs that had ended before this revision count as delivered: an upgrade sends nothing
again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

_generations = sa.table(
    "generations",
    sa.column("status", sa.String),
    sa.column("finished_at", sa.DateTime(timezone=True)),
    sa.column("end_delivered_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_params", JSON, nullable=True))
        batch_op.add_column(sa.Column("end_delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        _generations.update()
        .where(_generations.c.status.in_(("finished", "failed", "cancelled")))
        .values(end_delivered_at=_generations.c.finished_at)
    )


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("end_delivered_at")
        batch_op.drop_column("error_params")

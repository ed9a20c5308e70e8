"""Fewer index entries per job: ``generations.thread_key`` and ``forever_run`` lose their
indexes (nothing looks a job up by either) and ``parent_id``'s holds only the results that
have a parent. Every status change of a job (held, running, ended) writes a new row version
and an entry in each index; with a shared queue these writes were a measurable part of the
database's work per job.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 21:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

HAS_PARENT = sa.text("parent_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_generations_thread_key", table_name="generations")
    op.drop_index("ix_generations_forever_run", table_name="generations")
    op.drop_index("ix_generations_parent_id", table_name="generations")
    op.create_index(
        "ix_generations_parent_id",
        "generations",
        ["parent_id"],
        postgresql_where=HAS_PARENT,
        sqlite_where=HAS_PARENT,
    )


def downgrade() -> None:
    op.drop_index("ix_generations_parent_id", table_name="generations")
    op.create_index("ix_generations_parent_id", "generations", ["parent_id"])
    op.create_index("ix_generations_forever_run", "generations", ["forever_run"])
    op.create_index("ix_generations_thread_key", "generations", ["thread_key"])

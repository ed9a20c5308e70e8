"""An index on generations.parent_id: /show lists a result's children, variation chains are walked.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 10:15:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index("ix_generations_parent_id", ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_parent_id")

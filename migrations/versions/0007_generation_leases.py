"""Job ownership: generations.owner and generations.lease_expires_at, renewed by a heartbeat.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 21:00:00

Open jobs stored before this revision have no owner, so the first process to start takes
them over, as a restart did before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_generations_owner_status", ["owner", "status"], unique=False)
        batch_op.create_index("ix_generations_status_lease", ["status", "lease_expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_status_lease")
        batch_op.drop_index("ix_generations_owner_status")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("owner")

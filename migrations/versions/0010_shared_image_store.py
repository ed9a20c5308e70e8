"""Images and uploads in the database, for workers on other hosts ([queue] backend =
"procrastinate", image_store = "database"), and the relay's large event payloads.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_data",
        sa.Column("image_id", sa.String(length=26), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_image_data_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_image_data")),
    )
    op.create_table(
        "stored_inputs",
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_stored_inputs")),
    )
    op.create_table(
        "relay_payloads",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_relay_payloads")),
    )
    op.create_index(op.f("ix_relay_payloads_created_at"), "relay_payloads", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_relay_payloads_created_at"), table_name="relay_payloads")
    op.drop_table("relay_payloads")
    op.drop_table("stored_inputs")
    op.drop_table("image_data")

"""One person across platforms: identity_links (a linked user key -> the key of the person
it is one with) and link_codes (the one-time codes of /link).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_links",
        sa.Column("identity", sa.String(length=96), nullable=False),
        sa.Column("person", sa.String(length=96), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("identity", name=op.f("pk_identity_links")),
    )
    op.create_index(op.f("ix_identity_links_person"), "identity_links", ["person"], unique=False)
    op.create_table(
        "link_codes",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("identity", sa.String(length=96), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_link_codes")),
    )


def downgrade() -> None:
    op.drop_table("link_codes")
    op.drop_index(op.f("ix_identity_links_person"), table_name="identity_links")
    op.drop_table("identity_links")

"""Saved styles and negative-prompt presets per user, chat or guild.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _named_text_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("name_key", sa.String(length=64), nullable=False),
    ]


def _stamps() -> list[sa.Column]:
    return [
        sa.Column("created_by", sa.String(length=96), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "styles",
        *_named_text_columns(),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        *_stamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_styles")),
        sa.UniqueConstraint("scope", "scope_id", "name_key", name=op.f("uq_styles_scope")),
    )
    op.create_table(
        "negative_presets",
        *_named_text_columns(),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        *_stamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_negative_presets")),
        sa.UniqueConstraint("scope", "scope_id", "name_key", name=op.f("uq_negative_presets_scope")),
    )


def downgrade() -> None:
    op.drop_table("negative_presets")
    op.drop_table("styles")

"""Quotas and moderation: usage per period, billing ledger, budget overrides, bans, word rules, audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 06:43:18.784946
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("actor_key", sa.String(length=96), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=True),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_scope_created", ["scope", "created_at"], unique=False)

    op.create_table(
        "bans",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_key", sa.String(length=96), nullable=False),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("banned_by", sa.String(length=96), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bans")),
        sa.UniqueConstraint("user_key", "scope", name=op.f("uq_bans_user_key")),
    )
    op.create_table(
        "quota_ledger",
        sa.Column("generation_id", sa.String(length=26), nullable=False),
        sa.Column("user_key", sa.String(length=96), nullable=False),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("period", sa.String(length=24), nullable=False),
        sa.Column("outcome", sa.String(length=12), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("generation_id", name=op.f("pk_quota_ledger")),
    )
    with op.batch_alter_table("quota_ledger", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_quota_ledger_user_key"), ["user_key"], unique=False)

    op.create_table(
        "quota_overrides",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_key", sa.String(length=96), nullable=False),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("images", sa.Integer(), nullable=True),
        sa.Column("gpu_seconds", sa.Float(), nullable=True),
        sa.Column("set_by", sa.String(length=96), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_overrides")),
        sa.UniqueConstraint("user_key", "scope", name=op.f("uq_quota_overrides_user_key")),
    )
    op.create_table(
        "quota_usage",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_key", sa.String(length=96), nullable=False),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("period", sa.String(length=24), nullable=False),
        sa.Column("images_used", sa.Integer(), nullable=False),
        sa.Column("images_reserved", sa.Integer(), nullable=False),
        sa.Column("jobs_open", sa.Integer(), nullable=False),
        sa.Column("seconds_used", sa.Float(), nullable=False),
        sa.Column("bonus_images", sa.Integer(), nullable=False),
        sa.Column("bonus_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_usage")),
        sa.UniqueConstraint("user_key", "scope", "period", name=op.f("uq_quota_usage_user_key")),
    )
    op.create_table(
        "word_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(length=96), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("pattern", sa.Text(), nullable=False),
        sa.Column("added_by", sa.String(length=96), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_word_rules")),
        sa.UniqueConstraint("scope", "kind", "pattern", name=op.f("uq_word_rules_scope")),
    )


def downgrade() -> None:
    op.drop_table("word_rules")
    op.drop_table("quota_usage")
    op.drop_table("quota_overrides")
    with op.batch_alter_table("quota_ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quota_ledger_user_key"))

    op.drop_table("quota_ledger")
    op.drop_table("bans")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_scope_created")

    op.drop_table("audit_log")

"""stored latency calibrations (one per model structure and device)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 16:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('latency_calibrations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=300), nullable=False),
    sa.Column('model_key', sa.String(length=64), nullable=False),
    sa.Column('calibration', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device', 'model_key', name='uq_latency_calibration_device_model')
    )


def downgrade() -> None:
    op.drop_table('latency_calibrations')

"""request logs: the backend that answered and the attempts it took

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 03:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('backend', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.drop_column('attempts')
        batch_op.drop_column('backend')

"""quota reservations with leases

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('quota_reservations',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_quota_reservations_key_id_api_keys'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_quota_reservations'))
    )
    with op.batch_alter_table('quota_reservations', schema=None) as batch_op:
        batch_op.create_index('ix_quota_reservations_expires_at', ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('quota_reservations', schema=None) as batch_op:
        batch_op.drop_index('ix_quota_reservations_expires_at')
    op.drop_table('quota_reservations')

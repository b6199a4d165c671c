"""create customers

Revision ID: a1b2c3d4e5f6
Revises:
Create Date: 2026-01-10 09:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = "a1b2c3d4e5f6"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    customers = op.create_table(
        "customers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("legacy_code", sa.Text),
    )
    op.bulk_insert(customers, [
        {"name": "Ada", "legacy_code": "A-1"},
        {"name": "O'Brien", "legacy_code": "B-2"},
    ])


def downgrade() -> None:
    op.drop_table("customers")

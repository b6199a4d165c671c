"""A migration as read from the project (SQL files or an Alembic revision), apart from how it is
applied (rollback/targets/database/migrations.py), so that both loaders can use it without importing each other."""

from __future__ import annotations

from pydantic import BaseModel


class MigrationError(RuntimeError):
    """A migration could not be found, read or applied; the message says which and why."""


class Migration(BaseModel):
    revision: str
    name: str
    up_sql: str
    down_sql: str | None = None
    checksum: str

    @property
    def label(self) -> str:
        return f"{self.revision}_{self.name}"

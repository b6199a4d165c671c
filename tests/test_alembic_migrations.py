"""Alembic projects as a migration source: offline SQL per revision, run by the orchestrator's own code."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import asyncpg
import pytest

from rollback.targets.database.alembic_migrations import load_alembic_migrations
from rollback.targets.database.migrations import Migration, MigrationError, apply_up, current_revision, load_migrations
from rollback.targets.database.pg import connect, local_dsn
from tests.postgres import database  # noqa: F401

PROJECT = Path(__file__).parent / "alembic_project"
INI = PROJECT / "alembic.ini"
REVISIONS = ["a1b2c3d4e5f6", "b2c3d4e5f6a7", "c3d4e5f6a7b8"]
HEAD = REVISIONS[-1]


@pytest.fixture(scope="module")
def migrations() -> list[Migration]:
    return load_alembic_migrations(INI)


def project_copy(tmp_path: Path, extra_revision: str | None = None) -> Path:
    """A copy of the test project, optionally with one more revision file: returns its alembic.ini."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__"))
    if extra_revision is not None:
        (root / "versions" / "extra.py").write_text(extra_revision)
    return root / "alembic.ini"


def revision_file(revision: str, down_revision: str, upgrade: str, downgrade: str = "pass") -> str:
    return (f'"""{revision} for a test"""\nfrom alembic import op\nimport sqlalchemy as sa\n\n'
            f"revision = {revision!r}\ndown_revision = {down_revision!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade():\n    {upgrade}\n\n\ndef downgrade():\n    {downgrade}\n")


async def columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 "
                            "AND NOT attisdropped ORDER BY attnum", table)
    return [r["attname"] for r in rows]


async def alembic_versions(conn: asyncpg.Connection) -> list[str]:
    return [r["version_num"] for r in await conn.fetch("SELECT version_num FROM alembic_version")]


def test_revisions_in_order_with_offline_sql_without_transaction_control(migrations: list[Migration]) -> None:
    assert [m.revision for m in migrations] == REVISIONS
    assert [m.name for m in migrations] == ["create_customers", "add_customer_email", "drop_legacy_code_no_longer_read"]
    create, add, drop = migrations
    assert "CREATE TABLE customers" in create.up_sql and "'O''Brien'" in create.up_sql  # bulk_insert, literal binds
    assert "DROP TABLE customers" in create.down_sql
    assert "ALTER TABLE customers ADD COLUMN email TEXT" in add.up_sql
    assert "ALTER TABLE customers DROP COLUMN email" in add.down_sql
    assert "ALTER TABLE customers DROP COLUMN legacy_code" in drop.up_sql
    assert "ALTER TABLE customers ADD COLUMN legacy_code TEXT" in drop.down_sql
    for m in migrations:
        for sql in (m.up_sql, m.down_sql):
            statements = {line.strip().upper() for line in sql.splitlines()}
            assert not statements & {"BEGIN;", "COMMIT;"}, f"{m.revision} keeps transaction control"
            assert "alembic_version" in sql  # Alembic's bookkeeping stays
        assert m.checksum == hashlib.sha256(m.up_sql.encode() + b"\0" + m.down_sql.encode()).hexdigest()


async def test_offline_sql_migrates_and_reverts_in_our_own_transactions(
        migrations: list[Migration], database: str) -> None:  # noqa: F811
    conn = await connect(local_dsn(database))
    try:
        for m in migrations:
            async with conn.transaction():
                await conn.execute(m.up_sql)
        assert await alembic_versions(conn) == [HEAD]
        assert await columns(conn, "customers") == ["id", "name", "email"]
        assert await conn.fetch("SELECT name, email FROM customers ORDER BY id") == [
            ("Ada", "ada@example.com"), ("O'Brien", "o'brien@example.com")]

        async with conn.transaction():
            await conn.execute(migrations[-1].down_sql)
        assert await columns(conn, "customers") == ["id", "name", "email", "legacy_code"]
        assert await alembic_versions(conn) == [REVISIONS[-2]]

        # Down to base and up again: Alembic keeps an empty alembic_version at base, and the
        # first revision must still apply on top of it.
        for m in reversed(migrations[:-1]):
            async with conn.transaction():
                await conn.execute(m.down_sql)
        assert await conn.fetchval("SELECT to_regclass('customers')") is None
        assert await alembic_versions(conn) == []
        async with conn.transaction():
            await conn.execute(migrations[0].up_sql)
        assert await alembic_versions(conn) == [REVISIONS[0]]
    finally:
        await conn.close()


def test_second_head_is_refused_naming_the_heads(tmp_path: Path) -> None:
    ini = project_copy(tmp_path, revision_file("d9e8f7a6b5c4", "b2c3d4e5f6a7", 'op.add_column("customers", sa.Column("x", sa.Text))'))
    with pytest.raises(MigrationError) as raised:
        load_alembic_migrations(ini)
    message = str(raised.value)
    assert "2 heads" in message and HEAD in message and "d9e8f7a6b5c4" in message and "linear" in message


@pytest.mark.parametrize(("upgrade", "expected"), [
    # Reads data at generation time: offline mode has no connection to read from.
    ('[op.execute(f"DELETE FROM customers WHERE id = {r[0]}") '
     'for r in op.get_bind().execute(sa.text("SELECT id FROM customers")).fetchall()]',
     "offline SQL generation failed"),
    # Commits part-way: would end the orchestrator's transaction half-way.
    ('with op.get_context().autocommit_block(): op.execute("CREATE INDEX CONCURRENTLY ix ON customers (name)")',
     "commits part-way"),
])
def test_revision_the_orchestrator_cannot_run_is_refused_by_name(tmp_path: Path, upgrade: str, expected: str) -> None:
    ini = project_copy(tmp_path, revision_file("e1e1e1e1e1e1", HEAD, upgrade))
    with pytest.raises(MigrationError) as raised:
        load_alembic_migrations(ini)
    assert "e1e1e1e1e1e1" in str(raised.value) and expected in str(raised.value)


async def test_orchestrator_applies_alembic_project_end_to_end(database: str) -> None:  # noqa: F811
    migrations = load_migrations(INI)  # the .ini dispatches to the Alembic source
    conn = await connect(local_dsn(database))
    try:
        for m in migrations:
            await apply_up(conn, m, backup_id=None, lock_timeout_ms=1000, attempts=3)
        assert await current_revision(conn) == HEAD
        assert await alembic_versions(conn) == [HEAD]  # `alembic current` agrees with the orchestrator
        assert await columns(conn, "customers") == ["id", "name", "email"]
    finally:
        await conn.close()

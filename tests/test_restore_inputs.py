"""Schema rollbacks of databases the demo does not cover: mixed-case names, partitioned tables,
generated columns, a LATIN1 database, DDL text under standard_conforming_strings = off.

Each test runs what a rollback runs before and during its restore step (backup, migration,
revert, restore) on the real PostgreSQL, without the workflow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from rollback.targets.database.backups import BackupManifest, take_backup
from rollback.targets.database.captured_restore import restore_captured
from rollback.targets.database.migrations import Migration, MigrationError, apply_up, load_migrations, record_applied
from rollback.targets.database.pg import ident, local_dsn
from rollback.targets.database.schema_rollback import RebuildOptions, RestoreResult, RevertResult, restore_data, revert_schema
from rollback.targets.database.table_rebuild import LockPolicy
from tests.postgres import create_database, database, drop_database  # noqa: F401 - fixture


# How the destroyed data comes back: from the migration's capture, or (a migration applied before
# captures existed) from the backup, merged in place or by rebuilding the table.
PATHS = ["captured", "backup-merged", "backup-rebuilt"]


async def apply_before_captures(conn: asyncpg.Connection, migration: Migration) -> None:
    """A migration as this tool applied it before it captured anything: one script, no capture."""
    async with conn.transaction():
        await conn.execute(migration.up_sql)
        await record_applied(conn, migration, xid=await conn.fetchval("SELECT txid_current()"), backup_id="b1",
                             capture=None)


async def backed_up_and_reverted(dsn: str, tmp_path: Path, setup: str, migration: tuple[str, str], *, path: str = "captured",
                                 after: str = "", in_progress: str = "") -> tuple[BackupManifest, RevertResult]:
    """`setup` as 0001, a backup, `migration` as 0002 (captured, or as before captures: see PATHS), `after`
    (the application's writes since), the revert. `in_progress`: an application transaction open while the
    backup's snapshot is taken, committed after."""
    directory = tmp_path / "migrations"
    directory.mkdir()
    for number, (up, down) in enumerate([(setup, "SELECT 1;"), migration], 1):
        (directory / f"{number:04d}_s{number}.up.sql").write_text(up)
        (directory / f"{number:04d}_s{number}.down.sql").write_text(down)
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await apply_up(conn, migrations[0], backup_id=None, lock_timeout_ms=500, attempts=3)
        app = await asyncpg.connect(dsn, timeout=10)
        try:
            if in_progress:
                await app.execute(f"BEGIN; {in_progress}")
                # A later transaction completes: the snapshot's xmax passes the open one's xids.
                await conn.fetchval("SELECT txid_current()")
            backup = await take_backup(dsn=dsn, root=tmp_path / "backups", backup_id="b1", environment="shop",
                                       revision="0001", next_revision="0002")
            if in_progress:
                await app.execute("COMMIT")
        finally:
            await app.close()
        if path == "captured":
            await apply_up(conn, migrations[1], backup_id="b1", lock_timeout_ms=500, attempts=3)
        else:
            await apply_before_captures(conn, migrations[1])
        if after:
            await conn.execute(after)
        revert = await revert_schema(conn, migration=migrations[1], target_shape=backup.schema_snapshot, key="k:revert",
                                     lock_timeout_ms=500, attempts=3)
    finally:
        await conn.close()
    return backup, revert


async def restore(dsn: str, backup: BackupManifest, revert: RevertResult, path: str = "captured") -> RestoreResult:
    """What the restore activity does for this kind of migration."""
    if path == "captured":
        assert revert.capture is not None
        return RestoreResult(tables=await restore_captured(dsn, capture=revert.capture, target_shape=backup.schema_snapshot,
                                                           revert_xid=revert.xid, key="k:restore", rows_per_chunk=7))
    assert revert.capture is None
    options = RebuildOptions(backup_snapshot=backup.pg_snapshot or "", min_rows=1,
                             locks=LockPolicy(lock_timeout_ms=500, attempts=3)) if path == "backup-rebuilt" else None
    return await restore_data(dsn, backup_path=Path(backup.path), target_shape=backup.schema_snapshot, changes=revert.diff,
                              system_xids=[revert.migration_xid, revert.xid], revert_xid=revert.xid, key="k:restore",
                              rows_per_chunk=7, rebuild=options)


async def rows(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def latin1_database() -> AsyncIterator[str]:
    name = await create_database("rb_latin1", "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        yield name
    finally:
        await drop_database(name)


@pytest.mark.parametrize("path", ["captured", "backup-merged"])
async def test_a_mixed_case_partitioned_table_is_refused_not_restored_empty(database, tmp_path, path):  # noqa: F811
    """to_regclass('public.Events') folds to public.events: the partition guard must quote the name."""
    dsn = local_dsn(database)
    setup = """CREATE TABLE "Events" (id bigint, at date NOT NULL, detail text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
               CREATE TABLE "Events_2026" PARTITION OF "Events" FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
               INSERT INTO "Events" SELECT g, '2026-03-01', 'detail ' || g FROM generate_series(1, 50) g;"""
    backup, revert = await backed_up_and_reverted(dsn, tmp_path, setup, (
        'ALTER TABLE "Events" DROP COLUMN detail;', 'ALTER TABLE "Events" ADD COLUMN detail text;'), path=path)

    with pytest.raises(MigrationError, match=r'public\.Events(_2026)?: partitioned tables'):
        await restore(dsn, backup, revert, path)


@pytest.mark.parametrize("path", ["captured", "backup-merged"])
async def test_stored_generated_columns_are_recomputed_and_the_rest_restored(database, tmp_path, path):  # noqa: F811
    """pg_dump leaves STORED generated columns out of its COPY (the restore follows its column list); a
    generated column cannot be written (it is computed again from the restored values)."""
    dsn = local_dsn(database)
    setup = """CREATE TABLE items (id bigint PRIMARY KEY, price numeric(10,2) NOT NULL, qty int NOT NULL,
                                   total numeric GENERATED ALWAYS AS (price * qty) STORED, note text);
               CREATE TABLE archive (id bigint PRIMARY KEY, price numeric(10,2), doubled numeric GENERATED ALWAYS AS (price * 2) STORED);
               INSERT INTO items (id, price, qty, note) SELECT g, g + 0.25, g % 4, 'note ' || g FROM generate_series(1, 30) g;
               INSERT INTO archive (id, price) SELECT g, g + 0.5 FROM generate_series(1, 12) g;"""
    backup, revert = await backed_up_and_reverted(dsn, tmp_path, setup, (
        "ALTER TABLE items DROP COLUMN note; UPDATE items SET price = round(price); DROP TABLE archive;",
        "ALTER TABLE items ADD COLUMN note text; CREATE TABLE archive (id bigint PRIMARY KEY, price numeric(10,2), "
        "doubled numeric GENERATED ALWAYS AS (price * 2) STORED);"),
        after="INSERT INTO items (id, price, qty) VALUES (31, 3.5, 2)", path=path)

    result = await restore(dsn, backup, revert, path)

    items = {r["id"]: tuple(r)[1:] for r in await rows(dsn, "SELECT id, price::text, qty, total::text, note FROM items")}
    assert items[31] == ("3.50", 2, "7.00", None)  # written after the migration: kept
    del items[31]
    assert items == {g: (f"{g + 0.25:.2f}", g % 4, f"{(g + 0.25) * (g % 4):.2f}", f"note {g}") for g in range(1, 31)}
    archive = {r["id"]: (r["price"], r["doubled"]) for r in await rows(dsn, "SELECT id, price::text, doubled::text FROM archive")}
    assert archive == {g: (f"{g + 0.5:.2f}", f"{(g + 0.5) * 2:.2f}") for g in range(1, 13)}
    assert all(t.mismatches_after == 0 for t in result.tables)
    if path != "captured":
        assert {(t.table, t.mode): t.columns for t in result.tables}[("public.items", "rewritten")] == ["price", "qty"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_latin1_database_gets_its_own_characters_back(latin1_database, tmp_path, path):
    """pg_restore prints a LATIN1 database's rows in LATIN1 (SET client_encoding): COPY must be told."""
    dsn = local_dsn(latin1_database)
    setup = """CREATE TABLE people (id bigint PRIMARY KEY, name text NOT NULL, city text);
               INSERT INTO people VALUES (1, 'Zoë', 'Köln'), (2, 'Ñandú', 'São Paulo'), (3, 'plain', 'Århus');"""
    backup, revert = await backed_up_and_reverted(dsn, tmp_path, setup, (
        "ALTER TABLE people DROP COLUMN city;", "ALTER TABLE people ADD COLUMN city text;"), path=path)

    result = await restore(dsn, backup, revert, path)

    assert dict(tuple(r) for r in await rows(dsn, "SELECT id, city FROM people")) == {1: "Köln", 2: "São Paulo", 3: "Århus"}
    assert [t.method for t in result.tables] == ["rebuild" if path == "backup-rebuilt" else "merge"]


async def test_a_comment_with_a_backslash_quote_is_carried_verbatim_without_standard_conforming_strings(database, tmp_path):  # noqa: F811
    """A table rebuild writes the table's comment into DDL: with standard_conforming_strings off a
    backslash escapes the quote after it, so quoting must be the server's, not ours."""
    dsn = local_dsn(database)
    await rows(dsn, f"ALTER DATABASE {ident(database)} SET standard_conforming_strings = off")
    crafted = "x\\'; CREATE TABLE planted (); --"
    setup = f"""CREATE TABLE people (id bigint PRIMARY KEY, name text, city text);
                COMMENT ON TABLE people IS $c${crafted}$c$;
                INSERT INTO people SELECT g, 'p' || g, 'city ' || g FROM generate_series(1, 20) g;"""
    backup, revert = await backed_up_and_reverted(dsn, tmp_path, setup, (
        "ALTER TABLE people DROP COLUMN city;", "ALTER TABLE people ADD COLUMN city text;"), path="backup-rebuilt")

    result = await restore(dsn, backup, revert, "backup-rebuilt")

    assert [t.method for t in result.tables] == ["rebuild"]
    [(comment, planted)] = await rows(dsn, "SELECT obj_description('people'::regclass, 'pg_class'), to_regclass('planted')")
    assert (comment, planted) == (crafted, None)


@pytest.mark.parametrize("path", PATHS)
async def test_a_write_in_a_savepoint_of_a_transaction_open_during_the_backup_is_kept(database, tmp_path, path):  # noqa: F811
    """The backup's snapshot lists that transaction as in progress but not its subtransaction: the
    row looks older than the backup, and a rebuild that trusted it would put the backup's value back."""
    dsn = local_dsn(database)
    setup = """CREATE TABLE people (id bigint PRIMARY KEY, name text NOT NULL, city text);
               INSERT INTO people SELECT g, 'p' || g, 'city ' || g FROM generate_series(1, 20) g;"""
    backup, revert = await backed_up_and_reverted(dsn, tmp_path, setup, (
        "ALTER TABLE people DROP COLUMN city;", "ALTER TABLE people ADD COLUMN city text;"),
        in_progress="UPDATE people SET name = 'top' WHERE id = 4; SAVEPOINT s; UPDATE people SET name = 'in a savepoint' "
                    "WHERE id = 5; RELEASE SAVEPOINT s;", path=path)

    await restore(dsn, backup, revert, path)

    people = {r["id"]: (r["name"], r["city"]) for r in await rows(dsn, "SELECT id, name, city FROM people")}
    assert people[4] == ("top", "city 4") and people[5] == ("in a savepoint", "city 5"), people
    assert all(people[g] == (f"p{g}", f"city {g}") for g in range(1, 21) if g not in (4, 5))

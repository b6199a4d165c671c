"""Restoring a dropped column by rebuilding the table (rollback/targets/database/table_rebuild.py), on the real PostgreSQL.

The application keeps writing while the table is rebuilt; afterwards every row holds exactly
what the application last wrote, the dropped column holds the backup's values (or the
application's own later write), and the table looks as it did: same indexes and constraint
names, grants, comments, sequence.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg

from rollback.targets.database.backups import BackupManifest, take_backup
from rollback.targets.database.integrity import RebuiltTable, TableSpec, compare, take_snapshot
from rollback.targets.database.migrations import apply_up, load_migrations
from rollback.targets.database.pg import local_dsn
from rollback.targets.database.schema_rollback import (
    RebuildOptions, RestoreResult, RevertResult, restore_data, restore_xids, revert_schema,
)
from rollback.targets.database.pgschema import snapshot
from rollback.targets.database.table_rebuild import LockPolicy, rebuild_blockers
from tests.postgres import database  # noqa: F401 - fixture

ROWS = 20_000
TABLE = f"""
CREATE TABLE customers (id bigserial PRIMARY KEY, code text NOT NULL UNIQUE, name text NOT NULL,
                        email text, tier int NOT NULL DEFAULT 1 CHECK (tier > 0));
CREATE INDEX customers_by_name ON customers (name) WHERE tier > 0;
COMMENT ON TABLE customers IS 'the shop''s customers';
COMMENT ON COLUMN customers.name IS 'display name';
COMMENT ON INDEX customers_by_name IS 'search by name';
INSERT INTO customers (code, name, email) SELECT 'C' || g, 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, {ROWS}) g;
"""
DROP_EMAIL = ("ALTER TABLE customers DROP COLUMN email;", "ALTER TABLE customers ADD COLUMN email text;")
LOCKS = LockPolicy(lock_timeout_ms=200, attempts=3)
SPEC = TableSpec(table="public.customers", key=["id"], columns=["id", "code", "name", "tier"])  # not the restored e-mail


def write(directory: Path, *steps: tuple[str, str]) -> Path:
    directory.mkdir(parents=True)
    for number, (up, down) in enumerate(steps, 1):
        (directory / f"{number:04d}_s{number}.up.sql").write_text(up)
        (directory / f"{number:04d}_s{number}.down.sql").write_text(down)
    return directory


async def migrated_and_reverted(conn: asyncpg.Connection, dsn: str, tmp_path: Path, setup: str = TABLE,
                                between: str = "", after: str = "") -> tuple[BackupManifest, RevertResult]:
    """The table, a backup, `between` (application writes the backup misses), the bad migration,
    `after` (writes after it), then the revert: what a rollback has done before its restore step."""
    migrations = load_migrations(write(tmp_path / "m", (setup, "DROP TABLE customers;"), DROP_EMAIL))
    await apply_up(conn, migrations[0], backup_id=None, lock_timeout_ms=500, attempts=3)
    backup = await take_backup(dsn=dsn, root=tmp_path / "backups", backup_id="b1", environment="shop",
                               revision="0001", next_revision="0002")
    assert backup.pg_snapshot, "the backup records which row versions it holds"
    if between:
        await conn.execute(between)
    await apply_up(conn, migrations[1], backup_id="b1", lock_timeout_ms=500, attempts=3)
    if after:
        await conn.execute(after)
    revert = await revert_schema(conn, migration=migrations[1], target_shape=backup.schema_snapshot, key="k:revert",
                                 lock_timeout_ms=500, attempts=3)
    return backup, revert


async def restore(dsn: str, backup: BackupManifest, revert: RevertResult, *, locks: LockPolicy = LOCKS,
                  key: str = "k:restore") -> RestoreResult:
    return await restore_data(dsn, backup_path=Path(backup.path), target_shape=backup.schema_snapshot, changes=revert.diff,
                              system_xids=[revert.migration_xid, revert.xid], revert_xid=revert.xid, key=key,
                              rows_per_chunk=1000,
                              rebuild=RebuildOptions(backup_snapshot=backup.pg_snapshot or "", min_rows=1, locks=locks))


async def table_facts(conn: asyncpg.Connection) -> dict[str, object]:
    """What a rebuild must carry over, by name."""
    return {
        "indexes": sorted(tuple(r) for r in await conn.fetch(
            "SELECT indexname, regexp_replace(indexdef, ' INDEX \\S+ ', ' INDEX x ') FROM pg_indexes WHERE tablename = 'customers'")),
        "constraints": sorted(tuple(r) for r in await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'customers'::regclass")),
        "comments": (await conn.fetchval("SELECT obj_description('customers'::regclass, 'pg_class')"),
                     await conn.fetchval("SELECT col_description('customers'::regclass, 2 + 1)"),
                     await conn.fetchval("SELECT obj_description('customers_by_name'::regclass, 'pg_class')")),
        "sequence": await conn.fetchval("SELECT pg_get_serial_sequence('customers', 'id')"),
        "defaults": await conn.fetchval("SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'customers'::regclass "
                                        "AND adnum = 1"),
    }


async def test_rebuild_restores_the_column_and_keeps_every_application_write(database, tmp_path):  # noqa: F811
    dsn = local_dsn(database)
    reader = f"rb_reader_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn, timeout=10)
    app = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f"CREATE ROLE {reader}")
        backup, revert = await migrated_and_reverted(
            conn, dsn, tmp_path,
            between="UPDATE customers SET name = 'between' WHERE id = 10; DELETE FROM customers WHERE id = 11; "
                    "INSERT INTO customers (code, name, email) VALUES ('B1', 'inserted between', 'lost@example.com');",
            after="UPDATE customers SET name = 'after' WHERE id = 12; DELETE FROM customers WHERE id = 13; "
                  "INSERT INTO customers (code, name) VALUES ('A1', 'inserted after');")
        await conn.execute(f"GRANT SELECT, UPDATE ON customers TO {reader}")
        # The restored release writes before the restore: its own e-mail stays, a name-only change gets the backup's.
        await conn.execute("UPDATE customers SET email = 'own@example.com' WHERE id = 14; "
                           "UPDATE customers SET name = 'renamed' WHERE id = 15")
        facts = await table_facts(conn)
        oid = await conn.fetchval("SELECT 'customers'::regclass::oid")
        before = await take_snapshot(conn, [SPEC], label="rebuild-test", keep_rows=True)

        # The application keeps writing throughout the rebuild; every committed write is remembered.
        expected = {r["id"]: (r["name"], r["email"]) for r in await conn.fetch("SELECT id, name, email FROM customers")}
        done = asyncio.Event()
        writes = 0

        async def application() -> None:
            nonlocal writes
            step = 0
            while not done.is_set():
                step += 1
                target = 100 + step % 5000
                if step % 7 == 0:
                    await app.execute("DELETE FROM customers WHERE id = $1", target)
                    expected.pop(target, None)
                elif step % 5 == 0:
                    row = await app.fetchrow("INSERT INTO customers (code, name) VALUES ($1, 'live') RETURNING id, name, email",
                                             f"L{step}")
                    expected[row["id"]] = (row["name"], row["email"])
                else:
                    row = await app.fetchrow("UPDATE customers SET name = name || '+' WHERE id = $1 RETURNING id, name", target)
                    if row is not None:
                        expected[row["id"]] = (row["name"], expected[row["id"]][1])
                writes += 1

        writer = asyncio.create_task(application())
        try:
            result = await restore(dsn, backup, revert)
        finally:
            done.set()
            await writer
        rows = {r["id"]: (r["name"], r["email"]) for r in await conn.fetch("SELECT id, name, email FROM customers")}
        rebuilt = {"public.customers": RebuiltTable(authors=result.tables[0].authors or "", xids=result.tables[0].rebuild_xids)}
        xids = set(await restore_xids(conn, "k:restore"))
        report = await compare(conn, before, [SPEC], rollback_xids=xids, expected_xids=xids, rebuilt=rebuilt, allow_deletes=True)
        # A rebuild that got a row wrong: a row its own transaction wrote, that no application write explains.
        async with conn.transaction():
            await conn.execute("UPDATE customers SET name = 'corrupted' WHERE id = 50")
            bad_xid = await conn.fetchval("SELECT txid_current()")
        rebuilt["public.customers"].xids.append(bad_xid)
        caught = await compare(conn, before, [SPEC], rollback_xids=xids | {bad_xid}, expected_xids=xids | {bad_xid},
                               rebuilt=rebuilt, allow_deletes=True)
        await conn.execute("UPDATE customers SET name = 'c50' WHERE id = 50")
        after_facts = await table_facts(conn)
        new_oid = await conn.fetchval("SELECT 'customers'::regclass::oid")
        can_read = await conn.fetchval(f"SELECT has_table_privilege('{reader}', 'customers', 'SELECT')")
        can_insert = await conn.fetchval(f"SELECT has_table_privilege('{reader}', 'customers', 'INSERT')")
        leftovers = await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname LIKE 'rb\\_%' AND c.relname NOT LIKE '%\\_authors' AND n.nspname IN ('public', 'rollback_archive') "
            "AND c.relname NOT IN (SELECT o->>'archive_table' FROM rollback_meta.reverts, "  # the migration's capture stays
            "jsonb_array_elements(result->'capture'->'objects') o) "
            "AND c.relkind = 'r' "
            "UNION ALL SELECT tgname FROM pg_trigger WHERE NOT tgisinternal UNION ALL "
            "SELECT proname FROM pg_proc WHERE proname LIKE 'rb\\_%'")
        authors = await conn.fetchval(f"SELECT count(*) FROM {result.tables[0].authors} WHERE id IN (10, 12, 14, 15)")
        new_id = await conn.fetchval("INSERT INTO customers (code, name) VALUES ('N1', 'next') RETURNING id")
    finally:
        await app.close()
        await conn.execute(f"DROP OWNED BY {reader}; DROP ROLE {reader}")
        await conn.close()

    table = next(t for t in result.tables if t.table == "public.customers")
    assert table.method == "rebuild" and table.mismatches_after == 0, table
    assert new_oid != oid, "the table was rebuilt, not updated in place"
    assert writes > 0 and table.caught_up > 0, (writes, table)  # the application really wrote during the rebuild
    # Every name, every row present or absent, as the application left it; every e-mail the backup's,
    # except the one the restored release wrote itself and rows the backup never saw.
    assert {i: name for i, (name, _) in rows.items()} == {i: name for i, (name, _) in expected.items()}
    emails = {i: email for i, (_, email) in rows.items()}
    backup_emails = {i: f"c{i}@example.com" for i in range(1, ROWS + 1)}
    assert emails[14] == "own@example.com" and emails[15] == "c15@example.com" and emails[10] == "c10@example.com"
    assert {i: e for i, e in emails.items() if i <= ROWS and i != 14} == {i: backup_emails[i] for i in rows if i <= ROWS and i != 14}
    assert all(e is None for i, e in emails.items() if i > ROWS), "rows the backup never saw have no e-mail"
    assert 11 not in rows and 13 not in rows
    assert table.kept_application_version == 1 and table.missing_in_live >= 2
    assert authors == 4, "who wrote each row changed since the backup is kept for the integrity check"
    # The integrity check names the application's writes during the rebuild as concurrent, not as the rollback's...
    assert report.ok and report.tables["public.customers"].concurrent > 0, report.summary
    assert report.tables["public.customers"].rollback == 0, report.summary
    # ...and a row the rebuild itself got wrong as unexplained.
    assert not caught.ok and [(d.key, d.cause) for d in caught.differences if d.cause == "unexplained"] == [({"id": "50"}, "unexplained")]
    assert after_facts == facts  # indexes, constraints, comments, sequence, defaults as they were
    assert can_read and not can_insert
    assert leftovers == []
    assert new_id > max(expected), "the sequence still serves the table"


async def test_a_table_with_a_dependent_view_is_merged_in_place(database, tmp_path):  # noqa: F811
    dsn = local_dsn(database)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        backup, revert = await migrated_and_reverted(conn, dsn, tmp_path)
        await conn.execute("CREATE VIEW customer_names AS SELECT id, name FROM customers")
        result = await restore(dsn, backup, revert)
        wrong = await conn.fetchval("SELECT count(*) FROM customers WHERE email IS DISTINCT FROM 'c' || id || '@example.com'")
    finally:
        await conn.close()
    table = next(t for t in result.tables if t.table == "public.customers")
    assert table.method == "merge" and "dependent views customer_names" in (table.note or ""), table
    assert table.restored == ROWS and wrong == 0


async def test_a_blocked_swap_abandons_the_rebuild_untouched_and_the_column_is_merged_in_place(database, tmp_path):  # noqa: F811
    dsn = local_dsn(database)
    conn = await asyncpg.connect(dsn, timeout=10)
    blocker = await asyncpg.connect(dsn, timeout=10)
    try:
        backup, revert = await migrated_and_reverted(conn, dsn, tmp_path)
        oid = await conn.fetchval("SELECT 'customers'::regclass::oid")
        # A long read transaction: it does not stop the capture, the build or row updates, only the swap's ACCESS EXCLUSIVE.
        reading = blocker.transaction()
        await reading.start()
        await blocker.fetchval("SELECT count(*) FROM customers")
        result = await restore(dsn, backup, revert, locks=LockPolicy(lock_timeout_ms=100, attempts=2))
        still_reading = await blocker.fetchval("SELECT count(*) FROM customers")
        await reading.rollback()
        same_table = await conn.fetchval("SELECT 'customers'::regclass::oid") == oid
        wrong = await conn.fetchval("SELECT count(*) FROM customers WHERE email IS DISTINCT FROM 'c' || id || '@example.com'")
        leftovers = await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname LIKE 'rb\\_%rebuild' "
                                        "OR relname LIKE 'rb\\_%changes' OR relname LIKE 'rb\\_%authors'")
        # A capture trigger that could not be dropped behind the blocker does nothing any more.
        await conn.execute("UPDATE customers SET name = 'x' WHERE id = 1")
    finally:
        await blocker.close()
        await conn.close()
    table = result.tables[0]
    assert table.method == "merge" and "swap of the rebuilt public.customers: could not get its locks" in (table.note or ""), table
    assert still_reading == ROWS and same_table and wrong == 0 and leftovers == 0
    assert table.restored == ROWS


async def test_what_a_rebuild_would_lose_or_break_is_named(database):  # noqa: F811
    conn = await asyncpg.connect(local_dsn(database), timeout=10)
    try:
        await conn.execute("""
            CREATE TABLE parent (id int PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY, note text);
            CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id));
            CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
            CREATE TRIGGER audit BEFORE UPDATE ON parent FOR EACH ROW EXECUTE FUNCTION touch();
            CREATE VIEW parent_notes AS SELECT id, note FROM parent;
            ALTER TABLE parent ENABLE ROW LEVEL SECURITY;
            CREATE TABLE plain (id int PRIMARY KEY, note text);""")
        shapes = (await snapshot(conn)).tables
        parent = await rebuild_blockers(conn, shapes["public.parent"])
        child = await rebuild_blockers(conn, shapes["public.child"])
        plain = await rebuild_blockers(conn, shapes["public.plain"])
    finally:
        await conn.close()
    assert {"it has row-level security", "triggers audit", "foreign keys from child", "dependent views parent_notes",
            "identity or generated columns n"} <= set(parent), parent
    assert child == ["foreign keys child_parent_id_fkey"]
    assert plain == []

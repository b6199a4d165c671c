"""Capture at the moment of destruction (rollback/targets/database/capture.py) on the real PostgreSQL: each kind of
destruction leaves its before-image in rollback_archive, taken in the migration's own transaction."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from rollback.targets.database.capture import Capture
from rollback.targets.database.migrations import MigrationError, apply_up, load_migrations
from rollback.targets.database.pg import local_dsn, qualified
from tests.postgres import database  # noqa: F401 - fixture

SETUP = """
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers ON DELETE CASCADE,
                     amount numeric(10,2) NOT NULL, note text);
CREATE TABLE coupons (code text PRIMARY KEY, percent int NOT NULL);
CREATE TABLE untouched (id int PRIMARY KEY, v text);
INSERT INTO customers SELECT g, 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, 50) g;
INSERT INTO orders SELECT g, 1 + g % 50, g + 0.25, 'note ' || g FROM generate_series(1, 200) g;
INSERT INTO coupons SELECT 'K' || g, g FROM generate_series(1, 10) g;
INSERT INTO untouched SELECT g, 'v' FROM generate_series(1, 5) g;
"""


def migrations(tmp_path: Path, up: str):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "0001_setup.up.sql").write_text(SETUP)
    (directory / "0002_bad.up.sql").write_text(up)
    return load_migrations(directory)


async def apply(dsn: str, tmp_path: Path, up: str) -> tuple[asyncpg.Connection, Capture]:
    conn = await asyncpg.connect(dsn, timeout=10)
    first, second = migrations(tmp_path, up)
    await apply_up(conn, first, backup_id=None, lock_timeout_ms=500, attempts=3)
    applied = await apply_up(conn, second, backup_id=None, lock_timeout_ms=500, attempts=3)
    assert applied.capture is not None
    return conn, applied.capture


def archive(capture: Capture, table: str, kind: str):
    return [o for o in capture.objects if o.table == table and o.kind == kind]


async def test_each_kind_of_destruction_is_captured_before_it_happens(database, tmp_path):  # noqa: F811
    up = """
        DELETE FROM customers WHERE id = 7;                 -- cascades to its orders
        UPDATE orders SET amount = round(amount) WHERE id % 3 = 0;
        DROP TABLE coupons;
        ALTER TABLE customers DROP COLUMN email;
        ALTER TABLE orders ALTER COLUMN note TYPE varchar(4) USING left(note, 4);
        CREATE TABLE added (id int PRIMARY KEY); INSERT INTO added VALUES (1); UPDATE added SET id = 2;
    """
    conn, capture = await apply(local_dsn(database), tmp_path, up)
    try:
        async def rows(o, columns: str = "*") -> list[dict]:
            return [dict(r) for r in await conn.fetch(f"SELECT {columns} FROM {qualified('rollback_archive', o.archive_table)}")]

        # A captured table whose shape a later statement changes gets another archive for its new shape.
        deleted_customers, customers_after_drop = archive(capture, "public.customers", "rows")
        assert customers_after_drop.statement == 4 and "email" not in customers_after_drop.columns
        assert [(r["id"], r["email"], r["_rb_op"]) for r in await rows(deleted_customers)] == [(7, "c7@example.com", "d")]
        order_rows = archive(capture, "public.orders", "rows")[0]
        captured = await rows(order_rows)
        cascaded = {r["id"] for r in captured if r["_rb_op"] == "d"}
        assert cascaded == {o for o in range(1, 201) if 1 + o % 50 == 7}  # the FK cascade was foreseen
        rounded = {r["id"]: str(r["amount"]) for r in captured if r["_rb_op"] == "u"}
        assert rounded == {o: f"{o + 0.25:.2f}" for o in range(3, 201, 3) if o not in cascaded}
        [coupons] = archive(capture, "public.coupons", "table")
        assert len(await rows(coupons)) == 10 and coupons.statement == 3
        [emails] = archive(capture, "public.customers", "columns")
        assert emails.columns == ["id", "email"] and len(await rows(emails)) == 49
        [notes] = archive(capture, "public.orders", "retyped")
        assert notes.types == {"id": "bigint", "note": "text"}
        assert {r["id"]: r["note"] for r in await rows(notes)}[10] == "note 10"
        # What the migration left, for the three-way restore: its updates' new rows, its type change's values.
        new_orders = archive(capture, "public.orders", "new")[0]
        assert {r["id"]: str(r["amount"]) for r in await rows(new_orders)}[3] == "3.00"
        [retyped_after] = archive(capture, "public.orders", "retyped_after")
        assert {r["id"]: r["note"] for r in await rows(retyped_after)}[10] == "note"
        assert not archive(capture, "public.added", "rows") and not archive(capture, "public.untouched", "rows")
        assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
        assert "public.coupons: dropped" in capture.destroys()
    finally:
        await conn.close()


async def test_destruction_nobody_could_foresee_runs_again_after_its_capture(database, tmp_path):  # noqa: F811
    """A function deletes rows, a trigger updates another table, TRUNCATE empties one: only the check
    after each statement sees them; the statement is undone, captured and run again."""
    up = """
        CREATE FUNCTION purge() RETURNS void LANGUAGE sql AS $$ DELETE FROM coupons WHERE percent > 8 $$;
        SELECT purge();
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE untouched SET v = 'w'; RETURN NULL; END $$;
        CREATE TRIGGER touch AFTER UPDATE ON customers FOR EACH STATEMENT EXECUTE FUNCTION touch();
        UPDATE customers SET name = upper(name) WHERE id = 1;
        TRUNCATE orders;
    """
    conn, capture = await apply(local_dsn(database), tmp_path, up)
    try:
        def ops(table: str):
            [o] = archive(capture, table, "rows")
            return o

        coupons = await conn.fetch(f"SELECT code, _rb_op FROM {qualified('rollback_archive', ops('public.coupons').archive_table)}")
        assert sorted(tuple(r) for r in coupons) == [("K10", "d"), ("K9", "d")]
        assert await conn.fetchval(f"SELECT count(*) FROM {qualified('rollback_archive', ops('public.untouched').archive_table)} "
                                   "WHERE _rb_op = 'u'") == 5
        assert await conn.fetchval(f"SELECT count(*) FROM {qualified('rollback_archive', ops('public.orders').archive_table)} "
                                   "WHERE _rb_op = 't'") == 200
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0  # the migration itself ran as written
    finally:
        await conn.close()


async def test_transaction_control_inside_a_migration_is_refused_and_nothing_is_applied(database, tmp_path):  # noqa: F811
    conn = await asyncpg.connect(local_dsn(database), timeout=10)
    try:
        first, second = migrations(tmp_path, "DROP TABLE coupons; COMMIT; DROP TABLE untouched;")
        await apply_up(conn, first, backup_id=None, lock_timeout_ms=500, attempts=3)
        with pytest.raises(MigrationError, match="statement 2 .*controls the transaction"):
            await apply_up(conn, second, backup_id=None, lock_timeout_ms=500, attempts=3)
        assert await conn.fetchval("SELECT to_regclass('coupons') IS NOT NULL AND to_regclass('untouched') IS NOT NULL")
    finally:
        await conn.close()


async def test_a_script_wrapped_in_begin_and_commit_is_applied_in_our_transaction(database, tmp_path):  # noqa: F811
    conn, capture = await apply(local_dsn(database), tmp_path, "BEGIN;\nDELETE FROM coupons WHERE percent = 1;\nCOMMIT;\n")
    try:
        assert capture.statements == 1 and archive(capture, "public.coupons", "rows")[0].rows == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("rebuild", [False, True], ids=["merged", "rebuilt"])
async def test_the_restore_is_three_way_per_column_and_the_application_always_wins(database, tmp_path, rebuild):  # noqa: F811
    """After the migration the application re-uses a deleted key, writes a rewritten column, writes another
    column of a rewritten row, and deletes a row: its writes stay, everything else the migration did is undone."""
    from rollback.targets.database.backups import take_backup
    from rollback.targets.database.captured_restore import CapturedRebuild, restore_captured
    from rollback.targets.database.schema_rollback import revert_schema
    from rollback.targets.database.table_rebuild import LockPolicy

    dsn = local_dsn(database)
    up = ("DELETE FROM coupons WHERE percent <= 3; UPDATE orders SET amount = 0, note = 'zeroed' WHERE id <= 20; "
          "ALTER TABLE customers DROP COLUMN email;")
    down = "ALTER TABLE customers ADD COLUMN email text;"
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "0001_setup.up.sql").write_text(SETUP)
    (directory / "0002_bad.up.sql").write_text(up)
    (directory / "0002_bad.down.sql").write_text(down)
    first, second = load_migrations(directory)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await apply_up(conn, first, backup_id=None, lock_timeout_ms=500, attempts=3)
        backup = await take_backup(dsn=dsn, root=tmp_path / "backups", backup_id="b1", environment="shop",
                                   revision="0001", next_revision="0002")
        await apply_up(conn, second, backup_id="b1", lock_timeout_ms=500, attempts=3)
        await conn.execute("INSERT INTO coupons VALUES ('K1', 99);"            # a deleted key, used again
                           "UPDATE orders SET note = 'app note' WHERE id = 1;"   # a column the migration rewrote
                           "UPDATE orders SET customer_id = 2 WHERE id = 2;"     # another column of a rewritten row
                           "DELETE FROM orders WHERE id = 3;")                   # a rewritten row, deleted
        revert = await revert_schema(conn, migration=second, target_shape=backup.schema_snapshot, key="k:revert",
                                     lock_timeout_ms=500, attempts=3)
        await conn.execute("UPDATE customers SET email = 'new@example.com' WHERE id = 5")  # the restored release writes
        assert revert.capture is not None
        options = CapturedRebuild(min_rows=1, locks=LockPolicy(lock_timeout_ms=500, attempts=3), since_snapshot=None)
        tables = {t.table: t for t in await restore_captured(dsn, capture=revert.capture, target_shape=backup.schema_snapshot,
                                                            revert_xid=revert.xid, key="k:restore", rows_per_chunk=6,
                                                            rebuild=options if rebuild else None)}
        coupons = dict(await conn.fetch("SELECT code, percent FROM coupons"))
        orders = {r["id"]: (r["customer_id"], str(r["amount"]), r["note"]) for r in await conn.fetch("SELECT * FROM orders WHERE id <= 20")}
        emails = dict(await conn.fetch("SELECT id, email FROM customers"))
    finally:
        await conn.close()

    assert coupons == {"K1": 99, "K2": 2, "K3": 3, **{f"K{g}": g for g in range(4, 11)}}
    assert (tables["public.coupons"].reinserted, tables["public.coupons"].key_reused) == (2, 1)
    assert orders[1] == (2, "1.25", "app note")  # amount back; the note the application wrote stays
    assert orders[2] == (2, "2.25", "note 2")    # the application's customer_id stays; amount and note back
    assert 3 not in orders                        # deleted by the application since: stays deleted
    assert all(orders[o] == (1 + o % 50, f"{o + 0.25:.2f}", f"note {o}") for o in range(4, 21))
    assert (tables["public.orders"].kept_application_version, tables["public.orders"].missing_in_live) == (2, 1)  # rows 1, 2; row 3
    assert emails[5] == "new@example.com" and all(emails[c] == f"c{c}@example.com" for c in emails if c != 5)
    assert all(t.mismatches_after == 0 for t in tables.values())
    # A rebuild is refused for orders (a foreign key to customers) and coupons is rebuilt; merged otherwise.
    assert {t.table: t.method for t in tables.values()} == (
        {"public.coupons": "rebuild", "public.orders": "merge", "public.customers": "merge"} if rebuild
        else {"public.coupons": "merge", "public.orders": "merge", "public.customers": "merge"})

"""Integrity validation against a real PostgreSQL: fingerprints, named differences, who wrote them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from rollback.targets.database import integrity
from rollback.targets.database.integrity import (
    IntegrityReport,
    KeptRowsMissing,
    SnapshotMismatch,
    TableNotFound,
    TableSpec,
    compare,
    drop_kept_rows,
    take_snapshot,
)
from rollback.targets.database.pg import connect, local_dsn
from tests.postgres import database  # noqa: F401

ACCOUNTS = TableSpec(table="public.accounts", key=["id"], columns=["id", "name", "balance", "note"])


@pytest_asyncio.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    connection = await connect(local_dsn(database))
    try:
        yield connection
    finally:
        await connection.close()


async def _accounts(conn: asyncpg.Connection, rows: int = 3000) -> None:
    await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, balance numeric, note text)")
    await conn.execute("INSERT INTO accounts SELECT i, 'user ' || i, i * 1.5, CASE WHEN i % 3 = 0 THEN NULL "
                       "ELSE 'n' || i END FROM generate_series(1, $1) i", rows)


async def _plant(database: str, *statements: str) -> int:  # noqa: F811
    """Run statements in one transaction on another connection (like the application would); its xid."""
    other = await connect(local_dsn(database), application_name="test-app")
    try:
        async with other.transaction():
            for statement in statements:
                await other.execute(statement)
            return await other.fetchval("SELECT pg_current_xact_id()::text::int8")
    finally:
        await other.close()


def _named(report: IntegrityReport) -> dict[tuple[str, ...], tuple[str, str]]:
    return {tuple(d.key.values()): (d.kind, d.cause) for d in report.differences if d.key is not None}


def _shape(fingerprint):  # the fingerprint without the table's name
    return fingerprint.model_dump(exclude={"table", "kept_rows"})


async def test_physical_order_does_not_matter_but_null_vs_empty_does(conn: asyncpg.Connection) -> None:
    # Many types, including ones without a typed hash (json, point, boolean) that are hashed as text.
    columns = "id int PRIMARY KEY, t text, v varchar(10), n numeric, ts timestamptz, b boolean, j json, jb jsonb, " \
              "p point, a int[]"
    for table in ("ordered", "shuffled"):
        await conn.execute(f"CREATE TABLE {table} ({columns})")
    fill = ("SELECT i, 't' || i, 'v' || (i % 7), i / 7.0, timestamptz '2026-01-01' + i * interval '1 minute', "
            "i % 2 = 0, json_build_object('i', i), jsonb_build_object('i', i), point(i, -i), ARRAY[i, i + 1] "
            "FROM generate_series(1, 2000) i")
    await conn.execute(f"INSERT INTO ordered {fill} ORDER BY i")
    await conn.execute(f"INSERT INTO shuffled {fill} ORDER BY random()")
    await conn.execute("UPDATE shuffled SET n = n WHERE id % 5 = 0")  # moves rows around physically
    names = ["id", "t", "v", "n", "ts", "b", "j", "jb", "p", "a"]
    specs = [TableSpec(table=f"public.{t}", key=["id"], columns=names) for t in ("ordered", "shuffled")]
    await conn.execute("SET TimeZone = 'America/New_York'")  # text conversions must not depend on the session
    snapshot = await take_snapshot(conn, specs, label="order", keep_rows=False, buckets=64)

    ordered, shuffled = snapshot.tables["public.ordered"], snapshot.tables["public.shuffled"]
    assert ordered.rows == 2000 and len(ordered.buckets) == 64
    assert _shape(ordered) == _shape(shuffled)
    # The after-snapshot usually runs in another session (another worker): its settings must not matter.
    await conn.execute("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'German'; SET extra_float_digits = 0")
    assert (await compare(conn, snapshot, specs, allow_concurrent_writes=False)).ok

    await conn.execute("CREATE TABLE nulls (id int PRIMARY KEY, s text)")
    await conn.execute("CREATE TABLE empties (id int PRIMARY KEY, s text)")
    await conn.execute("INSERT INTO nulls VALUES (1, NULL), (2, 'x')")
    await conn.execute("INSERT INTO empties VALUES (1, ''), (2, 'x')")
    specs = [TableSpec(table=f"public.{t}", key=["id"], columns=["id", "s"]) for t in ("nulls", "empties")]
    snapshot = await take_snapshot(conn, specs, label="nulls", keep_rows=False)
    nulls, empties = snapshot.tables["public.nulls"], snapshot.tables["public.empties"]
    assert nulls.keys == empties.keys
    assert nulls.values != empties.values


async def test_planted_delete_insert_and_change_are_named(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await _accounts(conn)
    before = await take_snapshot(conn, [ACCOUNTS], label="planted", keep_rows=True)
    assert before.tables["public.accounts"].kept_rows is not None
    unchanged = await compare(conn, before, [ACCOUNTS], allow_concurrent_writes=False)
    assert unchanged.ok and unchanged.differences == [] and unchanged.tables["public.accounts"].rows_after == 3000

    await _plant(database, "DELETE FROM accounts WHERE id = 10", "INSERT INTO accounts VALUES (5000, 'new', 1, NULL)",
                 "UPDATE accounts SET note = '' WHERE id = 21")  # NULL -> '' is a change
    report = await compare(conn, before, [ACCOUNTS], allow_concurrent_writes=False)

    assert not report.ok
    assert _named(report) == {("10",): ("missing", "unexplained"), ("5000",): ("inserted", "unexplained"),
                              ("21",): ("changed", "unexplained")}
    table = report.tables["public.accounts"]
    assert (table.rows_before, table.rows_after, table.missing, table.inserted, table.changed) == (3000, 3000, 1, 1, 1)
    assert table.unexplained == 3 and report.differences_total == 3
    assert "FAILED" in report.summary
    missing = next(d for d in report.differences if d.kind == "missing")
    assert missing.after_xmin is None
    assert all(d.after_xmin for d in report.differences if d.kind != "missing")


async def test_concurrent_writes_are_expected_but_deletes_are_not(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await _accounts(conn)
    before = await take_snapshot(conn, [ACCOUNTS], label="concurrent", keep_rows=True)
    xid = await _plant(database, "INSERT INTO accounts VALUES (5000, 'new', 1, NULL)",
                       "UPDATE accounts SET balance = balance + 1 WHERE id = 20")

    report = await compare(conn, before, [ACCOUNTS])
    assert report.ok, report.summary
    assert _named(report) == {("5000",): ("inserted", "concurrent_write"), ("20",): ("changed", "concurrent_write")}
    assert {d.after_xmin for d in report.differences} == {xid % 2**32}
    assert report.tables["public.accounts"].concurrent == 2

    await _plant(database, "DELETE FROM accounts WHERE id = 10")
    report = await compare(conn, before, [ACCOUNTS])
    assert not report.ok
    assert report.differences[0].key == {"id": "10"} and report.differences[0].cause == "unexplained"
    assert _named(report)[("20",)] == ("changed", "concurrent_write")

    allowed = await compare(conn, before, [ACCOUNTS], allow_deletes=True)
    assert allowed.ok and _named(allowed)[("10",)] == ("missing", "allowed_delete")


@pytest.mark.parametrize("every_bucket", [False, True], ids=["recent rows", "bucket drill-down"])
async def test_transactions_in_progress_at_the_snapshot_are_application_writes(conn: asyncpg.Connection, database: str,  # noqa: F811
                                                                              monkeypatch, every_bucket: bool) -> None:
    """Multi-statement transactions straddle the before-snapshot: one wrote before it and commits
    after; one wrote inside savepoints (their subtransaction ids are not in pg_current_snapshot's
    list); one stays open through the comparison. All are the application's, never unexplained."""
    if every_bucket:  # the path a rollback that rewrote most rows takes
        monkeypatch.setattr("rollback.targets.database.integrity.RECENT_ROWS_LIMIT", 0)
    await _accounts(conn)
    apps = [await connect(local_dsn(database), application_name=f"test-app-{n}") for n in range(3)]
    try:
        straddling, savepoints, long_running = apps
        await straddling.execute("BEGIN; INSERT INTO accounts VALUES (5001, 'straddling', 1, NULL)")
        await savepoints.execute("BEGIN; UPDATE accounts SET note = 'top' WHERE id = 40; SAVEPOINT a; "
                                 "INSERT INTO accounts VALUES (5002, 'in a savepoint', 1, NULL); "
                                 "UPDATE accounts SET balance = -1 WHERE id = 41; RELEASE SAVEPOINT a")
        await savepoints.execute("DO $$ BEGIN UPDATE accounts SET balance = -2 WHERE id = 42; "
                                 "EXCEPTION WHEN others THEN NULL; END $$")
        await long_running.execute("BEGIN; UPDATE accounts SET name = 'long' WHERE id = 43")
        before = await take_snapshot(conn, [ACCOUNTS], label="straddle", keep_rows=True)
        await straddling.execute("UPDATE accounts SET balance = 7 WHERE id = 44; COMMIT")
        await savepoints.execute("COMMIT")

        report = await compare(conn, before, [ACCOUNTS])
        await long_running.execute("COMMIT")
        later = await compare(conn, before, [ACCOUNTS])
    finally:
        for app in apps:
            await app.close()

    written = {("5001",): ("inserted", "concurrent_write"), ("44",): ("changed", "concurrent_write"),
               ("40",): ("changed", "concurrent_write"), ("5002",): ("inserted", "concurrent_write"),
               ("41",): ("changed", "concurrent_write"), ("42",): ("changed", "concurrent_write")}
    assert report.ok and _named(report) == written, report.summary
    assert later.ok and _named(later) == {**written, ("43",): ("changed", "concurrent_write")}, later.summary


async def test_subtransaction_writes_to_a_table_without_primary_key_are_application_writes(
        conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await conn.execute("CREATE TABLE ledger (account int, amount int); "
                       "INSERT INTO ledger SELECT i % 50, i FROM generate_series(1, 2000) i")
    spec = TableSpec(table="public.ledger", key=[], columns=["account", "amount"])
    app = await connect(local_dsn(database), application_name="test-app")
    try:
        # (An update without a key looks like a delete plus an insert: see the test above.)
        await app.execute("BEGIN; INSERT INTO ledger VALUES (1, -1); SAVEPOINT s; INSERT INTO ledger VALUES (2, -2); "
                          "INSERT INTO ledger VALUES (3, -3); RELEASE SAVEPOINT s")
        before = await take_snapshot(conn, [spec], label="ledger", keep_rows=True)
        await app.execute("COMMIT")
    finally:
        await app.close()
    report = await compare(conn, before, [spec])
    assert report.ok, report.summary
    ledger = report.tables["public.ledger"]
    assert (ledger.unexplained, ledger.concurrent, ledger.rows_after) == (0, 3, 2003), ledger


async def test_rollback_writes_are_explained_only_when_expected(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await _accounts(conn)
    before = await take_snapshot(conn, [ACCOUNTS], label="rollback", keep_rows=True)
    rollback_xid = await _plant(database, "UPDATE accounts SET name = 'restored' WHERE id = 30")

    unexpected = await compare(conn, before, [ACCOUNTS], rollback_xids={rollback_xid})
    assert not unexpected.ok
    assert _named(unexpected) == {("30",): ("changed", "unexplained")}
    assert "not expected" in unexpected.differences[0].detail

    # xids from pg_current_xact_id() are 64-bit; xmin is 32-bit: both forms must match.
    expected = await compare(conn, before, [ACCOUNTS], rollback_xids={rollback_xid},
                             expected_xids={rollback_xid + 2**32})
    assert expected.ok
    assert _named(expected) == {("30",): ("changed", "rollback_write")}
    assert expected.tables["public.accounts"].rollback == 1


async def test_composite_key_and_table_without_primary_key(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await conn.execute("CREATE TABLE orders (region text, id int, total int, PRIMARY KEY (region, id))")
    await conn.execute("INSERT INTO orders SELECT r, i, i * 10 FROM unnest(ARRAY['eu', 'us']) r, "
                       "generate_series(1, 1000) i")
    await conn.execute("CREATE TABLE events (kind text, payload text)")  # no primary key, duplicate rows
    await conn.execute("INSERT INTO events SELECT 'k' || (i % 10), 'same' FROM generate_series(1, 2000) i")
    orders = TableSpec(table="public.orders", key=["region", "id"], columns=["region", "id", "total"])
    events = TableSpec(table="public.events", key=[], columns=["kind", "payload"])
    before = await take_snapshot(conn, [orders, events], label="shapes", keep_rows=True, buckets=128)
    assert before.tables["public.events"].kept_rows is None  # rows are only kept for keyed tables
    assert (await compare(conn, before, [orders, events])).ok

    await _plant(database, "UPDATE orders SET total = 0 WHERE region = 'us' AND id = 7",
                 "DELETE FROM orders WHERE region = 'eu' AND id = 7", "INSERT INTO events VALUES ('k1', 'same')")
    report = await compare(conn, before, [orders, events])
    assert _named(report) == {("us", "7"): ("changed", "concurrent_write"), ("eu", "7"): ("missing", "unexplained")}
    [bucket] = [d for d in report.differences if d.table == "public.events"]
    assert bucket.kind == "bucket" and bucket.key is None and bucket.cause == "concurrent_write"
    assert report.tables["public.events"].rows_after == 2001 and not report.tables["public.events"].keyed
    assert any("public.events: no primary key" in note for note in report.notes)

    await _plant(database, "DELETE FROM events WHERE ctid = (SELECT min(ctid) FROM events WHERE kind = 'k3')")
    report = await compare(conn, before, [events])
    assert not report.ok
    # The k3 bucket lost a row (unexplained, listed first); the k1 insert is still a concurrent write.
    assert [(d.kind, d.cause) for d in report.differences] == [("bucket", "unexplained"), ("bucket", "concurrent_write")]
    assert report.tables["public.events"].missing == 1 and "1 of" in report.differences[0].detail


async def test_without_kept_rows_only_buckets_are_named(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await _accounts(conn, 500)
    before = await take_snapshot(conn, [ACCOUNTS], label="light", keep_rows=False, buckets=16)
    await _plant(database, "UPDATE accounts SET name = 'x' WHERE id = 3")
    report = await compare(conn, before, [ACCOUNTS], allow_concurrent_writes=False)
    assert not report.ok
    assert [(d.kind, d.cause, d.key) for d in report.differences] == [("bucket", "unexplained", None)]
    assert "no kept rows" in report.notes[0]


async def test_kept_rows_are_dropped(conn: asyncpg.Connection) -> None:
    await _accounts(conn, 100)
    before = await take_snapshot(conn, [ACCOUNTS], label="a label with spaces & symbols " * 4, keep_rows=True)
    kept = before.tables["public.accounts"].kept_rows
    assert kept is not None and kept.startswith("rollback_archive.") and len(kept.split(".")[1]) <= 63
    assert await conn.fetchval("SELECT count(*) FROM rollback_archive." + kept.split(".")[1]) == 100

    await drop_kept_rows(conn, before)
    await drop_kept_rows(conn, before)  # idempotent
    assert await conn.fetchval("SELECT to_regclass($1)", kept) is None
    await conn.execute("UPDATE accounts SET name = 'x' WHERE id = 3")
    with pytest.raises(KeptRowsMissing, match="kept rows of public.accounts"):
        await compare(conn, before, [ACCOUNTS])


async def test_a_stored_snapshot_is_taken_once_compared_once_and_discarded_with_its_rows(conn: asyncpg.Connection,
                                                                                         database: str) -> None:  # noqa: F811
    """What the rollback's activities rely on: a retried snapshot step finds the first attempt's
    snapshot, a retried validation finds the report, and the compensation leaves nothing behind."""
    await _accounts(conn, 2000)
    first = await integrity.take_stored_snapshot(conn, [ACCOUNTS], label="wf:run:integrity")
    await _plant(database, "UPDATE accounts SET note = 'changed' WHERE id = 7")
    again = await integrity.take_stored_snapshot(conn, [ACCOUNTS], label="wf:run:integrity")
    assert again == first  # not retaken: the application's later write is after "before"

    report = await compare(conn, first, [ACCOUNTS])
    assert report.ok and _named(report) == {("7",): ("changed", "concurrent_write")}
    await integrity.store_report(conn, "wf:run:validate", report)
    assert await integrity.load_report(conn, "wf:run:validate") == report
    assert await integrity.load_snapshot(conn, "wf:run:integrity") is None  # compared: discarded with its kept rows
    assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'rollback_archive'") == 0

    other = await integrity.take_stored_snapshot(conn, [ACCOUNTS], label="wf:other:integrity")
    assert await integrity.discard_snapshot(conn, other.label) is True
    assert await integrity.discard_snapshot(conn, other.label) is False  # idempotent
    assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'rollback_archive'") == 0


def test_the_brief_of_a_report_is_bounded_whatever_its_size() -> None:
    from rollback.targets.database.integrity import Difference, TableReport

    tables = {f"public.t{n}": TableReport(table=f"public.t{n}", rows_before=10, rows_after=11, differing_buckets=1,
                                          keyed=True, inserted=1, concurrent=1) for n in range(500)}
    differences = [Difference(table="public.t1", kind="inserted", key={"id": "k" * 10_000}, bucket=1, after_xmin=5,
                              cause="concurrent_write", detail="d" * 5000)] * 100
    report = IntegrityReport(ok=True, summary=integrity._summary(True, tables), label="x", tables=tables,
                             differences=differences, differences_total=500, notes=["n" * 5000] * 500, seconds=1.0)
    brief = integrity.brief(report, stored_as="rollback_meta.integrity_reports key x")
    assert brief.tables_checked == 500 and brief.tables_with_differences == 500 and len(brief.tables) == 20
    assert len(brief.model_dump_json()) < 32 * 1024
    assert "and 490 more table(s)" in brief.summary


async def test_bad_input_is_named(conn: asyncpg.Connection) -> None:
    await _accounts(conn, 10)
    with pytest.raises(TableNotFound, match="public.nope"):
        await take_snapshot(conn, [TableSpec(table="public.nope", key=["id"], columns=["id"])], label="x",
                            keep_rows=False)
    before = await take_snapshot(conn, [ACCOUNTS], label="x", keep_rows=False)
    with pytest.raises(SnapshotMismatch, match="columns"):
        await compare(conn, before, [ACCOUNTS.model_copy(update={"columns": ["id"]})])


async def test_limit_lists_unexplained_first_and_counts_everything(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await _accounts(conn, 1000)
    before = await take_snapshot(conn, [ACCOUNTS], label="many", keep_rows=True, buckets=32)
    await _plant(database, "UPDATE accounts SET balance = 0 WHERE id <= 150", "DELETE FROM accounts WHERE id = 999")
    report = await compare(conn, before, [ACCOUNTS], limit=10)
    assert not report.ok and report.differences_total == 151 and len(report.differences) == 10
    assert (report.differences[0].key, report.differences[0].cause) == ({"id": "999"}, "unexplained")
    table = report.tables["public.accounts"]
    assert (table.changed, table.missing, table.concurrent, table.unexplained) == (150, 1, 150, 1)


async def test_snapshot_is_consistent_while_the_application_writes(conn: asyncpg.Connection, database: str) -> None:  # noqa: F811
    await _accounts(conn, 3000)
    await conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, account int)")
    specs = [ACCOUNTS, TableSpec(table="public.ledger", key=["id"], columns=["id", "account"])]
    writer = await connect(local_dsn(database), application_name="test-app")
    stop = asyncio.Event()

    async def write() -> int:
        # Each transaction inserts one account and one ledger row: a torn snapshot would see one without the other.
        n = 0
        while not stop.is_set():
            n += 1
            async with writer.transaction():
                await writer.execute("INSERT INTO accounts VALUES ($1, 'w', 0, NULL)", 10_000 + n)
                await writer.execute("INSERT INTO ledger VALUES ($1, $1)", 10_000 + n)
        return n

    task = asyncio.create_task(write())
    try:
        before = await take_snapshot(conn, specs, label="live", keep_rows=True)
        report_while_writing = await compare(conn, before, specs)
    finally:
        stop.set()
        written = await asyncio.wait_for(task, 30)
        await writer.close()
    report = await compare(conn, before, specs)
    assert before.tables["public.accounts"].rows - 3000 == before.tables["public.ledger"].rows
    assert report_while_writing.ok and report.ok, report.summary
    accounts, ledger = report.tables["public.accounts"], report.tables["public.ledger"]
    assert accounts.inserted == ledger.inserted == accounts.concurrent == ledger.concurrent
    assert accounts.rows_after == 3000 + written and accounts.rows_before + accounts.inserted == accounts.rows_after


async def test_single_change_among_many_buckets_is_named_by_either_path(conn: asyncpg.Connection,
                                                                        database: str) -> None:  # noqa: F811
    await _accounts(conn, 20_000)
    before = await take_snapshot(conn, [ACCOUNTS], label="wide", keep_rows=True, buckets=4096)
    await _plant(database, "UPDATE accounts SET balance = -1 WHERE id = 12345")
    report = await compare(conn, before, [ACCOUNTS])  # only the recent row is looked at
    assert report.ok and report.tables["public.accounts"].differing_buckets == 1
    [difference] = report.differences
    assert (difference.key, difference.kind, difference.cause) == ({"id": "12345"}, "changed", "concurrent_write")

    # A delete leaves no recent row, so the exact totals disagree and the bucket drill-down names both.
    await _plant(database, "DELETE FROM accounts WHERE id = 777")
    report = await compare(conn, before, [ACCOUNTS], allow_deletes=True)
    assert report.ok and report.tables["public.accounts"].differing_buckets == 2
    assert _named(report) == {("12345",): ("changed", "concurrent_write"), ("777",): ("missing", "allowed_delete")}

    # A row that differs without a new row version cannot come from any write; rewriting its kept
    # hash and the snapshot's sums the same way stands in for that. No recent row explains it, so
    # the drill-down must find and name it as unexplained.
    table = before.tables["public.accounts"]
    bucket = await conn.fetchval(f"UPDATE {table.kept_rows} SET _rb_row_hash = _rb_row_hash + 1 WHERE id = 99 "
                                 "RETURNING _rb_bucket")
    table.values = str(int(table.values) + 1)
    table.buckets[bucket].values = str(int(table.buckets[bucket].values) + 1)
    report = await compare(conn, before, [ACCOUNTS], allow_deletes=True)
    assert not report.ok and _named(report)[("99",)] == ("changed", "unexplained")


@pytest.mark.parametrize("recent_rows_limit", [100_000, 10], ids=["recent-rows", "bucket-drill-down"])
async def test_a_change_without_a_new_row_version_is_unexplained_while_an_old_transaction_holds_the_xmin_back(
        conn: asyncpg.Connection, database: str, monkeypatch: pytest.MonkeyPatch, recent_rows_limit: int) -> None:  # noqa: F811
    # Another session (any database of the cluster: a report, a pg_dump, a test elsewhere) holds a
    # transaction open: the before-snapshot's xmin is that old, and the rows written since look, by
    # visibility alone, like a subtransaction's. The kept rows record which version the snapshot
    # read; the same version differing is unexplained, however its xmin looks.
    monkeypatch.setattr("rollback.targets.database.integrity.RECENT_ROWS_LIMIT", recent_rows_limit)
    old = await connect(local_dsn(database), application_name="test-report")
    try:
        await old.execute("BEGIN")
        await old.fetchval("SELECT pg_current_xact_id()")  # an xid, in progress until the end of the test
        await _accounts(conn, 3000)
        before = await take_snapshot(conn, [ACCOUNTS], label="old-xmin", keep_rows=True, buckets=256)
        table = before.tables["public.accounts"]
        bucket = await conn.fetchval(f"UPDATE {table.kept_rows} SET _rb_row_hash = _rb_row_hash + 1 WHERE id = 99 "
                                     "RETURNING _rb_bucket")
        table.values = str(int(table.values) + 1)
        table.buckets[bucket].values = str(int(table.buckets[bucket].values) + 1)
        app_xid = await _plant(database, "UPDATE accounts SET balance = 0 WHERE id = 42")
        report = await compare(conn, before, [ACCOUNTS])
    finally:
        await old.close()
    assert not report.ok
    assert _named(report) == {("99",): ("changed", "unexplained"), ("42",): ("changed", "concurrent_write")}, report.differences
    assert next(d for d in report.differences if d.key == {"id": "42"}).after_xmin == app_xid % 2**32


@pytest.mark.parametrize("recent_rows_limit", [100_000, 10])
async def test_rollback_rewriting_every_row_hides_no_application_change(
        conn: asyncpg.Connection, database: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        recent_rows_limit: int) -> None:
    # A restore rewrites every row with the same values (new row versions) while the application
    # changes one of them; with a low limit the bucket drill-down must reach the same verdict.
    monkeypatch.setattr("rollback.targets.database.integrity.RECENT_ROWS_LIMIT", recent_rows_limit)
    await _accounts(conn, 3000)
    before = await take_snapshot(conn, [ACCOUNTS], label="rewrite", keep_rows=True, buckets=256)
    rollback_xid = await _plant(database, "UPDATE accounts SET name = name")
    app_xid = await _plant(database, "UPDATE accounts SET balance = 0 WHERE id = 42")
    report = await compare(conn, before, [ACCOUNTS], rollback_xids={rollback_xid}, expected_xids={rollback_xid})
    assert report.ok and report.differences_total == 1
    assert _named(report) == {("42",): ("changed", "concurrent_write")}
    assert report.differences[0].after_xmin == app_xid % 2**32


async def test_rewrite_of_every_row_beyond_the_recent_limit(conn: asyncpg.Connection, database: str,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # More rows rewritten by the rollback than RECENT_ROWS_LIMIT: the rollback's own rows are
    # proven unchanged by the exact totals, and only the application's rows are looked at.
    monkeypatch.setattr("rollback.targets.database.integrity.RECENT_ROWS_LIMIT", 10)
    drill_downs = []
    real_fingerprint = integrity._fingerprint_table

    async def counting_fingerprint(*args, **kwargs):
        drill_downs.append(args[1].table)
        return await real_fingerprint(*args, **kwargs)

    monkeypatch.setattr("rollback.targets.database.integrity._fingerprint_table", counting_fingerprint)
    await _accounts(conn, 3000)
    before = await take_snapshot(conn, [ACCOUNTS], label="rewrite-all", keep_rows=True, buckets=64)
    drill_downs.clear()
    rollback_xid = await _plant(database, "UPDATE accounts SET name = name")
    app_xid = await _plant(database, "INSERT INTO accounts VALUES (5000, 'new', 1, NULL)",
                           "UPDATE accounts SET note = '' WHERE id = 21",
                           *(f"UPDATE accounts SET balance = 0 WHERE id = {i}" for i in range(100, 108)))
    planted = {("5000",): ("inserted", "concurrent_write"), ("21",): ("changed", "concurrent_write"),
               **{(str(i),): ("changed", "concurrent_write") for i in range(100, 108)}}

    report = await compare(conn, before, [ACCOUNTS], rollback_xids={rollback_xid}, expected_xids={rollback_xid})
    assert drill_downs == []  # the fast path held
    assert report.ok and _named(report) == planted and report.differences_total == 10
    assert {d.after_xmin for d in report.differences} == {app_xid % 2**32}
    table = report.tables["public.accounts"]
    assert (table.rows_after, table.inserted, table.changed, table.concurrent, table.unexplained) == (3001, 1, 9, 10, 0)

    # The rewriter not named: its 3,000 rows are not skipped, and the bucket drill-down names the same rows.
    assert _named(await compare(conn, before, [ACCOUNTS])) == planted and drill_downs == ["public.accounts"]

    # A delete, and a value a rollback transaction changed, break the totals:
    # the drill-down must name every one of them, unexplained first, within the limit.
    drill_downs.clear()
    await _plant(database, "DELETE FROM accounts WHERE id = 10")
    second_rollback = await _plant(database, "UPDATE accounts SET name = 'restored' WHERE id = 30")
    report = await compare(conn, before, [ACCOUNTS], rollback_xids={rollback_xid, second_rollback},
                           expected_xids={rollback_xid, second_rollback}, limit=5)
    assert drill_downs == ["public.accounts"] and not report.ok
    table = report.tables["public.accounts"]
    assert (table.missing, table.inserted, table.changed, table.concurrent, table.rollback, table.unexplained) == (
        1, 1, 10, 10, 1, 1)
    assert report.differences_total == 12 and len(report.differences) == 5
    assert (report.differences[0].key, report.differences[0].cause) == ({"id": "10"}, "unexplained")
    full = await compare(conn, before, [ACCOUNTS], rollback_xids={rollback_xid, second_rollback},
                         expected_xids={rollback_xid, second_rollback})
    assert _named(full) == {**planted, ("10",): ("missing", "unexplained"), ("30",): ("changed", "rollback_write")}

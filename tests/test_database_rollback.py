"""Database rollback end to end: real PostgreSQL, real Temporal, the workflow and its activities.

Each test gets a fresh database and a `shop` environment whose only target is that
database; migrations are written per test into a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import os
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from rollback.targets.database.backups import BackupCatalog
from rollback.client import RollbackError
from rollback.config import ConfigSource
from rollback.models import MigrateRequest, MigrateResult, Phase, RollbackRequest, RollbackStatus, RollbackTarget
from rollback.targets.database.pg import local_dsn, with_database
from rollback.state import StateStore
from tests.test_frontend_rollback import frontend_of
from tests.helpers import eventually, front_version, history_without, keep_history, largest_payload, orchestrator, status_when
from tests.pgbouncer import pgbouncer  # noqa: F401 - fixture
from tests.postgres import database  # noqa: F401 - fixture

PLANTED_PASSWORD = "PLANTEDdbPASSWORD0042"  # trust auth ignores it; it must never reach Temporal

SHOP = """
CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, amount numeric(10,2) NOT NULL, note text);
CREATE TABLE coupons (code text PRIMARY KEY, percent integer NOT NULL);
INSERT INTO customers (name, email) SELECT 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, 400) g;
INSERT INTO orders (customer_id, amount, note) SELECT 1 + g % 400, g + 0.25, 'note ' || g FROM generate_series(1, 1200) g;
INSERT INTO coupons SELECT 'CODE' || g, g % 50 FROM generate_series(1, 60) g;
"""
SHOP_DOWN = "DROP TABLE orders; DROP TABLE customers; DROP TABLE coupons;"

ADDITIVE = ("ALTER TABLE customers ADD COLUMN phone text; CREATE TABLE reviews (id bigserial PRIMARY KEY, order_id bigint, stars int);",
            "DROP TABLE reviews; ALTER TABLE customers DROP COLUMN phone;")
DESTRUCTIVE = ("ALTER TABLE customers DROP COLUMN email; DROP TABLE coupons; UPDATE orders SET amount = round(amount) WHERE id % 3 = 0;",
               "ALTER TABLE customers ADD COLUMN email text; CREATE TABLE coupons (code text PRIMARY KEY, percent integer NOT NULL);")


def write_migrations(directory: Path, *steps: tuple[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for number, (up, down) in enumerate([(SHOP, SHOP_DOWN), *steps], 1):
        (directory / f"{number:04d}_step{number}.up.sql").write_text(up)
        (directory / f"{number:04d}_step{number}.down.sql").write_text(down)
    return directory


def shop_config(tmp_path: Path, migrations: Path, variable: str, **database: Any) -> ConfigSource:
    path = tmp_path / "rollback.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "rollback": {"notification_channels": ["log"]},
        "environments": {"shop": {"targets": {"database": {
            "dsn_env": variable, "migrations": str(migrations), "lock_timeout_ms": 200, "restore_chunk_rows": 300,
            **database}}}},
    }))
    return ConfigSource(path)


@pytest.fixture
def shop(tmp_path, database, monkeypatch):  # noqa: F811
    """(config, dsn) for a `shop` environment on a fresh database; the worker reads the DSN from the environment."""
    variable = f"SHOP_DSN_{uuid.uuid4().hex[:6].upper()}"
    dsn = with_database(local_dsn(), database, password=PLANTED_PASSWORD)
    monkeypatch.setenv(variable, dsn)

    def make(*steps: tuple[str, str], **database_options: Any) -> ConfigSource:
        return shop_config(tmp_path, write_migrations(tmp_path / "migrations", *steps), variable, **database_options)

    return make, local_dsn(database)


async def migrate(orch, revision: str) -> MigrateResult:
    return await orch.migrate(MigrateRequest(environment="shop", to_revision=revision, initiated_by="tester"))


async def at_second_migration(shop, run_worker, client, task_queue: str, *steps: tuple[str, str], **options: Any):
    """A worker for the `shop` environment, its database migrated through 0001 then 0002: (config, dsn, orchestrator)."""
    make, dsn = shop
    config = make(*steps, **options)
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    await migrate(orch, "0002")
    return config, dsn, orch


async def rollback_database(orch, **extra: Any) -> tuple[str, RollbackStatus]:
    """Run a database rollback to its end; its final status (state, error, steps, reports)."""
    started = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester",
                                               reason="bad migration", **extra))
    await orch.wait(started.execution_id)
    return started.execution_id, await orch.get_rollback_status(started.execution_id)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def execute(dsn: str, script: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


async def value(dsn: str, sql: str, *args: Any) -> Any:
    return (await fetch(dsn, sql, *args))[0][0]


DROP_EMAIL = ("ALTER TABLE customers DROP COLUMN email;", "ALTER TABLE customers ADD COLUMN email text;")


async def applied_with_backup(conn: asyncpg.Connection, dsn: str, tmp_path: Path, step: tuple[str, str]):
    """Without the workflow: the shop as 0001, a backup, then `step` as 0002: (migrations, backup manifest)."""
    from rollback.targets.database.migrations import load_migrations

    migrations = load_migrations(write_migrations(tmp_path / "m", step))
    return migrations, await migrated_past_a_backup(conn, dsn, migrations, tmp_path / "backups")


async def migrated_past_a_backup(conn: asyncpg.Connection, dsn: str, migrations, backups: Path, *, before: str = ""):
    """0001, then `before` (SQL), a backup b1 under `backups`, then 0002 applied with it: its manifest."""
    from rollback.targets.database.backups import take_backup
    from rollback.targets.database.migrations import apply_up

    await apply_up(conn, migrations[0], backup_id=None, lock_timeout_ms=500, attempts=3)
    if before:
        await conn.execute(before)
    backup = await take_backup(dsn=dsn, root=backups, backup_id="b1", environment="shop", revision="0001", next_revision="0002")
    await apply_up(conn, migrations[1], backup_id="b1", lock_timeout_ms=500, attempts=3)
    return backup


async def killed_mid_rollback(client, task_queue: str, config: ConfigSource, log: Path, dsn: str, *, bulk: int, prepare: str,
                              when: str, accept, what: str, before_captures: bool = False) -> tuple[RollbackStatus, dict[int, str]]:
    """Migrate to 0002 (dropping e-mails of `bulk` more customers), run `prepare`, start a database
    rollback, SIGKILL its worker once `when` (SQL) satisfies `accept`, finish on a new worker:
    (final status, the e-mails before the migration)."""
    from tests.test_durability import kill_and_replace, start_worker, stop_workers

    workers = [start_worker(client, task_queue, config.path, log)]
    try:
        orch = orchestrator(client, task_queue)
        await migrate(orch, "0001")
        await fetch(dsn, f"INSERT INTO customers (name, email) SELECT 'bulk' || g, 'bulk' || g || '@example.com' "
                         f"FROM generate_series(1, {bulk}) g")
        emails = dict(await fetch(dsn, "SELECT id, email FROM customers"))
        await migrate(orch, "0002")
        if before_captures:
            await as_if_applied_before_captures(dsn)
        if prepare:
            await execute(dsn, prepare)
        started = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester"))
        await eventually(lambda: value(dsn, when), accept, timeout=120, interval=0.02, what=what)
        workers.append(kill_and_replace(workers[0], client, task_queue, config.path, log))
        await orch.wait(started.execution_id)
        return await orch.get_rollback_status(started.execution_id), emails
    finally:
        stop_workers(*workers)


async def test_additive_migration_rolled_back_keeps_new_rows_and_archives_new_columns(shop, client, task_queue, run_worker):
    config, dsn, orch = await at_second_migration(shop, run_worker, client, task_queue, ADDITIVE)
    # The application keeps working on the new schema: new rows, values only the new objects hold.
    await fetch(dsn, "INSERT INTO customers (name, email, phone) SELECT 'new' || g, 'n' || g || '@x', '555-' || g FROM generate_series(1, 50) g")
    await fetch(dsn, "INSERT INTO reviews (order_id, stars) SELECT g, 5 FROM generate_series(1, 30) g")

    workflow_id, status = await rollback_database(orch)

    assert status.state == Phase.SUCCEEDED, status.error
    assert await value(dsn, "SELECT count(*) FROM customers") == 450  # the 50 written after the migration are kept
    assert await value(dsn, "SELECT count(*) FROM customers WHERE name LIKE 'new%' AND email LIKE 'n%@x'") == 50
    columns = {r[0] for r in await fetch(dsn, "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")}
    assert columns == {"id", "name", "email"}
    assert await value(dsn, "SELECT to_regclass('public.reviews')") is None
    # What only the dropped objects held is archived, so the rollback itself can be undone.
    revert = next(s for s in status.steps if s.name.startswith("revert schema"))
    assert "public.reviews" in revert.detail and "public.customers" in revert.detail, revert.detail
    archives = {r[0]: r[1] for r in await fetch(dsn, "SELECT table_name, (xpath('/row/c/text()', query_to_xml("
                                                    "format('SELECT count(*) AS c FROM rollback_archive.%I', table_name), false, true, '')))[1]::text::int "
                                                    "FROM information_schema.tables WHERE table_schema = 'rollback_archive' AND table_name LIKE 'rb_%'")}
    assert sorted(archives.values()) == [30, 450], archives
    assert await value(dsn, "SELECT count(*) FROM rollback_meta.migrations") == 1
    versions = StateStore(Path(config.get().state_dir)).versions("shop", "database")
    assert (versions.current, versions.known_good) == ("0001", "0001")
    assert status.reports["database_integrity"]["ok"] is True
    await history_without(client, workflow_id, [PLANTED_PASSWORD])


async def as_if_applied_before_captures(dsn: str) -> None:
    """The applied migrations, as this tool recorded them before it captured anything: their rollback
    restores from the backup (merged in place, or big tables rebuilt)."""
    await execute(dsn, "UPDATE rollback_meta.migrations SET capture = NULL")


@pytest.mark.parametrize("rebuild_min_rows", [None, 1], ids=["merged", "rebuilt"])
async def test_destructive_migration_rolled_back_restores_dropped_data_and_keeps_new_rows(shop, client, task_queue, run_worker,
                                                                                          rebuild_min_rows):
    make, dsn = shop
    config = make(DESTRUCTIVE, rebuild_min_rows=rebuild_min_rows)
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    original = {r["id"]: (r["amount"], r["note"]) for r in await fetch(dsn, "SELECT id, amount, note FROM orders")}
    emails = {r["id"]: r["email"] for r in await fetch(dsn, "SELECT id, email FROM customers")}
    migrated = await migrate(orch, "0002")
    assert await value(dsn, "SELECT count(*) FROM orders WHERE amount <> round(amount)") == 800  # 1 in 3 rounded
    # After the bad migration: new customers and orders, and one rounded order the application changed again.
    await fetch(dsn, "INSERT INTO customers (name) SELECT 'after' || g FROM generate_series(1, 25) g")
    await fetch(dsn, "INSERT INTO orders (customer_id, amount) SELECT g, 7.77 FROM generate_series(1, 40) g")
    await fetch(dsn, "UPDATE orders SET amount = 99.99 WHERE id = 3")

    workflow_id, status = await rollback_database(orch)

    assert status.state == Phase.SUCCEEDED, status.error
    restored = {r["id"]: r["email"] for r in await fetch(dsn, "SELECT id, email FROM customers WHERE name NOT LIKE 'after%'")}
    assert restored == emails  # the dropped column is back, value for value
    assert await value(dsn, "SELECT count(*) FROM customers WHERE name LIKE 'after%' AND email IS NULL") == 25
    assert await value(dsn, "SELECT count(*) FROM coupons") == 60  # the dropped table's rows are back
    now = {r["id"]: r["amount"] for r in await fetch(dsn, "SELECT id, amount FROM orders")}
    assert len(now) == 1240  # the 40 orders written after the migration are kept
    assert {i: now[i] for i in original if i != 3} == {i: a for i, (a, _) in original.items() if i != 3}  # rounding undone
    assert str(now[3]) == "99.99"  # the application's later write wins over the backup
    detail = next(s for s in status.steps if s.name.startswith("restore data")).detail
    assert "public.coupons captured: 0 restored, 60 deleted rows inserted again" in detail, detail
    assert "public.customers captured: 400 restored" in detail, detail
    assert re.search(r"public.orders captured: 399 restored, .* 1 kept as the application wrote them", detail), detail
    assert ("table rebuilt" in detail) == (rebuild_min_rows is not None), detail
    integrity = status.reports["database_integrity"]
    assert integrity["ok"] is True and all(t["unexplained"] == 0 for t in integrity["tables"].values()), integrity
    await history_without(client, workflow_id, [PLANTED_PASSWORD])
    if rebuild_min_rows is None:
        await keep_history(client, workflow_id, "rollback_database")
        await keep_history(client, migrated.execution_id, "migration")


MANY_TABLES = "".join(f"CREATE TABLE t{n} (id bigint PRIMARY KEY, name text NOT NULL, extra text); "
                      f"INSERT INTO t{n} SELECT g, 'n' || g, 'x' || g FROM generate_series(1, 2000) g; " for n in range(40))


async def test_a_database_of_many_tables_rolls_back_with_small_payloads(shop, client, task_queue, run_worker):
    """40 tables of 2,000 rows: the integrity snapshot (~90 KB of bucket sums per table) stays in the
    database; what travels through Temporal is bounded whatever the database's size."""
    config, dsn, orch = await at_second_migration(
        shop, run_worker, client, task_queue, (MANY_TABLES, "SELECT 1;"))
    (Path(config.get().environments["shop"].targets.database.migrations) / "0003_drop_extra.up.sql").write_text(
        "ALTER TABLE t0 DROP COLUMN extra;")
    (Path(config.get().environments["shop"].targets.database.migrations) / "0003_drop_extra.down.sql").write_text(
        "ALTER TABLE t0 ADD COLUMN extra text;")
    await migrate(orch, "0003")
    await fetch(dsn, "INSERT INTO t1 (id, name) SELECT g, 'after' FROM generate_series(2001, 2100) g")

    workflow_id, status = await rollback_database(orch)

    assert status.state == Phase.SUCCEEDED, status.error
    assert await value(dsn, "SELECT count(*) FROM t0 WHERE extra = 'x' || id") == 2000
    assert await value(dsn, "SELECT count(*) FROM t1") == 2100
    integrity = status.reports["database_integrity"]
    assert integrity["ok"] is True and integrity["tables_checked"] == 43, integrity  # 40 + customers, orders, coupons
    largest = await largest_payload(client, workflow_id)
    assert largest < 64 * 1024, f"{largest} bytes"
    # Nothing of the snapshot is left behind once it has been compared.
    assert await value(dsn, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'rollback_archive' "
                            "AND table_name NOT LIKE 'rb\\_%'") == 0
    assert await value(dsn, "SELECT count(*) FROM rollback_meta.integrity_snapshots") == 0


async def test_failed_migration_leaves_the_database_as_it_was_and_keeps_the_backup(shop, client, task_queue, run_worker):
    make, dsn = shop
    broken = ("ALTER TABLE customers ADD COLUMN tier text; UPDATE customers SET name = NULL WHERE id = 5;", "SELECT 1;")
    config = make(broken)
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")

    with pytest.raises(RollbackError, match=r"0002_step2 failed and was rolled back.*NotNullViolation"):
        await migrate(orch, "0002")

    columns = {r[0] for r in await fetch(dsn, "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")}
    assert columns == {"id", "name", "email"}  # the half-applied ADD COLUMN is gone too
    assert await value(dsn, "SELECT max(revision) FROM rollback_meta.migrations") == "0001"
    backups = BackupCatalog(config.get().environments["shop"].targets.database.backup_dir).list("shop")
    assert [b.next_revision for b in backups] == ["0002", "0001"] and Path(backups[0].path).is_dir()


async def test_corrupt_backup_is_refused_and_nothing_changes(shop, client, task_queue, run_worker):
    config, dsn, orch = await at_second_migration(shop, run_worker, client, task_queue, DESTRUCTIVE)
    newest = BackupCatalog(config.get().environments["shop"].targets.database.backup_dir).list("shop")[0]
    data_file = next(p for p in Path(newest.path).iterdir() if p.name.endswith(".dat.gz"))
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))

    workflow_id, status = await rollback_database(orch)

    assert status.state == Phase.FAILED
    assert data_file.name in status.error and "refused" in status.error
    assert await value(dsn, "SELECT max(revision) FROM rollback_meta.migrations") == "0002"  # untouched
    assert await value(dsn, "SELECT to_regclass('public.coupons')") is None


async def test_rollback_waits_politely_for_a_long_transaction_without_blocking_the_application(shop, client, task_queue, run_worker):
    config, dsn, orch = await at_second_migration(shop, run_worker, client, task_queue, ADDITIVE, lock_attempts=200)
    holder = await asyncpg.connect(dsn, timeout=10)
    reader = await asyncpg.connect(dsn, timeout=10)
    try:
        # A long application transaction holds a lock on customers (it wrote a row and has not committed).
        holder_tx = holder.transaction()
        await holder_tx.start()
        await holder.execute("UPDATE customers SET name = 'held' WHERE id = 1")
        started = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester"))
        await status_when(orch, started.execution_id, lambda s: any(x.name.startswith("revert schema") and x.state == "running"
                                                                    for x in s.steps), what="revert running")
        # While the rollback keeps retrying, other application queries on the table still run:
        # a DDL waits at most lock_timeout (200 ms) per attempt, so a reader is never stuck behind it.
        for _ in range(20):
            assert await reader.fetchval("SELECT count(*) FROM customers", timeout=3) == 400
            await reader.execute("UPDATE customers SET name = name WHERE id = 2", timeout=3)
        status = await orch.get_rollback_status(started.execution_id)
        assert status.state == Phase.EXECUTION  # still waiting politely, not failed, not done
        await holder_tx.commit()
        result = await orch.wait(started.execution_id)
    finally:
        await holder.close()
        await reader.close()
    assert result is not None and result.state == Phase.SUCCEEDED, result
    assert await value(dsn, "SELECT name FROM customers WHERE id = 1") == "held"  # its write is kept


async def test_blocking_session_is_terminated_only_when_the_config_allows_it(shop, client, task_queue, run_worker):
    config, dsn, orch = await at_second_migration(shop, run_worker, client, task_queue, ADDITIVE, lock_attempts=4, terminate_blockers=True)
    holder = await asyncpg.connect(dsn, timeout=10)
    try:
        await holder.execute("BEGIN; LOCK TABLE customers IN ROW EXCLUSIVE MODE")
        _, status = await rollback_database(orch)
        assert status.state == Phase.SUCCEEDED, status.error
        assert holder.is_closed() or await _terminated(holder)
    finally:
        if not holder.is_closed():
            holder.terminate()


async def _terminated(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=3)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError):
        return True
    return False


async def test_unexpected_change_fails_integrity_and_compensates(shop, client, task_queue, run_worker):
    """A down migration that also deletes a row: the integrity check names it and the revert is undone."""
    make, dsn = shop
    sneaky = (ADDITIVE[0], ADDITIVE[1] + " DELETE FROM orders WHERE id = 17;")
    config = make(sneaky)
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    await migrate(orch, "0002")
    await fetch(dsn, "INSERT INTO reviews (order_id, stars) VALUES (1, 4), (2, 5)")

    workflow_id, status = await rollback_database(orch)

    assert status.state == Phase.COMPENSATED, status.error
    assert "integrity" in status.error and "id=17" in status.error, status.error
    # Compensation re-applied the migration and put the archived data back, and left no per-row hashes behind.
    assert await value(dsn, "SELECT count(*) FROM reviews") == 2
    assert await _kept_row_tables(dsn) == 0
    assert await value(dsn, "SELECT max(revision) FROM rollback_meta.migrations") == "0002"


@pytest.mark.parametrize("with_frontend", [False, True], ids=["backend-and-database", "three-tiers"])
async def test_a_full_rollback_that_fails_in_the_database_is_compensated_across_every_tier(shop, blue_green, tmp_path, client,
                                                                                           task_queue, run_worker, with_frontend):
    """Backend and database together (and the frontend, in front of them): the frontend switches back to v1,
    the backend to v1, the database is reverted, its integrity check fails (the down SQL deletes a row), and
    compensation undoes every tier, newest first: the migration re-applied with its data, the snapshot
    discarded, traffic switched back to v2, then the frontend switched back to v2."""
    make, dsn = shop
    sneaky = (ADDITIVE[0], ADDITIVE[1] + " DELETE FROM orders WHERE id = 17;")
    database = yaml.safe_load(make(sneaky).path.read_text())["environments"]["shop"]["targets"]["database"]
    raw = blue_green.config_dict()
    raw["environments"]["demo"]["targets"]["database"] = database
    frontend = frontend_of(blue_green) if with_frontend else None
    with contextlib.ExitStack() as cleanup:
        if frontend is not None:
            frontend.start("v1")
            cleanup.callback(frontend.stop)
            raw["environments"]["demo"]["targets"]["frontend"] = frontend.target_config()
        path = tmp_path / "full.yaml"
        path.write_text(yaml.safe_dump(raw))
        await run_worker(ConfigSource(path))
        orch = orchestrator(client, task_queue)
        for revision in ("0001", "0002"):
            await orch.migrate(MigrateRequest(environment="demo", to_revision=revision, initiated_by="tester"))
        await fetch(dsn, "INSERT INTO reviews (order_id, stars) VALUES (1, 4), (2, 5)")
        blue_green.deploy("v2", "errors")
        bad_build = frontend.deploy("v2") if frontend is not None else None

        started = await orch.start(RollbackRequest(environment="demo", targets=[RollbackTarget.FULL], initiated_by="tester"))
        await orch.wait(started.execution_id)
        status = await orch.get_rollback_status(started.execution_id)
        served = frontend.serving() if frontend is not None else None

    assert status.state == Phase.COMPENSATED and "id=17" in (status.error or ""), status.error
    assert [s.name for s in status.steps if s.state == "compensated"] == [
        "re-apply 0002_step2 (undo its revert)", "discard the integrity snapshot", "switch traffic back to green",
        *(["switch frontend back to v2"] if with_frontend else [])]
    assert await front_version(blue_green.front_url) == "v2", "traffic is back where the rollback found it"
    assert served == ({"version": "v2", "build": bad_build} if with_frontend else None)
    assert await value(dsn, "SELECT max(revision) FROM rollback_meta.migrations") == "0002"
    assert await value(dsn, "SELECT count(*) FROM reviews") == 2 and await _kept_row_tables(dsn) == 0
    versions = StateStore(blue_green.state_dir)
    assert (versions.versions("demo", "backend").current, versions.versions("demo", "database").current) == ("v2", "0002")


async def test_worker_killed_during_restore_resumes_and_restores_each_value_once(shop, client, task_queue, tmp_path):
    """SIGKILL the worker while it merges dropped data back; a new worker finishes, and every row
    was restored by exactly one committed update (a trigger counts them)."""
    make, dsn = shop
    config = make(DROP_EMAIL, restore_chunk_rows=500, restore_workers=1)
    log = tmp_path / "worker.log"
    # Outside the migrations: an audit of every committed change to a customer's e-mail.
    audit = """
        CREATE SCHEMA audit;
        CREATE TABLE audit.email_writes (id bigint NOT NULL);
        CREATE FUNCTION audit.log_email() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF to_jsonb(NEW)->>'email' IS DISTINCT FROM to_jsonb(OLD)->>'email' THEN
            INSERT INTO audit.email_writes VALUES (NEW.id);
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER log_email AFTER UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION audit.log_email();"""
    status, emails = await killed_mid_rollback(
        client, task_queue, config, log, dsn, bulk=30000, prepare=audit,
        when="SELECT count(DISTINCT id) FROM audit.email_writes", accept=lambda n: 2000 <= n < 25000, what="restore under way")

    assert status.state == Phase.SUCCEEDED, (status.error, log.read_text()[-2000:])
    restore = next(s for s in status.steps if s.name.startswith("restore data"))
    assert restore.attempts >= 2, restore  # it really ran on two workers
    assert dict(await fetch(dsn, "SELECT id, email FROM customers WHERE name LIKE 'bulk%' OR name LIKE 'c%'")) == emails
    per_row = await fetch(dsn, "SELECT id, count(*) AS writes FROM audit.email_writes GROUP BY id HAVING count(*) <> 1")
    assert per_row == []  # each value restored by exactly one committed write
    assert await value(dsn, "SELECT count(*) FROM audit.email_writes") == len(emails)
    assert await value(dsn, "SELECT count(*) FROM rollback_meta.reverts") == 1  # the revert happened once


async def test_worker_killed_during_a_table_rebuild_resumes_and_rebuilds_once(shop, client, task_queue, tmp_path):
    """SIGKILL the worker while it builds the new copy of a table (a migration applied before captures:
    restored from its backup); a new worker starts the rebuild again and swaps once: every value back,
    nothing left behind."""
    make, dsn = shop
    config = make(DROP_EMAIL, rebuild_min_rows=1)
    log = tmp_path / "worker.log"
    # Killed while it COPYs the backup into the new table: the build transaction has seconds left to run.
    building = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rollback-rebuild' "
                "AND state = 'active' AND query LIKE 'COPY %'")
    status, emails = await killed_mid_rollback(client, task_queue, config, log, dsn, bulk=400000, prepare="",
                                               when=building, accept=lambda n: n > 0, what="the rebuild under way",
                                               before_captures=True)

    assert status.state == Phase.SUCCEEDED, (status.error, log.read_text()[-2000:])
    restore = next(s for s in status.steps if s.name.startswith("restore data"))
    assert restore.attempts >= 2 and "table rebuilt" in restore.detail, restore
    assert dict(await fetch(dsn, "SELECT id, email FROM customers")) == emails
    assert await value(dsn, "SELECT count(*) FROM rollback_meta.rebuilds") == 1  # swapped once
    leftovers = await fetch(dsn, "SELECT relname FROM pg_class WHERE relname LIKE 'rb\\_%rebuild' OR relname LIKE 'rb\\_%changes' "
                                 "UNION ALL SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
    assert leftovers == []
    assert status.reports["database_integrity"]["ok"] is True


async def test_pgbouncer_holds_application_queries_during_the_ddl_and_always_resumes(shop, pgbouncer, client, task_queue, run_worker):
    from rollback.targets.database.pgbouncer import is_paused

    make, dsn = shop
    settings = pgbouncer.settings(pause_timeout_seconds=20)
    config = make(ADDITIVE, pgbouncer=settings.model_dump(mode="json"))
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    await migrate(orch, "0002")
    holder = await asyncpg.connect(pgbouncer.client_dsn, timeout=10, statement_cache_size=0)
    app = await asyncpg.connect(pgbouncer.client_dsn, timeout=10, statement_cache_size=0)
    try:
        # An application transaction in flight: PAUSE waits for it instead of cutting it off.
        tx = holder.transaction()
        await tx.start()
        await holder.execute("INSERT INTO customers (name) VALUES ('in flight')")
        started = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester"))
        await eventually(lambda: is_paused(settings), bool, timeout=60, what="PAUSE issued")
        # Meanwhile a new application query waits in PgBouncer (it is not refused, and not run against the DDL).
        waiting = asyncio.create_task(app.fetchval("SELECT count(*) FROM customers", timeout=60))
        await tx.commit()
        assert await waiting == 401
        await orch.wait(started.execution_id)
        status = await orch.get_rollback_status(started.execution_id)
        assert status.state == Phase.SUCCEEDED, status.error
        assert not await is_paused(settings)
        assert await app.fetchval("SELECT count(*) FROM customers WHERE name = 'in flight'", timeout=10) == 1
    finally:
        await holder.close()
        await app.close()


async def test_pgbouncer_is_paused_around_a_rebuild_swap_and_resumed(shop, pgbouncer, client, task_queue, run_worker):
    from rollback.targets.database.pgbouncer import is_paused

    settings = pgbouncer.settings(pause_timeout_seconds=20)
    _, dsn, orch = await at_second_migration(shop, run_worker, client, task_queue, DROP_EMAIL,
                                             pgbouncer=settings.model_dump(mode="json"), rebuild_min_rows=1)
    await as_if_applied_before_captures(dsn)  # a rebuild restores from the backup
    emails = {i: f"c{i}@example.com" for i in range(1, 401)}
    app = await asyncpg.connect(pgbouncer.client_dsn, timeout=10, statement_cache_size=0)
    try:
        _, status = await rollback_database(orch)
        after = dict(await app.fetch("SELECT id, email FROM customers", timeout=10))  # through the resumed pool
    finally:
        await app.close()
    assert status.state == Phase.SUCCEEDED, status.error
    restore = next(s for s in status.steps if s.name.startswith("restore data"))
    assert "public.customers columns: 400 restored" in restore.detail and "table rebuilt" in restore.detail, restore.detail
    assert after == emails and not await is_paused(settings)
    log = pgbouncer.log()
    # One pause around the revert, one around the swap (more only if a lock attempt was retried), each resumed.
    assert log.count("LOG PAUSE '") >= 2 and log.count("LOG PAUSE '") == log.count("LOG RESUME '"), log[-2000:]


async def test_pgbouncer_is_resumed_when_the_ddl_fails(shop, pgbouncer, client, task_queue, run_worker):
    from rollback.targets.database.pgbouncer import is_paused

    make, dsn = shop
    settings = pgbouncer.settings(pause_timeout_seconds=5)
    broken_down = (ADDITIVE[0], "DROP TABLE reviews; ALTER TABLE customers DROP COLUMN no_such_column;")
    config = make(broken_down, pgbouncer=settings.model_dump(mode="json"))
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    await migrate(orch, "0002")

    _, status = await rollback_database(orch)

    # The revert was registered for undo before it ran; its undo finds nothing to undo.
    assert status.state == Phase.COMPENSATED and "no_such_column" in status.error, status.error
    assert any(s.name == "discard the integrity snapshot" and s.state == "compensated" for s in status.steps)
    assert await _kept_row_tables(dsn) == 0
    assert not await is_paused(settings)
    app = await asyncpg.connect(pgbouncer.client_dsn, timeout=10, statement_cache_size=0)
    try:
        assert await app.fetchval("SELECT count(*) FROM reviews", timeout=5) == 0  # nothing half-done: reviews still there
    finally:
        await app.close()


async def test_retention_schedule_deletes_only_unpinned_expired_backups_and_old_archives(shop, client, task_queue, run_worker):
    from datetime import timedelta

    from rollback.targets.database.backups import BackupManifest

    config, dsn, orch = await at_second_migration(shop, run_worker, client, task_queue, ADDITIVE, DESTRUCTIVE)
    await fetch(dsn, "INSERT INTO reviews (order_id, stars) VALUES (1, 5)")
    _, status = await rollback_database(orch)  # back to 0001: archives reviews and phone
    assert status.state == Phase.SUCCEEDED, status.error
    await migrate(orch, "0002")
    await migrate(orch, "0003")  # current 0003, known-good 0002
    catalog = BackupCatalog(config.get().environments["shop"].targets.database.backup_dir)
    everything = catalog.list("shop")
    assert [m.next_revision for m in everything] == ["0003", "0002", "0002", "0001"], [(m.id, m.created_at.isoformat()) for m in everything]
    needed = everything[0]  # taken before 0003: what a rollback of the current migration restores from
    for manifest in everything:  # all of them 40 days old now
        catalog.record(BackupManifest.model_validate({**manifest.model_dump(), "created_at": manifest.created_at - timedelta(days=40)}))
    await fetch(dsn, "UPDATE rollback_meta.reverts SET done_at = done_at - interval '40 days'")
    archives_before = await value(dsn, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'rollback_archive' "
                                       "AND table_name LIKE 'rb_%'")
    applied_captures = {r[0] for r in await fetch(dsn, "SELECT o->>'archive_table' FROM rollback_meta.migrations, "
                                                       "jsonb_array_elements(capture->'objects') o")}
    assert applied_captures and archives_before > len(applied_captures)
    # An integrity snapshot a terminated rollback left behind, and the first rollback's report, both old.
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        from rollback.targets.database.integrity import TableSpec, take_stored_snapshot
        await take_stored_snapshot(conn, [TableSpec(table="public.orders", key=["id"], columns=["id", "amount"])],
                                   label="terminated:integrity")
        await conn.execute("UPDATE rollback_meta.integrity_snapshots SET taken_at = taken_at - interval '40 days'; "
                           "UPDATE rollback_meta.integrity_reports SET done_at = done_at - interval '40 days'")
    finally:
        await conn.close()
    assert await _kept_row_tables(dsn) == 1

    schedule = client.get_schedule_handle(await orch.ensure_retention_schedule())

    async def retention_run(number: int) -> dict:
        await schedule.trigger()
        described = await eventually(schedule.describe, lambda d: len(d.info.recent_actions) >= number, what="retention run")
        return await client.get_workflow_handle(described.info.recent_actions[-1].action.workflow_id).result()

    try:
        # While a rollback runs (here: waiting for approval), it may need any backup: none is deleted.
        pending = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester",
                                                   require_approval=True))
        await status_when(orch, pending.execution_id, lambda s: s.approval.decision == "pending", what="approval pending")
        first = await retention_run(1)
        assert first["deleted"] == [] and "rollback is running" in first["skipped"]["shop"]
        assert len(catalog.list("shop")) == 4
        await orch.reject(pending.execution_id, by="tester")
        await orch.wait(pending.execution_id)
        report = await retention_run(2)
    finally:
        await schedule.delete()

    assert report["pinned"]["shop"] == [needed.id]
    assert sorted(report["deleted"]) == sorted(m.id for m in everything[1:])
    assert [m.id for m in catalog.list("shop")] == [needed.id]
    assert Path(needed.path).is_dir() and not any(Path(m.path).exists() for m in everything[1:])
    # The archive tables of the 40-day-old rollback (what the added objects held, and the captures its
    # restore read) are dropped too, and old integrity records; the captures of the migrations applied
    # now stay: a rollback of them needs them.
    assert len(report["archives_dropped"]) == archives_before - len(applied_captures) + 2, report["archives_dropped"]
    assert "terminated:integrity" in report["archives_dropped"]
    assert {r[0] for r in await fetch(dsn, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'rollback_archive' "
                                           "AND table_name LIKE 'rb_%'")} == applied_captures
    assert await _kept_row_tables(dsn) == 0
    assert await value(dsn, "SELECT count(*) FROM rollback_meta.integrity_snapshots") == 0
    assert await value(dsn, "SELECT count(*) FROM rollback_meta.integrity_reports") == 0


async def test_alembic_project_migrated_and_rolled_back_through_the_workflow(shop, tmp_path, client, task_queue, run_worker):
    """The same path for an Alembic project: its offline SQL runs in our transactions, alembic_version follows."""
    _, dsn = shop
    variable = next(k for k, v in os.environ.items() if k.startswith("SHOP_DSN_"))
    config = shop_config(tmp_path, Path(__file__).parent / "alembic_project" / "alembic.ini", variable)
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "b2c3d4e5f6a7")
    await migrate(orch, "c3d4e5f6a7b8")  # drops customers.legacy_code
    await fetch(dsn, "INSERT INTO customers (name, email) VALUES ('after', 'after@example.com')")

    _, status = await rollback_database(orch)

    assert status.state == Phase.SUCCEEDED, status.error
    rows = {r["name"]: r["legacy_code"] for r in await fetch(dsn, "SELECT name, legacy_code FROM customers")}
    assert rows == {"Ada": "A-1", "O'Brien": "B-2", "after": None}
    assert await value(dsn, "SELECT version_num FROM alembic_version") == "b2c3d4e5f6a7"


async def test_restore_respects_what_the_application_wrote_between_revert_and_restore(database, tmp_path):  # noqa: F811
    """In a full rollback the restored release runs before the database is restored: a value it writes
    into the re-added column stays; a row it only touched elsewhere still gets its value back."""
    from rollback.targets.database.schema_rollback import restore_data, revert_schema

    dsn = local_dsn(database)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        migrations, backup = await applied_with_backup(conn, dsn, tmp_path, DESTRUCTIVE)
        revert = await revert_schema(conn, migration=migrations[1], target_shape=backup.schema_snapshot, key="k:revert",
                                     lock_timeout_ms=500, attempts=3)
        # The restored release, between the revert and the restore:
        await conn.execute("UPDATE customers SET name = 'renamed' WHERE id = 5")          # email untouched (NULL)
        await conn.execute("UPDATE customers SET email = 'new@example.com' WHERE id = 6")  # its own write
        result = await restore_data(dsn, backup_path=Path(backup.path), target_shape=backup.schema_snapshot,
                                    changes=revert.diff, system_xids=[revert.migration_xid, revert.xid],
                                    revert_xid=revert.xid, key="k:restore", rows_per_chunk=100)
        rows = {r["id"]: (r["name"], r["email"]) for r in await conn.fetch("SELECT id, name, email FROM customers WHERE id IN (5, 6, 7)")}
    finally:
        await conn.close()
    assert rows == {5: ("renamed", "c5@example.com"), 6: ("c6", "new@example.com"), 7: ("c7", "c7@example.com")}
    customers = next(t for t in result.tables if t.table == "public.customers" and t.mode == "columns")
    assert (customers.restored, customers.kept_application_version, customers.mismatches_after) == (399, 1, 0)


@pytest.mark.parametrize("down, problem", [
    ("SELECT 1;", "public.customers"),  # forgets to add the column back
    ("ALTER TABLE customers ADD COLUMN email integer;", "email"),  # adds it with another type
], ids=["column-not-re-added", "column-of-another-type"])
async def test_a_down_sql_that_does_not_restore_the_shape_is_refused_and_changes_nothing(database, tmp_path, down, problem):  # noqa: F811
    from rollback.targets.database.migrations import MigrationError, applied
    from rollback.targets.database.schema_rollback import revert_schema

    dsn = local_dsn(database)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        migrations, backup = await applied_with_backup(conn, dsn, tmp_path, (DROP_EMAIL[0], down))
        with pytest.raises(MigrationError) as refused:
            await revert_schema(conn, migration=migrations[1], target_shape=backup.schema_snapshot, key="k:revert",
                                lock_timeout_ms=500, attempts=3)
        columns = {r[0] for r in await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")}
        still_applied = [m.revision for m in await applied(conn)]
    finally:
        await conn.close()
    assert "does not restore the pre-migration shape" in str(refused.value) and problem in str(refused.value), refused.value
    assert "nothing was changed" in str(refused.value)
    assert "email" not in columns and still_applied == ["0001", "0002"]


async def _kept_row_tables(dsn: str) -> int:
    return await value(dsn, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'rollback_archive' "
                            "AND table_name NOT LIKE 'rb\\_%'")


# Which rows count as written since the copy made ahead is conservative (rollback.targets.database.pg.written_after):
# a transaction held open anywhere in the cluster makes it take more, which is safe but breaks the count below.
@pytest.mark.alone
async def test_revert_copies_added_data_before_its_locks_and_only_rows_written_since_under_them(database, tmp_path):  # noqa: F811
    """The archive of an added column and an added table is copied before the revert locks anything;
    under the lock only what the application wrote since is copied again (deleted rows dropped)."""
    from rollback.targets.database.schema_rollback import revert_schema

    dsn = local_dsn(database)
    added = ("ALTER TABLE customers ADD COLUMN phone text; UPDATE customers SET phone = 'p' || id; "
             "CREATE TABLE reviews (id bigserial PRIMARY KEY, stars int); INSERT INTO reviews (stars) SELECT g % 5 FROM generate_series(1, 300) g;",
             "DROP TABLE reviews; ALTER TABLE customers DROP COLUMN phone;")
    conn = await asyncpg.connect(dsn, timeout=10)
    app = await asyncpg.connect(dsn, timeout=10)
    blocker = await asyncpg.connect(dsn, timeout=10)
    try:
        migrations, backup = await applied_with_backup(conn, dsn, tmp_path, added)
        reading = blocker.transaction()
        await reading.start()
        await blocker.fetchval("SELECT count(*) FROM customers")  # the revert's first attempt cannot lock

        async def application_writes_then_unblock(attempt: int) -> None:
            if attempt == 1:  # after the copy made ahead, before the revert got its locks
                await app.execute("UPDATE customers SET phone = 'changed' WHERE id = 1; DELETE FROM customers WHERE id = 2; "
                                  "INSERT INTO customers (name, phone) VALUES ('late', 'late-phone'); "
                                  "DELETE FROM reviews WHERE id = 3; UPDATE reviews SET stars = 9 WHERE id = 4; "
                                  "INSERT INTO reviews (stars) VALUES (7)")
                await reading.rollback()

        result = await revert_schema(conn, migration=migrations[1], target_shape=backup.schema_snapshot, key="k:revert",
                                     lock_timeout_ms=100, attempts=5, on_blocked=application_writes_then_unblock)
        archives = {a.source: a for a in result.archived}
        phones = dict(await conn.fetch(f"SELECT id, phone FROM rollback_archive.{archives['public.customers'].archive_table}"))
        reviews = dict(await conn.fetch(f"SELECT id, stars FROM rollback_archive.{archives['public.reviews'].archive_table}"))
        recopied = await conn.fetchval(f"SELECT count(*) FROM rollback_archive.{archives['public.customers'].archive_table} "
                                       "WHERE xmin::text::int8 = $1", result.xid & 0xFFFFFFFF)
        names = dict(await conn.fetch("SELECT id, name FROM customers"))
    finally:
        await blocker.close()
        await app.close()
        await conn.close()
    # The archives hold what the application left just before the revert locked.
    assert phones[1] == "changed" and 2 not in phones and phones[max(phones)] == "late-phone"
    assert set(phones) == set(names) and all(phones[i] == f"p{i}" for i in phones if i != 1 and names[i] != "late")
    assert 3 not in reviews and reviews[4] == 9 and len(reviews) == 300 and reviews[301] == 7
    assert archives["public.customers"].rows == len(names) and archives["public.reviews"].rows == 300
    assert recopied == 2, "under the lock only the rows written since the copy made ahead are copied again"


async def test_a_destructive_revert_is_never_undone_by_re_applying_the_migration(shop, client, task_queue, run_worker):
    """Once the revert of a migration that dropped data has committed, a later failure (here the
    integrity check: the down SQL also deletes an order) must not run the migration again: the
    rollback ends failed with the reverted schema and the restored data, and pages."""
    make, dsn = shop
    sneaky = (DESTRUCTIVE[0], DESTRUCTIVE[1] + " DELETE FROM orders WHERE id = 17;")
    config = make(sneaky)
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    emails = dict(await fetch(dsn, "SELECT id, email FROM customers"))
    await migrate(orch, "0002")

    workflow_id, status = await rollback_database(orch)

    assert status.state == Phase.FAILED, status.error
    assert "integrity" in status.error and "not compensated" in status.error and "0002_step2 is not re-applied" in status.error
    reapply = next(s for s in status.steps if s.name.startswith("re-apply"))
    assert reapply.state == "skipped" and "public.customers(email)" in reapply.detail, reapply
    # What the rollback brought back stays: the schema is 0001's, every e-mail and coupon is back.
    assert dict(await fetch(dsn, "SELECT id, email FROM customers")) == emails
    assert await value(dsn, "SELECT count(*) FROM coupons") == 60
    assert await value(dsn, "SELECT max(revision) FROM rollback_meta.migrations") == "0001"
    # The evidence is in the status, and someone is paged.
    integrity = status.reports["database_integrity"]
    assert integrity["ok"] is False and any(d["key"] == {"id": "17"} for d in integrity["differences"]), integrity
    sent = [json.loads(line) for line in (Path(config.get().state_dir) / "notifications.jsonl").read_text().splitlines()]
    assert [(n["event"], n["fields"]["severity"]) for n in sent if n["fields"]["workflow_id"] == workflow_id][-2:] == [
        ("needs_attention", "page"), ("failed", "info")]

"""Database rollbacks while a real pgbench runs multi-statement transactions throughout.

Single-statement writers never hold a row lock across statements nor stay in progress across a
snapshot; an OLTP application does both. These tests run `pgbench` (tests/pgbench_load.py) with
scripts whose transactions insert a row and then update others, some of them rows the rollback's
restore is working on, while the migration and its rollback run through the workflow.
"""

from __future__ import annotations

import re

import pytest

from rollback.models import Phase
from tests.helpers import orchestrator
from rollback.dev.pgbench_load import PgbenchLoad
from tests.test_database_rollback import fetch, migrate, rollback_database, shop, value  # noqa: F401 - fixture
from tests.postgres import database  # noqa: F401 - fixture

# Deletes rows, drops a table, narrows a column type and drops a column.
DESTROYS_EVERYTHING = (
    "DELETE FROM orders WHERE id % 10 = 0; DROP TABLE coupons; "
    "ALTER TABLE orders ALTER COLUMN note TYPE varchar(4) USING left(note, 4); ALTER TABLE customers DROP COLUMN email;",
    "ALTER TABLE customers ADD COLUMN email text; ALTER TABLE orders ALTER COLUMN note TYPE text; "
    "CREATE TABLE coupons (code text PRIMARY KEY, percent integer NOT NULL);",
)
# An application transaction: insert an order, then update a customer and an order (rows the
# restore rewrites, so it waits on the restore's row locks and the restore on it).
INSERT_THEN_UPDATE = """
\\set c random(1, 400)
\\set o random(1, 1200)
BEGIN;
INSERT INTO orders (customer_id, amount) VALUES (:c, 9.99);
UPDATE customers SET name = 'app' || :c WHERE id = :c;
UPDATE orders SET amount = amount + 1 WHERE id = :o;
END;
"""


async def test_a_destructive_rollback_under_multi_statement_load_succeeds(shop, client, task_queue, run_worker, tmp_path):  # noqa: F811
    """Everything the migration destroyed comes back, under a load that keeps writing the same tables."""
    make, dsn = shop
    await run_worker(make(DESTROYS_EVERYTHING))
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    orders = {r["id"]: (r["customer_id"], r["note"]) for r in await fetch(dsn, "SELECT id, customer_id, note FROM orders")}
    emails = dict(await fetch(dsn, "SELECT id, email FROM customers"))
    coupons = dict(await fetch(dsn, "SELECT code, percent FROM coupons"))

    with PgbenchLoad(dsn, INSERT_THEN_UPDATE, tmp_path) as load:
        await migrate(orch, "0002")  # the application writes while the migration runs, too
        workflow_id, status = await rollback_database(orch)
        result = load.stop()

    assert result.transactions > 100 and result.failed == 0 and not result.errors, result
    assert status.state == Phase.SUCCEEDED, status.error
    assert status.reports["database_integrity"]["ok"] is True
    now = {r["id"]: (r["customer_id"], r["note"]) for r in await fetch(dsn, "SELECT id, customer_id, note FROM orders WHERE id <= 1200")}
    assert now == orders  # deleted orders back, truncated notes whole again (the application only wrote amounts)
    assert await value(dsn, "SELECT count(*) FROM orders WHERE id > 1200") == result.transactions  # every insert kept
    assert dict(await fetch(dsn, "SELECT id, email FROM customers")) == emails
    assert dict(await fetch(dsn, "SELECT code, percent FROM coupons")) == coupons
    [restore] = [s for s in status.steps if s.name.startswith("restore data")]
    # 120 of the first 1,200 orders, and those of the application's the migration deleted too.
    reinserted = re.search(r"public.orders captured: \d+ restored, (\d+) deleted rows inserted again", restore.detail)
    assert reinserted and int(reinserted.group(1)) >= 120, restore.detail


TPCB_SCHEMA = """
CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int NOT NULL, filler char(88));
CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int NOT NULL, tbalance int NOT NULL, filler char(84));
CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL, filler char(84));
CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
INSERT INTO pgbench_branches VALUES (1, 0, NULL);
INSERT INTO pgbench_tellers SELECT t, 1, 0, 'teller ' || t || ' of branch one' FROM generate_series(1, 10) t;
INSERT INTO pgbench_accounts SELECT a, 1, 0, md5(a::text) FROM generate_series(1, 20000) a;
"""
# Deletes 10% of the accounts, drops a column of every account, narrows the tellers' filler.
TPCB_MIGRATION = (
    "DELETE FROM pgbench_accounts WHERE aid % 10 = 0; ALTER TABLE pgbench_accounts DROP COLUMN filler; "
    "ALTER TABLE pgbench_tellers ALTER COLUMN filler TYPE varchar(5) USING left(filler, 5);",
    "ALTER TABLE pgbench_accounts ADD COLUMN filler char(84); ALTER TABLE pgbench_tellers ALTER COLUMN filler TYPE char(84);",
)
TPCB = """
\\set aid random(1, 20000)
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = 1;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, 1, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


@pytest.mark.parametrize("rebuild_min_rows", [None, 1], ids=["merged", "rebuilt"])
async def test_a_destructive_rollback_under_tpcb_load_loses_nothing(shop, client, task_queue, run_worker, tmp_path,  # noqa: F811
                                                                    rebuild_min_rows):
    """Also with the accounts table rebuilt (and swapped) while TPC-B keeps updating it."""
    make, dsn = shop
    await run_worker(make((TPCB_SCHEMA, "DROP TABLE pgbench_history, pgbench_accounts, pgbench_tellers, pgbench_branches;"),
                          TPCB_MIGRATION, rebuild_min_rows=rebuild_min_rows))
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0002")  # the shop and the pgbench tables
    tellers = dict(await fetch(dsn, "SELECT tid, filler FROM pgbench_tellers"))

    with PgbenchLoad(dsn, TPCB, tmp_path, clients=4) as load:
        await migrate(orch, "0003")
        workflow_id, status = await rollback_database(orch)
        result = load.stop()

    assert result.transactions > 100 and result.failed == 0 and not result.errors, result
    assert status.state == Phase.SUCCEEDED, status.error
    integrity = status.reports["database_integrity"]
    assert integrity["ok"] is True and all(t["unexplained"] == 0 for t in integrity["tables"].values()), integrity
    assert await value(dsn, "SELECT count(*) FROM pgbench_accounts") == 20000  # the deleted 10% are back
    assert await value(dsn, "SELECT count(*) FROM pgbench_accounts WHERE filler IS DISTINCT FROM md5(aid::text)") == 0
    assert dict(await fetch(dsn, "SELECT tid, filler FROM pgbench_tellers")) == tellers
    [restore] = [s for s in status.steps if s.name.startswith("restore data")]
    assert ("public.pgbench_accounts captured:" in restore.detail
            and ("table rebuilt" in restore.detail.split("public.pgbench_tellers")[0]) == (rebuild_min_rows is not None)), restore.detail
    # Every balance the application wrote is there: an account it never lost holds exactly its history's deltas.
    wrong = await fetch(dsn, "SELECT a.aid, a.abalance, h.total FROM pgbench_accounts a JOIN (SELECT aid, sum(delta) AS total "
                             "FROM pgbench_history GROUP BY aid) h USING (aid) WHERE a.aid % 10 <> 0 AND a.abalance <> h.total")
    assert wrong == []
    assert await value(dsn, "SELECT sum(tbalance) FROM pgbench_tellers") == await value(dsn, "SELECT sum(delta) FROM pgbench_history")

"""Database rollbacks while a real pgbench runs multi-statement transactions throughout.

Single-statement writers never hold a row lock across statements nor stay in progress across a
snapshot; an OLTP application does both. These tests run `pgbench` (tests/pgbench_load.py) with
scripts whose transactions insert a row and then update others, some of them rows the rollback's
restore is working on, while the migration and its rollback run through the workflow.
"""

from __future__ import annotations

import re

from rollback.models import Phase
from tests.helpers import orchestrator
from tests.pgbench_load import PgbenchLoad
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

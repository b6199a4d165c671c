"""Point-in-time recovery through RollbackWorkflow: the last resort, always approved, loss stated.

A private PostgreSQL cluster with WAL archiving (the machine's shared server has none):
base backup, migrations through the system (each backup creates a restore point), writes
after the bad migration, then a PITR rollback to the restore point taken before it.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import asyncpg
import yaml

from rollback.targets.database.backups import BackupCatalog
from rollback.config import ConfigSource
from rollback.models import TERMINAL_STATES, DatabaseOptions, MigrateRequest, Phase, RollbackRequest, RollbackTarget
from rollback.targets.database.pitr import take_base_backup
from tests.helpers import orchestrator, status_when
from tests.pitr_cluster import ArchivingCluster, archiving_cluster  # noqa: F401 - fixture
from tests.test_database_rollback import DESTRUCTIVE, migrate, write_migrations


async def _execute(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def pitr_environment(cluster: ArchivingCluster, tmp_path, monkeypatch, environment: str) -> ConfigSource:
    """`environment`: the cluster's database `shop`, a base backup taken now, PITR configured."""
    await _execute(cluster.dsn(), "CREATE DATABASE shop")
    variable = f"SHOP_PITR_DSN_{uuid.uuid4().hex[:6].upper()}"
    monkeypatch.setenv(variable, cluster.dsn("shop"))
    await take_base_backup(dsn=cluster.dsn(), target_dir=cluster.base_dir / "base")
    config_path = tmp_path / "rollback.yaml"
    config_path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "rollback": {"notification_channels": ["log"]},
        "environments": {environment: {"targets": {"database": {
            "dsn_env": variable, "migrations": str(write_migrations(tmp_path / "migrations", DESTRUCTIVE)),
            "pitr": {"base_backup_dir": str(cluster.base_dir / "base"), "wal_archive_dir": str(cluster.archive_dir),
                     "work_dir": str(cluster.workspace("pitr")), "terminate_sessions": True}}}}},
    }))
    return ConfigSource(config_path)


async def test_pitr_needs_approval_states_the_loss_and_swaps_in_the_recovered_database(
        archiving_cluster: ArchivingCluster, tmp_path, client, task_queue, run_worker, monkeypatch):  # noqa: F811
    cluster = archiving_cluster
    await run_worker(await pitr_environment(cluster, tmp_path, monkeypatch, "shop"))
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    await migrate(orch, "0002")  # its backup created the restore point we go back to
    await _execute(cluster.dsn("shop"), "INSERT INTO customers (name) SELECT 'lost' || g FROM generate_series(1, 30) g")
    segment = await _execute(cluster.dsn(), "SELECT pg_walfile_name(pg_switch_wal())")
    cluster.wait_archived(str(segment))

    started = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester",
                                               require_approval=False, database=DatabaseOptions(strategy="pitr")))
    # The policy and the request say no approval; a recovery that loses data gets one anyway.
    waiting = await status_when(orch, started.execution_id, lambda s: s.approval.decision == "pending", what="approval pending")
    assert waiting.plan is not None and waiting.plan.require_approval
    assert "point-in-time recovery loses data" in waiting.plan.approval_reason
    assert "bytes of WAL" in waiting.plan.approval_reason, waiting.plan.approval_reason
    assert waiting.plan.targets[0].strategy == "pitr"
    await orch.approve(started.execution_id, by="dba")
    await orch.wait(started.execution_id)
    status = await orch.get_rollback_status(started.execution_id)

    assert status.state == Phase.SUCCEEDED, status.error
    shop = cluster.dsn("shop")
    assert await _execute(shop, "SELECT max(revision) FROM rollback_meta.migrations") == "0001"
    assert await _execute(shop, "SELECT count(*) FROM customers WHERE email IS NOT NULL") == 400  # emails back
    assert await _execute(shop, "SELECT count(*) FROM coupons") == 60
    assert await _execute(shop, "SELECT count(*) FROM customers WHERE name LIKE 'lost%'") == 0  # the stated loss
    assert list((cluster.base_dir / "pitr").iterdir()) == [], "the scratch instance's data directory is removed"
    retired = await _execute(cluster.dsn(), "SELECT datname FROM pg_database WHERE datname LIKE 'retired_%'")
    assert retired and await _execute(cluster.dsn(str(retired)), "SELECT count(*) FROM customers WHERE name LIKE 'lost%'") == 30


async def test_two_recoveries_of_a_long_named_environment_each_retire_their_own_database(
        archiving_cluster: ArchivingCluster, tmp_path, client, task_queue, run_worker, monkeypatch):  # noqa: F811
    """A 63-character environment: names cut at 63 bytes used to lose the rollback's timestamp, so the
    second recovery found the first one's retired database and took it for its own. The second also
    recovers to a restore point made by hand, which no backup in the catalog knows."""
    cluster = archiving_cluster
    environment = "shop-" + "a" * 58
    await run_worker(await pitr_environment(cluster, tmp_path, monkeypatch, environment))
    orch = orchestrator(client, task_queue)
    shop = cluster.dsn("shop")

    async def recover(batch: str, **options: str) -> str:
        await orch.migrate(MigrateRequest(environment=environment, to_revision="0002", initiated_by="tester"))
        await _execute(shop, f"INSERT INTO customers (name) SELECT '{batch}' || g FROM generate_series(1, 30) g")
        cluster.wait_archived(str(await _execute(cluster.dsn(), "SELECT pg_walfile_name(pg_switch_wal())")))
        started = await orch.start(RollbackRequest(environment=environment, targets=[RollbackTarget.DATABASE],
                                                   database=DatabaseOptions(strategy="pitr", **options)))
        waiting = await status_when(orch, started.execution_id, lambda s: s.approval.decision == "pending",
                                    what="approval pending")
        await orch.approve(started.execution_id, by="dba")
        await orch.wait(started.execution_id)
        status = await orch.get_rollback_status(started.execution_id)
        assert status.state == Phase.SUCCEEDED, status.error
        assert await _execute(shop, f"SELECT count(*) FROM customers WHERE name LIKE '{batch}%'") == 0
        assert await _execute(shop, "SELECT max(revision) FROM rollback_meta.migrations") == "0001"
        assert waiting.plan is not None
        return waiting.plan.approval_reason

    await orch.migrate(MigrateRequest(environment=environment, to_revision="0001", initiated_by="tester"))
    assert "bytes of WAL" in await recover("first")
    by_hand = f"by-hand-{uuid.uuid4().hex[:8]}"
    await _execute(cluster.dsn(), f"SELECT pg_create_restore_point('{by_hand}')")
    reason = await recover("second", restore_point=by_hand)

    assert f"restore point '{by_hand}', which is not in the backup catalog" in reason, reason
    retired = await _fetch(cluster.dsn(), "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                                          "WHERE datname LIKE 'retired_%' ORDER BY datname")
    assert len(retired) == 2 and all(len(name) <= 63 for name, _ in retired), retired
    assert all(comment.startswith("rollback: the shop database retired by rollback-") for _, comment in retired), retired
    # Each retired database holds the writes its own recovery threw away (and not the other's).
    lost = [tuple([await _execute(cluster.dsn(name), f"SELECT count(*) FROM customers WHERE name LIKE '{batch}%'")
                   for batch in ("first", "second")]) for name, _ in retired]
    assert sorted(lost) == [(0, 30), (30, 0)], lost



async def test_a_recovery_to_a_time_is_planned_after_retention_removed_the_migrations_backup(
        archiving_cluster: ArchivingCluster, tmp_path, client, task_queue, run_worker, monkeypatch):  # noqa: F811
    """Recovering to a time needs the WAL archive, not the dump: with the migration's backup gone from
    the catalog the plan still names the database (it used to read the name from that backup: None)."""
    cluster = archiving_cluster
    await run_worker(await pitr_environment(cluster, tmp_path, monkeypatch, "shop"))
    orch = orchestrator(client, task_queue)
    await migrate(orch, "0001")
    before_the_bad_migration = datetime.now(timezone.utc)
    await migrate(orch, "0002")
    catalog = BackupCatalog(tmp_path / "state" / "backups")
    removed = [m.id for m in catalog.list("shop") if catalog.remove(m.id)]
    assert removed and catalog.list("shop") == []

    started = await orch.start(RollbackRequest(environment="shop", targets=[RollbackTarget.DATABASE], initiated_by="tester",
                                               database=DatabaseOptions(strategy="pitr", target_time=before_the_bad_migration)))
    waiting = await status_when(orch, started.execution_id, lambda s: s.approval.decision == "pending" or s.state in TERMINAL_STATES,
                                what="approval pending")
    assert waiting.plan is not None, waiting.error
    [step] = waiting.plan.targets[0].steps
    assert step.startswith("recover shop to time ") and step.endswith(" into a new database and swap it in"), step
    await orch.reject(started.execution_id, by="dba")
    await orch.wait(started.execution_id)
    assert (await orch.get_rollback_status(started.execution_id)).state == Phase.REJECTED

async def _fetch(dsn: str, sql: str) -> list[tuple]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()

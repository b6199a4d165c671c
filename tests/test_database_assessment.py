"""The database slice's assessment refuses, before anything moves, each case docs/database.md lists:
nothing applied through the system, a target that is not older, a migration without down SQL, a
backup not in the catalog, a migration that destroyed what no key can put back, an unreachable
database. Against a real PostgreSQL database, without a workflow."""

from __future__ import annotations

import pytest
from temporalio.exceptions import ApplicationError

from activities.database import DatabaseRollback
from rollback.models import RollbackRequest
from rollback.state import TargetVersions
from rollback.targets.database.backups import BackupCatalog
from rollback.targets.database.config import DatabaseTarget
from rollback.targets.database.migrations import load_migrations
from rollback.targets.database.pg import connect
from rollback.targets.database.contract import SchemaRollbackParams
from rollback.ports import free_port
from tests.postgres import database  # noqa: F401 - fixture
from tests.test_database_rollback import DROP_EMAIL, migrated_past_a_backup, shop  # noqa: F401 - fixture

EVENTS = "CREATE TABLE events (at timestamptz NOT NULL DEFAULT now(), what text); INSERT INTO events (what) VALUES ('a'), ('b');"
KEYLESS = ("UPDATE events SET what = upper(what);", "SELECT 1;")
REQUEST = RollbackRequest(environment="shop", targets=["database"])
KNOWN_GOOD = TargetVersions(current="0002", known_good="0001")


async def through_the_system(config, dsn: str, *, record_backup: bool = True, before: str = "") -> None:
    """0001, `before`, a backup (recorded in the catalog, or not), then 0002 applied with it: what `rollback db migrate` leaves."""
    target = config.get().environment("shop").targets.of("database", DatabaseTarget)
    conn = await connect(dsn)
    try:
        manifest = await migrated_past_a_backup(conn, dsn, load_migrations(target.migrations), target.backup_dir, before=before)
    finally:
        await conn.close()
    if record_backup:
        BackupCatalog(target.backup_dir).record(manifest)


async def refusal(config, versions: TargetVersions = KNOWN_GOOD, to_version: str | None = None, *,
                  kind: str = "AssessmentRefused") -> str:
    slice_ = DatabaseRollback(config)
    try:
        with pytest.raises(ApplicationError) as refused:
            await slice_.assess(REQUEST, versions, to_version)
    finally:
        await slice_.close()
    assert refused.value.type == kind and refused.value.non_retryable
    return refused.value.message


async def test_a_database_migrated_through_the_system_is_planned(shop):  # noqa: F811
    make, dsn = shop
    config = make(DROP_EMAIL)
    await through_the_system(config, dsn)
    slice_ = DatabaseRollback(config)
    try:
        plan = await slice_.assess(REQUEST, KNOWN_GOOD, None)
    finally:
        await slice_.close()
    assert isinstance(plan.params, SchemaRollbackParams) and [m.revision for m in plan.params.undo] == ["0002"]
    assert (plan.from_version, plan.to_version) == ("0002", "0001")


async def test_nothing_applied_through_the_system_is_refused(shop):  # noqa: F811
    make, _ = shop
    assert "no migration was ever applied through the system" in await refusal(make(DROP_EMAIL), kind="NothingToRollBack")


async def test_a_target_that_is_not_older_is_refused(shop):  # noqa: F811
    make, dsn = shop
    config = make(DROP_EMAIL)
    await through_the_system(config, dsn)
    assert await refusal(config, to_version="0002", kind="NothingToRollBack") == "database is at revision 0002; 0002 is not older"


async def test_a_migration_without_down_sql_is_refused(shop, tmp_path):  # noqa: F811
    make, dsn = shop
    config = make(DROP_EMAIL)
    await through_the_system(config, dsn)
    (tmp_path / "migrations" / "0002_step2.down.sql").unlink()
    assert "has no .down.sql: it cannot be reverted (point-in-time recovery can)" in await refusal(config)


async def test_a_migration_whose_backup_left_the_catalog_is_refused(shop):  # noqa: F811
    make, dsn = shop
    config = make(DROP_EMAIL)
    await through_the_system(config, dsn, record_backup=False)
    assert "has no backup in the catalog: its destroyed data could not be restored" in await refusal(config)


async def test_a_migration_that_rewrote_a_table_without_a_key_is_refused(shop):  # noqa: F811
    make, dsn = shop
    config = make(KEYLESS)
    await through_the_system(config, dsn, before=EVENTS)
    message = await refusal(config)
    assert "destroyed what no schema rollback can put back" in message and "public.events" in message, message


async def test_an_unreachable_database_is_refused_naming_the_variable_never_the_dsn(shop, monkeypatch):  # noqa: F811
    make, _ = shop
    config = make(DROP_EMAIL)
    variable = config.get().environment("shop").targets.of("database", DatabaseTarget).dsn_env
    monkeypatch.setenv(variable, f"postgresql://app:SECRETpw@127.0.0.1:{free_port()}/shop")
    message = await refusal(config)
    assert f"unreachable with ${variable}" in message and "SECRETpw" not in message

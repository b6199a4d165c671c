"""The database doors: `rollback db ...` and the database options of `rollback start`, config and JSON input."""

from __future__ import annotations

import pytest
import yaml
from temporalio.client import WorkflowFailureError

from rollback.config import ConfigError, load_config
from tests.helpers import orchestrator
from tests.postgres import database  # noqa: F401 - fixture
from tests.test_cli import cli, one_line_error
from tests.test_database_rollback import DESTRUCTIVE, migrate, shop  # noqa: F401 - fixture


async def test_db_migrate_and_backups_from_the_cli(shop, client, task_queue, run_worker):  # noqa: F811
    make, dsn = shop
    config = make(DESTRUCTIVE)
    await run_worker(config)

    done = await cli(client, task_queue, "db", "migrate", "-e", "shop", "--to", "0002", "--by", "cli-user", config=config.path)

    assert done.returncode == 0, done.stderr
    assert "backing up before 0001_step1" in done.stdout and "applying 0002_step2" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("shop: database at 0002 (applied: 0001, 0002; backups: shop-0001-")
    listed = await cli(client, task_queue, "db", "backups", "-e", "shop", config=config.path)
    rows = [line for line in listed.stdout.splitlines() if line.startswith("│ shop-000")]
    assert listed.returncode == 0 and len(rows) == 2 and all("│ yes" in row for row in rows), listed.stdout

    again = await cli(client, task_queue, "db", "migrate", "-e", "shop", "--to", "0002", config=config.path)
    assert again.returncode == 0 and "nothing to apply" in again.stdout  # idempotent: no backup, no migration


@pytest.mark.parametrize("args, expected", [
    (["db", "migrate", "-e", "shop", "--to", "9999"], "unknown revision '9999'"),
    (["db", "migrate", "-e", "shop", "--to", "../x"], "to_revision"),
    (["db", "backups", "-e", "nowhere"], "'nowhere' has no database target"),
    (["start", "-e", "shop", "-t", "database", "--database-strategy", "pitr"], "point-in-time recovery is not configured"),
    (["start", "-e", "shop", "-t", "database", "--target-time", "2026-01-01T00:00:00"], "needs a timezone"),
    (["start", "-e", "shop", "-t", "database", "--database-strategy", "magic"], "database.strategy"),
])
async def test_bad_database_input_gets_one_clear_line(shop, client, task_queue, run_worker, args, expected):  # noqa: F811
    make, dsn = shop
    config = make(DESTRUCTIVE)
    await run_worker(config)
    await migrate(orchestrator(client, task_queue), "0002")

    line = one_line_error(await cli(client, task_queue, *args, config=config.path))

    assert expected in line, line


async def test_bad_migration_file_name_fails_the_migration_naming_the_file(shop, client, task_queue, run_worker, tmp_path):  # noqa: F811
    make, dsn = shop
    config = make(DESTRUCTIVE)
    (tmp_path / "migrations" / "0003-oops.up.sql").write_text("SELECT 1;")
    await run_worker(config)

    line = one_line_error(await cli(client, task_queue, "db", "migrate", "-e", "shop", "--to", "0002", config=config.path))

    assert "0003-oops.up.sql" in line and "0001_create_users.up.sql" in line, line


async def test_a_migration_edited_after_it_was_applied_stops_the_next_migrate(shop, client, task_queue, run_worker, tmp_path):  # noqa: F811
    make, dsn = shop
    config = make(DESTRUCTIVE)
    await run_worker(config)
    await migrate(orchestrator(client, task_queue), "0001")
    edited = tmp_path / "migrations" / "0001_step1.up.sql"
    edited.write_text(edited.read_text() + "\nCREATE INDEX orders_by_customer ON orders (customer_id);")

    line = one_line_error(await cli(client, task_queue, "db", "migrate", "-e", "shop", "--to", "0002", config=config.path))

    assert "migration files changed after they were applied: 0001_step1 (checksum" in line, line


async def test_json_from_the_ui_with_a_bad_database_option_fails_at_once(client, task_queue, run_worker, shop):  # noqa: F811
    make, _ = shop
    await run_worker(make(DESTRUCTIVE))
    handle = await client.start_workflow("RollbackWorkflow", {"environment": "shop", "targets": ["database"],
                                                              "database": {"strategy": "schema_rollback", "restore_point": 42}},
                                         id=f"rollback-shop-bad-{task_queue}", task_queue=task_queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert "database.restore_point" in str(failure.value.cause)


@pytest.mark.parametrize("database_block, expected", [
    ({"dsn_env": "postgresql://user:secret@host/db", "migrations": "m"}, "environments.shop.targets.database.dsn_env"),
    ({"dsn_env": "SHOP_DSN"}, "environments.shop.targets.database.migrations: Field required"),
    ({"dsn_env": "SHOP_DSN", "migrations": "m", "lock_timeout_ms": 0}, "environments.shop.targets.database.lock_timeout_ms"),
    ({"dsn_env": "SHOP_DSN", "migrations": "m", "pgbouncer": {"port": 6432}}, "environments.shop.targets.database.pgbouncer"),
    ({"dsn_env": "SHOP_DSN", "migrations": "m", "pitr": {"base_backup_dir": "b"}}, "pitr.wal_archive_dir: Field required"),
])
def test_database_config_errors_name_the_field(tmp_path, database_block, expected):
    path = tmp_path / "rollback.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "state", "environments": {"shop": {"targets": {"database": database_block}}}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert expected in str(error.value) and "secret" not in str(error.value), error.value

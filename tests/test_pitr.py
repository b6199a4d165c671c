"""Point-in-time recovery end to end: a real archiving cluster, a real recovering postgres, real pg_dump."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone

import asyncpg
import pytest
from pydantic import ValidationError

from rollback.targets.database.pg import ident, local_dsn, with_database
from rollback.targets.database.pitr import (
    PitrSource,
    CopyFailed,
    NameTaken,
    RecoveryFailed,
    RecoveryTarget,
    SessionsConnected,
    copy_database,
    describe_loss,
    recover,
    swap_databases,
    take_base_backup,
)
from tests.pitr_cluster import ArchivingCluster, archiving_cluster  # noqa: F401
from tests.postgres import create_database, database, drop_database  # noqa: F401


async def insert(dsn: str, batch: str, count: int = 50) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("INSERT INTO items (batch, n) SELECT $1, g FROM generate_series(1, $2) g", batch, count)
    finally:
        await conn.close()


async def batches(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {r["batch"]: r["count"] for r in await conn.fetch("SELECT batch, count(*) FROM items GROUP BY batch")}
    finally:
        await conn.close()


async def archive_current_wal(cluster: ArchivingCluster) -> None:
    """Close the current WAL segment and wait until archive_command has copied it."""
    conn = await asyncpg.connect(cluster.dsn(), timeout=10)
    try:
        segment = await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
    finally:
        await conn.close()
    cluster.wait_archived(segment)


async def prepare_history(cluster: ArchivingCluster) -> dict[str, object]:
    """app gets rows A, base backup, rows B, restore point 'before_mig', rows C; WAL archived."""
    admin = await asyncpg.connect(cluster.dsn(), timeout=10)
    await admin.execute("CREATE DATABASE app")
    await admin.close()
    app = cluster.dsn("app")
    conn = await asyncpg.connect(app, timeout=10)
    await conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, batch text NOT NULL, n int NOT NULL)")
    await conn.close()
    await insert(app, "A")
    backup = await take_base_backup(dsn=cluster.dsn(), target_dir=cluster.base_dir / "base")
    await insert(app, "B")
    conn = await asyncpg.connect(app, timeout=10)
    after_b = await conn.fetchval("SELECT now()")
    restore_lsn = await conn.fetchval("SELECT pg_create_restore_point('before_mig')::text")
    await conn.close()
    await insert(app, "C")
    await archive_current_wal(cluster)
    return {"backup": backup, "after_b": after_b, "restore_lsn": restore_lsn}


def source_of(cluster: ArchivingCluster) -> PitrSource:
    return PitrSource(base_backup_dir=cluster.base_dir / "base", wal_archive_dir=cluster.archive_dir)


async def test_recover_to_restore_point_copy_and_swap(archiving_cluster: ArchivingCluster) -> None:  # noqa: F811
    cluster = archiving_cluster
    history = await prepare_history(cluster)
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", history["backup"].start_lsn)
    assert (cluster.base_dir / "base" / "backup_label").exists()
    loss = await describe_loss(live_dsn=cluster.dsn("app"), restore_point_lsn=history["restore_lsn"], since=None)
    assert f"after the restore point at {history['restore_lsn']}" in loss
    stages: list[str] = []

    async with await recover(source=source_of(cluster), target=RecoveryTarget(restore_point="before_mig"),
                             work_dir=cluster.workspace("recover"), progress=stages.append) as instance:
        assert await batches(instance.dsn("app")) == {"A": 50, "B": 50}
        await copy_database(source_dsn=instance.dsn("app"), target_admin_dsn=cluster.dsn(), new_database="app_pitr")
        # A retried activity finds the complete copy and leaves it as it is.
        await copy_database(source_dsn=instance.dsn("app"), target_admin_dsn=cluster.dsn(), new_database="app_pitr")
    assert any("promoted" in stage for stage in stages)
    # The base backup is never modified: it can serve another recovery.
    assert not (cluster.base_dir / "base" / "recovery.signal").exists()

    retired = f"app_retired_{uuid.uuid4().hex[:6]}"
    await _execute(cluster.dsn(), "COMMENT ON DATABASE app IS 'the shop''s data'")
    for _ in range(2):  # the second call finds it swapped already and succeeds
        await swap_databases(admin_dsn=cluster.dsn(), live="app", replacement="app_pitr", retired=retired,
                             marker="retired by step k1", terminate_sessions=False, timeout=10)
    assert await batches(cluster.dsn("app")) == {"A": 50, "B": 50}
    assert await batches(cluster.dsn(retired)) == {"A": 50, "B": 50, "C": 50}
    comments = await _comments(cluster.dsn(), ["app", retired])
    assert comments == {"app": "the shop's data", retired: "retired by step k1"}
    # Another step finding that name taken refuses, rather than taking the database for its own.
    with pytest.raises(NameTaken, match=f"{retired} already exists and was not retired by this step"):
        await swap_databases(admin_dsn=cluster.dsn(), live="app", replacement="app_pitr", retired=retired,
                             marker="retired by step k2", terminate_sessions=False, timeout=10)
    # The restored table keeps working for the application: its sequence continues past the ids it
    # holds (recovered sequences skip ahead, as PostgreSQL logs them 32 values in advance).
    conn = await asyncpg.connect(cluster.dsn("app"), timeout=10)
    try:
        assert await conn.fetchval("INSERT INTO items (batch, n) VALUES ('D', 1) RETURNING id") > 100
    finally:
        await conn.close()


async def test_recover_to_a_time_between_writes(archiving_cluster: ArchivingCluster) -> None:  # noqa: F811
    cluster = archiving_cluster
    history = await prepare_history(cluster)
    target = RecoveryTarget(time=history["after_b"])
    work = cluster.workspace("recover")
    # A first attempt whose worker died with the scratch server still running...
    abandoned = await recover(source=source_of(cluster), target=target, work_dir=work)
    # ...is stopped and replaced by the retry in the same work_dir.
    async with await recover(source=source_of(cluster), target=target, work_dir=work) as inst:
        with pytest.raises(OSError):  # its socket is gone: the abandoned server was stopped
            await asyncpg.connect(abandoned.dsn("app"), timeout=5)
        assert await batches(inst.dsn("app")) == {"A": 50, "B": 50}
    assert not (inst.data_dir / "postmaster.pid").exists()  # stopped on leaving the block


async def test_unknown_restore_point_fails_clearly_and_leaves_nothing(
        archiving_cluster: ArchivingCluster) -> None:  # noqa: F811
    cluster = archiving_cluster
    await prepare_history(cluster)
    work = cluster.workspace("recover")
    with pytest.raises(RecoveryFailed, match=r"(?s)restore point 'no_such_point'.*recovery ended before configured"):
        await recover(source=source_of(cluster), target=RecoveryTarget(restore_point="no_such_point"), work_dir=work)
    conn = await asyncpg.connect(cluster.dsn(), timeout=10)
    try:
        names = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()
    assert names == {"postgres", "template0", "template1", "app"}
    assert not (work / "data" / "postmaster.pid").exists()  # no scratch server left running


async def database_settings(admin: asyncpg.Connection, name: str) -> list[tuple]:
    """Who may do what on the database (grantee, privilege), and its settings per role."""
    acl = await admin.fetch("SELECT a.grantee::regrole::text, a.privilege_type FROM pg_database d, aclexplode(d.datacl) a "
                            "WHERE d.datname = $1 AND a.grantee <> d.datdba ORDER BY 1, 2", name)
    settings = await admin.fetch("SELECT setrole::regrole::text, setconfig FROM pg_db_role_setting s "
                                 "JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = $1 ORDER BY 1", name)
    return [tuple(r) for r in acl] + [(r[0], sorted(r[1])) for r in settings]


async def test_copy_database_replaces_a_half_made_copy_and_spares_other_databases(database: str) -> None:  # noqa: F811
    source = local_dsn(database)
    role = f"rb_pitr_app_{database[-10:]}"
    conn = await asyncpg.connect(source, timeout=10)
    await conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, batch text NOT NULL, n int NOT NULL)")
    await conn.close()
    await insert(source, "A")
    half_made, foreign = f"{database}_copy", await create_database("rb_pitr_foreign")
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        # What a worker that died during pg_restore leaves: our marker and a partial table.
        await admin.execute(f"CREATE DATABASE {ident(half_made)}")
        await admin.execute(f"COMMENT ON DATABASE {ident(half_made)} IS 'rollback-pitr: copy in progress'")
        partial = await asyncpg.connect(local_dsn(half_made), timeout=10)
        await partial.execute("CREATE TABLE items (id int)")
        await partial.close()
        # Database-level privileges and settings, which a dump restored into an existing database lacks.
        await admin.execute(f"CREATE ROLE {role}; REVOKE CONNECT, TEMPORARY ON DATABASE {ident(database)} FROM PUBLIC; "
                            f"GRANT CONNECT ON DATABASE {ident(database)} TO {role}; "
                            f"ALTER DATABASE {ident(database)} SET search_path = \"$user\", public, \"odd,name\"; "
                            f"ALTER DATABASE {ident(database)} SET work_mem = '7MB'; "
                            f"ALTER ROLE {role} IN DATABASE {ident(database)} SET statement_timeout = '5s'")
        await copy_database(source_dsn=source, target_admin_dsn=local_dsn(), new_database=half_made, settings_from=database)
        assert await batches(local_dsn(half_made)) == {"A": 50}
        assert await database_settings(admin, half_made) == await database_settings(admin, database)
        assert await admin.fetchval(f"SELECT has_database_privilege('{role}', $1, 'CONNECT') "
                                    "AND NOT has_database_privilege('public', $1, 'TEMPORARY')", half_made)

        with pytest.raises(CopyFailed, match=f"database {foreign} already exists and was not made by rollback"):
            await copy_database(source_dsn=source, target_admin_dsn=local_dsn(), new_database=foreign)
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", foreign) == 1

        # A password in a DSN never reaches the error a person reads.
        with_password = with_database(local_dsn(), "rb_pitr_no_such_db", password="planted-s3cret")
        with pytest.raises(CopyFailed, match="rb_pitr_no_such_db") as failure:
            await copy_database(source_dsn=with_password, target_admin_dsn=local_dsn(), new_database=f"{half_made}2")
        assert "planted-s3cret" not in str(failure.value)
    finally:
        await admin.close()
        for name in (half_made, f"{half_made}2", foreign):
            await drop_database(name)
        await drop_database(database)
        cleanup = await asyncpg.connect(local_dsn(), timeout=10)
        try:
            await cleanup.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await cleanup.close()


def test_recovery_target_is_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        RecoveryTarget()
    with pytest.raises(ValidationError, match="exactly one"):
        RecoveryTarget(restore_point="x", time=datetime.now(timezone.utc))
    with pytest.raises(ValidationError, match="timezone-aware"):
        RecoveryTarget(time=datetime(2026, 1, 1, 12, 0))


async def test_swap_waits_for_sessions_or_terminates_them() -> None:
    live, replacement = await create_database("rb_pitr_live"), await create_database("rb_pitr_new")
    retired = f"rb_pitr_retired_{uuid.uuid4().hex[:8]}"
    holder = await asyncpg.connect(local_dsn(live), timeout=10,
                                   server_settings={"application_name": "report-job"})
    try:
        with pytest.raises(SessionsConnected, match=rf"pid {holder.get_server_pid()} on {live} .*report-job.*idle"):
            await swap_databases(admin_dsn=local_dsn(), live=live, replacement=replacement, retired=retired,
                                 marker="m", terminate_sessions=False, timeout=1)
        await swap_databases(admin_dsn=local_dsn(), live=live, replacement=replacement, retired=retired,
                             marker="m", terminate_sessions=True, timeout=10)
        admin = await asyncpg.connect(local_dsn(), timeout=10)
        try:
            present = {r["datname"] for r in await admin.fetch(
                "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", [live, replacement, retired])}
        finally:
            await admin.close()
        assert present == {live, retired}
        assert holder.is_closed() or not await _alive(holder)
    finally:
        if not holder.is_closed():
            holder.terminate()
        for name in (live, replacement, retired):
            await drop_database(name)


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _comments(dsn: str, databases: list[str]) -> dict[str, str | None]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return dict(tuple(r) for r in await conn.fetch(  # type: ignore[misc]
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = ANY($1::text[])",
            databases))
    finally:
        await conn.close()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=5)
        return True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False


async def test_describe_loss_counts_wal_after_the_restore_point(database: str) -> None:  # noqa: F811
    dsn = local_dsn(database)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        lsn = await conn.fetchval(f"SELECT pg_create_restore_point({_q('rb_test_' + database)})::text")
        before = await conn.fetchval("SELECT now()")
        await conn.execute("INSERT INTO orders SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g")
        await conn.execute("ANALYZE orders")
    finally:
        await conn.close()
    text = await describe_loss(live_dsn=dsn, restore_point_lsn=lsn, since=before)
    lost = int(re.search(r"([\d,]+) bytes of WAL", text)[1].replace(",", ""))
    assert lost > 200_000  # 2000 rows of ~130 bytes, plus their index entries
    assert "every transaction committed after" in text
    assert "public.orders ~2,000" in text and "estimates" in text
    assert len(text.splitlines()) <= 2


def _q(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


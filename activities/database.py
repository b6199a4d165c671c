"""The database target: migrations with a verified backup first, and their rollback.

`DatabaseRollback` holds the configuration and one asyncpg pool per database; its
activities are the steps RollbackWorkflow and DatabaseMigrationWorkflow call. Every one
is idempotent under its key (workflow id + step): the revert records itself in the same
transaction as the DDL, the restore merges only rows that still differ, backups are
named by id and reused when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from rollback.targets.database import integrity, pitr
from rollback.targets.database.captured_restore import CapturedRebuild, restore_captured
from rollback.targets.database.backups import BackupCatalog, BackupCorrupt, BackupError, BackupManifest, take_backup, verify_backup
from rollback.config import ConfigSource
from rollback.targets.database.config import DatabaseTarget
from rollback.targets.database.migrations import (
    Migration, MigrationError, applied, apply_up, edited_since_applied, find, in_transaction_with_lock_timeout, load_migrations, plan_upgrade,
    position, record_applied, run_captured,
)
from rollback.payloads import NOTHING_TO_ROLL_BACK
from rollback.models import DatabaseOptions, RollbackRequest, RollbackTarget, TargetPlan
from rollback.targets.database.contract import (
    APPLY_MIGRATION, BACKUP, CURRENT_REVISION, DISCARD_SNAPSHOT, INTEGRITY_BEFORE, PLAN_MIGRATION, REAPPLY_MIGRATION,
    RECOVER_TO_POINT, RESTORE_DATA, REVERT_MIGRATION, SWAP_BACK, VALIDATE, VERIFY_BACKUP, AppliedMigration, BackupInput,
    BackupSummary, DbStepInput, IntegrityBrief, IntegrityInput, MigrationInput, MigrationPlan, MigrationToUndo, PitrInput,
    PitrParams, Reapplied, Recovered, RestoreInput, SchemaRollbackParams, SnapshotDiscarded, SnapshotRef, SwapBackInput,
    SwappedBack, ValidateDbInput,
)
from rollback.targets.database.names import bounded_name, derived_name
from rollback.targets.database.pg import MissingDsn, database_name, dsn_from_env, ident, qualified, with_database
from rollback.targets.database.pgbouncer import PgBouncerError, paused
from rollback.targets.database.pgschema import SchemaSnapshot, snapshot
from rollback.targets.database.schema_rollback import (
    ARCHIVE_SCHEMA, RebuildOptions, RestoreResult, RevertResult, diff, ensure_bookkeeping, restore_data, restore_xids,
    revert_schema,
)
from rollback.state import TargetVersions
from rollback.targets.database.table_rebuild import LockPolicy

if TYPE_CHECKING:
    from activities.targets import Shared


def _refuse(message: str, kind: str = "AssessmentRefused") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def _fail(message: str, kind: str = "DatabaseStepFailed") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


class DatabaseRollback:
    def __init__(self, config: ConfigSource) -> None:
        self.config = config
        self._pools: dict[str, asyncpg.Pool] = {}

    # -- plumbing -------------------------------------------------------------------------

    def target(self, environment: str) -> DatabaseTarget:
        env = self.config.get().environments.get(environment)
        target = env.targets.of("database", DatabaseTarget) if env is not None else None
        if target is None:
            raise _fail(f"environment {environment!r} has no database target configured", "InvalidRequest")
        return target

    def dsn(self, target: DatabaseTarget) -> str:
        try:
            return dsn_from_env(target.dsn_env)
        except MissingDsn as err:
            raise _fail(str(err), "CredentialsMissing") from None

    @contextlib.asynccontextmanager
    async def connection(self, target: DatabaseTarget) -> AsyncIterator[asyncpg.Connection]:
        dsn = self.dsn(target)
        pool = self._pools.get(dsn)
        if pool is None:
            pool = self._pools[dsn] = await asyncpg.create_pool(dsn, min_size=0, max_size=4, timeout=10,
                                                                 server_settings={"application_name": "rollback-worker"})
        async with pool.acquire(timeout=30) as conn:
            yield conn

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    @staticmethod
    def backup_root(target: DatabaseTarget) -> Path:
        assert target.backup_dir is not None  # resolved by load_config
        return target.backup_dir

    def catalog(self, target: DatabaseTarget) -> BackupCatalog:
        return BackupCatalog(self.backup_root(target))

    def manifest(self, target: DatabaseTarget, backup_id: str) -> BackupManifest:
        manifest = self.catalog(target).get(backup_id)
        if manifest is None:
            raise _fail(f"backup {backup_id} is not in the catalog at {target.backup_dir}", "BackupMissing")
        return manifest

    @staticmethod
    async def migrations(target: DatabaseTarget) -> list[Migration]:
        # In a thread: an Alembic project's SQL is rendered by a child process (~0.6 s).
        try:
            return await asyncio.to_thread(load_migrations, target.migrations)
        except MigrationError as err:
            raise _fail(str(err), "InvalidRequest") from None

    # -- assessment (called by coordination.plan) -----------------------------------------

    async def assess(self, request: RollbackRequest, versions: TargetVersions, to_version: str | None) -> TargetPlan:
        environment, options = request.environment, request.database or DatabaseOptions()
        target = self.target(environment)
        migrations = await self.migrations(target)
        try:
            async with self.connection(target) as conn:
                done = await applied(conn)
                live = await snapshot(conn)
        except (OSError, asyncpg.PostgresError) as err:
            raise _refuse(f"database of {environment!r} is unreachable with ${target.dsn_env}: {type(err).__name__}") from None
        if not done:
            raise _refuse("no migration was ever applied through the system (rollback db migrate): nothing to roll back",
                          NOTHING_TO_ROLL_BACK)
        current = done[-1].revision
        to = to_version or versions.known_good
        if to is None:
            raise _refuse("no known-good database revision is recorded; pass to_version")
        try:
            to_index, current_index = position(migrations, to), position(migrations, current)
        except MigrationError as err:
            raise _refuse(str(err)) from None
        to = migrations[to_index].revision  # canonical spelling: validation compares it with the database's record
        if to_index >= current_index:
            raise _refuse(f"database is at revision {current}; {to} is not older",
                          NOTHING_TO_ROLL_BACK if to_index == current_index else "AssessmentRefused")
        undo = [m for m in reversed(done) if position(migrations, m.revision) > to_index]
        catalog = self.catalog(target)
        evidence: dict[str, Any] = {"current_revision": current, "backups": [m.backup_id for m in undo]}
        if options.strategy == "pitr":
            # The last resort needs no down SQL and no dump: only the WAL archive and a point to recover to.
            oldest = catalog.get(undo[-1].backup_id) if undo[-1].backup_id else None
            return await self._assess_pitr(environment, target, current, to, oldest, options, evidence)
        steps_undo: list[MigrationToUndo] = []
        for record in undo:
            migration = find(migrations, record.revision)
            if not migration.down_sql:
                raise _refuse(f"migration {migration.label} has no .down.sql: it cannot be reverted (point-in-time recovery can)")
            if not record.backup_id or catalog.get(record.backup_id) is None:
                raise _refuse(f"migration {migration.label} has no backup in the catalog: its destroyed data could not be restored")
            if record.capture is not None and record.capture.uncaptured:
                raise _refuse(f"migration {migration.label} destroyed what no schema rollback can put back: "
                              f"{'; '.join(record.capture.uncaptured)} (point-in-time recovery can)")
            steps_undo.append(MigrationToUndo(revision=record.revision, label=migration.label, backup_id=record.backup_id))
            evidence.setdefault("destroyed", {})[migration.label] = (
                "; ".join(record.capture.destroys()) or "nothing" if record.capture is not None
                else "applied before captures existed: restored from its backup")
        oldest = self.manifest(target, steps_undo[-1].backup_id)
        evidence["schema_changes_since_known_good"] = diff(oldest.schema_snapshot, live).describe()
        edited = edited_since_applied(migrations, undo)
        if edited:  # a down SQL fixed after the fact is legitimate: said, not refused
            evidence["edited_since_applied"] = edited
        evidence["preserves"] = ("every row written after the migration(s) stays; data only in added objects is archived in "
                                 f"{ARCHIVE_SCHEMA}; what the migration destroyed (rows it deleted or updated, tables and "
                                 "columns it dropped, values it retyped) is restored by primary key from what it captured "
                                 "when it ran (migrations applied before captures: from the backup), keeping every value "
                                 "the application wrote since")
        return TargetPlan(target=RollbackTarget.DATABASE, strategy="schema_rollback", from_version=current, to_version=to,
                          checks=["down SQL restores the backup's shape", "restored values match the backup",
                                  "row fingerprints before vs after (REPEATABLE READ)"],
                          params=SchemaRollbackParams(undo=steps_undo, target_backup_id=oldest.id), evidence=evidence)

    async def _assess_pitr(self, environment: str, target: DatabaseTarget, current: str, to: str,
                           oldest: BackupManifest | None, options: DatabaseOptions, evidence: dict[str, Any]) -> TargetPlan:
        if target.pitr is None:
            raise _refuse("point-in-time recovery is not configured for this database (targets.database.pitr)")
        restore_point = options.restore_point
        target_time = options.target_time.isoformat() if options.target_time else None
        if not restore_point and not target_time:
            restore_point = oldest.restore_point if oldest else None
            if not restore_point:
                why = oldest.restore_point_note if oldest else "no backup of the migration is in the catalog"
                raise _refuse(f"no restore point to recover to ({why}); pass --restore-point or --target-time")
        # A named restore point is measured from the backup that made it; one made by hand (or by a
        # backup no longer in the catalog) cannot be located from here, and the statement says so.
        made_by = next((m for m in self.catalog(target).list(environment) if m.restore_point == restore_point), None) \
            if restore_point else None
        live_dsn = self.dsn(target)
        try:
            loss = await pitr.describe_loss(
                live_dsn=live_dsn, restore_point_lsn=made_by.restore_point_lsn if made_by else None,
                since=datetime.fromisoformat(target_time) if target_time else (made_by.created_at if made_by else None),
                restore_point=restore_point)
        except pitr.PitrError as err:
            raise _refuse(str(err)) from None
        evidence["loses"] = loss
        return TargetPlan(
            target=RollbackTarget.DATABASE, strategy="pitr", from_version=current, to_version=to,
            checks=["recovered database is at the known-good revision"],
            params=PitrParams(database=database_name(live_dsn), restore_point=restore_point, target_time=target_time),
            evidence=evidence)

    # -- migrations ----------------------------------------------------------------------

    @activity.defn(name=BACKUP)
    async def backup(self, inp: BackupInput) -> BackupSummary:
        target = self.target(inp.environment)
        async with heartbeating(f"backup {inp.backup_id}"):
            try:
                manifest = await take_backup(dsn=self.dsn(target), root=self.backup_root(target), backup_id=inp.backup_id,
                                             environment=inp.environment, revision=inp.revision,
                                             next_revision=inp.next_revision, jobs=target.backup_jobs)
            except BackupCorrupt as err:
                raise _fail(str(err), "BackupCorrupt") from None
            except BackupError as err:
                raise ApplicationError(str(err), type="BackupFailed") from None  # retryable: disk, server restarts
        self.catalog(target).record(manifest)
        return _backup_summary(manifest)

    @activity.defn(name=PLAN_MIGRATION)
    async def plan_migration(self, inp: MigrationInput) -> MigrationPlan:
        """Which migrations take the database from where it is to `inp.revision`, oldest first."""
        target = self.target(inp.environment)
        migrations = await self.migrations(target)
        async with self.connection(target) as conn:
            done = await applied(conn)
        current = done[-1].revision if done else None
        edited = edited_since_applied(migrations, done)
        if edited:
            # What the database ran is no longer what the files say: a later rollback would trust the wrong down SQL.
            raise _fail(f"migration files changed after they were applied: {', '.join(edited)}; restore them, or write the "
                        "change as a new migration", "InvalidRequest")
        try:
            pending = plan_upgrade(migrations, current, inp.revision)
        except MigrationError as err:
            raise _fail(str(err), "InvalidRequest") from None
        return MigrationPlan(current=current, pending=[m.revision for m in pending], labels=[m.label for m in pending])

    @activity.defn(name=APPLY_MIGRATION)
    async def apply_migration(self, inp: MigrationInput) -> AppliedMigration:
        target = self.target(inp.environment)
        migration = find(await self.migrations(target), inp.revision)
        async with heartbeating(f"apply {migration.label}"), self.connection(target) as conn:
            try:
                result = await apply_up(conn, migration, backup_id=inp.backup_id, lock_timeout_ms=target.lock_timeout_ms,
                                        attempts=target.lock_attempts)
            except MigrationError as err:
                raise _fail(f"{err}; backup {inp.backup_id} is kept", "MigrationFailed") from None
        return result

    # -- schema rollback -------------------------------------------------------------------

    @activity.defn(name=VERIFY_BACKUP)
    async def verify_backup(self, inp: BackupInput) -> BackupSummary:
        target = self.target(inp.environment)
        manifest = self.manifest(target, inp.backup_id)
        async with heartbeating(f"verify {inp.backup_id}"):
            try:
                checked = await asyncio.to_thread(verify_backup, Path(manifest.path))
            except BackupCorrupt as err:
                raise _fail(f"backup {inp.backup_id} refused for restore: {err}", "BackupCorrupt") from None
        return _backup_summary(checked)

    @activity.defn(name=INTEGRITY_BEFORE)
    async def integrity_before(self, inp: IntegrityInput) -> SnapshotRef:
        target = self.target(inp.environment)
        shape = self.manifest(target, inp.target_backup_id).schema_snapshot
        async with heartbeating("integrity snapshot"), self.connection(target) as conn:
            specs = _integrity_specs(shape, await snapshot(conn))
            snap = await integrity.take_stored_snapshot(conn, specs, label=inp.key)
        return SnapshotRef(label=snap.label, pg_snapshot=snap.pg_snapshot, tables=len(snap.tables),
                           rows=sum(t.rows for t in snap.tables.values()), seconds=snap.seconds)

    @activity.defn(name=REVERT_MIGRATION)
    async def revert_migration(self, inp: MigrationInput) -> RevertResult:
        target = self.target(inp.environment)
        migration = find(await self.migrations(target), inp.revision)
        assert inp.backup_id is not None
        shape = self.manifest(target, inp.backup_id).schema_snapshot
        async with heartbeating(f"revert {migration.label}"), self.connection(target) as conn:
            try:
                result = await revert_schema(conn, migration=migration, target_shape=shape, key=inp.key,
                                             lock_timeout_ms=target.lock_timeout_ms, attempts=target.lock_attempts,
                                             around_attempt=self._pause_around(target),
                                             on_blocked=self._blocker_policy(target, conn))
            except MigrationError as err:
                raise _fail(str(err), "RevertFailed") from None
            except PgBouncerError as err:
                # A PAUSE that timed out waits for a long application transaction: worth another attempt later.
                raise ApplicationError(str(err), type="PoolBusy") from None
        return result.model_copy(update={"attempt": activity.info().attempt})

    def _rebuild_options(self, target: DatabaseTarget, manifest: BackupManifest,
                         conn: asyncpg.Connection) -> RebuildOptions | None:
        """Big tables are rebuilt rather than updated row by row, when the backup says which rows it holds."""
        if target.rebuild_min_rows is None or manifest.pg_snapshot is None:
            return None  # (backups taken before their snapshot was recorded: merged in place)
        return RebuildOptions(backup_snapshot=manifest.pg_snapshot, min_rows=target.rebuild_min_rows,
                              locks=self._lock_policy(target, conn))

    def _lock_policy(self, target: DatabaseTarget, conn: asyncpg.Connection) -> LockPolicy:
        """How a rebuild's swap takes its lock: the target's lock_timeout and attempts, its pool pause, its blocker policy."""
        return LockPolicy(lock_timeout_ms=target.lock_timeout_ms, attempts=target.lock_attempts,
                          around_attempt=self._pause_around(target), on_blocked=self._blocker_policy(target, conn))

    def _pause_around(self, target: DatabaseTarget):
        """PAUSE the application's pool for one DDL transaction, RESUME whatever happens."""
        if target.pgbouncer is None:
            return None
        return lambda: paused(target.pgbouncer)

    def _blocker_policy(self, target: DatabaseTarget, conn: asyncpg.Connection):
        if not target.terminate_blockers:
            return None
        threshold = max(1, target.lock_attempts // 2)

        async def terminate(attempt: int) -> None:
            if attempt < threshold:
                return
            # Half the attempts failed: whoever still holds a lock on an application table is
            # what our ACCESS EXCLUSIVE waits for (it conflicts with every mode). pg_locks needs
            # no extra privilege, unlike another role's xact_start in pg_stat_activity. The
            # rollback's own sessions (a table rebuild's) are not blockers to end.
            rows = await conn.fetch(
                """SELECT DISTINCT l.pid, a.application_name, a.state FROM pg_locks l
                   JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                   WHERE l.granted AND l.pid <> pg_backend_pid() AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND coalesce(a.application_name, '') NOT LIKE 'rollback-%'
                     AND c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'rollback_meta', 'rollback_archive')""")
            for row in rows:
                activity.logger.warning("terminating session %s (%s, %s) that blocks the rollback's DDL",
                                        row["pid"], row["application_name"], row["state"])
                await conn.execute("SELECT pg_terminate_backend($1)", row["pid"])

        return terminate

    @activity.defn(name=RESTORE_DATA)
    async def restore_data(self, inp: RestoreInput) -> RestoreResult:
        target = self.target(inp.environment)
        manifest = self.manifest(target, inp.backup_id)
        revert = inp.revert
        system_xids = [revert.migration_xid, revert.xid]
        progress: dict[str, str] = {}
        async with heartbeating(f"restore data of {inp.revision}"):
            try:
                await asyncio.to_thread(verify_backup, Path(manifest.path))
            except BackupCorrupt as err:
                raise _fail(f"backup {inp.backup_id} refused for restore: {err}", "BackupCorrupt") from None
            try:
                if revert.capture is not None:  # the images taken when the migration ran
                    async with self.connection(target) as conn:
                        rebuild = None if target.rebuild_min_rows is None else CapturedRebuild(
                            min_rows=target.rebuild_min_rows, locks=self._lock_policy(target, conn),
                            since_snapshot=inp.integrity_snapshot)
                        result = RestoreResult(tables=await restore_captured(
                            self.dsn(target), capture=revert.capture, target_shape=manifest.schema_snapshot,
                            revert_xid=revert.xid, key=inp.key, rows_per_chunk=target.restore_chunk_rows, rebuild=rebuild,
                            progress=lambda text: progress.update(last=text)))
                else:
                    async with self.connection(target) as conn:
                        result = await restore_data(
                            self.dsn(target), backup_path=Path(manifest.path), target_shape=manifest.schema_snapshot,
                            changes=revert.diff, system_xids=system_xids, key=inp.key, rows_per_chunk=target.restore_chunk_rows,
                            workers=target.restore_workers, revert_xid=revert.xid,
                            rebuild=self._rebuild_options(target, manifest, conn), progress=lambda text: progress.update(last=text))
            except (MigrationError, BackupError) as err:  # BackupError: the backup has no rows for a table it should
                raise _fail(str(err), "RestoreRefused") from None
            except PgBouncerError as err:
                raise ApplicationError(str(err), type="PoolBusy") from None
        bad = [t for t in result.tables if t.mismatches_after]
        if bad:
            raise _fail("restored values differ from the backup afterwards: " +
                        ", ".join(f"{t.table} ({t.mismatches_after} rows)" for t in bad), "IntegrityViolation")
        return result.model_copy(update={"attempt": activity.info().attempt})

    @activity.defn(name=VALIDATE)
    async def validate(self, inp: ValidateDbInput) -> IntegrityBrief:
        target = self.target(inp.environment)
        async with heartbeating("integrity validation"), self.connection(target) as conn:
            report = await integrity.load_report(conn, inp.key)  # a retry after the comparison was made
            if report is None:
                report = await self._compare(conn, target, inp)
                # The report names what differs; the snapshot and its per-row hashes have served either way.
                await integrity.store_report(conn, inp.key, report)
        brief = integrity.brief(report, stored_as=f"rollback_meta.integrity_reports key {inp.key}")
        if not report.ok:
            named = "; ".join(f"{d.table} {d.kind} " + ",".join(f"{k}={v}" for k, v in (d.key or {}).items())
                              for d in report.differences if d.cause == "unexplained")
            # The brief rides along (failure details), so the status shows the evidence of a failed check too.
            raise ApplicationError(f"integrity check failed: {report.summary}; {named}"[:1500], brief.model_dump(mode="json"),
                                   type="IntegrityViolation", non_retryable=True)
        return brief

    @staticmethod
    async def _compare(conn: asyncpg.Connection, target: DatabaseTarget, inp: ValidateDbInput) -> integrity.IntegrityReport:
        before = await integrity.load_snapshot(conn, inp.snapshot_label)
        if before is None:
            raise _fail(f"the integrity snapshot {inp.snapshot_label} is not in rollback_meta.integrity_snapshots "
                        "(discarded, or dropped by hand): nothing to compare with", "IntegrityViolation")
        expected: set[int] = set()
        for key in inp.restore_keys:
            expected |= set(await restore_xids(conn, key))
        reverts = set()
        for key in inp.revert_keys:
            xid = await conn.fetchval("SELECT xid FROM rollback_meta.reverts WHERE key = $1", key)
            if xid is not None:
                reverts.add(xid)
        specs = [integrity.TableSpec(table=t.table, key=t.key, columns=t.columns) for t in before.tables.values()]
        return await integrity.compare(conn, before, specs, rollback_xids=expected | reverts, expected_xids=expected,
                                       allow_deletes=target.allow_concurrent_deletes,
                                       rebuilt=await _rebuilt_tables(conn, inp.restore_keys))

    @activity.defn(name=DISCARD_SNAPSHOT)
    async def discard_snapshot(self, inp: DbStepInput) -> SnapshotDiscarded:
        """Compensation: drop an integrity snapshot (stored under `inp.key`) that will never be compared."""
        target = self.target(inp.environment)
        async with self.connection(target) as conn:
            discarded = await integrity.discard_snapshot(conn, inp.key)
        return SnapshotDiscarded(label=inp.key, discarded=discarded)

    @activity.defn(name=REAPPLY_MIGRATION)
    async def reapply_migration(self, inp: MigrationInput) -> Reapplied:
        """Compensation: undo a revert (re-apply the migration, put the archived data back)."""
        target = self.target(inp.environment)
        migration = find(await self.migrations(target), inp.revision)
        async with heartbeating(f"re-apply {migration.label}"), self.connection(target) as conn:
            await ensure_bookkeeping(conn)
            raw = await conn.fetchval("SELECT result FROM rollback_meta.reverts WHERE key = $1", inp.key)
            if raw is None:
                return Reapplied(reapplied=False, why="the revert never happened")
            revert = RevertResult.model_validate_json(raw)
            if destroyed := await _restored_since_revert(conn, revert, inp.restore_key):
                raise ApplicationError(
                    f"{migration.label} is not re-applied: the rollback brought back {destroyed}, and re-applying it "
                    "would destroy that again, with whatever the application has written there since; the reverted "
                    "schema and the restored data are kept", type="RevertIrreversible", non_retryable=True)

            async def body(c: asyncpg.Connection) -> Reapplied:
                if await c.fetchval("SELECT count(*) FROM rollback_meta.migrations WHERE revision = $1", migration.revision):
                    return Reapplied(reapplied=False, why="already re-applied")
                xid, capture = await run_captured(c, migration)
                for item in revert.archived:
                    schema, table = item.source.split(".", 1)
                    source = qualified(ARCHIVE_SCHEMA, item.archive_table)
                    if item.whole_table:
                        cols = ", ".join(ident(x) for x in item.columns)
                        await c.execute(f"INSERT INTO {qualified(schema, table)} ({cols}) SELECT {cols} FROM {source}")
                    else:
                        sets = ", ".join(f"{ident(x)} = a.{ident(x)}" for x in item.columns)
                        join = " AND ".join(f"t.{ident(k)} = a.{ident(k)}" for k in item.key)
                        await c.execute(f"UPDATE {qualified(schema, table)} t SET {sets} FROM {source} a WHERE {join}")
                await record_applied(c, migration, xid=xid, backup_id=inp.backup_id, capture=capture)
                return Reapplied(reapplied=True, archives_restored=[a.archive_table for a in revert.archived])

            try:
                return await in_transaction_with_lock_timeout(conn, body, lock_timeout_ms=target.lock_timeout_ms,
                                                              attempts=target.lock_attempts, what=f"re-apply of {migration.label}",
                                                              around_attempt=self._pause_around(target))  # type: ignore[return-value]
            except (MigrationError, asyncpg.PostgresError) as err:
                raise _fail(f"could not re-apply {migration.label}: {err}".replace("\n", " "), "CompensationFailed") from None

    # -- point-in-time recovery --------------------------------------------------------------

    @activity.defn(name=RECOVER_TO_POINT)
    async def recover_to_point(self, inp: PitrInput) -> Recovered:
        target = self.target(inp.environment)
        assert target.pitr is not None and target.pitr.work_dir is not None
        dsn = self.dsn(target)
        live = database_name(dsn)
        replacement = bounded_name(f"{live}_pitr", inp.key)  # `{live}_pitr` cut at 63 bytes could be `live` itself
        source = pitr.PitrSource(base_backup_dir=target.pitr.base_backup_dir, wal_archive_dir=target.pitr.wal_archive_dir,
                                 pg_bin_dir=target.pitr.pg_bin_dir)
        point = pitr.RecoveryTarget(restore_point=inp.restore_point,
                                    time=datetime.fromisoformat(inp.target_time) if inp.target_time else None)
        work = target.pitr.work_dir / inp.key.replace(":", "_")[-40:]
        async with heartbeating(f"point-in-time recovery to {point.describe()}"):
            if not await _database_exists(dsn, inp.retired_name):  # not swapped yet (a retry after the swap skips this)
                instance = await pitr.recover(source=source, target=point, work_dir=work)
                async with instance:
                    await pitr.copy_database(source_dsn=instance.dsn(live), target_admin_dsn=dsn, new_database=replacement,
                                             pg_bin_dir=target.pitr.pg_bin_dir, settings_from=live)
                # The scratch instance is stopped: its data directory (a whole cluster's size) has served.
                await asyncio.to_thread(shutil.rmtree, work, True)
            await self.close()  # our own pooled sessions on the live database would block the rename
            try:
                await pitr.swap_databases(admin_dsn=with_database(dsn, "postgres"), live=live, replacement=replacement,
                                          retired=inp.retired_name, marker=_retired_marker(inp.key, live),
                                          terminate_sessions=target.pitr.terminate_sessions,
                                          timeout=target.pitr.swap_timeout_seconds)
            except pitr.NameTaken as err:
                raise _fail(str(err), "PitrRefused") from None
        return Recovered(recovered_to=point.describe(), live=live, retired=inp.retired_name)

    @activity.defn(name=SWAP_BACK)
    async def swap_back(self, inp: SwapBackInput) -> SwappedBack:
        """Compensation of a recovery: the retired (pre-recovery) database becomes live again."""
        target = self.target(inp.environment)
        dsn = self.dsn(target)
        live = database_name(dsn)
        if not await _database_exists(dsn, inp.retired_name):
            return SwappedBack(swapped_back=False, why=f"{inp.retired_name} does not exist: the recovery never swapped")
        await self.close()
        try:
            await pitr.swap_databases(admin_dsn=with_database(dsn, "postgres"), live=live, replacement=inp.retired_name,
                                      retired=derived_name(inp.retired_name, live, "pitr_failed"),
                                      marker=_retired_marker(inp.key, live),
                                      terminate_sessions=target.pitr.terminate_sessions if target.pitr else False,
                                      timeout=target.pitr.swap_timeout_seconds if target.pitr else 120)
        except pitr.NameTaken as err:
            raise _fail(str(err), "CompensationFailed") from None
        return SwappedBack(swapped_back=True)

    @activity.defn(name=CURRENT_REVISION)
    async def current_revision(self, inp: BackupInput) -> str | None:
        target = self.target(inp.environment)
        async with self.connection(target) as conn:
            done = await applied(conn)
        return done[-1].revision if done else None


def build(shared: Shared) -> DatabaseRollback:
    return DatabaseRollback(shared.config)


async def _restored_since_revert(conn: asyncpg.Connection, revert: RevertResult, restore_key: str | None) -> str:
    """What re-applying a reverted migration would destroy again, in words ('' when nothing): what it
    dropped or retyped (the revert re-created it, and the restore or the application filled it since),
    and whatever the restore step wrote."""
    changes = revert.diff
    parts = [f"table {t}" for t in changes.dropped_tables]
    parts += [f"{t}({', '.join(c)})" for t, c in changes.dropped_columns.items()]
    parts += [f"the type of {t}({', '.join(c)})" for t, c in changes.retyped_columns.items()]
    if restore_key and (await restore_xids(conn, restore_key) or await _rebuilt_tables(conn, [restore_key])):
        parts.append("the values its restore step wrote")
    return ", ".join(parts)


async def _rebuilt_tables(conn: asyncpg.Connection, restore_keys: list[str]) -> dict[str, integrity.RebuiltTable]:
    """The tables these restores rebuilt: the integrity check reads who wrote their rows from the rebuild's record."""
    if not await conn.fetchval("SELECT to_regclass('rollback_meta.rebuilds') IS NOT NULL"):
        return {}
    rows = await conn.fetch("SELECT table_name, report FROM rollback_meta.rebuilds WHERE key = ANY($1::text[])", restore_keys)
    rebuilt = {}
    for row in rows:
        report = json.loads(row["report"])
        rebuilt[row["table_name"]] = integrity.RebuiltTable(authors=report["authors"], xids=report["rebuild_xids"])
    return rebuilt


def _integrity_specs(target: SchemaSnapshot, live: SchemaSnapshot) -> list[integrity.TableSpec]:
    """Tables in both shapes, over the columns in both: what must survive the rollback unchanged."""
    specs = []
    for name in sorted(set(target.tables) & set(live.tables)):
        if name.endswith(".alembic_version"):
            continue  # Alembic's bookkeeping: the down SQL changes it on purpose
        want, have = target.tables[name], live.tables[name]
        # A column whose type the rollback changes back cannot compare value for value: left out.
        columns = [c.name for c in have.columns if (w := want.column(c.name)) is not None and w.type == c.type]
        key = have.primary_key if set(have.primary_key) <= set(columns) else []
        specs.append(integrity.TableSpec(table=name, key=key, columns=columns))
    return specs


def _retired_marker(key: str, live: str) -> str:
    """The comment of a database retired by a swap: what it is, and which step retired it."""
    return f"rollback: the {live} database retired by {key}"


async def _database_exists(dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(with_database(dsn, "postgres"), timeout=10)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


def _backup_summary(manifest: BackupManifest) -> BackupSummary:
    return BackupSummary(id=manifest.id, revision=manifest.revision, next_revision=manifest.next_revision,
                         total_bytes=manifest.total_bytes, files=len(manifest.files), restore_point=manifest.restore_point,
                         verified_at=manifest.verified_at, created_at=manifest.created_at)

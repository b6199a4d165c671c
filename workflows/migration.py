"""DatabaseMigrationWorkflow: `rollback db migrate`, a verified backup before every migration.

Per pending revision: back up (pg_dump, checksums, restore point, catalog), apply the
migration in one transaction, record it as the database's current version (the previous
one becomes known-good). Under the environment's deployment lock, so a migration never
races a rollback. A migration that fails leaves the database as it was and keeps the backup.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from rollback.models import MigrateRequest, MigrateResult
    from rollback.payloads import ACQUIRE_LOCK, RECORD_DEPLOYED, RELEASE_LOCK, LockInput, RecordInput
    from rollback.targets.database import contract as database
    from rollback.targets.database.contract import AppliedMigration, BackupInput, BackupSummary, MigrationInput, MigrationPlan

from workflows.keys import effect_key
from workflows.saga import StepKind, call, describe_failure


@workflow.defn(name="DatabaseMigrationWorkflow")
class DatabaseMigrationWorkflow:
    def __init__(self) -> None:
        self._progress: list[str] = []

    @workflow.query
    def progress(self) -> list[str]:
        return self._progress

    @workflow.run
    async def run(self, raw: Any) -> MigrateResult:
        try:
            request = MigrateRequest.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in err.errors()[:5])
            raise ApplicationError(f"invalid MigrateRequest: {problems}", type="InvalidRequest", non_retryable=True) from None
        wf_id = workflow.info().workflow_id
        lock = LockInput(environment=request.environment, holder=wf_id)
        await call(ACQUIRE_LOCK, lock, None, attempts=5)
        try:
            return await self._migrate(request, wf_id)
        except ActivityError as err:
            raise ApplicationError(f"migration of {request.environment} failed: {describe_failure(err)}",
                                   type="MigrationFailed", non_retryable=True) from None
        finally:
            await call(RELEASE_LOCK, lock, None, attempts=20)

    async def _migrate(self, request: MigrateRequest, wf_id: str) -> MigrateResult:
        env = request.environment
        plan = await call(database.PLAN_MIGRATION, MigrationInput(environment=env, key=effect_key("plan"), revision=request.to_revision),
                          MigrationPlan, attempts=5)
        current, applied, backups = plan.current, [], []
        self._say(f"database at {current or 'no revision'}; to apply: {', '.join(plan.labels) or 'nothing'}")
        for revision, label in zip(plan.pending, plan.labels, strict=True):
            # Unique per run: two migrations started in the same second (one workflow id, reused
            # once the first ended) must not share a backup, or the second would reuse the first's.
            # (Run ids are UUIDv7: their head is a timestamp, their tail is random.)
            run = f"-{workflow.info().run_id[-8:]}" if workflow.patched("backup-id-per-run") else ""
            backup_id = f"{env}-{revision}-{wf_id.rsplit('-', 1)[-1]}{run}"
            self._say(f"backing up before {label} ({backup_id})")
            backup = await call(database.BACKUP, BackupInput(environment=env, key=effect_key("backup", revision), backup_id=backup_id,
                                                             revision=current, next_revision=revision),
                                BackupSummary, attempts=5, kind=StepKind.DATA)
            backups.append(backup_id)
            self._say(f"backup {backup_id}: {backup.total_bytes} bytes, restore point {backup.restore_point or 'none'}")
            self._say(f"applying {label}")
            await call(database.APPLY_MIGRATION, MigrationInput(environment=env, key=effect_key("apply", revision), revision=revision,
                                                                backup_id=backup_id), AppliedMigration, attempts=3, kind=StepKind.DATA)
            await call(RECORD_DEPLOYED, RecordInput(environment=env, target="database", version=revision,
                                                    key=effect_key("record", revision)), None, attempts=10)
            applied.append(revision)
            current = revision
            self._say(f"applied {label}; database at {revision}")
        return MigrateResult(execution_id=wf_id, environment=env, from_revision=plan.current, revision=current,
                             applied=applied, backups=backups)

    def _say(self, line: str) -> None:
        self._progress.append(f"{workflow.now():%H:%M:%S} {line}")

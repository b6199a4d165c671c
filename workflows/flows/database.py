"""The database's steps: a schema rollback with data restore (or a point-in-time recovery), then its checks."""

from __future__ import annotations

from functools import partial

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from rollback.models import Step, TargetPlan
    from rollback.targets.database.names import bounded_name
    from rollback.targets.database import contract as database
    from rollback.targets.database.contract import (
        BackupInput, BackupSummary, DbStepInput, IntegrityBrief, IntegrityInput, MigrationInput, MigrationToUndo, PitrInput,
        PitrParams, Reapplied, Recovered, RestoreInput, RestoreResult, RevertResult, SchemaRollbackParams, SnapshotDiscarded,
        SnapshotRef, SwapBackInput, SwappedBack,
    )

from workflows.flows import TargetRun
from workflows.keys import effect_key
from workflows.saga import StepKind, call

TARGET = "database"


def verify_backup(backup_id: str) -> Step:
    return Step(id=f"database.verify_backup.{backup_id}", name=f"verify backup {backup_id}", target=TARGET)


def revert(item: MigrationToUndo) -> Step:
    return Step(id=f"database.revert.{item.revision}", name=f"revert schema {item.label}", target=TARGET)


def reapply(item: MigrationToUndo) -> Step:
    return Step(id=f"database.reapply.{item.revision}", name=f"re-apply {item.label} (undo its revert)", target=TARGET)


def restore(item: MigrationToUndo) -> Step:
    return Step(id=f"database.restore.{item.revision}", name=f"restore data destroyed by {item.label}", target=TARGET)


def recover(params: PitrParams) -> Step:
    return Step(id="database.recover", name=params.describe(), target=TARGET)


def revision_is(revision: str) -> Step:
    return Step(id="database.revision", name=f"check database is at revision {revision}", target=TARGET)


INTEGRITY_BEFORE = Step(id="database.integrity_before", name="integrity snapshot before", target=TARGET)
DISCARD_SNAPSHOT = Step(id="database.discard_snapshot", name="discard the integrity snapshot", target=TARGET)
VALIDATE = Step(id="database.validate", name="validate database integrity", target=TARGET)
SWAP_BACK = Step(id="database.swap_back", name="swap the pre-recovery database back in", target=TARGET)


class DatabaseFlow:
    def steps(self, plan: TargetPlan) -> list[Step]:
        params = plan.params
        if isinstance(params, PitrParams):
            return [recover(params)]
        assert isinstance(params, SchemaRollbackParams)
        steps = [verify_backup(item.backup_id) for item in params.undo] + [INTEGRITY_BEFORE]
        for item in params.undo:
            steps += [revert(item), restore(item)]
        return [*steps, VALIDATE]

    async def execute(self, run: TargetRun) -> None:
        params = run.plan.params
        if isinstance(params, PitrParams):
            await self._recover(run, params)
        else:
            assert isinstance(params, SchemaRollbackParams)
            await self._roll_back_schema(run, params)

    async def _recover(self, run: TargetRun, params: PitrParams) -> None:
        recovery = effect_key("pitr")
        # Readable, and unique to this run whatever the environment's length: cut at 63 bytes, a
        # second recovery would find the first one's retired database and take it for its own.
        readable = f"retired_{workflow.info().workflow_id.removeprefix('rollback-')}".replace("-", "_")
        retired = bounded_name(readable, recovery) if workflow.patched("effect-keys-per-run") else readable[:63]
        swap_back = SwapBackInput(environment=run.environment, key=effect_key("swap_back"), retired_name=retired)
        run.saga.undo_with(SWAP_BACK, partial(call, database.SWAP_BACK, swap_back, SwappedBack, attempts=run.attempts,
                                              kind=StepKind.DATA))
        point = PitrInput(environment=run.environment, key=recovery, restore_point=params.restore_point,
                          target_time=params.target_time, retired_name=retired)
        await run.saga.run(recover(params), partial(call, database.RECOVER_TO_POINT, point, Recovered, attempts=run.attempts,
                                                    kind=StepKind.DATA))

    async def _roll_back_schema(self, run: TargetRun, params: SchemaRollbackParams) -> None:
        env, attempts = run.environment, run.attempts
        for item in params.undo:
            check = BackupInput(environment=env, key=effect_key("verify", item.backup_id), backup_id=item.backup_id, revision=None)
            await run.saga.run(verify_backup(item.backup_id), partial(
                call, database.VERIFY_BACKUP, check, BackupSummary, attempts=attempts, kind=StepKind.DATA))
        snapshot_key = effect_key("integrity")
        # Undone last, and registered before the step: if the rollback fails, the snapshot's per-row
        # hashes (a narrow copy of every fingerprinted row) would otherwise stay in rollback_archive,
        # also when the step stored them and then failed to report back.
        run.saga.undo_with(DISCARD_SNAPSHOT, partial(call, database.DISCARD_SNAPSHOT, DbStepInput(environment=env, key=snapshot_key),
                                                     SnapshotDiscarded, attempts=attempts))
        snapshot = await run.saga.run(INTEGRITY_BEFORE, partial(
            call, database.INTEGRITY_BEFORE, IntegrityInput(environment=env, key=snapshot_key, target_backup_id=params.target_backup_id),
            SnapshotRef, attempts=attempts, kind=StepKind.DATA))
        restores: list[RestoreResult] = []
        for item in params.undo:
            revert_in = MigrationInput(environment=env, key=effect_key("revert", item.revision), revision=item.revision,
                                       backup_id=item.backup_id, restore_key=effect_key("restore", item.revision))
            # Registered first: a revert whose transaction committed just before a crash must be undone too
            # (or, if it destroyed something, be left and stop the compensation: see Saga.compensate).
            run.saga.undo_with(reapply(item), partial(call, database.REAPPLY_MIGRATION, revert_in, Reapplied, attempts=attempts,
                                                      kind=StepKind.DATA))
            reverted = await run.saga.run(revert(item), partial(
                call, database.REVERT_MIGRATION, revert_in, RevertResult, attempts=attempts, kind=StepKind.DATA))
            restore_in = RestoreInput(environment=env, key=effect_key("restore", item.revision), revision=item.revision,
                                      backup_id=item.backup_id, revert=reverted, integrity_snapshot=snapshot.pg_snapshot)
            restores.append(await run.saga.run(restore(item), partial(
                call, database.RESTORE_DATA, restore_in, RestoreResult, attempts=attempts, kind=StepKind.DATA)))
        validate = database.ValidateDbInput(
            environment=env, key=effect_key("validate"), snapshot_label=snapshot.label,
            restore_keys=[effect_key("restore", i.revision) for i in params.undo],
            revert_keys=[effect_key("revert", i.revision) for i in params.undo])
        reports = run.saga.status.reports
        try:
            report = await run.saga.run(VALIDATE, partial(call, database.VALIDATE, validate, IntegrityBrief, attempts=attempts,
                                                          kind=StepKind.DATA))
        except ActivityError as err:
            if isinstance(err.cause, ApplicationError) and err.cause.details:
                reports["database_integrity"] = err.cause.details[0]  # the evidence of the failed check
            raise
        finally:
            reports["database_restore"] = [r.model_dump(mode="json") for r in restores]
        reports["database_integrity"] = report.model_dump(mode="json")

    async def validate(self, run: TargetRun) -> None:
        await run.saga.run(revision_is(run.plan.to_version), partial(self._revision_is, run))

    @staticmethod
    async def _revision_is(run: TargetRun) -> str:
        revision = await call(database.CURRENT_REVISION, BackupInput(environment=run.environment, key=effect_key("revision"),
                                                                     backup_id="-", revision=None), str, attempts=5)
        if revision != run.plan.to_version:
            raise ApplicationError(f"database is at revision {revision}, expected {run.plan.to_version}", type="Unhealthy",
                                   non_retryable=True)
        return revision


FLOW = DatabaseFlow()

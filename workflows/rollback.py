"""RollbackWorkflow: assessment -> coordination -> execution -> validation.

Deterministic: no I/O, time from workflow.now(); activities are called by name
with payload models from rollback.payloads, so this module never imports the
activity implementations (httpx, subprocess, ...).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from functools import partial
from typing import Any, Awaitable, Callable

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from rollback.models import (
        Approval, ApprovalRecord, HealthReport, Phase, RollbackPlan, RollbackRequest, RollbackResult,
        RollbackStatus, StepRecord, TargetPlan,
    )
    from rollback.payloads import (
        BackupInput, BatchInput, BatchResult, DbStepInput, IntegrityInput, LockInput, MigrationInput, Notification,
        NotifyResult, PitrInput, RecordInput, RestoreInput, SnapshotRef, SwapBackInput, SwitchInput, SwitchResult,
        ValidateDbInput, ValidateInput,
    )
    from rollback.names import bounded_name
    from rollback.settings import SA_ENVIRONMENT, SA_PHASE, SA_STATE, SA_TARGETS, SA_TRIGGER

from workflows.keys import effect_key

# Errors that retrying cannot fix; activities also mark them non-retryable themselves.
NON_RETRYABLE = ["InvalidRequest", "AssessmentRefused", "EnvironmentLocked", "UnhealthyAfterDeploy", "IntegrityViolation",
                 "BackupCorrupt", "RevertFailed", "MigrationFailed", "CredentialsMissing"]
HEARTBEAT = timedelta(seconds=10)


def retry(attempts: int) -> RetryPolicy:
    return RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                       maximum_interval=timedelta(seconds=20), maximum_attempts=attempts,
                       non_retryable_error_types=NON_RETRYABLE)


class Rejected(Exception):
    """The rollback was not approved (rejected, or the approval timed out)."""


def describe_failure(err: BaseException) -> str:
    """The innermost message of a Temporal failure chain: what actually went wrong."""
    while isinstance(err, FailureError) and err.cause is not None:
        err = err.cause
    return str(err) or type(err).__name__


def decode_request(raw: Any) -> RollbackRequest:
    """Turn whatever arrived (JSON from the UI, a model from our client) into a request.

    A typed argument that fails to decode would fail the workflow *task*, which
    Temporal retries forever; decoding here fails the workflow instead, at once.
    """
    try:
        return RollbackRequest.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in err.errors()[:5]
        )
        raise ApplicationError(f"invalid RollbackRequest: {problems}", type="InvalidRequest", non_retryable=True) from None


@workflow.defn(name="RollbackWorkflow")
class RollbackWorkflow:
    def __init__(self) -> None:
        self._status: RollbackStatus | None = None
        self._decision: tuple[str, Approval] | None = None
        self._lock_held = False
        self._health_timeout: timedelta | None = None
        self._undo: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = []
        self._halted: str | None = None  # why compensation stopped short (see _compensate)

    # -- interface ------------------------------------------------------------

    @workflow.run
    async def run(self, raw: Any) -> RollbackResult:
        info = workflow.info()
        request = decode_request(raw)
        self._status = RollbackStatus(
            workflow_id=info.workflow_id, environment=request.environment,
            targets=[t.value for t in request.targets], trigger=request.trigger.value,
            initiated_by=request.initiated_by, reason=request.reason,
            phase=Phase.PENDING, state=Phase.PENDING, started_at=workflow.now(), dry_run=request.dry_run,
        )
        workflow.upsert_search_attributes([
            SA_ENVIRONMENT.value_set(request.environment), SA_TRIGGER.value_set(request.trigger.value),
            SA_TARGETS.value_set([t.value for t in request.targets]),
        ])
        try:
            plan = await self._assessment(request)
            await self._coordination(request, plan)
            if request.dry_run:
                return await self._finish(Phase.SUCCEEDED, plan, None)
            await self._execution(request, plan)
            await self._validation(request, plan)
            return await self._finish(Phase.SUCCEEDED, plan, None)
        except Rejected as why:
            return await self._finish(Phase.REJECTED, self._status.plan, str(why))
        except (asyncio.CancelledError, ActivityError, ApplicationError) as err:
            if is_cancelled_exception(err):
                # Cancelled from the UI or CLI: undo what was done, then end as cancelled.
                undone = await self._compensate()
                await self._finish(Phase.CANCELLED, self._status.plan, "cancelled by request" if undone else
                                   "cancelled by request; " + (self._halted or "some undo steps failed, see steps"))
                raise
            message = describe_failure(err)
            planned = self._status.plan  # None when the assessment itself failed
            if self._undo and planned is not None and planned.on_failure == "halt":
                await self._finish(Phase.FAILED, planned, f"{message} (halted by policy: completed steps left in place; page the on-call)")
            else:
                state = Phase.COMPENSATED if self._undo and await self._compensate() else Phase.FAILED
                await self._finish(state, planned, f"{message}; {self._halted}" if self._halted else message)
            raise ApplicationError(f"rollback {self._status.state.value}: {message}", type="RollbackFailed",
                                   non_retryable=True) from None

    @workflow.signal
    def approve(self, payload: Any) -> None:
        self._decide("approved", payload)

    @workflow.signal
    def reject(self, payload: Any) -> None:
        self._decide("rejected", payload)

    @workflow.signal
    def attach_incident(self, incident: dict[str, Any]) -> None:
        """A monitor saw another incident while this rollback runs: keep it on the record."""
        if self._status is not None and isinstance(incident, dict):
            # What the monitor sends (activities/incidents.py), cut: anyone may signal, and the status,
            # every query and the memo carry the last 20.
            kept: dict[str, Any] = {name: str(incident[name])[:2000] for name in ("key", "reason", "trigger") if name in incident}
            self._status.incidents = (self._status.incidents + [kept])[-20:]

    @workflow.query
    def status(self) -> RollbackStatus:
        if self._status is None:
            raise ApplicationError("the rollback has not started yet")
        return self._status

    def _decide(self, decision: str, payload: Any) -> None:
        try:
            approval = Approval.model_validate(payload if payload is not None else {})
        except ValidationError as err:
            # A signal cannot fail back to its sender; record and ignore a malformed one.
            workflow.logger.warning("ignoring %s signal with invalid payload: %s", decision, err.errors()[:1])
            return
        if self._status is None or self._status.approval.decision != "pending":
            # Nobody can approve a plan before it is shown to them: early or late
            # decisions are logged and ignored.
            workflow.logger.warning("ignoring %s by %s: no approval is pending", decision, approval.by)
            return
        if self._decision is None:
            self._decision = (decision, approval)

    # -- phases ---------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        assert self._status is not None
        self._status.phase = phase
        self._status.state = phase
        self._status.phase_started[phase.value] = workflow.now()
        workflow.upsert_search_attributes([SA_PHASE.value_set(phase.value), SA_STATE.value_set(phase.value)])

    async def _assessment(self, request: RollbackRequest) -> RollbackPlan:
        self._enter(Phase.ASSESSMENT)
        plan = await self._step("assess", "all", lambda: workflow.execute_activity(
            "coordination.plan", request,
            result_type=RollbackPlan, start_to_close_timeout=timedelta(minutes=2), retry_policy=retry(3)))
        assert self._status is not None
        self._status.plan = plan
        self._health_timeout = timedelta(seconds=plan.health_check_timeout_seconds)
        self._status.steps.append(StepRecord(name="acquire deployment lock", target="all"))
        for target in plan.targets:
            self._status.steps += [StepRecord(name=name, target=target.target.value) for name in target.steps]
        return plan

    async def _coordination(self, request: RollbackRequest, plan: RollbackPlan) -> None:
        self._enter(Phase.COORDINATION)
        await self._step("acquire deployment lock", "all", lambda: self._activity(
            "coordination.acquire_lock", self._lock_input(), None, attempts=5))
        self._lock_held = True
        targets = ", ".join(f"{t.target.value} {t.from_version} -> {t.to_version}" for t in plan.targets)
        await self._notify("started", f"rollback of {request.environment} started by {request.initiated_by} "
                                      f"({request.trigger.value}): {targets}. Reason: {request.reason or 'n/a'}")
        if plan.require_approval:
            await self._await_approval(plan)

    async def _await_approval(self, plan: RollbackPlan) -> None:
        assert self._status is not None
        timeout = timedelta(seconds=plan.approval_timeout_seconds)
        record = ApprovalRecord(required=True, reason=plan.approval_reason, decision="pending",
                                deadline=workflow.now() + timeout)
        self._status.approval = record
        await self._notify("approval_requested", f"rollback {workflow.info().workflow_id} waits for approval "
                                                 f"until {record.deadline:%Y-%m-%d %H:%M:%S} UTC")
        try:
            await workflow.wait_condition(lambda: self._decision is not None, timeout=timeout)
        except asyncio.TimeoutError:
            record.decided_at = workflow.now()
            record.decision = "timed_out"
            if plan.on_approval_timeout == "proceed":
                return
            raise Rejected(f"no approval within {plan.approval_timeout_seconds}s") from None
        assert self._decision is not None
        decision, approval = self._decision
        record.decision, record.by, record.comment, record.decided_at = decision, approval.by, approval.comment, workflow.now()  # type: ignore[assignment]
        if decision == "rejected":
            raise Rejected(f"rejected by {approval.by}" + (f": {approval.comment}" if approval.comment else ""))

    async def _execution(self, request: RollbackRequest, plan: RollbackPlan) -> None:
        self._enter(Phase.EXECUTION)
        if plan.require_approval:
            # Renew the lock's lease: the approval may have taken a while.
            await self._activity("coordination.acquire_lock", self._lock_input(), None, attempts=5)
        for target in plan.targets:
            if target.target.value == "backend":
                await self._execute_backend(request.environment, target, plan.max_attempts)
            elif target.target.value == "database":
                await self._execute_database(request.environment, target, plan.max_attempts)

    async def _execute_backend(self, environment: str, target: TargetPlan, attempts: int) -> None:
        to, back = target.to_version, target.from_version or target.to_version
        if target.strategy == "blue_green":
            colour, previous = target.params["colour"], target.params.get("previous_colour")
            switch = SwitchInput(environment=environment, colour=colour, expect_version=to)
            await self._step(f"verify standby {colour}", "backend", lambda: self._healthy(
                "backend.check_standby", switch, attempts))
            if previous:
                # Registered before the switch: a switch that reloaded nginx but then
                # failed to settle must be undone too (switching back is declarative).
                undo = SwitchInput(environment=environment, colour=previous, expect_version=back)
                self._undo.append((f"switch traffic back to {previous}", "backend", lambda: self._activity(
                    "backend.switch_traffic", undo, SwitchResult, attempts=attempts, long=True)))
            await self._step(f"switch traffic to {colour}", "backend", lambda: self._activity(
                "backend.switch_traffic", switch, SwitchResult, attempts=attempts, long=True))
        else:
            batches: list[list[str]] = target.params["batches"]
            for number, batch in enumerate(batches, 1):
                names = ", ".join(batch)
                # Register the undo first: a batch that fails half-way must be reverted too.
                undo_batch = BatchInput(environment=environment, instances=batch, version=back, require_healthy=False)
                self._undo.append((f"revert batch {number}/{len(batches)}: {names}", "backend",
                                   partial(self._activity, "backend.roll_batch", undo_batch, BatchResult, attempts=attempts, long=True)))
                batch_input = BatchInput(environment=environment, instances=batch, version=to)
                await self._step(f"roll batch {number}/{len(batches)}: {names}", "backend", partial(
                    self._activity, "backend.roll_batch", batch_input, BatchResult, attempts=attempts, long=True))
        await self._step("validate backend", "backend", lambda: self._healthy(
            "backend.validate", ValidateInput(environment=environment, expect_version=to), attempts))

    async def _execute_database(self, environment: str, target: TargetPlan, attempts: int) -> None:
        wf_id = workflow.info().workflow_id
        if target.strategy == "pitr":
            recovery = effect_key("pitr")
            # Readable, and unique to this run whatever the environment's length: cut at 63 bytes, a
            # second recovery would find the first one's retired database and take it for its own.
            readable = f"retired_{wf_id.removeprefix('rollback-')}".replace("-", "_")
            retired = bounded_name(readable, recovery) if workflow.patched("effect-keys-per-run") else readable[:63]
            recover = PitrInput(environment=environment, key=recovery, restore_point=target.params.get("restore_point"),
                                target_time=target.params.get("target_time"), retired_name=retired)
            self._undo.append(("swap the pre-recovery database back in", "database", lambda: self._activity(
                "database.swap_back", SwapBackInput(environment=environment, key=effect_key("swap_back"), retired_name=retired),
                dict, attempts=attempts, long=True)))
            await self._step(target.steps[0], "database", lambda: self._activity(
                "database.pitr", recover, dict, attempts=attempts, long=True))
            return
        undo: list[dict[str, str]] = target.params["undo"]
        for item in undo:
            await self._step(f"verify backup {item['backup_id']}", "database", partial(
                self._activity, "database.verify_backup", BackupInput(environment=environment, key=effect_key("verify", item["backup_id"]),
                                                                     backup_id=item["backup_id"], revision=None), dict,
                attempts=attempts, long=True))
        snapshot_key = effect_key("integrity")
        # Undone last, and registered before the step: if the rollback fails, the snapshot's per-row
        # hashes (a narrow copy of every fingerprinted row) would otherwise stay in rollback_archive,
        # also when the step stored them and then failed to report back.
        self._undo.append(("discard the integrity snapshot", "database", lambda: self._activity(
            "database.discard_snapshot", DbStepInput(environment=environment, key=snapshot_key), dict, attempts=attempts)))
        snapshot: SnapshotRef = await self._step("integrity snapshot before", "database", lambda: self._activity(
            "database.integrity_before", IntegrityInput(environment=environment, key=snapshot_key,
                                                        target_backup_id=target.params["target_backup_id"]),
            SnapshotRef, attempts=attempts, long=True))
        restores: list[dict[str, Any]] = []
        for item in undo:
            revert_in = MigrationInput(environment=environment, key=effect_key("revert", item["revision"]),
                                       revision=item["revision"], backup_id=item["backup_id"],
                                       restore_key=effect_key("restore", item["revision"]))
            # Registered first: a revert whose transaction committed just before a crash must be undone too
            # (or, if it destroyed something, be left and stop the compensation: see _compensate).
            self._undo.append((f"re-apply {item['label']} (undo its revert)", "database", partial(
                self._activity, "database.reapply_migration", revert_in, dict, attempts=attempts, long=True)))
            revert = await self._step(f"revert schema {item['label']}", "database", partial(
                self._activity, "database.revert_migration", revert_in, dict, attempts=attempts, long=True))
            restore_in = RestoreInput(environment=environment, key=effect_key("restore", item["revision"]),
                                      revision=item["revision"], backup_id=item["backup_id"], revert=revert,
                                      integrity_snapshot=snapshot.pg_snapshot)
            restores.append(await self._step(f"restore data destroyed by {item['label']}", "database", partial(
                self._activity, "database.restore_data", restore_in, dict, attempts=attempts, long=True)))
        validate = ValidateDbInput(environment=environment, key=effect_key("validate"), snapshot_label=snapshot.label,
                                   restore_keys=[effect_key("restore", i["revision"]) for i in undo],
                                   revert_keys=[effect_key("revert", i["revision"]) for i in undo])
        assert self._status is not None
        try:
            report = await self._step("validate database integrity", "database", lambda: self._activity(
                "database.validate", validate, dict, attempts=attempts, long=True))
        except ActivityError as err:
            if isinstance(err.cause, ApplicationError) and err.cause.details:
                self._status.reports["database_integrity"] = err.cause.details[0]  # the evidence of the failed check
            raise
        finally:
            self._status.reports["database_restore"] = restores
        self._status.reports["database_integrity"] = report

    async def _validation(self, request: RollbackRequest, plan: RollbackPlan) -> None:
        self._enter(Phase.VALIDATION)
        for target in plan.targets:
            if target.target.value == "backend":
                # Execution already checked health after each step; this is the end-to-end
                # view: every smoke path through the front door, with a p95 latency bound.
                await self._step("smoke and performance check: backend", "backend", partial(self._healthy,
                    "backend.smoke", ValidateInput(environment=request.environment, expect_version=target.to_version),
                    plan.max_attempts))
        for target in plan.targets:
            if target.target.value == "database":
                await self._step(f"check database is at revision {target.to_version}", "database", partial(
                    self._revision_is, request.environment, target.to_version))
        for target in plan.targets:
            record = RecordInput(environment=request.environment, target=target.target.value,
                                 version=target.to_version, key=effect_key("record", target.target.value))
            await self._step(f"record {target.target.value} {target.to_version} as current and known-good",
                             target.target.value, partial(self._activity, "coordination.record_restored", record, None, attempts=10))
        # The steps are done; nothing left to undo if a later notification fails.
        self._undo.clear()

    async def _revision_is(self, environment: str, expected: str) -> str:
        revision = await self._activity("database.current_revision", BackupInput(
            environment=environment, key=effect_key("revision"), backup_id="-", revision=None), str, attempts=5)
        if revision != expected:
            raise ApplicationError(f"database is at revision {revision}, expected {expected}", type="Unhealthy", non_retryable=True)
        return revision

    # -- compensation and the end ----------------------------------------------

    async def _compensate(self) -> bool:
        """Undo completed steps in reverse order. True if every undo step succeeded.

        A database revert that destroyed something (a dropped column's values restored since, a
        table re-created and refilled) is never undone by re-applying its migration: that step
        refuses (RevertIrreversible) and compensation stops there, leaving every earlier step as
        it is too, since an older backend or frontend put back against the reverted schema would
        be worse than the tiers as the rollback left them. The status says so, and it pages.
        """
        assert self._status is not None
        ok = True
        while self._undo:
            name, target, undo = self._undo.pop()
            try:
                await self._step(name, target, undo, planned=False)
            except (ActivityError, ApplicationError) as err:
                if _failure_type(err) == "RevertIrreversible":
                    self._status.steps[-1].state = "skipped"
                    self._halted = (f"not compensated: {describe_failure(err)}; the earlier steps are left as they are "
                                    f"({len(self._undo)} undo step(s) not run). Page the on-call.")
                    self._undo.clear()
                    await self._notify("needs_attention", self._halted, severity="page")
                    return False
                ok = False  # keep undoing the rest; the step record says what failed
        return ok

    async def _finish(self, state: Phase, plan: RollbackPlan | None, error: str | None) -> RollbackResult:
        assert self._status is not None
        self._status.error = error
        if self._lock_held:
            await self._activity("coordination.release_lock", self._lock_input(), None, attempts=20)
            self._lock_held = False
        self._status.state = state  # before the notification, which carries it
        await self._notify(state.value, f"rollback {workflow.info().workflow_id} of {self._status.environment} "
                                        f"ended {state.value}" + (f": {error}" if error else ""))
        self._status.finished_at = workflow.now()
        workflow.upsert_search_attributes([SA_STATE.value_set(state.value), SA_PHASE.value_set(state.value)])
        self._status.phase = state
        # The final record, readable from the execution itself: no worker needed to
        # inspect a finished rollback (queries need one).
        workflow.upsert_memo({"status": self._status})
        done = plan is not None and state == Phase.SUCCEEDED and not self._status.dry_run
        restored = {t.target.value: t.to_version for t in plan.targets} if done and plan else {}
        return RollbackResult(
            execution_id=workflow.info().workflow_id, environment=self._status.environment, state=state,
            restored=restored, phase_seconds=self._phase_seconds(), started_at=self._status.started_at,
            finished_at=self._status.finished_at, error=error,
        )

    def _phase_seconds(self) -> dict[str, float]:
        assert self._status is not None
        marks = sorted(self._status.phase_started.items(), key=lambda kv: kv[1])
        end = self._status.finished_at or workflow.now()
        return {name: round(((marks[i + 1][1] if i + 1 < len(marks) else end) - at).total_seconds(), 3)
                for i, (name, at) in enumerate(marks)}

    # -- helpers ----------------------------------------------------------------

    def _lock_input(self) -> LockInput:
        assert self._status is not None
        return LockInput(environment=self._status.environment, holder=workflow.info().workflow_id)

    async def _notify(self, event: str, message: str, *, severity: str = "info") -> None:
        assert self._status is not None
        note = Notification(environment=self._status.environment, event=event, message=message,
                            key=effect_key(event),
                            fields={"workflow_id": workflow.info().workflow_id, "state": self._status.state.value,
                                    "severity": severity})
        try:
            await self._activity("notify.send", note, NotifyResult, attempts=5)
        except ActivityError as err:
            # A notification failure must never stop or fail a rollback.
            workflow.logger.warning("notification %s failed: %s", event, describe_failure(err))

    def _activity(self, name: str, arg: BaseModel, result_type: type | None, *, attempts: int, long: bool = False,
                  deadline: timedelta | None = None) -> Awaitable[Any]:
        # Database steps (restores, recoveries) can take hours on big tables; a dead worker is
        # still noticed within the heartbeat timeout.
        limit = timedelta(hours=4) if long and name.startswith("database.") else timedelta(minutes=10 if long else 2)
        return workflow.execute_activity(
            name, arg, result_type=result_type, schedule_to_close_timeout=deadline,
            start_to_close_timeout=limit,
            heartbeat_timeout=HEARTBEAT if long else None, retry_policy=retry(attempts),
            # On cancellation, wait until a running step has really stopped before
            # compensating, or the undo could race the step it undoes.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    async def _healthy(self, name: str, arg: BaseModel, attempts: int) -> HealthReport:
        report: HealthReport = await self._activity(name, arg, HealthReport, attempts=attempts, long=True,
                                                     deadline=self._health_timeout)
        if not report.healthy:
            raise ApplicationError(f"{report.url}: {report.successes}/{report.samples} healthy samples "
                                   f"(need {report.required_ratio:.0%}): {report.detail}", type="Unhealthy", non_retryable=True)
        return report

    async def _step(self, name: str, target: str, run: Callable[[], Awaitable[Any]], *, planned: bool = True) -> Any:
        """Run one step, keeping its record in `status` current."""
        assert self._status is not None
        record = next((s for s in self._status.steps if s.name == name and s.state == "pending"), None) if planned else None
        if record is None:
            record = StepRecord(name=name, target=target)
            self._status.steps.append(record)
        record.state, record.started, record.attempts = "running", workflow.now(), record.attempts + 1
        try:
            result = await run()
        except (ActivityError, ApplicationError, asyncio.CancelledError) as err:
            record.state, record.finished = "failed", workflow.now()
            record.detail = "cancelled" if isinstance(err, asyncio.CancelledError) else describe_failure(err)
            raise
        record.state, record.finished = ("compensated" if not planned else "succeeded"), workflow.now()
        record.attempts = result.get("attempt", record.attempts) if isinstance(result, dict) else getattr(result, "attempt", record.attempts)
        record.detail = _summary(result)[:2000]  # a step record lives in the status, the memo and every query
        if planned and _cancel_requested():
            raise asyncio.CancelledError("cancel requested while this step ran to completion")
        return result


def _failure_type(err: BaseException) -> str | None:
    """The type of the innermost ApplicationError of a failure chain (what the activity raised)."""
    found = None
    while err is not None:
        if isinstance(err, ApplicationError):
            found = err.type
        err = err.cause if isinstance(err, FailureError) else None  # type: ignore[assignment]
    return found


def _cancel_requested() -> bool:
    """True once the workflow was asked to cancel, even if the step it interrupted finished.

    A step awaited with WAIT_CANCELLATION_COMPLETED may complete instead of
    stopping; asyncio then hands back its result and the cancellation would be lost.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _summary(result: Any) -> str:
    if isinstance(result, HealthReport):
        versions = f", versions {result.versions}" if result.versions else ""
        return f"{result.successes}/{result.samples} healthy, p95 {result.p95_latency_ms} ms{versions}"
    if isinstance(result, SwitchResult):
        return f"{'reloaded nginx' if result.reloaded else 'already live'}; front door {result.front_door_versions}"
    if isinstance(result, SnapshotRef):
        return (f"{result.tables} tables, {result.rows} rows fingerprinted in one REPEATABLE READ snapshot "
                f"({result.seconds:.2f} s), kept in the database as {result.label}")
    if isinstance(result, BatchResult):
        return f"restarted {result.restarted or 'none (already on version)'}; {result.reloads} nginx reloads"
    if isinstance(result, dict):
        return _database_summary(result)
    if isinstance(result, RollbackPlan):
        return "; ".join(f"{t.target.value}: {t.strategy} {t.from_version} -> {t.to_version}" for t in result.targets)
    return ""


def _restore_method(table: dict[str, Any]) -> str:
    if table.get("method") == "rebuild":
        return f" (table rebuilt; {table.get('caught_up', 0)} changes made during the rebuild re-synced)"
    return f" ({table['note'][:200]})" if table.get("note") else ""


def _database_summary(result: dict[str, Any]) -> str:
    """One line for a database step's result (plain dicts: their models live beside asyncpg code)."""
    if "archived" in result:
        archived = ", ".join(f"{a['source']} -> rollback_archive.{a['archive_table']} ({a['rows']} rows)" for a in result["archived"])
        again = " (done by an earlier attempt)" if result.get("repeated") else ""
        return f"down SQL applied{again}; archived: {archived or 'nothing'}"
    if "tables" in result and isinstance(result["tables"], list):
        parts = [f"{t['table']} {t['mode']}: {t['restored']} restored, "
                 + (f"{t.get('reinserted', 0)} deleted rows inserted again, {t.get('key_reused', 0)} keys re-used by the "
                    "application (its rows kept), " if t["mode"] == "captured" else "")
                 + f"{t['missing_in_live']} deleted since, {t['kept_application_version']} kept as the application "
                 f"wrote them{_restore_method(t)}" for t in result["tables"]]
        return "; ".join(parts) or "nothing to restore"
    if "summary" in result:
        return str(result["summary"])
    if "total_bytes" in result:
        return f"backup {result['id']}: {result['files']} files, {result['total_bytes']} bytes, checksums verified"
    if "recovered_to" in result:
        return f"recovered to {result['recovered_to']}; previous database kept as {result['retired']}"
    return ", ".join(f"{k}: {v}" for k, v in result.items())[:300]

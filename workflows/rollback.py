"""RollbackWorkflow: assessment -> coordination -> execution -> validation.

Reads top to bottom as the four phases. It knows no target by name: each target's steps are
its flow (workflows/flows/<target>.py), found through rollback.targets.registry; the step
runner, the undo stack and the activity options are workflows/saga.py.

Deterministic: no I/O, time from workflow.now(); activities are called by the name constants
of their contracts, so this module never imports the activity implementations.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from functools import partial
from importlib import import_module
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from rollback.models import (
        LOCK_STEP, Approval, ApprovalRecord, Phase, RollbackPlan, RollbackRequest, RollbackResult, RollbackStatus, Step, TargetPlan,
    )
    from rollback.payloads import (
        ACQUIRE_LOCK, PLAN_ROLLBACK, RECORD_DEPLOYED, RECORD_RESTORED, RELEASE_LOCK, SEND_NOTIFICATION, LockInput, Notification,
        NotifyResult, RecordInput,
    )
    from rollback.settings import SA_ENVIRONMENT, SA_PHASE, SA_STATE, SA_TARGETS, SA_TRIGGER
    from rollback.targets.registry import TARGETS

from workflows.flows import TargetFlow, TargetRun
from workflows.keys import effect_key
from workflows.saga import Saga, call, describe_failure

# Each target's flow, by target name (the registry names the module; each defines FLOW).
FLOWS: dict[str, TargetFlow] = {t.name: import_module(t.flow).FLOW for t in TARGETS}

ASSESS = Step(id="assess", name="assess", target="all")


def flow_of(target: TargetPlan) -> TargetFlow:
    flow = FLOWS.get(target.target.value)
    if flow is None:  # a plan names a target with no slice: fail, never pass through doing nothing
        raise ApplicationError(f"no flow for target {target.target.value!r} (rollback/targets/registry.py)",
                               type="InvalidRequest", non_retryable=True)
    return flow


class Rejected(Exception):
    """The rollback was not approved (rejected, or the approval timed out)."""


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
        self._saga: Saga | None = None
        self._decision: tuple[str, Approval] | None = None
        self._lock_held = False

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
        self._saga = saga = Saga(self._status)
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
                undone = await saga.compensate(self._page)
                await self._finish(Phase.CANCELLED, self._status.plan, "cancelled by request" if undone else
                                   "cancelled by request; " + (saga.halted or "some undo steps failed, see steps"))
                raise
            message = describe_failure(err)
            planned = self._status.plan  # None when the assessment itself failed
            if saga.has_undo and planned is not None and planned.on_failure == "halt":
                await self._finish(Phase.FAILED, planned, f"{message} (halted by policy: completed steps left in place; page the on-call)")
            else:
                state = Phase.COMPENSATED if saga.has_undo and await saga.compensate(self._page) else Phase.FAILED
                await self._finish(state, planned, f"{message}; {saga.halted}" if saga.halted else message)
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
        plan = await self.saga.run(ASSESS, partial(call, PLAN_ROLLBACK, request, RollbackPlan, attempts=3))
        # The flows declare the steps: the plan shows them and the status records them, by id.
        declared = [flow_of(target).steps(target) for target in plan.targets]
        for target, steps in zip(plan.targets, declared, strict=True):
            target.steps = [step.name for step in steps]
        self.saga.status.plan = plan
        self.saga.declare([LOCK_STEP] + [step for steps in declared for step in steps])
        return plan

    async def _coordination(self, request: RollbackRequest, plan: RollbackPlan) -> None:
        self._enter(Phase.COORDINATION)
        await self.saga.run(LOCK_STEP, partial(call, ACQUIRE_LOCK, self._lock_input(), None, attempts=5))
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
            await call(ACQUIRE_LOCK, self._lock_input(), None, attempts=5)
        for target in plan.targets:
            await flow_of(target).execute(self._run(request, plan, target))

    async def _validation(self, request: RollbackRequest, plan: RollbackPlan) -> None:
        self._enter(Phase.VALIDATION)
        for target in plan.targets:
            await flow_of(target).validate(self._run(request, plan, target))
        for target in plan.targets:
            name = target.target.value
            if request.promote:
                # A forward switch is a deploy: the new release becomes current, the one it left known-good.
                deployed = RecordInput(environment=request.environment, target=name, version=target.to_version,
                                       key=effect_key("record", name))
                await self.saga.run(Step(id=f"{name}.record", name=f"record {name} {target.to_version} as deployed", target=name),
                                    partial(call, RECORD_DEPLOYED, deployed, None, attempts=10))
                continue
            record = RecordInput(environment=request.environment, target=name, version=target.to_version,
                                 key=effect_key("record", name), rolled_back_from=target.from_version,
                                 rollback=workflow.info().workflow_id, by=request.initiated_by)
            await self.saga.run(Step(id=f"{name}.record", name=f"record {name} {target.to_version} as current and known-good",
                                     target=name), partial(call, RECORD_RESTORED, record, None, attempts=10))
        # The steps are done; nothing left to undo if a later notification fails.
        self.saga.forget_undo()

    def _run(self, request: RollbackRequest, plan: RollbackPlan, target: TargetPlan) -> TargetRun:
        return TargetRun(saga=self.saga, environment=request.environment, plan=target, attempts=plan.max_attempts,
                         health_deadline=timedelta(seconds=plan.health_check_timeout_seconds))

    # -- the end ----------------------------------------------------------------

    async def _finish(self, state: Phase, plan: RollbackPlan | None, error: str | None) -> RollbackResult:
        assert self._status is not None
        self._status.error = error
        if self._lock_held:
            await call(RELEASE_LOCK, self._lock_input(), None, attempts=20)
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

    @property
    def saga(self) -> Saga:
        assert self._saga is not None, "set when the run starts"
        return self._saga

    async def _page(self, message: str) -> None:
        await self._notify("needs_attention", message, severity="page")

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
            await call(SEND_NOTIFICATION, note, NotifyResult, attempts=5)
        except ActivityError as err:
            # A notification failure must never stop or fail a rollback.
            workflow.logger.warning("notification %s failed: %s", event, describe_failure(err))

"""Where an external trigger goes: to the environment's monitor if one runs, else straight to a rollback.

The monitor owns incident handling (dedupe by key, pause, attaching to a running
rollback), so when it runs it gets every trigger. Without a monitor the trigger starts
a RollbackWorkflow itself, but never a second one beside a running rollback.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from rollback.client import RollbackError, RollbackOrchestrator, monitor_id
from rollback.models import RollbackRequest, RollbackTarget
from rollback.monitoring import TriggerRequest

MONITOR_SIGNAL = "trigger_rollback"
DEFAULT_TARGETS = [RollbackTarget.BACKEND]


class TriggerOutcome(BaseModel):
    """What happened to one trigger. `started` is True only if this call started a rollback."""

    routed_to: Literal["monitor", "rollback"]
    workflow_id: str | None
    started: bool
    detail: str


async def route_trigger(orchestrator: RollbackOrchestrator, environment: str, request: TriggerRequest) -> TriggerOutcome:
    if await _monitor_running(orchestrator, environment):
        try:
            return await _signal_monitor(orchestrator, environment, request)
        except RPCError as err:
            # The monitor ended between describe and signal: fall through to a direct start.
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
    return await _start_rollback(orchestrator, environment, request)


async def _monitor_running(orchestrator: RollbackOrchestrator, environment: str) -> bool:
    handle = (await orchestrator.client()).get_workflow_handle(monitor_id(environment))
    try:
        described = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return described.status == WorkflowExecutionStatus.RUNNING


async def _signal_monitor(orchestrator: RollbackOrchestrator, environment: str, request: TriggerRequest) -> TriggerOutcome:
    workflow_id = monitor_id(environment)
    # No run id: after a continue-as-new the signal goes to the monitor's current run.
    await (await orchestrator.client()).get_workflow_handle(workflow_id).signal(MONITOR_SIGNAL, request)
    return TriggerOutcome(routed_to="monitor", workflow_id=workflow_id, started=False,
                          detail=f"handed to {workflow_id}, which starts a rollback or attaches to the running one "
                                 "(it dedupes, honours a pause and attaches to a running rollback)")


async def _start_rollback(orchestrator: RollbackOrchestrator, environment: str, request: TriggerRequest) -> TriggerOutcome:
    running = await orchestrator.running_rollback(environment)
    if running:
        return _already_running(environment, running)
    rollback = RollbackRequest(
        environment=environment, targets=request.targets or DEFAULT_TARGETS, trigger=request.trigger,
        initiated_by=request.initiated_by, reason=request.reason, require_approval=request.require_approval,
        evidence=request.evidence,
    )
    try:
        started = await orchestrator.start(rollback)
    except RollbackError as err:
        # Lost a race with another start (the client is connected, so that is the only
        # refusal left): report the one that won, never start a second. Listing may lag.
        running = await orchestrator.running_rollback(environment)
        if running is None:
            return TriggerOutcome(routed_to="rollback", workflow_id=None, started=False, detail=f"{err}; none started")
        return _already_running(environment, running)
    return TriggerOutcome(routed_to="rollback", workflow_id=started.execution_id, started=True,
                          detail=f"started {started.execution_id}")


def _already_running(environment: str, workflow_id: str) -> TriggerOutcome:
    return TriggerOutcome(routed_to="rollback", workflow_id=workflow_id, started=False,
                          detail=f"a rollback is already running for {environment}: {workflow_id}; none started")

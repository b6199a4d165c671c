"""Turning an incident into a rollback, at most once.

The rollback's workflow id is derived from the incident, so a retried start finds
the rollback it already started instead of starting a second one; a rollback that
is already running for the environment gets the incident attached instead.
"""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from rollback.config import ConfigSource
from rollback.payloads import START_ROLLBACK, StartRollbackInput, StartRollbackResult
from rollback.client import search_attributes_for
from rollback.state import StateStore


class Incidents:
    def __init__(self, config: ConfigSource, client: Client, task_queue: str) -> None:
        self.config = config
        self.client = client
        self.task_queue = task_queue

    async def _running(self, workflow_id: str | None) -> bool:
        if not workflow_id:
            return False
        try:
            described = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError:
            return False
        return described.status == WorkflowExecutionStatus.RUNNING

    async def _running_rollback(self, inp: StartRollbackInput) -> str | None:
        """Another rollback of this environment that still runs, by any account we have."""
        environment = inp.request.environment
        candidates = [inp.known_rollback, StateStore(self.config.get().state_dir).lock_holder(environment)]
        query = (f"WorkflowType = 'RollbackWorkflow' AND RollbackEnvironment = '{environment}' "
                 "AND ExecutionStatus = 'Running'")
        async for execution in self.client.list_workflows(query, limit=1):
            candidates.append(execution.id)
        for candidate in candidates:
            if candidate and candidate != inp.workflow_id and await self._running(candidate):
                return candidate
        return None

    @activity.defn(name=START_ROLLBACK)
    async def start_rollback(self, inp: StartRollbackInput) -> StartRollbackResult:
        running = await self._running_rollback(inp)
        if running:
            incident = {"key": inp.incident_key, "reason": inp.request.reason, "trigger": inp.request.trigger.value}
            await self.client.get_workflow_handle(running).signal("attach_incident", incident)
            return StartRollbackResult(workflow_id=running, started=False)
        request = inp.request
        try:
            await self.client.start_workflow(
                "RollbackWorkflow", request, id=inp.workflow_id, task_queue=self.task_queue,
                search_attributes=search_attributes_for(request),
            )
        except WorkflowAlreadyStartedError:
            pass  # our own earlier attempt started it: same id, same incident
        return StartRollbackResult(workflow_id=inp.workflow_id, started=True)

"""The Python API: RollbackOrchestrator, and the Temporal connection every client uses."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from temporalio.client import (
    Client, Schedule, ScheduleActionStartWorkflow, ScheduleAlreadyRunningError, ScheduleIntervalSpec, ScheduleOverlapPolicy,
    SchedulePolicy, ScheduleSpec, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle,
)
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from rollback.config import RollbackConfig
from rollback.state import StateStore
from rollback.monitoring import MonitorInput, MonitorStatus, PauseRequest, Rule
from rollback.models import Approval, MigrateRequest, MigrateResult, RollbackRequest, RollbackResult, RollbackStatus, RollbackTarget, RollbackTrigger
from rollback.settings import (
    SA_ENVIRONMENT, SA_PHASE, SA_STATE, SA_TARGETS, SA_TRIGGER, SEARCH_ATTRIBUTES, TemporalSettings, search_attribute_type,
)

WORKFLOW_TYPE = "RollbackWorkflow"
MONITOR_TYPE = "HealthMonitorWorkflow"


RETENTION_SCHEDULE_ID = "backup-retention"


class RollbackError(RuntimeError):
    """A request the orchestrator refused; the message is meant for a person."""


async def connect(settings: TemporalSettings | None = None) -> Client:
    settings = settings or TemporalSettings.from_env()
    try:
        return await Client.connect(settings.address, namespace=settings.namespace, data_converter=pydantic_data_converter)
    except RuntimeError as err:
        raise RollbackError(f"cannot reach Temporal at {settings.address}: {err}") from None


SEARCH_ATTRIBUTES_USABLE_SECONDS = 30.0


def _register_by_hand(namespace: str) -> str:
    create = "; ".join(f"temporal operator search-attribute create --namespace {namespace} --name {key.name} "
                       f"--type {search_attribute_type(key)}" for key in SEARCH_ATTRIBUTES)
    cloud = " ".join(f"--search-attribute {key.name}={search_attribute_type(key)}" for key in SEARCH_ATTRIBUTES)
    return f"register them by hand: {create}; on Temporal Cloud: tcld namespace search-attributes add --namespace {namespace} {cloud}"


async def ensure_search_attributes(client: Client, *, namespace: str, address: str) -> list[SearchAttributeKey]:
    """Register the rollback search attributes (settings.SEARCH_ATTRIBUTES) the namespace lacks.

    Returns the ones it added (empty when all were there), once the server accepts list
    queries on them. Without them every start and `rollback list -e` fails with `invalid
    search attribute`. Raises RollbackError, saying how to register them by hand, when the
    server does not let us (Temporal Cloud registers them through tcld or its UI; a
    self-hosted service may require an admin) or one exists with another type.
    """
    timeout = timedelta(seconds=10)
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace), timeout=timeout)
        known = {**listed.system_attributes, **listed.custom_attributes}
        clashes = [f"{key.name} is registered as {IndexedValueType.Name(known[key.name]).removeprefix('INDEXED_VALUE_TYPE_')}, "
                   f"not {search_attribute_type(key)}" for key in SEARCH_ATTRIBUTES
                   if key.name in known and known[key.name] != key.indexed_value_type]
        if clashes:
            raise RollbackError(f"namespace {namespace} on {address}: {'; '.join(clashes)}; rename or remove it first")
        missing = [key for key in SEARCH_ATTRIBUTES if key.name not in known]
        if missing:
            await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
                namespace=namespace, search_attributes={key.name: IndexedValueType.ValueType(key.indexed_value_type)
                                                        for key in missing}), timeout=timeout)
    except RPCError as err:
        if err.status == RPCStatusCode.ALREADY_EXISTS:  # another worker registered them meanwhile
            return []
        raise RollbackError(f"cannot register search attributes in namespace {namespace} on {address}: {err.message}; "
                            f"{_register_by_hand(namespace)}") from None
    if missing:
        await _await_usable(client, namespace)
    return missing


async def _await_usable(client: Client, namespace: str) -> None:
    """The server caches each namespace's search attributes: poll until a query on them is accepted."""
    query = " AND ".join(f"{key.name} = 'setup-probe'" for key in SEARCH_ATTRIBUTES)
    deadline = asyncio.get_running_loop().time() + SEARCH_ATTRIBUTES_USABLE_SECONDS
    while True:
        try:
            await client.count_workflows(query, rpc_timeout=timedelta(seconds=10))
            return
        except RPCError as err:
            if asyncio.get_running_loop().time() > deadline:
                raise RollbackError(f"search attributes registered in namespace {namespace}, but queries on them still "
                                    f"fail after {SEARCH_ATTRIBUTES_USABLE_SECONDS:.0f}s: {err.message}") from None
        await asyncio.sleep(0.5)


def search_attributes_for(request: RollbackRequest) -> TypedSearchAttributes:
    """Set at start, so a rollback is findable by environment before its first workflow task."""
    return TypedSearchAttributes([
        SearchAttributePair(SA_ENVIRONMENT, request.environment),
        SearchAttributePair(SA_TRIGGER, request.trigger.value),
        SearchAttributePair(SA_TARGETS, [t.value for t in request.targets]),
        SearchAttributePair(SA_PHASE, "pending"), SearchAttributePair(SA_STATE, "pending"),
    ])


def workflow_id_for(environment: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"rollback-{environment}-{now:%Y%m%dT%H%M%S}"


@dataclass(frozen=True)
class StartedRollback:
    execution_id: str
    run_id: str | None
    environment: str


@dataclass(frozen=True)
class RollbackSummary:
    execution_id: str
    environment: str
    status: str
    state: str
    trigger: str
    targets: list[str]
    started: datetime | None


class RollbackOrchestrator:
    """Start, approve, inspect and cancel rollbacks.

    `github_token` is kept here, in the caller's process: workflows only ever
    carry references to secrets, never their values.
    """

    def __init__(self, config: RollbackConfig | None = None, github_token: str | None = None, *,
                 client: Client | None = None, settings: TemporalSettings | None = None,
                 environment: str | None = None) -> None:
        self.config = config or RollbackConfig()
        self._github_token = github_token
        self._client = client
        self.settings = settings or TemporalSettings.from_env()
        self.environment = environment or os.environ.get("ROLLBACK_ENVIRONMENT", "production")

    async def client(self) -> Client:
        if self._client is None:
            self._client = await connect(self.settings)
        return self._client

    async def initiate_rollback(self, *, trigger: RollbackTrigger = RollbackTrigger.MANUAL,
                                targets: list[RollbackTarget], initiated_by: str, environment: str | None = None,
                                reason: str = "", to_version: dict[RollbackTarget, str] | None = None,
                                require_approval: bool | None = None, dry_run: bool = False) -> StartedRollback:
        request = RollbackRequest(
            environment=environment or self.environment, targets=targets, trigger=trigger, initiated_by=initiated_by,
            reason=reason, to_version=to_version, require_approval=require_approval, dry_run=dry_run,
        )
        return await self.start(request)

    async def start(self, request: RollbackRequest) -> StartedRollback:
        client = await self.client()
        running = await self.running_rollback(request.environment)
        if running:
            raise RollbackError(f"a rollback is already running for {request.environment}: {running}")
        workflow_id = workflow_id_for(request.environment)
        try:
            handle = await client.start_workflow(
                WORKFLOW_TYPE, request, id=workflow_id, task_queue=self.settings.task_queue,
                search_attributes=search_attributes_for(request),
            )
        except WorkflowAlreadyStartedError:
            raise RollbackError(f"a rollback is already running for {request.environment}: {workflow_id}") from None
        return StartedRollback(execution_id=handle.id, run_id=handle.result_run_id, environment=request.environment)

    async def migrate(self, request: MigrateRequest, *, on_progress=None) -> MigrateResult:
        """Run DatabaseMigrationWorkflow to completion; `on_progress(line)` sees each step as it happens."""
        client = await self.client()
        now = datetime.now(timezone.utc)
        handle = await client.start_workflow(
            "DatabaseMigrationWorkflow", request, id=f"migrate-{request.environment}-{now:%Y%m%dT%H%M%S}",
            task_queue=self.settings.task_queue, result_type=MigrateResult)
        seen = 0
        result_task = asyncio.ensure_future(handle.result())
        try:
            while not result_task.done():
                await asyncio.wait([result_task], timeout=0.5)
                if on_progress is not None:
                    try:
                        lines = await handle.query("progress", result_type=list[str])
                    except RPCError:
                        continue
                    for line in lines[seen:]:
                        on_progress(line)
                    seen = len(lines)
            return result_task.result()
        except WorkflowFailureError as err:
            raise RollbackError(_innermost(err)) from None

    async def ensure_retention_schedule(self, *, every: timedelta = timedelta(days=1)) -> str:
        """The Temporal Schedule that runs BackupRetentionWorkflow (created once; an existing one is left alone)."""
        client = await self.client()
        schedule = Schedule(
            action=ScheduleActionStartWorkflow("BackupRetentionWorkflow", {}, id=f"{RETENTION_SCHEDULE_ID}-run",
                                               task_queue=self.settings.task_queue),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP))
        try:
            await client.create_schedule(RETENTION_SCHEDULE_ID, schedule)
        except ScheduleAlreadyRunningError:
            pass
        return RETENTION_SCHEDULE_ID

    def _handle(self, client: Client, execution_id: str) -> WorkflowHandle:
        return client.get_workflow_handle(execution_id)

    async def get_rollback_status(self, execution_id: str) -> RollbackStatus:
        """The live status of a running rollback (a query); a finished one's final record (its memo)."""
        handle = self._handle(await self.client(), execution_id)
        described = await handle.describe()
        if described.status != WorkflowExecutionStatus.RUNNING:
            final = await described.memo_value("status", None, type_hint=RollbackStatus)
            if final is not None:
                return final
        return await handle.query("status", result_type=RollbackStatus)

    async def approve(self, execution_id: str, *, by: str, comment: str | None = None) -> None:
        await self._handle(await self.client(), execution_id).signal("approve", Approval(by=by, comment=comment))

    async def reject(self, execution_id: str, *, by: str, comment: str | None = None) -> None:
        await self._handle(await self.client(), execution_id).signal("reject", Approval(by=by, comment=comment))

    async def cancel(self, execution_id: str) -> None:
        await self._handle(await self.client(), execution_id).cancel()

    async def wait(self, execution_id: str) -> RollbackResult | None:
        """The result once the rollback ends; None when it ended failed, compensated or cancelled
        (its `status` then says how and why)."""
        handle = (await self.client()).get_workflow_handle(execution_id, result_type=RollbackResult)
        try:
            return await handle.result()
        except WorkflowFailureError:
            return None

    async def list_rollbacks(self, *, environment: str | None = None, running_only: bool = False,
                             limit: int = 20) -> list[RollbackSummary]:
        client = await self.client()
        query = f"WorkflowType = '{WORKFLOW_TYPE}'"
        if environment:
            query += f" AND RollbackEnvironment = '{_quote(environment)}'"
        if running_only:
            query += " AND ExecutionStatus = 'Running'"
        found: list[RollbackSummary] = []
        async for execution in client.list_workflows(query, limit=limit):
            attrs = execution.typed_search_attributes
            found.append(RollbackSummary(
                execution_id=execution.id, environment=attrs.get(SA_ENVIRONMENT) or "?",
                status=execution.status.name if execution.status else "?", state=attrs.get(SA_STATE) or "?",
                trigger=attrs.get(SA_TRIGGER) or "?", targets=list(attrs.get(SA_TARGETS) or []),
                started=execution.start_time,
            ))
        return found

    async def running_rollback(self, environment: str) -> str | None:
        running = await self.list_rollbacks(environment=environment, running_only=True, limit=1)
        return running[0].execution_id if running else None


    # -- the health monitor ----------------------------------------------------------

    async def start_monitor(self, environment: str, *, ready_within: float = 60) -> bool:
        """Start `monitor-<environment>` and return once it evaluated once; False if it was already running.

        A monitor that cannot start (unknown environment, no `monitoring` block) fails
        here with its reason instead of looking started.
        """
        client = await self.client()
        try:
            handle = await client.start_workflow(MONITOR_TYPE, MonitorInput(environment=environment),
                                                 id=monitor_id(environment), task_queue=self.settings.task_queue)
        except WorkflowAlreadyStartedError:
            return False
        deadline = asyncio.get_running_loop().time() + ready_within
        while asyncio.get_running_loop().time() < deadline:
            described = await handle.describe()
            if described.status != WorkflowExecutionStatus.RUNNING:
                try:
                    await handle.result()
                except WorkflowFailureError as err:
                    raise RollbackError(f"{monitor_id(environment)} failed: {_innermost(err)}") from None
                raise RollbackError(f"{monitor_id(environment)} ended at once ({described.status.name if described.status else '?'})")
            try:
                if (await handle.query("status", result_type=MonitorStatus)).evaluations > 0:
                    return True
            except RPCError:
                pass  # no workflow task has run yet
            await asyncio.sleep(0.2)
        raise RollbackError(f"{monitor_id(environment)} did not evaluate within {ready_within:.0f}s; is a worker running?")

    async def stop_monitor(self, environment: str) -> None:
        await (await self.client()).get_workflow_handle(monitor_id(environment)).cancel()

    async def monitor_status(self, environment: str) -> MonitorStatus:
        handle = (await self.client()).get_workflow_handle(monitor_id(environment))
        return await handle.query("status", result_type=MonitorStatus)

    async def pause_monitor(self, environment: str, *, by: str, reason: str = "") -> None:
        handle = (await self.client()).get_workflow_handle(monitor_id(environment))
        await handle.signal("pause", PauseRequest(by=by, reason=reason))

    async def resume_monitor(self, environment: str, *, by: str) -> None:
        handle = (await self.client()).get_workflow_handle(monitor_id(environment))
        await handle.signal("resume", PauseRequest(by=by))

    async def update_rules(self, environment: str, rules: list[Rule]) -> list[Rule]:
        handle = (await self.client()).get_workflow_handle(monitor_id(environment))
        return await handle.execute_update("update_rules", [r.model_dump(mode="json", exclude_none=True) for r in rules],
                                           result_type=list[Rule])


def _innermost(err: BaseException) -> str:
    cause: BaseException | None = err
    while cause is not None:  # Temporal's failures chain through `cause`
        err, cause = cause, getattr(cause, "cause", None)
    return str(err)


def monitor_id(environment: str) -> str:
    return f"monitor-{environment}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


async def deploy_gate(orchestrator: RollbackOrchestrator, store: StateStore, environment: str, target: str, version: str) -> str | None:
    """The gate's answer: why a deploy must wait or not happen, None when it may go. A Temporal service that
    cannot be asked is a refusal: the gate fails closed."""
    try:
        running = await orchestrator.running_rollback(environment)
    except (RollbackError, RPCError, OSError, RuntimeError) as err:
        return f"cannot tell whether a rollback of {environment!r} runs (Temporal: {err})"
    if running is not None:
        return f"rollback {running} of {environment!r} is running"
    return store.gate_refusal(environment, target, version)

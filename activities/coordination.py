"""Planning, the per-environment deployment lock, and the version record."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.backend import BackendRollback
from activities.compatibility import CompatibilityCheck
from activities.frontend import FrontendRollback
from activities.targets import TargetActivities
from rollback.config import ConfigSource
from rollback.models import EXECUTION_ORDER, RollbackPlan, RollbackRequest, RollbackTarget, TargetPlan
from rollback.targets.frontend.contract import CompatibilityReport
from rollback.versions import version_problem
from rollback.payloads import ACQUIRE_LOCK, NOTHING_TO_ROLL_BACK, PLAN_ROLLBACK, RECORD_DEPLOYED, RECORD_RESTORED, RELEASE_LOCK, LockInput, RecordInput
from rollback.state import StateStore, TargetVersions


def _invalid(field: str, message: str) -> ApplicationError:
    return ApplicationError(f"{field}: {message}", type="InvalidRequest", non_retryable=True)


def _check_recorded(environment: str, target: str, versions: TargetVersions, explicit: str | None) -> None:
    """A version record written before versions were checked, or edited by hand, must not
    reach a deploy hook: the known-good one is the default target, the current one what an
    undo returns to. (A request's to_version was checked when the request was decoded.)"""
    recorded = [("current", versions.current)] + ([] if explicit else [("known-good", versions.known_good)])
    for what, version in recorded:
        if version is not None and (problem := version_problem(version)) is not None:
            hint = "record a valid release with `rollback record-deploy`" + (" or pass to_version" if what == "known-good" else "")
            raise ApplicationError(f"{target} of {environment!r}: recorded {what} version {problem}; {hint}",
                                   type="AssessmentRefused", non_retryable=True)


class Coordination:
    def __init__(self, config: ConfigSource, targets: dict[str, TargetActivities], client: Client) -> None:
        self.config = config
        self.targets = targets  # by target name, from the registry
        self.client = client

    def _store(self) -> StateStore:
        return StateStore(self.config.get().state_dir)

    @activity.defn(name=PLAN_ROLLBACK)
    async def plan(self, request: RollbackRequest) -> RollbackPlan:
        """Validate the request against the config and assess each target from fresh evidence."""
        config = self.config.get()
        if request.environment not in config.environments:
            raise _invalid("environment", f"unknown environment {request.environment!r}; configured: {', '.join(sorted(config.environments))}")
        env = config.environment(request.environment)
        configured = env.targets.configured()
        wanted = configured if request.targets == [RollbackTarget.FULL] else [t.value for t in request.targets]
        missing = [t for t in wanted if t not in configured]
        if missing:
            raise _invalid("targets", f"{', '.join(missing)} not configured for {request.environment!r} (configured: {', '.join(configured)})")
        to_version = {k.value: v for k, v in (request.to_version or {}).items()}
        if request.promote:
            # The forward switch asks the deployment gate too: a release rolled back from stays out until allowed.
            for target, version in to_version.items():
                if (refusal := StateStore(config.state_dir).gate_refusal(request.environment, target, version)) is not None:
                    raise ApplicationError(f"promote refused by the deployment gate: {refusal}", type="GateRefused", non_retryable=True)
        extra = [t for t in to_version if t not in wanted]
        if extra:
            raise _invalid("to_version", f"names targets not being rolled back: {', '.join(extra)}")
        store = StateStore(config.state_dir)
        plans: list[TargetPlan] = []
        skipped: dict[str, str] = {}
        full = request.targets == [RollbackTarget.FULL]
        for target in [t.value for t in EXECUTION_ORDER if t.value in wanted]:
            part = env.targets.get(target)  # configured: checked above
            versions = store.versions(request.environment, target, seed=part.versions if part else None)
            _check_recorded(request.environment, target, versions, to_version.get(target))
            try:
                plans.append(await self.targets[target].assess(request, versions, to_version.get(target)))
            except ApplicationError as err:
                if not (full and err.type == NOTHING_TO_ROLL_BACK):
                    raise
                skipped[target] = err.message  # `full`: a tier already where it should be is left alone
        if not plans:
            raise ApplicationError("full: nothing to roll back: " + "; ".join(skipped.values()), type=NOTHING_TO_ROLL_BACK,
                                   non_retryable=True)
        policy = env.policy
        plans, compatibility = await self._compatibility(request, plans, configured, couple=policy.couple_frontend)
        # The request may add an approval, never waive one the environment's policy requires.
        require = policy.require_approval or bool(request.require_approval)
        why = "environment policy" if policy.require_approval else ("requested by the caller" if require else "")
        lossy = [p for p in plans if getattr(p.params, "approval_required", False)]  # a strategy that loses data (PITR)
        if lossy:
            # Point-in-time recovery loses data: a person always decides, whatever the policy says.
            require = True
            why = "point-in-time recovery loses data: " + "; ".join(str(p.evidence.get("loses", "")) for p in lossy)
        on_timeout = "reject" if lossy else policy.on_approval_timeout  # nobody's silence may approve a data loss
        return RollbackPlan(
            environment=request.environment, targets=plans, require_approval=require, approval_reason=why,
            approval_timeout_seconds=policy.approval_timeout_seconds, on_approval_timeout=on_timeout,
            on_failure=policy.on_failure, max_attempts=config.rollback.max_rollback_attempts,
            health_check_timeout_seconds=config.rollback.health_check_timeout,
            notification_channels=config.rollback.notification_channels, trigger_evidence=request.evidence,
            compatibility=compatibility, skipped=skipped,
        )

    async def _compatibility(self, request: RollbackRequest, plans: list[TargetPlan], configured: list[str], *,
                             couple: bool) -> tuple[list[TargetPlan], CompatibilityReport | None]:
        """Where the environment has both a frontend and a backend, the pair the rollback leaves live must fit."""
        frontend, backend = self.targets.get("frontend"), self.targets.get("backend")
        if not ({"frontend", "backend"} <= set(configured) and isinstance(frontend, FrontendRollback)
                and isinstance(backend, BackendRollback)):
            return plans, None
        seed = self.config.get().environment(request.environment).targets.get("frontend")
        versions = self._store().versions(request.environment, "frontend", seed=seed.versions if seed else None)
        return await CompatibilityCheck(frontend, backend).reconcile(request, plans, couple=couple, frontend_versions=versions)

    async def _is_running(self, workflow_id: str) -> bool | None:
        """Whether the lock holder's workflow still runs; None when Temporal cannot tell us."""
        try:
            described = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            return False if err.status == RPCStatusCode.NOT_FOUND else None
        return described.status == WorkflowExecutionStatus.RUNNING

    @activity.defn(name=ACQUIRE_LOCK)
    async def acquire_lock(self, inp: LockInput) -> None:
        config = self.config.get()
        store = StateStore(config.state_dir)
        ttl = timedelta(seconds=config.rollback.lock_ttl_seconds)
        holder = store.lock_holder(inp.environment)
        running = await self._is_running(holder) if holder and holder != inp.holder else None
        blocker = store.acquire_lock(inp.environment, inp.holder, ttl=ttl, checked=(holder, running) if holder else None)
        if blocker:
            raise ApplicationError(
                f"environment {inp.environment!r} is locked by running rollback {blocker}; "
                f"wait for it, or cancel it with: rollback cancel {blocker}",
                type="EnvironmentLocked", non_retryable=True,
            )

    @activity.defn(name=RELEASE_LOCK)
    async def release_lock(self, inp: LockInput) -> bool:
        return self._store().release_lock(inp.environment, inp.holder)

    def _seed(self, environment: str, target: str) -> TargetVersions | None:
        configured = self.config.get().environment(environment).targets.get(target)
        return configured.versions if configured is not None else None

    @activity.defn(name=RECORD_RESTORED)
    async def record_restored(self, inp: RecordInput) -> bool:
        return self._store().record_restored(inp.environment, inp.target, inp.version, key=inp.key,
                                             seed=self._seed(inp.environment, inp.target), rolled_back_from=inp.rolled_back_from,
                                             rollback=inp.rollback, by=inp.by)

    @activity.defn(name=RECORD_DEPLOYED)
    async def record_deployed(self, inp: RecordInput) -> bool:
        """A new version went live through the system (e.g. a migration): current, previous becomes known-good."""
        entry = self._store().record_deploy(inp.environment, inp.target, inp.version, seed=self._seed(inp.environment, inp.target))
        return entry.current == inp.version

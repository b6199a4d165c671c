"""The planner's cross-target check: the frontend and the backend a rollback leaves live must fit.

Checked in both directions: a frontend rollback checks the release it returns to against the backend
that stays; a backend rollback checks the live frontend against the backend it returns to; a rollback
of both checks the final pair and the pair live between the two switches (frontend first, then the
backend: and the same pair again if compensation runs them back in reverse), so at no moment does the
live frontend call an operation the live backend lacks.

Incompatible: the plan is refused naming the operations, or, with policy `couple_frontend`, a backend
rollback takes the frontend along to its newest retained release, older than the live one, that fits
both the backend it returns to and the one live between the two switches.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from activities.backend import BackendRollback
from activities.frontend import FrontendRollback
from rollback.models import RollbackRequest, RollbackTarget, TargetPlan
from rollback.state import TargetVersions
from rollback.targets.frontend.compatibility import check
from rollback.targets.frontend.contract import CompatibilityReport


def _refuse(message: str) -> ApplicationError:
    return ApplicationError(message, type="AssessmentRefused", non_retryable=True)


class CompatibilityCheck:
    def __init__(self, frontend: FrontendRollback, backend: BackendRollback) -> None:
        self.frontend = frontend
        self.backend = backend

    async def pair(self, environment: str, frontend_version: str, backend_version: str, backend_plan: TargetPlan | None,
                   ) -> CompatibilityReport:
        manifest = await self.frontend.manifest(environment, frontend_version)
        document, source = await self.backend.api_document(environment, backend_version, backend_plan)
        missing, problems = check(manifest, document, backend_version)
        return CompatibilityReport(frontend_version=frontend_version, backend_version=backend_version,
                                   compatible=not missing and not problems, missing=missing, problems=problems, source=source)

    async def reconcile(self, request: RollbackRequest, plans: list[TargetPlan], *, couple: bool,
                        frontend_versions: TargetVersions) -> tuple[list[TargetPlan], CompatibilityReport | None]:
        """The plans (with the frontend coupled in when policy says so) and the report of the pair left live."""
        environment = request.environment
        by_target = {p.target: p for p in plans}
        frontend_plan, backend_plan = by_target.get(RollbackTarget.FRONTEND), by_target.get(RollbackTarget.BACKEND)
        if frontend_plan is None and backend_plan is None:
            return plans, None
        frontend_version = frontend_plan.to_version if frontend_plan else await self.frontend.live(environment)
        backend_version = backend_plan.to_version if backend_plan else await self.backend.live_version(environment)
        if frontend_version is None or backend_version is None:
            return plans, None  # nothing live on one side yet: no pair to check
        report = await self.pair(environment, frontend_version, backend_version, backend_plan)
        if frontend_plan is not None and backend_plan is not None and backend_plan.from_version and report.compatible:
            # Between the two switches the frontend is already back and the backend not yet.
            between = await self.pair(environment, frontend_version, backend_plan.from_version, None)
            if not between.compatible:
                raise _refuse(f"between the frontend's and the backend's switch, {between.summary()}")
        if report.compatible:
            return plans, report
        if frontend_plan is not None or not couple:
            hint = "" if frontend_plan is not None else "; set policy couple_frontend: true to roll the frontend back with it"
            raise _refuse(report.summary() + hint)
        coupled = await self._newest_compatible(request, backend_version, backend_plan, frontend_versions, live=frontend_version)
        if coupled is None:
            raise _refuse(report.summary() + "; no retained frontend release is compatible either")
        plan, fitting = coupled
        return [plan, *plans], fitting.model_copy(update={"coupled": True})

    async def _newest_compatible(self, request: RollbackRequest, backend_version: str, backend_plan: TargetPlan | None,
                                 versions: TargetVersions, *, live: str) -> tuple[TargetPlan, CompatibilityReport] | None:
        """The newest release built before the live one that fits the backend left live, and the backend live
        between the two switches (the frontend goes first): a rollback never rolls the frontend forward."""
        retained = await self.frontend.retained(request.environment)
        older = retained[:retained.index(live)] if live in retained else retained
        between_version = backend_plan.from_version if backend_plan is not None else None
        for candidate in reversed(older):
            report = await self.pair(request.environment, candidate, backend_version, backend_plan)
            if not report.compatible:
                continue
            if between_version and not (await self.pair(request.environment, candidate, between_version, None)).compatible:
                continue
            return await self.frontend.assess(request, versions, candidate), report
        return None

"""The planner's frontend/backend pairing without the world: fake slices that answer with manifests and
OpenAPI documents, the real CompatibilityCheck between them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from temporalio.exceptions import ApplicationError

from activities.compatibility import CompatibilityCheck
from rollback.models import RollbackRequest, TargetPlan
from rollback.state import TargetVersions
from rollback.targets.backend.contract import BlueGreenParams
from rollback.targets.frontend.contract import ReleaseSwitchParams
from rollback.targets.frontend.release import ReleaseManifest

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
REQUEST = RollbackRequest(environment="shop", targets=["backend"])


def ok(paths: list[str]) -> dict:
    return {"openapi": "3.1.0", "paths": {p: {"get": {"responses": {"200": {"description": "OK"}}}} for p in paths}}


class Frontend:
    """Retained releases (oldest first) and the operations each calls."""

    def __init__(self, calls: dict[str, list[str]], live: str) -> None:
        self.calls, self.live_version = calls, live
        self.assessed: list[str] = []

    async def live(self, environment: str) -> str | None:
        return self.live_version

    async def retained(self, environment: str) -> list[str]:
        return list(self.calls)

    async def manifest(self, environment: str, version: str) -> ReleaseManifest:
        created = T0 + timedelta(days=list(self.calls).index(version))
        return ReleaseManifest(version=version, build=f"b-{version}", created=created, files={"index.html": "0" * 64},
                               api=[f"GET {p}" for p in self.calls[version]])

    async def assess(self, request: RollbackRequest, versions: TargetVersions, to_version: str | None) -> TargetPlan:
        assert to_version is not None
        self.assessed.append(to_version)
        return TargetPlan(target="frontend", strategy="release_switch", from_version=self.live_version, to_version=to_version,
                          checks=[], params=ReleaseSwitchParams(build=f"b-{to_version}", purge_paths=["/"]))


class Backend:
    def __init__(self, serves: dict[str, list[str]], live: str) -> None:
        self.serves, self.live = serves, live

    async def live_version(self, environment: str) -> str | None:
        return self.live

    async def api_document(self, environment: str, version: str, plan: TargetPlan | None) -> tuple[dict, str]:
        return ok(self.serves[version]), f"backend {version}"


def backend_plan(to: str, frm: str) -> TargetPlan:
    return TargetPlan(target="backend", strategy="blue_green", from_version=frm, to_version=to, checks=[],
                      params=BlueGreenParams(colour="blue", previous_colour="green"))


async def reconcile(frontend: Frontend, backend: Backend, plans: list[TargetPlan], *, couple: bool):
    check = CompatibilityCheck(frontend, backend)  # type: ignore[arg-type]  # duck-typed slices
    return await check.reconcile(REQUEST, plans, couple=couple, frontend_versions=TargetVersions(current=frontend.live_version))


async def test_coupling_takes_the_newest_older_release_that_fits_never_a_newer_one():
    # v4 was rolled back earlier and is still retained: it fits the old backend, but it is newer than the live v3.
    frontend = Frontend({"v1": ["/a"], "v2": ["/a"], "v3": ["/a", "/orders"], "v4": ["/a"]}, live="v3")
    backend = Backend({"b1": ["/a"], "b2": ["/a", "/orders"]}, live="b2")
    plans, report = await reconcile(frontend, backend, [backend_plan("b1", "b2")], couple=True)
    assert [p.target.value for p in plans] == ["frontend", "backend"] and frontend.assessed == ["v2"]
    assert report is not None and report.coupled and report.summary() == (
        "frontend v2 with backend b1: compatible (frontend coupled into the rollback)")


async def test_coupling_skips_a_release_that_breaks_between_the_two_switches():
    # v2 fits the backend returned to, but not the one still live while the frontend switches first.
    frontend = Frontend({"v1": ["/a"], "v2": ["/legacy"], "v3": ["/orders"]}, live="v3")
    backend = Backend({"b1": ["/a", "/legacy"], "b2": ["/a", "/orders"]}, live="b2")
    plans, report = await reconcile(frontend, backend, [backend_plan("b1", "b2")], couple=True)
    assert frontend.assessed == ["v1"] and report is not None and report.frontend_version == "v1"


async def test_without_coupling_or_with_nothing_that_fits_the_plan_is_refused_naming_the_operations():
    frontend = Frontend({"v1": ["/orders"], "v2": ["/orders"]}, live="v2")
    backend = Backend({"b1": ["/a"], "b2": ["/a", "/orders"]}, live="b2")
    with pytest.raises(ApplicationError, match="frontend v2 with backend b1: incompatible: missing GET /orders; "
                                               "set policy couple_frontend: true"):
        await reconcile(frontend, backend, [backend_plan("b1", "b2")], couple=False)
    with pytest.raises(ApplicationError, match="no retained frontend release is compatible either"):
        await reconcile(frontend, backend, [backend_plan("b1", "b2")], couple=True)


async def test_a_frontend_rollback_is_checked_against_the_backend_that_stays():
    frontend = Frontend({"v1": ["/gone"], "v2": ["/a"]}, live="v2")
    backend = Backend({"b2": ["/a"]}, live="b2")
    plan = await frontend.assess(REQUEST, TargetVersions(), "v1")
    with pytest.raises(ApplicationError, match="frontend v1 with backend b2: incompatible: missing GET /gone$"):
        await reconcile(frontend, backend, [plan], couple=True)  # coupling never moves the backend

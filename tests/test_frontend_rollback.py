"""The frontend target end to end: real Temporal, real nginx (the backend's and the frontend origin), real
Varnish in front of the releases, the demo backend's OpenAPI document for the compatibility check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.backend import BackendRollback
from activities.frontend import FrontendRollback
from activities.health import HttpHealth
from activities.retention import Retention
from rollback.dev.frontend_stack import FrontendStack
from rollback.dev.stack import BackendStack
from rollback.models import Phase, RollbackTarget, TargetPlan
from rollback.payloads import RetentionInput
from rollback.ports import free_port
from rollback.state import StateStore
from rollback.targets.backend.contract import RollingParams
from rollback.targets.frontend.contract import PurgeInput
from rollback.targets.frontend.release import MANIFEST
from tests.cdn_standins import CLOUDFLARE_TOKEN, CLOUDFLARE_ZONE, cloudflare_standin  # noqa: F401 (fixture)
from tests.conftest import write_config
from tests.helpers import front_version, orchestrator
from tests.test_cli import cli

FRONTEND = [RollbackTarget.FRONTEND]


def frontend_of(stack: BackendStack, **fields) -> FrontendStack:
    return FrontendStack(base_dir=stack.base_dir, origin_port=free_port(), varnish_port=free_port(), varnish_admin_port=free_port(),
                         api_upstream=f"127.0.0.1:{stack.nginx_port}", log=lambda _: None, **fields)


@pytest.fixture
def frontend(blue_green: BackendStack) -> Iterator[FrontendStack]:
    stack = frontend_of(blue_green)
    try:
        stack.start("v1")
        yield stack
    finally:
        stack.stop()


def config_of(backend: BackendStack, frontend: FrontendStack, tmp_path: Path, *, policy: dict | None = None, **frontend_fields):
    return write_config(backend, tmp_path, policy=policy or {},
                        extra={"environments": {"demo": {"targets": {"frontend": frontend.target_config(**frontend_fields)}}}})


def served(frontend: FrontendStack) -> dict:
    return frontend.serving() or {}


async def test_a_frontend_rollback_switches_purges_varnish_and_checks_the_pair(blue_green, frontend, tmp_path, client, task_queue,
                                                                                run_worker):
    good = served(frontend)["build"]
    frontend.deploy("v2", "broken-js")
    assert served(frontend)["version"] == "v2"
    await run_worker(config_of(blue_green, frontend, tmp_path))
    orch = orchestrator(client, task_queue)

    started = await orch.initiate_rollback(targets=FRONTEND, initiated_by="tester", reason="broken js in v2")
    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.SUCCEEDED, result
    assert result.restored == {"frontend": "v1"}
    assert served(frontend) == {"version": "v1", "build": good}  # through Varnish: its cache was purged
    status = await orch.get_rollback_status(started.execution_id)
    assert status.plan is not None and status.plan.compatibility is not None
    assert status.plan.compatibility.summary() == "frontend v1 with backend v1: compatible"
    assert status.plan.compatibility.source.endswith("/openapi.json")
    assert [s.name for s in status.steps if s.target == "frontend"] == [
        "verify release v1", "switch frontend to v1", "purge varnish", f"front door serves build {good}",
        "validate frontend through the front door", "record frontend v1 as current and known-good"]
    assert all(s.state == "succeeded" for s in status.steps), status.steps
    versions = StateStore(blue_green.state_dir).versions("demo", "frontend")
    assert (versions.current, versions.known_good) == ("v1", "v1")
    assert [(s["from"], s["to"]) for s in frontend.store.switches()][-1] == ("v2", "v1")
    shown = await cli(client, task_queue, "status", started.execution_id)
    assert "compatibility: frontend v1 with backend v1: compatible" in shown.stdout, shown.stdout


async def test_a_corrupt_or_missing_release_is_refused_before_anything_moves(blue_green, frontend, tmp_path, client, task_queue,
                                                                              run_worker):
    frontend.deploy("v2")
    index = frontend.store.path("v1") / "index.html"
    index.write_text(index.read_text() + "<!-- edited on the server -->")
    await run_worker(config_of(blue_green, frontend, tmp_path))
    orch = orchestrator(client, task_queue)
    switches = len(frontend.store.switches())

    for to_version, said in (("v1", "release v1: index.html has sha256"), ("v9", "release v9 is not in the store (retained: v1, v2)")):
        started = await orch.initiate_rollback(targets=FRONTEND, initiated_by="tester", to_version={RollbackTarget.FRONTEND: to_version})
        with pytest.raises(WorkflowFailureError):
            await client.get_workflow_handle(started.execution_id).result()
        status = await orch.get_rollback_status(started.execution_id)
        assert status.state == Phase.FAILED and said in (status.error or ""), status.error
    assert len(frontend.store.switches()) == switches and served(frontend)["version"] == "v2"


async def test_a_corrupt_release_json_is_refused_naming_the_file(blue_green, frontend, tmp_path, client, task_queue, run_worker):
    frontend.deploy("v2")
    (frontend.store.path("v1") / MANIFEST).write_text("{not json")
    await run_worker(config_of(blue_green, frontend, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=FRONTEND, initiated_by="tester", to_version={RollbackTarget.FRONTEND: "v1"})
    with pytest.raises(WorkflowFailureError):
        await client.get_workflow_handle(started.execution_id).result()
    status = await orch.get_rollback_status(started.execution_id)
    assert "v1" in (status.error or "") and served(frontend)["version"] == "v2", status.error


async def test_a_backend_rollback_the_live_frontend_does_not_fit_is_refused_or_couples_the_frontend(
        blue_green, frontend, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    frontend.deploy("v2", "missing-api")  # calls GET /api/orders, which no demo backend serves
    orch = orchestrator(client, task_queue)

    worker = await run_worker(config_of(blue_green, frontend, tmp_path))
    refused = await orch.initiate_rollback(targets=[RollbackTarget.BACKEND], initiated_by="tester")
    with pytest.raises(WorkflowFailureError):
        await client.get_workflow_handle(refused.execution_id).result()
    status = await orch.get_rollback_status(refused.execution_id)
    assert ("frontend v2 with backend v1: incompatible: missing GET /api/orders; "
            "set policy couple_frontend: true") in (status.error or ""), status.error
    assert await front_version(blue_green.front_url) == "v2" and served(frontend)["version"] == "v2"
    await worker.__aexit__(None, None, None)
    run_worker.workers.remove(worker)

    await run_worker(config_of(blue_green, frontend, tmp_path / "coupled", policy={"couple_frontend": True}))
    started = await orch.initiate_rollback(targets=[RollbackTarget.BACKEND], initiated_by="tester")
    result = await orch.wait(started.execution_id)
    assert result is not None and result.state == Phase.SUCCEEDED, result
    assert result.restored == {"frontend": "v1", "backend": "v1"}
    status = await orch.get_rollback_status(started.execution_id)
    assert status.plan is not None and status.plan.compatibility is not None and status.plan.compatibility.coupled
    assert [t.target.value for t in status.plan.targets] == ["frontend", "backend"]
    assert await front_version(blue_green.front_url) == "v1" and served(frontend)["version"] == "v1"


async def test_a_frontend_switched_before_a_failing_backend_is_switched_back(blue_green, frontend, tmp_path, client, task_queue,
                                                                             run_worker):
    blue_green.deploy("v2", "errors")
    bad_build = frontend.deploy("v2")
    # The colour the backend would return to now fails its checks: the backend step fails after the frontend moved.
    blue_green.redeploy_colour("blue", "v1", "errors_after:10")  # passes assessment (5) and verify_standby (5)
    await run_worker(config_of(blue_green, frontend, tmp_path))
    orch = orchestrator(client, task_queue)

    started = await orch.initiate_rollback(targets=[RollbackTarget.FRONTEND, RollbackTarget.BACKEND], initiated_by="tester")
    with pytest.raises(WorkflowFailureError):
        await client.get_workflow_handle(started.execution_id).result()
    status = await orch.get_rollback_status(started.execution_id)
    assert status.state == Phase.COMPENSATED, status.error
    assert [(s["from"], s["to"]) for s in frontend.store.switches()][-2:] == [("v2", "v1"), ("v1", "v2")]
    assert served(frontend) == {"version": "v2", "build": bad_build}
    undo = next(s for s in status.steps if s.name == "switch frontend back to v2")
    assert undo.state == "compensated", status.steps


async def test_assets_of_both_releases_answer_through_varnish_and_a_missing_one_is_a_404(frontend):
    frontend.deploy("v2")
    async with httpx.AsyncClient(base_url=frontend.front_url, timeout=5) as http:
        for version in ("v1", "v2"):
            manifest = frontend.store.manifest(version)
            for path in (p for p in manifest.files if p.startswith("assets/")):
                answer = await http.get(f"/{path}")
                assert answer.status_code == 200, (version, path)
        missing = await http.get("/assets/app.0000000000.js")
        assert (missing.status_code, missing.text, missing.headers["content-type"]) == (404, "not found\n", "text/plain")


async def test_retention_keeps_the_newest_and_the_current_and_known_good_releases(blue_green, tmp_path, client):
    frontend = frontend_of(blue_green, keep_releases=10)
    try:
        frontend.start("v1")
        for version in ("v2", "v3", "v4"):
            frontend.deploy(version)
        old_asset = next(p for p in frontend.store.manifest("v1").files if p.startswith("assets/app."))
        config = config_of(blue_green, frontend, tmp_path, keep_releases=1)
        dry = await Retention(config, client).apply(RetentionInput(dry_run=True))
        assert dry.releases_retired == {"demo": ["v1", "v2"]} and frontend.store.versions() == ["v1", "v2", "v3", "v4"]
        report = await Retention(config, client).apply(RetentionInput())
        assert report.releases_retired == {"demo": ["v1", "v2"]}  # v3 is known-good, v4 live and current
        assert frontend.store.versions() == ["v3", "v4"]
        async with httpx.AsyncClient(base_url=frontend.origin_url, timeout=5) as http:
            assert (await http.get(f"/{old_asset}")).status_code == 404  # its pool link went with it
    finally:
        frontend.stop()


async def test_a_cdn_refusing_the_token_fails_the_purge_for_good_and_a_rate_limit_is_retried_later(
        blue_green, frontend, cloudflare_standin, tmp_path, http, monkeypatch):
    cloudflare = {"provider": "cloudflare", "zone_id": CLOUDFLARE_ZONE, "token_env": "CF_PURGE_TOKEN", "api_url": cloudflare_standin.url,
                  "site_url": "https://shop.example"}
    activities = FrontendRollback(config_of(blue_green, frontend, tmp_path, cdn=[cloudflare]), HttpHealth(http))
    purge = PurgeInput(environment="demo", tier=0, paths=["/", "/index.html"], key="rollback-demo-1:run:frontend:forward:purge.0")

    monkeypatch.setenv("CF_PURGE_TOKEN", "not-the-token")
    with pytest.raises(ApplicationError) as refused:
        await activities.purge_cdn(purge)
    assert refused.value.non_retryable and "401" in str(refused.value) and "not-the-token" not in str(refused.value)

    monkeypatch.setenv("CF_PURGE_TOKEN", CLOUDFLARE_TOKEN)
    cloudflare_standin.rate_limit(10, retry_after="1")  # more 429s than the provider waits out in place
    with pytest.raises(ApplicationError) as limited:
        await activities.purge_cdn(purge)
    # Retryable, no sooner than Cloudflare asked: Temporal's next attempt honours Retry-After.
    assert not limited.value.non_retryable and limited.value.next_retry_delay == timedelta(seconds=1), limited.value
    monkeypatch.delenv("CF_PURGE_TOKEN")
    with pytest.raises(ApplicationError, match="CF_PURGE_TOKEN") as unset:
        await activities.purge_cdn(purge)
    assert unset.value.non_retryable


async def test_a_broken_live_release_does_not_stop_the_rollback_away_from_it(blue_green, frontend, tmp_path, client, task_queue,
                                                                              run_worker):
    good = served(frontend)["build"]
    frontend.deploy("v2")
    (frontend.store.path("v2") / MANIFEST).write_text("")  # the bad release is broken in more ways than one
    await run_worker(config_of(blue_green, frontend, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=FRONTEND, initiated_by="tester")
    result = await orch.wait(started.execution_id)
    assert result is not None and result.state == Phase.SUCCEEDED, result
    assert served(frontend) == {"version": "v1", "build": good}
    status = await orch.get_rollback_status(started.execution_id)
    assert status.plan is not None and status.plan.targets[0].params.previous_build.startswith("v2-")  # type: ignore[attr-defined]


async def test_a_rolling_backends_api_comes_from_an_instance_on_the_version_or_from_openapi_documents(rolling, tmp_path, http):
    rolling.deploy("v2")
    documents = tmp_path / "openapi"
    documents.mkdir()
    (documents / "v1.json").write_text(json.dumps({"openapi": "3.1.0", "paths": {"/api/legacy": {}}}))
    plan = TargetPlan(target="backend", strategy="rolling", from_version="v2", to_version="v1", checks=[],
                      params=RollingParams(batches=[["app-1"]]))
    backend = BackendRollback(write_config(rolling, tmp_path, extra={"environments": {"demo": {"targets": {"backend": {
        "openapi_documents": str(documents)}}}}}), HttpHealth(http))
    running, source = await backend.api_document("demo", "v2", plan)  # every instance runs v2 now
    assert source.endswith("/openapi.json") and "/api/items" in running["paths"]
    stored, source = await backend.api_document("demo", "v1", plan)  # no instance runs v1 any more
    assert source == str(documents / "v1.json") and list(stored["paths"]) == ["/api/legacy"]
    with pytest.raises(ApplicationError, match="backend v0: no OpenAPI document at"):
        await backend.api_document("demo", "v0", plan)

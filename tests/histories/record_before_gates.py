"""Record histories with the workflow code of a commit from before a `workflow.patched` gate, so that
tests/test_replay.py replays the unpatched branch too (a running workflow started before the gate).

Run from a worktree of the commit before the gate, with this repository's venv:

    git worktree add /tmp/before 696b796^      # effect-keys-per-run
    cd /tmp/before && /path/to/repo/.venv/bin/python /path/to/repo/tests/histories/record_before_gates.py \
        rollback_rolling rollback_pitr --out /path/to/repo/tests/histories --suffix before_effect_keys

Scenarios: rollback_rolling, rollback_pitr (RollbackWorkflow), migration (DatabaseMigrationWorkflow),
monitor_pause_resume (HealthMonitorWorkflow). The activities are stand-ins registered under the
real names that answer plain JSON of the shapes the workflows of that time decoded: only the
workflow code (the commands it issues) is recorded, which is what a replay checks. Uses only
what every commit since 2026-11-26 has (the workflow classes by module, the task queue names).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

sys.path.insert(0, str(Path.cwd()))  # the worktree's workflow code, not this repository's

from rollback.settings import SEARCH_ATTRIBUTES  # noqa: E402
from workflows.migration import DatabaseMigrationWorkflow  # noqa: E402
from workflows.monitor import HealthMonitorWorkflow  # noqa: E402
from workflows.rollback import RollbackWorkflow  # noqa: E402

TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"
HEALTHY = {"url": "http://front", "healthy": True, "samples": 5, "successes": 5, "success_ratio": 1.0, "required_ratio": 1.0}
POLICY = {"require_approval": False, "approval_reason": "", "approval_timeout_seconds": 3600, "on_approval_timeout": "reject",
          "on_failure": "compensate", "max_attempts": 1, "health_check_timeout_seconds": 60, "notification_channels": ["log"]}
ROLLING = {"target": "backend", "strategy": "rolling", "from_version": "v2", "to_version": "v1", "checks": [],
           "steps": ["roll batch 1/2: app-1", "roll batch 2/2: app-2", "validate backend", "smoke and performance check: backend"],
           "params": {"batches": [["app-1"], ["app-2"]]}, "evidence": {}}
PITR = {"target": "database", "strategy": "pitr", "from_version": "0003", "to_version": "0001", "checks": [],
        "steps": ["recover shop to restore point rp into a new database and swap it in"],
        "params": {"restore_point": "rp", "target_time": None, "approval_required": True}, "evidence": {}}


def answers(plan_target: dict[str, Any]) -> dict[str, Any]:
    """What each activity answers, by name."""
    return {
        "coordination.plan": {"environment": "demo", "targets": [plan_target], "trigger_evidence": {}, **POLICY},
        "coordination.acquire_lock": None, "coordination.release_lock": True, "coordination.record_restored": True,
        "coordination.record_deployed": True,
        "backend.roll_batch": {"instances": ["app-1"], "restarted": ["app-1"], "reloads": 2, "attempt": 1},
        "backend.validate": HEALTHY, "backend.smoke": HEALTHY, "backend.check_standby": HEALTHY,
        "notify.send": {"delivered": ["log"], "skipped": {}},
        "database.pitr": {"recovered_to": "restore point rp", "live": "shop", "retired": "retired"},
        "database.swap_back": {"swapped_back": True},
        "database.current_revision": "0001",
        "database.plan_migration": {"current": "0001", "pending": ["0002"], "labels": ["0002_add_note"]},
        "database.backup": {"id": "b", "revision": "0001", "next_revision": "0002", "total_bytes": 10, "files": 2,
                            "restore_point": "rp", "verified_at": None, "created_at": "2026-11-26T00:00:00+00:00"},
        "database.apply_migration": {"revision": "0002", "name": "add_note", "xid": 7},
        "monitor.settings": {"environment": "demo", "interval_seconds": 15, "metrics": [{"name": "app.errors", "source": "gauge"}],
                             "rules": [{"name": "errors", "metric": "app.errors", "threshold": 0.5, "window_seconds": 60,
                                        "severity": "high"}]},
        "monitor.collect": {"readings": {"app.errors": {"value": 0.9}}},
        "monitor.start_rollback": {"workflow_id": "rollback-demo-x", "started": True},
    }


def stand_ins(replies: dict[str, Any]) -> list[Any]:
    def stand_in(name: str, reply: Any):
        @activity.defn(name=name)
        async def run(*args: Any) -> Any:
            return reply
        return run
    return [stand_in(name, reply) for name, reply in replies.items()]


async def record(env: WorkflowEnvironment, scenario: str) -> tuple[str, dict[str, Any]]:
    queue = f"record-{uuid.uuid4().hex[:8]}"
    replies = answers(PITR if scenario == "rollback_pitr" else ROLLING)
    workflows = [RollbackWorkflow, DatabaseMigrationWorkflow, HealthMonitorWorkflow]
    async with Worker(env.client, task_queue=queue, workflows=workflows, activities=stand_ins(replies)):
        if scenario.startswith("rollback_"):
            workflow_id = f"rollback-demo-{queue}"
            handle = await env.client.start_workflow("RollbackWorkflow", {"environment": "demo", "targets": ["backend"]},
                                                     id=workflow_id, task_queue=queue)
            await handle.result()
        elif scenario == "migration":
            workflow_id = f"migrate-demo-{queue}"
            handle = await env.client.start_workflow("DatabaseMigrationWorkflow", {"environment": "demo", "to_revision": "0002"},
                                                     id=workflow_id, task_queue=queue)
            await handle.result()
        else:
            workflow_id = f"monitor-demo-{queue}"
            handle = await env.client.start_workflow("HealthMonitorWorkflow", {"environment": "demo"}, id=workflow_id, task_queue=queue)
            await env.sleep(30)
            await handle.signal("pause", {"by": "oncall", "reason": "maintenance"})
            await env.sleep(45)
            await handle.signal("resume", {})
            await env.sleep(45)
            await handle.terminate("recorded")
        history = await handle.fetch_history()
    return workflow_id, json.loads(history.to_json())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", nargs="+", choices=["rollback_rolling", "rollback_pitr", "migration", "monitor_pause_resume"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suffix", required=True, help="e.g. before_effect_keys: the file is <scenario>_<suffix>.json")
    args = parser.parse_args()
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER), data_converter=pydantic_data_converter)
    try:
        await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in SEARCH_ATTRIBUTES}))
        for scenario in args.scenarios:
            workflow_id, history = await record(env, scenario)
            path = args.out / f"{scenario}_{args.suffix}.json"
            path.write_text(json.dumps({"workflow_id": workflow_id, "history": history}))
            print(f"recorded {path} ({len(history['events'])} events)")
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())

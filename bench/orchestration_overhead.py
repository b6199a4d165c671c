"""How much of a rollback's time is Temporal orchestration rather than real work?

K blue-green rollbacks in a row (policy without approval; before each one a broken v2
is deployed again, so there is something to roll back), each started with
`client.start_workflow` and timed to its result. The workflow's own event history
says how long the activities really ran: the sum, over every activity, of
ActivityTaskStarted -> ActivityTaskCompleted/Failed/TimedOut/Canceled. The rest is
overhead:

  client view   overhead = wall (start_workflow -> result) - activity time
  server view   overhead = (WorkflowExecutionStarted -> close event) - activity time

and the server view is broken down into workflow tasks (scheduled -> completed, i.e.
task-queue latency plus the worker running workflow code) and activity
schedule-to-start latency. The counts of activities and workflow tasks (each
WorkflowTaskCompleted is one round trip server -> worker -> server) explain the sum.

Target: median client-view overhead under 300 ms. Exits 0 either way; JSON on stdout
and in bench/results/orchestration_overhead.json.

    .venv/bin/python bench/orchestration_overhead.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _harness import (run_benchmark, backend_stack, decompose, in_process_worker, log, machine,
                      summarize, temporal_server)

from temporalio.client import Client, WorkflowFailureError

from rollback.models import RollbackRequest, RollbackResult, RollbackTarget, RollbackTrigger

TARGET_MS = 300
RUN_DEADLINE_SECONDS = 120.0

async def one_rollback(client: Client, task_queue: str, index: int) -> dict[str, Any]:
    request = RollbackRequest(environment="demo", targets=[RollbackTarget.BACKEND], trigger=RollbackTrigger.MANUAL,
                              initiated_by="bench", reason=f"bench: orchestration overhead run {index}")
    workflow_id = f"rollback-demo-bench-{index}-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    handle = await client.start_workflow("RollbackWorkflow", request, id=workflow_id, task_queue=task_queue,
                                         result_type=RollbackResult)
    try:
        result: RollbackResult | None = await asyncio.wait_for(handle.result(), timeout=RUN_DEADLINE_SECONDS)
    except WorkflowFailureError as err:
        log(f"run {index}: workflow failed: {err.cause}")
        result = None
    wall = time.perf_counter() - t0
    history = await handle.fetch_history()
    d = decompose(list(history.events))
    server_overhead = d["span_s"] - d["activity_s"]
    return {
        "run": index,
        "workflow_id": workflow_id,
        "state": result.state.value if result else "failed",
        "wall_s": round(wall, 4),
        "activity_s": round(d["activity_s"], 4),
        "overhead_ms": round((wall - d["activity_s"]) * 1000, 1),
        "overhead_share": round((wall - d["activity_s"]) / wall, 3) if wall else None,
        "server_span_s": round(d["span_s"], 4),
        "server_overhead_ms": round(server_overhead * 1000, 1),
        "client_extra_ms": round((wall - d["span_s"]) * 1000, 1),
        "activities": d["activities"],
        "workflow_tasks": d["workflow_tasks"],
        "history_events": d["events"],
        "server_overhead_breakdown_ms": {
            "activity_schedule_to_start": round(d["activity_queue_s"] * 1000, 1),
            "workflow_task_schedule_to_start": round(d["workflow_task_queue_s"] * 1000, 1),
            "workflow_task_start_to_complete": round(d["workflow_task_run_s"] * 1000, 1),
            "rest": round((server_overhead - d["activity_queue_s"] - d["workflow_task_queue_s"]
                           - d["workflow_task_run_s"]) * 1000, 1),
        },
        "per_activity": d["per_activity"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    error = None
    with tempfile.TemporaryDirectory(prefix="rollback-bench-") as tmp:
        async with temporal_server() as env:
            with backend_stack(Path(tmp) / "bg", "blue_green", ["blue", "green"]) as stack:
                config_path = Path(tmp) / "bg" / "rollback.yaml"
                stack.write_config(config_path, policy={"require_approval": False})
                async with in_process_worker(env.client, config_path) as task_queue:
                    try:
                        for index in range(args.runs):
                            stack.deploy("v2", "errors")
                            run = await one_rollback(env.client, task_queue, index)
                            log(f"run {index}: {run['state']} wall {run['wall_s']}s, activities {run['activity_s']}s, "
                                f"overhead {run['overhead_ms']} ms ({run['activities']} activities, "
                                f"{run['workflow_tasks']} workflow tasks)")
                            if not args.per_activity:
                                run.pop("per_activity")
                            runs.append(run)
                    except Exception as err:  # noqa: BLE001 - report what was measured so far
                        log(f"failed: {type(err).__name__}: {err}")
                        error = f"{type(err).__name__}: {err}"

    overhead = [r["overhead_ms"] for r in runs]
    warm = [r["overhead_ms"] for r in runs[1:]]
    median = summarize(overhead)["median"]
    ok = bool(runs) and error is None and all(r["state"] == "succeeded" for r in runs)
    met = ok and median is not None and median < TARGET_MS
    summary = {
        "overhead_ms": summarize(overhead),
        "overhead_ms_warm": summarize(warm),
        "server_overhead_ms": summarize([r["server_overhead_ms"] for r in runs]),
        "wall_s": summarize([r["wall_s"] for r in runs]),
        "activity_s": summarize([r["activity_s"] for r in runs]),
        "overhead_share": summarize([r["overhead_share"] for r in runs if r["overhead_share"] is not None]),
        "activities": sorted({r["activities"] for r in runs}),
        "workflow_tasks": sorted({r["workflow_tasks"] for r in runs}),
    }
    if runs:
        n = summary["workflow_tasks"][-1]
        summary["overhead_per_workflow_task_ms"] = round(median / n, 1) if median is not None and n else None
    return {
        "benchmark": "orchestration_overhead",
        "target": f"median overhead (wall - activity time) < {TARGET_MS} ms",
        "result": "target met" if met else "target missed",
        "max_within_target": bool(overhead) and max(overhead) < TARGET_MS,
        "error": error,
        "summary": summary,
        "runs": runs,
        "note": "run 0 is cold (first workflow task loads the workflow sandbox); overhead_ms_warm leaves it out",
        "machine": machine(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--per-activity", action="store_true", help="list every activity's queue and run time")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 100:
        parser.error("--runs must be between 1 and 100")
    return args


if __name__ == "__main__":
    run_benchmark(main, parse_args(sys.argv[1:]), "orchestration_overhead")

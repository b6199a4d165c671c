"""Small test helpers: polling with a deadline, and reading what the front door serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from temporalio.client import Client

from rollback.client import RollbackOrchestrator
from rollback.models import RollbackStatus
from rollback.settings import TemporalSettings

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *,
                     timeout: float = 30, interval: float = 0.1, what: str = "condition") -> T:
    """Poll `probe` until `accept` holds; fail with the last value seen after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
            if accept(last):
                return last
        except Exception as err:  # noqa: BLE001 - not ready yet
            last = err  # type: ignore[assignment]
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

"""Keep a long activity's heartbeat going while it waits on threads, subprocesses or sockets.

Heartbeats are how Temporal notices a dead worker (heartbeat timeout) and how a
cancellation reaches a running activity; a step blocked in nginx -s reload or a slow
health sample must not look dead, so a background task beats every second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

INTERVAL_SECONDS = 1.0


@contextlib.asynccontextmanager
async def heartbeating(what: str) -> AsyncIterator[None]:
    if not activity.in_activity():
        yield
        return

    async def beat() -> None:
        while True:
            activity.heartbeat(what)
            await asyncio.sleep(INTERVAL_SECONDS)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

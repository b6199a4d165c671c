"""What a configured target serves now, read where it is served: `rollback record-deploy` records only what
is live, so the version record and the front door never drift apart silently.

Kept out of the targets' config models: workflows import those (through the registry), and this does I/O.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httpx

from rollback.config_parts import TargetConfig
from rollback.targets.backend.config import BackendTarget
from rollback.targets.frontend.config import FrontendTarget


async def live_version(target: TargetConfig) -> str | None:
    """The live version; None for a target with no cheap way to tell (a database: its migrations record
    themselves). Raises LookupError naming where it asked when that place does not answer."""
    if isinstance(target, BackendTarget):
        return await _front_door_version(target)
    if isinstance(target, FrontendTarget):
        live = await asyncio.to_thread(target.store.open().live)
        if live is None:
            raise LookupError("its store has no live release")
        return live
    return None


async def _front_door_version(target: BackendTarget) -> str:
    async with httpx.AsyncClient() as http:
        return await answered_version(http, target.router.front_url.rstrip("/") + target.version_path, target.health.timeout_seconds)


class Getter(Protocol):
    async def get(self, url: str, *, timeout: float) -> httpx.Response: ...


async def answered_version(http: Getter | httpx.AsyncClient, url: str, timeout: float) -> str:
    """The `version` a release's version endpoint answers (`{"version": ...}`); LookupError naming the URL otherwise.
    `http`: a client, or the worker's HttpHealth (which retries a keep-alive connection nginx closed on reload)."""
    try:
        answer = await http.get(url, timeout=timeout)
        version = answer.json().get("version") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError) as err:
        raise LookupError(f"the front door {url} does not answer its version ({type(err).__name__})") from None
    if not isinstance(version, str):
        raise LookupError(f"the front door {url} answers no version (HTTP {answer.status_code})")
    return version

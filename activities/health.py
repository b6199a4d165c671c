"""HTTP health validation: N samples, expected status/body/version, latency, success ratio."""

from __future__ import annotations

import asyncio
import time

import httpx
from pydantic import BaseModel
from temporalio import activity

from activities.heartbeat import heartbeating
from rollback.config_parts import HealthCheck
from rollback.models import HealthReport, HealthSample
from rollback.payloads import CHECK_HTTP


class HttpCheckInput(BaseModel):
    base_url: str
    check: HealthCheck
    version_path: str = "/version"
    expect_version: str | None = None


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


class HttpHealth:
    """Holds one HTTP client for all checks (connection reuse keeps samples honest)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, url: str, timeout: float) -> httpx.Response:
        """GET, retrying once when a pooled keep-alive connection turns out closed.

        nginx closes idle keep-alive connections on every graceful reload; that is
        our client's stale socket, not an unhealthy service.
        """
        try:
            return await self.client.get(url, timeout=timeout)
        except httpx.RemoteProtocolError:
            return await self.client.get(url, timeout=timeout)

    async def sample(self, inp: HttpCheckInput) -> HealthSample:
        check = inp.check
        started = time.perf_counter()
        try:
            response = await self.get(inp.base_url.rstrip("/") + check.path, check.timeout_seconds)
            latency_ms = (time.perf_counter() - started) * 1000
            version = None
            if inp.expect_version is not None:
                answer = await self.get(inp.base_url.rstrip("/") + inp.version_path, check.timeout_seconds)
                version = answer.json().get("version") if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as err:
            return HealthSample(ok=False, error=f"{type(err).__name__}: {err}"[:200])
        problems = []
        if response.status_code != check.expected_status:
            problems.append(f"status {response.status_code} != {check.expected_status}")
        if check.expected_body is not None and check.expected_body not in response.text:
            problems.append(f"body lacks {check.expected_body!r}")
        if latency_ms > check.max_latency_ms:
            problems.append(f"latency {latency_ms:.0f} ms > {check.max_latency_ms} ms")
        if inp.expect_version is not None and version != inp.expect_version:
            problems.append(f"version {version!r} != {inp.expect_version!r}")
        return HealthSample(
            ok=not problems, status=response.status_code, latency_ms=round(latency_ms, 2),
            version=version, error="; ".join(problems) or None,
        )

    async def validate(self, inp: HttpCheckInput) -> HealthReport:
        samples: list[HealthSample] = []
        for index in range(inp.check.samples):
            if index:
                await asyncio.sleep(inp.check.interval_ms / 1000)
            samples.append(await self.sample(inp))
        successes = sum(s.ok for s in samples)
        ratio = successes / len(samples)
        versions: dict[str, int] = {}
        for s in samples:
            if s.version is not None:
                versions[s.version] = versions.get(s.version, 0) + 1
        failures = [s.error for s in samples if not s.ok and s.error]
        return HealthReport(
            url=inp.base_url.rstrip("/") + inp.check.path,
            healthy=ratio >= inp.check.success_ratio,
            samples=len(samples),
            successes=successes,
            success_ratio=round(ratio, 4),
            required_ratio=inp.check.success_ratio,
            p95_latency_ms=_p95([s.latency_ms for s in samples if s.latency_ms is not None]),
            versions=versions,
            detail="; ".join(sorted(set(failures)))[:500],
        )

    @activity.defn(name=CHECK_HTTP)
    async def check_http(self, inp: HttpCheckInput) -> HealthReport:
        async with heartbeating(f"check {inp.base_url}"):
            return await self.validate(inp)

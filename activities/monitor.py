"""Metric collection for the HealthMonitorWorkflow: probes, Prometheus, PostgreSQL, host, dependencies.

One `monitor.collect` call gathers every configured source concurrently. Each source
is bounded by its own timeout and can only spoil its own readings: a Prometheus
outage is `provider_down` for the Prometheus metrics, never a failed collection, and
never a value the rules could mistake for a breach. The rule engine
(rollback.monitoring) decides what the readings mean.

Secrets: the PostgreSQL DSN is read from the environment variable the config names,
inside the activity, and never appears in a reading, an error detail or a log line.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from rollback.config import (DEFAULT_PROMETHEUS_WINDOW_SECONDS, HOST_GAUGES, POSTGRES_GAUGES, ConfigSource, Dependency,
                             MetricDefinition, Monitoring, PostgresSource, Probe, PrometheusSource, dependency_gauges)
from rollback.monitoring import Collection, MonitorSettings, ProbeSample, Reading
from rollback.payloads import COLLECT_READINGS, MONITOR_SETTINGS, CollectInput

__all__ = ["CollectInput", "HealthMonitor"]

# A source that overruns its own timeout by this much is cut off (connect + query + close, slack).
SOURCE_GRACE_SECONDS = 1.0
# CPU percent is a rate over two /proc/stat snapshots; shorter spans are mostly scheduler noise.
CPU_MIN_SPAN_SECONDS = 1.0
DETAIL_LIMIT = 200

PROC = Path("/proc")

_POSTGRES_QUERY = """
SELECT
  (SELECT sum(numbackends) FROM pg_stat_database)::float8
    / current_setting('max_connections')::float8 AS connections_used_ratio,
  (SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'
      AND query_start < clock_timestamp() - make_interval(secs => $1)) AS long_running_queries,
  (SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock') AS blocked_queries
"""


def _invalid(message: str) -> ApplicationError:
    return ApplicationError(message, type="InvalidRequest", non_retryable=True)


def _short(err: BaseException) -> str:
    text = str(err).strip().replace("\n", " ")
    return (f"{type(err).__name__}: {text}" if text else type(err).__name__)[:DETAIL_LIMIT]


def _duration(seconds: float) -> str:
    """A PromQL duration: whole seconds when possible, else milliseconds (PromQL has no fractions)."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def _down(keys: tuple[str, ...] | list[str], detail: str) -> dict[str, Reading]:
    return {key: Reading(status="provider_down", detail=detail[:DETAIL_LIMIT]) for key in keys}


class _CpuSnapshot(BaseModel):
    busy: int
    total: int


class HealthMonitor:
    """Holds the config and one HTTP client; keeps the previous CPU snapshot between collections."""

    def __init__(self, config: ConfigSource, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        # (monotonic time, snapshot), oldest first; pruned to the newest one older than CPU_MIN_SPAN_SECONDS.
        self._cpu: deque[tuple[float, _CpuSnapshot]] = deque()

    def monitoring(self, environment: str) -> Monitoring:
        config = self.config.get()
        env = config.environments.get(environment)
        if env is None:
            raise _invalid(f"unknown environment {environment!r}; configured: {', '.join(sorted(config.environments)) or 'none'}")
        if env.monitoring is None:
            raise _invalid(f"environment {environment!r} has no 'monitoring' block in {self.config.path}")
        return env.monitoring

    @activity.defn(name=MONITOR_SETTINGS)
    async def settings(self, environment: str) -> MonitorSettings:
        monitoring = self.monitoring(environment)
        return monitoring.settings(environment, self.config.get().rollback.auto_rollback_enabled)

    @activity.defn(name=COLLECT_READINGS)
    async def collect(self, inp: CollectInput) -> Collection:
        monitoring = self.monitoring(inp.environment)
        collection = Collection()
        async with heartbeating(f"collect {inp.environment}"):
            jobs: list[Awaitable[None]] = [self._probe(p, collection) for p in monitoring.probes]
            prometheus = {n: m for n, m in monitoring.all_metrics().items() if m.source == "prometheus"}
            if monitoring.prometheus is not None and prometheus:
                for name, metric in prometheus.items():
                    window = inp.prometheus_windows.get(name, DEFAULT_PROMETHEUS_WINDOW_SECONDS)
                    jobs.append(self._guard(list((name,)), monitoring.prometheus.timeout_seconds, collection,
                                            partial(self._prometheus, monitoring.prometheus, name, metric, window)))
            if monitoring.postgres is not None:
                pg = monitoring.postgres
                jobs.append(self._guard(list(POSTGRES_GAUGES), pg.timeout_seconds, collection, lambda: self._postgres(pg)))
            if monitoring.host:
                jobs.append(self._guard(list(HOST_GAUGES), 2.0, collection, self._host))
            for dependency in monitoring.dependencies:
                jobs.append(self._guard(list(dependency_gauges(dependency.name)), dependency.timeout_seconds, collection,
                                        partial(self._dependency, dependency)))
            await asyncio.gather(*jobs)
        return collection

    async def _guard(self, keys: list[str], timeout: float, collection: Collection,
                     source: Callable[[], Awaitable[dict[str, Reading]]]) -> None:
        """Run one source under its deadline; whatever goes wrong becomes provider_down for its keys only."""
        try:
            readings = await asyncio.wait_for(source(), timeout + SOURCE_GRACE_SECONDS)
        except asyncio.TimeoutError:
            readings = _down(keys, f"no answer within {timeout:g}s")
        except Exception as err:  # noqa: BLE001 - one broken source must not fail the collection
            readings = _down(keys, _short(err))
        collection.readings.update(readings)

    # -- synthetic probes --------------------------------------------------------------

    async def _probe(self, probe: Probe, collection: Collection) -> None:
        try:
            samples = await asyncio.gather(*(self._probe_once(probe) for _ in range(probe.requests)))
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
            collection.probe_errors[probe.name] = f"cannot probe {probe.url}: {_short(err)}"[:DETAIL_LIMIT]
            return
        except Exception as err:  # noqa: BLE001 - our failure to probe, not the service's
            collection.probe_errors[probe.name] = f"cannot probe {probe.url}: {_short(err)}"[:DETAIL_LIMIT]
            return
        collection.probes[probe.name] = list(samples)

    async def _probe_once(self, probe: Probe) -> ProbeSample:
        started = time.perf_counter()
        try:
            # httpx applies its timeout per phase (connect, each read ...); the deadline bounds the whole request.
            async with asyncio.timeout(probe.timeout_seconds):
                try:
                    response = await self.http.get(probe.url, timeout=probe.timeout_seconds)
                except httpx.RemoteProtocolError:
                    # A pooled keep-alive socket closed by the server (nginx does on every reload):
                    # our stale connection, not a failing service. Once more on a fresh one.
                    response = await self.http.get(probe.url, timeout=probe.timeout_seconds)
            ok = response.status_code == probe.expected_status
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise
        except (httpx.HTTPError, TimeoutError):
            ok = False  # refused, reset, timed out: the service failed this request
        return ProbeSample(ok=ok, latency_ms=round((time.perf_counter() - started) * 1000, 2))

    # -- Prometheus ----------------------------------------------------------------

    async def _prometheus(self, source: PrometheusSource, name: str, metric: MetricDefinition,
                          window_seconds: float) -> dict[str, Reading]:
        # PromQL is full of braces: replace the placeholder, never str.format.
        query = (metric.query or "").replace("{window}", _duration(window_seconds))
        url = source.url.rstrip("/") + "/api/v1/query"
        try:
            response = await self.http.get(url, params={"query": query, "timeout": _duration(source.timeout_seconds)},
                                           timeout=source.timeout_seconds)
        except httpx.HTTPError as err:
            return _down([name], f"prometheus unreachable: {_short(err)}")
        try:
            body = response.json()
        except ValueError:
            return _down([name], f"prometheus answered HTTP {response.status_code} without JSON")
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error", "") if isinstance(body, dict) else ""
            error_type = body.get("errorType", "") if isinstance(body, dict) else ""
            return _down([name], f"prometheus HTTP {response.status_code} {error_type}: {error}".strip())
        return {name: _prometheus_reading(body.get("data") or {})}

    # -- PostgreSQL ----------------------------------------------------------------

    async def _postgres(self, source: PostgresSource) -> dict[str, Reading]:
        dsn = os.environ.get(source.dsn_env)
        if not dsn:
            return _down(POSTGRES_GAUGES, f"environment variable {source.dsn_env} is not set")
        try:
            return await self._postgres_readings(dsn, source)
        except Exception as err:  # noqa: BLE001 - driver, network or DSN: scrubbed, then provider_down
            return _down(POSTGRES_GAUGES, f"postgres: {_scrub(_short(err), dsn)}")

    async def _postgres_readings(self, dsn: str, source: PostgresSource) -> dict[str, Reading]:
        # One short-lived connection per collection: nothing to go stale between collections,
        # and a changed DSN applies at once. The monitor's own session is excluded from the counts.
        connection = await asyncpg.connect(dsn, timeout=source.timeout_seconds, command_timeout=source.timeout_seconds,
                                           server_settings={"application_name": "rollback-monitor"})
        try:
            started = time.perf_counter()
            await connection.fetchval("SELECT 1")
            latency_ms = (time.perf_counter() - started) * 1000
            row = await connection.fetchrow(_POSTGRES_QUERY, float(source.long_query_seconds))
        except BaseException:
            connection.terminate()
            raise
        await connection.close(timeout=source.timeout_seconds)
        ratio = row["connections_used_ratio"]
        return {
            "postgres.connections_used_ratio": (Reading(value=round(ratio, 6)) if ratio is not None and math.isfinite(ratio)
                                                else Reading(status="no_data", detail="no connection statistics")),
            "postgres.probe_latency_ms": Reading(value=round(latency_ms, 3)),
            "postgres.long_running_queries": Reading(value=float(row["long_running_queries"])),
            "postgres.blocked_queries": Reading(value=float(row["blocked_queries"])),
        }

    # -- host ----------------------------------------------------------------------

    async def _host(self) -> dict[str, Reading]:
        return {"host.cpu_percent": self._cpu_percent(), "host.memory_percent": _memory_percent()}

    def _cpu_percent(self) -> Reading:
        now = time.monotonic()
        current = _read_cpu()
        reference = next((snap for at, snap in reversed(self._cpu) if now - at >= CPU_MIN_SPAN_SECONDS), None)
        if reference is None and self._cpu:
            reference = self._cpu[0][1]  # younger than the ideal span, still a rate
        self._cpu.append((now, current))
        # Keep the newest snapshot that is already old enough, and everything younger.
        while len(self._cpu) > 1 and now - self._cpu[1][0] >= CPU_MIN_SPAN_SECONDS:
            self._cpu.popleft()
        if reference is None:
            return Reading(status="no_data", detail="first CPU snapshot; a rate needs two")
        total = current.total - reference.total
        if total <= 0:
            return Reading(status="no_data", detail="no CPU time elapsed since the previous snapshot")
        busy = current.busy - reference.busy
        return Reading(value=round(min(100.0, max(0.0, 100.0 * busy / total)), 2))

    # -- dependencies --------------------------------------------------------------

    async def _dependency(self, dependency: Dependency) -> dict[str, Reading]:
        up_key, latency_key = dependency_gauges(dependency.name)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(dependency.timeout_seconds):
                response = await self.http.get(dependency.url, timeout=dependency.timeout_seconds)
        except TimeoutError:
            return {up_key: Reading(value=0.0, detail=f"no answer within {dependency.timeout_seconds:g}s"),
                    latency_key: Reading(status="no_data", detail="no answer")}
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            # The dependency is down: that is a value (0.0), not a monitoring outage.
            return {up_key: Reading(value=0.0, detail=_short(err)),
                    latency_key: Reading(status="no_data", detail="no answer")}
        latency_ms = (time.perf_counter() - started) * 1000
        up = response.status_code == dependency.expected_status
        return {up_key: Reading(value=1.0 if up else 0.0,
                                detail="" if up else f"HTTP {response.status_code} != {dependency.expected_status}"),
                latency_key: Reading(value=round(latency_ms, 3))}


def _prometheus_reading(data: dict) -> Reading:
    kind = data.get("resultType")
    result = data.get("result")
    if kind == "scalar":
        values = [result[1]] if isinstance(result, list) and len(result) == 2 else []
    elif kind == "vector":
        values = [series.get("value", [None, None])[1] for series in result or []]
    else:
        return Reading(status="no_data", detail=f"unsupported result type {kind!r}; the query must return a vector or scalar")
    numbers = []
    for raw in values:
        try:
            number = float(raw)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            numbers.append(number)
    if not numbers:
        # Empty vector, or NaN from 0/0 when there is no traffic: no data, never a breach.
        return Reading(status="no_data", detail="empty result" if not values else "no finite value (NaN/Inf)")
    if len(numbers) > 1:
        return Reading(value=max(numbers), detail=f"max of {len(numbers)} series; aggregate the query to pick one")
    return Reading(value=numbers[0])


def _scrub(text: str, dsn: str) -> str:
    """Drop the DSN and its password from a driver message, whatever the driver chose to quote."""
    secrets = [dsn]
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        secrets.append(password)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _read_cpu() -> _CpuSnapshot:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user already)
    fields = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return _CpuSnapshot(busy=total - idle, total=total)


def _memory_percent() -> Reading:
    info: dict[str, int] = {}
    for line in (PROC / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0])
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if not total or available is None:
        return Reading(status="no_data", detail="MemTotal/MemAvailable missing from /proc/meminfo")
    return Reading(value=round(100.0 * (total - available) / total, 2))

"""Metric sources of the monitor against real components: nginx + demo app, Prometheus, PostgreSQL, /proc."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import yaml
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.monitor import CollectInput, HealthMonitor
from rollback.config import ConfigError, ConfigSource, load_config
from rollback.ports import free_port
from rollback.targets.database.pg import local_dsn, with_database
from rollback.monitoring import Collection
from tests.conftest import write_config
from tests.helpers import eventually
from tests.prometheus import PrometheusServer, metrics_target, prometheus  # noqa: F401 - fixtures

ERROR_RATIO_QUERY = 'sum(rate(http_requests_total{code=~"5.."}[{window}])) / sum(rate(http_requests_total[{window}]))'
POSTGRES_KEYS = {"postgres.connections_used_ratio", "postgres.probe_latency_ms",
                 "postgres.long_running_queries", "postgres.blocked_queries"}


# -- helpers ---------------------------------------------------------------------------

def config_dict(tmp_path: Path, monitoring: dict[str, Any] | None, **rollback: Any) -> dict[str, Any]:
    """A valid rollback.yaml without a running stack: the backend target is only described."""
    backend = {
        "strategy": "blue_green",
        "router": {"upstream_file": str(tmp_path / "upstream.conf"), "reload_command": ["true"],
                   "front_url": "http://127.0.0.1:1"},
        "colours": {"blue": {"address": "127.0.0.1:1"}, "green": {"address": "127.0.0.1:2"}},
    }
    demo: dict[str, Any] = {"targets": {"backend": backend}}
    if monitoring is not None:
        demo["monitoring"] = monitoring
    return {"state_dir": str(tmp_path / "state"), "rollback": {"notification_channels": ["log"], **rollback},
            "environments": {"demo": demo, "quiet": {"targets": {"backend": backend}}}}


def config_source(tmp_path: Path, monitoring: dict[str, Any] | None, **rollback: Any) -> ConfigSource:
    path = tmp_path / f"rollback-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, monitoring, **rollback)))
    return ConfigSource(path)


async def collect(monitor: HealthMonitor, windows: dict[str, float] | None = None,
                  heartbeats: list[Any] | None = None) -> Collection:
    env = ActivityEnvironment()
    if heartbeats is not None:
        env.on_heartbeat = lambda *details: heartbeats.extend(details)
    return await env.run(monitor.collect, CollectInput(environment="demo", prometheus_windows=windows or {}))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


# -- configuration ----------------------------------------------------------------------

PROBE = {"name": "front", "url": "http://127.0.0.1:8080/api/items"}


@pytest.mark.parametrize("monitoring, expected", [
    ({"probes": [PROBE], "metrics": {"slow": {"source": "probe", "probe": "back", "stat": "latency_p99_ms"}}},
     "metrics.slow.probe: probe 'back' is not configured (probes: front)"),
    ({"probes": [PROBE], "rules": [{"name": "api_error_rate", "threshold": 0.05, "window_minutes": 5},
                                   {"name": "queue_depth", "threshold": 10, "window_minutes": 5}]},
     "rules.1 ('queue_depth'): unknown metric 'queue_depth'; define it under 'metrics'"),
    ({"probes": [PROBE], "rules": [{"name": "db_blocked", "metric": "postgres.blocked_queries", "threshold": 1, "window_minutes": 1}]},
     "rules.0 ('db_blocked'): unknown metric 'postgres.blocked_queries'; postgres gauges need the 'postgres' source"),
    ({"metrics": {"http_error_ratio": {"source": "prometheus", "query": ERROR_RATIO_QUERY}},
      "rules": [{"name": "http_error_ratio", "threshold": 0.05, "window_minutes": 5}]},
     "metrics.http_error_ratio: a prometheus metric needs the 'prometheus' source configured"),
    ({"prometheus": {"url": "http://127.0.0.1:9090"}, "metrics": {"x": {"source": "prometheus"}}},
     "metrics.x: Value error, a prometheus metric needs 'query'"),
    ({}, "default rule 'api_error_rate': unknown metric 'api_error_rate'; define it under 'metrics' or configure a probe"),
    ({"probes": [{"name": "front", "url": "localhost:8080/api"}]}, "monitoring.probes.0.url"),
    ({"probes": [PROBE, PROBE]}, "probes: duplicate name(s) front"),
    ({"probes": [PROBE], "targets": ["database"]}, "monitoring.targets: target 'database' is not configured in this environment"),
    ({"probes": [PROBE], "metrics": {"host.cpu": {"source": "probe", "probe": "front", "stat": "error_ratio"}}},
     "dotted names are reserved for gauges"),
    ({"probes": [{**PROBE, "requests": 0}]}, "monitoring.probes.0.requests"),
    ({"probes": [PROBE], "poll": 5}, "environments.demo.monitoring.poll: Extra inputs are not permitted"),
])
def test_config_errors_name_the_field(tmp_path, monitoring, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, monitoring)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value), str(err.value)


async def test_settings_give_the_workflow_its_metrics_and_widest_windows(tmp_path, http):
    config = config_source(tmp_path, {
        "interval_seconds": 5, "cooldown_minutes": 2, "consecutive_error_limit": 3,
        "probes": [PROBE, {"name": "login", "url": "http://127.0.0.1:8080/login", "requests": 3}],
        "prometheus": {"url": "http://127.0.0.1:9090"},
        "postgres": {"dsn_env": "SHOP_DB_URL"},
        "host": True,
        "dependencies": [{"name": "payments", "url": "http://127.0.0.1:9999/health"}],
        "metrics": {
            "http_error_ratio": {"source": "prometheus", "query": ERROR_RATIO_QUERY},
            "unused_ratio": {"source": "prometheus", "query": "sum(up)"},
            "login_p99": {"source": "probe", "probe": "login", "stat": "latency_p99_ms"},
        },
        "rules": [
            {"name": "api_error_rate", "threshold": 0.05, "window_minutes": 5, "severity": "high"},
            {"name": "errors_fast", "metric": "http_error_ratio", "threshold": 0.5, "window_seconds": 120, "severity": "critical"},
            {"name": "errors_slow", "metric": "http_error_ratio", "threshold": 0.05, "window_minutes": 10},
            {"name": "login_slow", "metric": "login_p99", "threshold": 3000, "window_minutes": 5},
            {"name": "db_full", "metric": "postgres.connections_used_ratio", "threshold": 0.9, "window_minutes": 2},
            {"name": "payments_down", "metric": "dependency.payments.up", "threshold": 1, "comparison": "<",
             "window_minutes": 1, "severity": "low"},
        ],
    }, auto_rollback_enabled=False)
    monitor = HealthMonitor(config, http)
    settings = await ActivityEnvironment().run(monitor.settings, "demo")

    assert (settings.environment, settings.interval_seconds, settings.cooldown_minutes, settings.consecutive_error_limit) == ("demo", 5, 2, 3)
    assert settings.auto_rollback_enabled is False and [t.value for t in settings.targets] == ["backend"]
    assert [r.name for r in settings.rules] == ["api_error_rate", "errors_fast", "errors_slow", "login_slow", "db_full", "payments_down"]
    specs = {m.name: (m.source, m.probe, m.stat) for m in settings.metrics}
    assert specs == {
        "http_error_ratio": ("prometheus", None, "last"),
        "unused_ratio": ("prometheus", None, "last"),
        "login_p99": ("probe", "login", "latency_p99_ms"),
        # defaults from the first probe
        "api_error_rate": ("probe", "front", "error_ratio"),
        "response_time_p95": ("probe", "front", "latency_p95_ms"),
        **{key: ("gauge", None, "last") for key in [*sorted(POSTGRES_KEYS), "host.cpu_percent", "host.memory_percent",
                                                    "dependency.payments.up", "dependency.payments.latency_ms"]},
    }
    # The widest window of the rules that use the metric; unused metrics get none.
    assert settings.prometheus_windows == {"http_error_ratio": 600.0}
    assert "SHOP_DB_URL" not in settings.model_dump_json(), "the workflow never needs the DSN's variable"

    for environment, message in (("nope", "unknown environment 'nope'"), ("quiet", "environment 'quiet' has no 'monitoring' block")):
        for call, arg in ((monitor.settings, environment), (monitor.collect, CollectInput(environment=environment))):
            with pytest.raises(ApplicationError) as err:
                await ActivityEnvironment().run(call, arg)
            assert err.value.type == "InvalidRequest" and err.value.non_retryable and message in str(err.value)


# -- synthetic probes -------------------------------------------------------------------

async def test_probes_judge_the_front_door(blue_green, tmp_path, http):
    config = write_config(blue_green, tmp_path, extra={"environments": {"demo": {"monitoring": {"probes": [
        {"name": "api", "url": f"{blue_green.front_url}/api/items", "requests": 5, "timeout_seconds": 2},
        {"name": "impatient", "url": f"{blue_green.front_url}/api/items", "requests": 2, "timeout_seconds": 1},
        {"name": "closed", "url": f"http://127.0.0.1:{free_port()}/api/items", "requests": 3},
        {"name": "unrequestable", "url": "http://xn--a.example/", "requests": 2},
    ]}}}})
    monitor = HealthMonitor(config, http)
    heartbeats: list[Any] = []

    healthy = await collect(monitor, heartbeats=heartbeats)
    assert [s.ok for s in healthy.probes["api"]] == [True] * 5
    assert all(0 < s.latency_ms < 2000 for s in healthy.probes["api"])
    assert [s.ok for s in healthy.probes["impatient"]] == [True] * 2
    # A refused connection is the service failing requests (samples), not the monitor failing to probe.
    assert [s.ok for s in healthy.probes["closed"]] == [False] * 3 and "closed" not in healthy.probe_errors
    assert "unrequestable" not in healthy.probes and "xn--a.example" in healthy.probe_errors["unrequestable"]
    assert heartbeats == ["collect demo"]

    blue_green.deploy("v2", "errors")
    broken = await collect(monitor)
    assert [s.ok for s in broken.probes["api"]] == [False] * 5

    blue_green.deploy("v3", "latency")  # answers after 2.5 s: slower than either probe's timeout
    slow = await collect(monitor)
    assert [s.ok for s in slow.probes["impatient"]] == [False] * 2
    assert all(950 <= s.latency_ms < 2000 for s in slow.probes["impatient"]), slow.probes["impatient"]
    assert all(not s.ok and s.latency_ms >= 1950 for s in slow.probes["api"])


# -- Prometheus -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scraped(prometheus, metrics_target) -> PrometheusServer:  # noqa: F811 - fixtures
    """A Prometheus scraping a target that serves 10% errors; returns once a 10 s rate has data."""
    target = metrics_target(error_ratio=0.1)
    server = prometheus([target.address])
    server.wait_for_data("sum(rate(http_requests_total[10s]))", timeout=30)
    server.target = target  # type: ignore[attr-defined]
    return server


def prometheus_monitoring(url: str, **metrics: str) -> dict[str, Any]:
    return {
        "prometheus": {"url": url, "timeout_seconds": 2},
        "metrics": {name: {"source": "prometheus", "query": query} for name, query in metrics.items()},
        "rules": [{"name": name, "threshold": 0.5, "window_seconds": 10} for name in metrics],
    }


async def test_prometheus_values_and_no_data(scraped, tmp_path, http):
    config = config_source(tmp_path, prometheus_monitoring(
        scraped.url,
        http_error_ratio=ERROR_RATIO_QUERY,
        per_code=" rate(http_requests_total[{window}])",
        missing_series='sum(rate(http_requests_total{code="404"}[{window}]))',
        no_traffic="vector(0) / vector(0)",
        scalar_nan="0 / 0",
    ))
    monitor = HealthMonitor(config, http)
    settings = await ActivityEnvironment().run(monitor.settings, "demo")
    assert settings.prometheus_windows["http_error_ratio"] == 10

    got = await collect(monitor, settings.prometheus_windows)
    ratio = got.readings["http_error_ratio"]
    assert ratio.status == "ok" and ratio.value == pytest.approx(0.1, abs=0.02), ratio
    several = got.readings["per_code"]
    assert several.status == "ok" and several.value > 0 and "max of 2 series" in several.detail
    # An empty vector and NaN (0/0: no traffic) are no data, never a value a rule could breach on.
    for name in ("missing_series", "no_traffic", "scalar_nan"):
        assert got.readings[name].status == "no_data" and got.readings[name].value is None, (name, got.readings[name])

    # Without a window from the workflow the default (5 minutes) is substituted; the data is younger,
    # so the answer is the same ratio.
    default = await collect(monitor)
    assert default.readings["http_error_ratio"].value == pytest.approx(0.1, abs=0.02)


async def test_prometheus_down_unreachable_slow_or_refusing(prometheus, scraped, tmp_path, http, silent_port):  # noqa: F811
    stopped = prometheus([scraped.target.address])
    stopped.stop()
    urls = {"stopped": stopped.url, "closed": f"http://127.0.0.1:{free_port()}",
            "silent": f"http://127.0.0.1:{silent_port}", "not_prometheus": f"http://{scraped.target.address}"}
    for case, url in urls.items():
        monitor = HealthMonitor(config_source(tmp_path, prometheus_monitoring(url, http_error_ratio=ERROR_RATIO_QUERY)), http)
        reading = (await collect(monitor, {"http_error_ratio": 10})).readings["http_error_ratio"]
        assert reading.status == "provider_down" and reading.value is None and reading.detail, (case, reading)
    # A query Prometheus rejects: its error, not a value.
    monitor = HealthMonitor(config_source(tmp_path, prometheus_monitoring(scraped.url, broken="sum(rate(")), http)
    reading = (await collect(monitor)).readings["broken"]
    assert reading.status == "provider_down" and "bad_data" in reading.detail


# -- PostgreSQL -------------------------------------------------------------------------

def base_dsn() -> str:
    return local_dsn()


def dsn_for(database: str, *, password: str | None = None) -> str:
    return with_database(base_dsn(), database, password=password)


@pytest_asyncio.fixture
async def test_database() -> AsyncIterator[str]:
    """A fresh database, so session counts in it are ours alone; dropped afterwards."""
    name = f"rollback_monitor_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base_dsn(), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def postgres_monitoring(dsn_env: str, **postgres: Any) -> dict[str, Any]:
    return {"postgres": {"dsn_env": dsn_env, **postgres},
            "rules": [{"name": "db_blocked", "metric": "postgres.blocked_queries", "threshold": 0, "window_seconds": 30}]}


async def test_postgres_gauges_count_long_running_and_blocked_sessions(test_database, tmp_path, http, monkeypatch):
    variable = f"ROLLBACK_TEST_DSN_{uuid.uuid4().hex[:6].upper()}"
    planted = "PLANTEDpgSECRET0123"  # trust auth ignores it; it must still never leave the activity
    dsn = dsn_for(test_database, password=planted)
    monkeypatch.setenv(variable, dsn)
    monitor = HealthMonitor(config_source(tmp_path, postgres_monitoring(variable, long_query_seconds=0.5, timeout_seconds=5)), http)

    quiet = await collect(monitor)
    assert set(quiet.readings) == POSTGRES_KEYS and all(r.status == "ok" for r in quiet.readings.values()), quiet
    assert 0 < quiet.readings["postgres.connections_used_ratio"].value <= 1
    assert quiet.readings["postgres.probe_latency_ms"].value > 0
    assert quiet.readings["postgres.long_running_queries"].value == 0  # our own query is not counted
    assert quiet.readings["postgres.blocked_queries"].value == 0

    holder = await asyncpg.connect(dsn_for(test_database), timeout=10)
    waiter = await asyncpg.connect(dsn_for(test_database), timeout=10)
    sleeper = await asyncpg.connect(dsn_for(test_database), timeout=10)
    try:
        sleeping = asyncio.create_task(sleeper.execute("SELECT pg_sleep(30)"))
        await holder.execute("SELECT pg_advisory_lock(42)")
        waiting = asyncio.create_task(waiter.execute("SELECT pg_advisory_lock(42)"))
        busy = await eventually(lambda: collect(monitor),
                                lambda c: c.readings["postgres.blocked_queries"].value == 1
                                and c.readings["postgres.long_running_queries"].value == 2,
                                timeout=15, interval=0.2, what="one blocked session and two long-running queries")
        assert busy.readings["postgres.connections_used_ratio"].value > quiet.readings["postgres.connections_used_ratio"].value

        await holder.execute("SELECT pg_advisory_unlock(42)")
        await asyncio.wait_for(waiting, 10)
        await holder.execute("SELECT pg_cancel_backend($1)", sleeper.get_server_pid())
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(sleeping, 10)
        calm = await collect(monitor)
        assert calm.readings["postgres.blocked_queries"].value == 0 and calm.readings["postgres.long_running_queries"].value == 0
    finally:
        for connection in (holder, waiter, sleeper):
            connection.terminate()
    for collection in (quiet, busy, calm):
        text = collection.model_dump_json()
        assert planted not in text and dsn not in text


async def test_postgres_provider_down(tmp_path, http, monkeypatch, silent_port):
    variable = f"ROLLBACK_TEST_DSN_{uuid.uuid4().hex[:6].upper()}"
    monkeypatch.delenv(variable, raising=False)
    monitor = HealthMonitor(config_source(tmp_path, postgres_monitoring(variable, timeout_seconds=1)), http)

    missing = await collect(monitor)
    assert set(missing.readings) == POSTGRES_KEYS
    assert all(r.status == "provider_down" and f"environment variable {variable} is not set" in r.detail
               for r in missing.readings.values())

    planted = "PLANTEDpgSECRET4567"
    for case, dsn in {"closed port": f"postgresql://postgres:{planted}@127.0.0.1:{free_port()}/postgres",
                      "silent server": f"postgresql://postgres:{planted}@127.0.0.1:{silent_port}/postgres",
                      "no such database": dsn_for(f"missing_{uuid.uuid4().hex[:8]}", password=planted),
                      "not a DSN": f"mysql://root:{planted}@127.0.0.1/x"}.items():
        monkeypatch.setenv(variable, dsn)
        down = await collect(monitor)
        assert all(r.status == "provider_down" and r.detail for r in down.readings.values()), (case, down)
        assert planted not in down.model_dump_json() and dsn not in down.model_dump_json(), case


# -- host and dependencies --------------------------------------------------------------

async def test_host_cpu_and_memory(tmp_path, http):
    monitor = HealthMonitor(config_source(tmp_path, {"host": True, "rules": [
        {"name": "cpu", "metric": "host.cpu_percent", "threshold": 95, "window_minutes": 5}]}), http)
    first = await collect(monitor)
    assert first.readings["host.cpu_percent"].status == "no_data", "a rate needs two snapshots"
    assert 0 < first.readings["host.memory_percent"].value < 100
    await asyncio.sleep(0.3)
    second = await collect(monitor)
    cpu = second.readings["host.cpu_percent"]
    assert cpu.status == "ok" and 0 <= cpu.value <= 100


async def test_dependencies_up_down_and_wrong_status(scraped, tmp_path, http, silent_port):
    metrics_url = f"http://{scraped.target.address}/metrics"
    monitor = HealthMonitor(config_source(tmp_path, {
        "dependencies": [
            {"name": "metrics", "url": metrics_url},
            {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/health"},
            {"name": "hung", "url": f"http://127.0.0.1:{silent_port}/health", "timeout_seconds": 0.5},
            {"name": "picky", "url": metrics_url, "expected_status": 204},
        ],
        "rules": [{"name": "gone_down", "metric": "dependency.gone.up", "threshold": 1, "comparison": "<", "window_minutes": 1}],
    }), http)
    got = (await collect(monitor)).readings
    assert got["dependency.metrics.up"].value == 1.0 and got["dependency.metrics.latency_ms"].value > 0
    # A dead dependency is a value (down), not a monitoring outage.
    for name in ("gone", "hung"):
        assert got[f"dependency.{name}.up"].status == "ok" and got[f"dependency.{name}.up"].value == 0.0
        assert got[f"dependency.{name}.latency_ms"].status == "no_data"
    assert "no answer within 0.5s" in got["dependency.hung.up"].detail
    assert got["dependency.picky.up"].value == 0.0 and "HTTP 200 != 204" in got["dependency.picky.up"].detail
    assert got["dependency.picky.latency_ms"].status == "ok"


async def test_every_source_bounded_and_isolated(tmp_path, http, monkeypatch, silent_port):
    """Everything broken or hanging at once: the collection still returns, each source in its own time."""
    variable = f"ROLLBACK_TEST_DSN_{uuid.uuid4().hex[:6].upper()}"
    planted = "PLANTEDpgSECRET89ab"
    monkeypatch.setenv(variable, f"postgresql://postgres:{planted}@127.0.0.1:{silent_port}/postgres")
    silent = f"http://127.0.0.1:{silent_port}"
    monitor = HealthMonitor(config_source(tmp_path, {
        "probes": [{"name": "api", "url": f"{silent}/api", "requests": 3, "timeout_seconds": 0.5}],
        "prometheus": {"url": silent, "timeout_seconds": 0.5},
        "postgres": {"dsn_env": variable, "timeout_seconds": 0.5},
        "host": True,
        "dependencies": [{"name": "payments", "url": f"{silent}/health", "timeout_seconds": 0.5}],
        "metrics": {"http_error_ratio": {"source": "prometheus", "query": ERROR_RATIO_QUERY}},
    }), http)
    started = time.monotonic()
    got = await collect(monitor, {"http_error_ratio": 300})
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"sources run concurrently, each within its timeout (0.5 s); took {elapsed:.1f}s"
    assert [s.ok for s in got.probes["api"]] == [False] * 3
    assert got.readings["http_error_ratio"].status == "provider_down"
    assert all(got.readings[k].status == "provider_down" for k in POSTGRES_KEYS)
    assert got.readings["host.memory_percent"].status == "ok"
    assert got.readings["dependency.payments.up"].value == 0.0
    assert planted not in got.model_dump_json()

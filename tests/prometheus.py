"""Test harness: a real Prometheus on a free loopback port, and a metrics target the test controls.

Prometheus answers /-/ready within ~0.2 s of starting but holds its first sample
only after ~5–6 s (target discovery is throttled): tests poll for data, with a
deadline, not for readiness. Use it through the fixtures:

    from tests.prometheus import metrics_target, prometheus  # noqa: F401 (fixtures)

    def test_x(prometheus, metrics_target):
        target = metrics_target()
        server = prometheus([target.address])
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, start_http_server

from rollback.ports import free_port

PROMETHEUS_BINARY = "/usr/bin/prometheus"
READY_DEADLINE_SECONDS = 30
STOP_GRACE_SECONDS = 10


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (PROMETHEUS_BINARY if Path(PROMETHEUS_BINARY).exists() else None)
    if found is None:
        why = "prometheus is not installed (Debian package 'prometheus'; scripts/bootstrap.sh installs it)"
        if os.environ.get("CI"):  # CI installs every component: a missing one is a failure, never a quiet skip
            pytest.fail(why)
        pytest.skip(why)
    return found


@dataclass
class PrometheusServer:
    """One Prometheus process scraping `targets` every second, under `base_dir`."""

    base_dir: Path
    targets: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PrometheusServer":
        self.base_dir.mkdir(parents=True, exist_ok=True)
        config = self.base_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "app", "static_configs": [{"targets": list(self.targets)}]}],
        }))
        log = (self.base_dir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={self.base_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + READY_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus on {self.url} not ready within {READY_DEADLINE_SECONDS}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_GRACE_SECONDS)

    def log_tail(self, lines: int = 20) -> str:
        path = self.base_dir / "prometheus.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def query(self, promql: str) -> dict:
        return httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()

    def wait_for_data(self, promql: str, timeout: float = 30) -> dict:
        """Poll until `promql` returns a non-empty result; the first samples take ~5–6 s."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                last = self.query(promql)
                if last.get("status") == "success" and last["data"]["result"]:
                    return last
            except httpx.HTTPError as err:
                last = {"error": repr(err)}
            time.sleep(0.25)
        raise AssertionError(f"prometheus had no data for {promql!r} within {timeout}s; last: {last}; log: {self.log_tail(5)}")


class MetricsTarget:
    """A /metrics endpoint with `http_requests_total{code}`, incremented by a background thread
    at a chosen error ratio, so rate() over any window has a known answer."""

    def __init__(self, *, error_ratio: float = 0.1, per_tick: int = 10, tick_seconds: float = 0.1) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests_total", "requests served", ["code"], registry=self.registry)
        self.port = free_port()
        self.error_ratio = error_ratio
        self.per_tick = per_tick
        self.tick_seconds = tick_seconds
        self._stop = threading.Event()
        self._server, self._serving = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self._ticker = threading.Thread(target=self._tick, name="metrics-target", daemon=True)
        self._ticker.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            errors = round(self.per_tick * self.error_ratio)
            self.requests.labels(code="500").inc(errors)
            self.requests.labels(code="200").inc(self.per_tick - errors)

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[list[str]], PrometheusServer]]:
    """Factory: `prometheus(["127.0.0.1:P"])` starts a Prometheus scraping those targets; all stop at the end."""
    servers: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        server = PrometheusServer(base_dir=tmp_path_factory.mktemp("prometheus"), targets=targets)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def metrics_target() -> Iterator[Callable[..., MetricsTarget]]:
    """Factory: `metrics_target(error_ratio=0.1)` serves a counter the test controls; all stop at the end."""
    targets: list[MetricsTarget] = []

    def start(**kw) -> MetricsTarget:
        target = MetricsTarget(**kw)
        targets.append(target)
        return target

    yield start
    for target in targets:
        target.stop()

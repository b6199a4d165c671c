"""A real Alertmanager (Debian `prometheus-alertmanager`) on loopback, delivering to our webhook.

The tests fire alerts through Alertmanager's own API (`POST /api/v2/alerts`); Alertmanager
groups them and delivers its webhook payload (version 4) with the bearer token from its
config, exactly as in production.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

from rollback.ports import free_port

BINARY = "/usr/bin/prometheus-alertmanager"
READY_TIMEOUT = 20.0


class AlertmanagerError(RuntimeError):
    pass


class Alertmanager:
    """One Alertmanager process under `base_dir`; `start()` returns once it answers /-/ready."""

    def __init__(self, base_dir: Path, *, webhook_url: str, token: str) -> None:
        self.base_dir = base_dir
        self.webhook_url = webhook_url
        self.token = token
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "alertmanager.log"

    def config(self) -> dict:
        return {
            "route": {"receiver": "rollback-api", "group_by": ["alertname", "environment"],
                      "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "rollback-api", "webhook_configs": [{
                "url": self.webhook_url, "send_resolved": False,
                # The token lives in its own file (mode 0600), as it should in production.
                "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(self.base_dir / "token")}},
            }]}],
        }

    def start(self) -> "Alertmanager":
        if not Path(BINARY).exists():
            raise AlertmanagerError(f"{BINARY} not found: install the Debian package prometheus-alertmanager "
                                    "(scripts/bootstrap.sh does)")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.base_dir / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        config_file = self.base_dir / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [BINARY, f"--config.file={config_file}", f"--storage.path={self.base_dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=debug"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AlertmanagerError(f"alertmanager exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AlertmanagerError(f"alertmanager not ready on {self.url} within {READY_TIMEOUT:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def fire(self, alertname: str, *, environment: str = "demo", severity: str = "critical",
                   summary: str = "", labels: dict[str, str] | None = None,
                   starts_at: datetime | None = None) -> None:
        """Post one firing alert to Alertmanager's own API, as Prometheus would."""
        alert = {
            "labels": {"alertname": alertname, "environment": environment, "severity": severity, **(labels or {})},
            "annotations": {"summary": summary} if summary else {},
            "startsAt": (starts_at or datetime.now(timezone.utc)).isoformat(),
            "generatorURL": "http://prometheus.invalid/graph",
        }
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{self.url}/api/v2/alerts", json=[alert], timeout=5)
        if response.status_code != 200:
            raise AlertmanagerError(f"alertmanager refused the alert: {response.status_code} {response.text}")

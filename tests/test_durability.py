"""The worker process is killed (SIGKILL) mid-rollback and restarted: the rollback completes,
and each external effect happened exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from rollback.models import Phase, RollbackTarget
from rollback.state import StateStore
from tests.conftest import write_config
from tests.helpers import front_version, orchestrator, status_when
from tests.test_frontend_rollback import config_of, frontend_of
from tests.test_rollback_workflow import notifications, restarts

ROOT = Path(__file__).resolve().parents[1]


def start_worker(client, task_queue: str, config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TEMPORAL_ADDRESS": client.service_client.config.target_host,
           "TEMPORAL_NAMESPACE": client.namespace, "ROLLBACK_TASK_QUEUE": task_queue, "ROLLBACK_CONFIG": str(config)}
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_and_replace(worker: subprocess.Popen, client, task_queue: str, config: Path, log: Path) -> subprocess.Popen:
    """SIGKILL a worker (no goodbye to Temporal) and start a new one on the same task queue."""
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    return start_worker(client, task_queue, config, log)


def stop_workers(*workers: subprocess.Popen | None) -> None:
    for proc in workers:
        if proc and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)


async def test_worker_killed_during_execution_resumes_and_each_effect_happens_once(rolling, tmp_path, client, task_queue):
    rolling.deploy("v2", "errors")
    config = write_config(rolling, tmp_path).path
    before = len(restarts(rolling))
    log = tmp_path / "worker.log"
    worker = start_worker(client, task_queue, config, log)
    replacement = None
    try:
        orch = orchestrator(client, task_queue)
        started = await orch.initiate_rollback(targets=[RollbackTarget.BACKEND], initiated_by="tester")
        await status_when(orch, started.execution_id,
                          lambda s: any(x.name.startswith("roll batch 2/3") and x.state == "running" for x in s.steps),
                          what="batch 2 running")
        replacement = kill_and_replace(worker, client, task_queue, config, log)
        result = await orch.wait(started.execution_id)
    finally:
        stop_workers(worker, replacement)

    assert result is not None and result.state == Phase.SUCCEEDED, log.read_text()[-2000:]
    assert await front_version(rolling.front_url) == "v1"
    # Each instance was restarted on v1 exactly once, although batch 2 ran on two workers.
    again = Counter((r["instance"], r["version"]) for r in restarts(rolling)[before:])
    assert again == {("app-1", "v1"): 1, ("app-2", "v1"): 1, ("app-3", "v1"): 1}
    events = Counter(n["event"] for n in notifications(rolling))
    assert events == {"started": 1, "succeeded": 1}
    history = StateStore(rolling.base_dir / "state").versions("demo", "backend").history
    assert [h["event"] for h in history].count("restored") == 1
    # Every worker is gone: the finished rollback's record is still readable (from its memo).
    status = await orch.get_rollback_status(started.execution_id)
    assert all(s.state == "succeeded" for s in status.steps)
    # The kill landed inside batch 2: its activity ran again on the new worker.
    assert next(s for s in status.steps if s.name.startswith("roll batch 2/3")).attempts == 2


async def test_worker_killed_mid_frontend_switch_resumes_and_switches_once(blue_green, tmp_path, client, task_queue):
    frontend = frontend_of(blue_green)
    replacement = worker = None
    try:
        frontend.start("v1")
        good = (frontend.serving() or {})["build"]
        frontend.deploy("v2", "broken-js")
        # Many answers in a row make the front-door step last a few seconds: the kill lands inside it.
        config = config_of(blue_green, frontend, tmp_path, switch_samples=150).path
        switches = len(frontend.store.switches())
        log = tmp_path / "worker.log"
        worker = start_worker(client, task_queue, config, log)
        orch = orchestrator(client, task_queue)
        started = await orch.initiate_rollback(targets=[RollbackTarget.FRONTEND], initiated_by="tester")
        await status_when(orch, started.execution_id,
                          lambda s: any(x.id == "frontend.await_front_door" and x.state == "running" for x in s.steps),
                          what="the front door step running")
        replacement = kill_and_replace(worker, client, task_queue, config, log)
        result = await orch.wait(started.execution_id)
        served = frontend.serving()
    finally:
        stop_workers(worker, replacement)
        frontend.stop()

    assert result is not None and result.state == Phase.SUCCEEDED, log.read_text()[-2000:]
    assert (served or {}).get("build") == good
    assert [(s["from"], s["to"]) for s in frontend.store.switches()[switches:]] == [("v2", "v1")]  # once, across two workers
    status = await orch.get_rollback_status(started.execution_id)
    assert next(s for s in status.steps if s.id == "frontend.await_front_door").attempts == 2
    assert Counter(n["event"] for n in notifications(blue_green)) == {"started": 1, "succeeded": 1}

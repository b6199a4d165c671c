"""A new Temporal service has none of our search attributes: `rollback setup` and the worker register them.

Each test starts its own dev server WITHOUT `--search-attribute` flags (the session's
server in conftest.py has them), the way a fresh self-hosted service starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from rollback.dev.stack import temporal_binary
from rollback.settings import SEARCH_ATTRIBUTES
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[1]
ROLLBACK = str(Path(sys.executable).parent / "rollback")
NAMES = [key.name for key in SEARCH_ATTRIBUTES]


@pytest_asyncio.fixture
async def bare() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary(),
                                                        data_converter=pydantic_data_converter)
    try:
        yield environment
    finally:
        await environment.shutdown()


def env_for(server: WorkflowEnvironment, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "ROLLBACK_"))}
    return {**env, "TEMPORAL_ADDRESS": server.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": server.client.namespace, **extra}


async def rollback(server: WorkflowEnvironment, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [ROLLBACK, *args], capture_output=True, text=True,
                                   env=env_for(server), timeout=120)


async def registered(server: WorkflowEnvironment) -> set[str]:
    listed = await server.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=server.client.namespace))
    return set(listed.custom_attributes) & set(NAMES)


async def test_rollback_setup_registers_them_and_list_works(bare):
    before = await rollback(bare, "list", "-e", "demo")
    assert before.returncode == 1 and "Traceback" not in before.stderr
    assert "rollback setup" in before.stderr, before.stderr  # the way out, in the error itself

    done = await rollback(bare, "setup")

    assert done.returncode == 0, done.stderr
    for key in SEARCH_ATTRIBUTES:
        assert f"registered {key.name} ({'KeywordList' if key.name == 'RollbackTargets' else 'Keyword'})" in done.stdout
    assert await registered(bare) == set(NAMES)
    listed = await rollback(bare, "list", "-e", "demo")
    assert listed.returncode == 0, listed.stderr
    again = await rollback(bare, "setup")
    assert again.returncode == 0 and "already registered" in again.stdout and "registered Rollback" not in again.stdout


async def test_the_worker_registers_them_when_it_starts(bare, tmp_path):
    config = tmp_path / "rollback.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nenvironments:\n  demo:\n    targets: {{}}\n")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], stdout=out, stderr=subprocess.STDOUT,
                                  env=env_for(bare, ROLLBACK_CONFIG=str(config)), cwd=ROOT)
    try:
        await eventually(lambda: registered(bare), lambda found: found == set(NAMES), timeout=60,
                         what="the worker to register the search attributes")
        listed = await eventually(lambda: rollback(bare, "list", "-e", "demo"), lambda done: done.returncode == 0, timeout=30,
                                  what="rollback list to work")
        assert "environment" in listed.stdout
        assert "registered search attributes" in log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

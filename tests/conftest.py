"""Shared fixtures: one real Temporal dev server per session (per xdist worker), real nginx and app processes per test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from rollback.config import ConfigSource
from rollback.dev.stack import BackendStack, temporal_binary
from rollback.ports import free_port, share_ports
from rollback.settings import SEARCH_ATTRIBUTES

from worker import build_worker


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker process starts its own servers: give each its own share of ports.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        share_ports(int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))


@pytest_asyncio.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        # Small histories, so the monitor's continue-as-new happens within a test.
        dev_server_extra_args=["--dynamic-config-value", "limit.historyCount.suggestContinueAsNew=60"],
    )
    try:
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


@pytest_asyncio.fixture(autouse=True)
async def no_workflow_outlives_its_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test that fails half-way must not leave a rollback (or a monitor) running on the shared dev
    server: every later rollback of its environment would be refused as a second one."""
    yield
    if "client" not in request.fixturenames:
        return
    client: Client = request.getfixturevalue("env").client  # the session's server (the test's `client` is torn down)
    async for execution in client.list_workflows("ExecutionStatus = 'Running'"):
        with contextlib.suppress(RPCError):  # it ended meanwhile
            await client.get_workflow_handle(execution.id, run_id=execution.run_id).terminate("its test ended")


@pytest.fixture
def task_queue() -> str:
    return f"rollback-test-{uuid.uuid4().hex[:8]}"


def make_stack(base: Path, strategy: str, names: list[str]) -> BackendStack:
    return BackendStack(base_dir=base, nginx_port=free_port(), strategy=strategy,
                        instances={name: free_port() for name in names})


@pytest.fixture
def blue_green(tmp_path: Path) -> Iterator[BackendStack]:
    """blue live on v1, green on v1; deploying v2 (broken) moves traffic to green."""
    stack = make_stack(tmp_path / "bg", "blue_green", ["blue", "green"])
    try:
        stack.start(initial_version="v1", releases={"v1": "none"})
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def rolling(tmp_path: Path) -> Iterator[BackendStack]:
    stack = make_stack(tmp_path / "rolling", "rolling", ["app-1", "app-2", "app-3"])
    try:
        stack.start(initial_version="v1", releases={"v1": "none"})
        yield stack
    finally:
        stack.stop()


def write_config(stack: BackendStack, tmp_path: Path, **kw) -> ConfigSource:
    path = tmp_path / "rollback.yaml"
    stack.write_config(path, **kw)
    return ConfigSource(path)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


class WorkerRunner:
    """Starts in-process workers for a config; `workers` lists the live ones."""

    def __init__(self, client: Client, task_queue: str, http: httpx.AsyncClient) -> None:
        self.client, self.task_queue, self.http = client, task_queue, http
        self.workers: list[Worker] = []

    async def __call__(self, config: ConfigSource) -> Worker:
        worker = build_worker(self.client, task_queue=self.task_queue, config=config, http=self.http)
        await worker.__aenter__()
        self.workers.append(worker)
        return worker

    async def stop_all(self) -> None:
        while self.workers:
            await self.workers.pop().__aexit__(None, None, None)


@pytest_asyncio.fixture
async def run_worker(client: Client, task_queue: str, http: httpx.AsyncClient):
    runner = WorkerRunner(client, task_queue, http)
    yield runner
    await runner.stop_all()

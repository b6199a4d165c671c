"""Each activity run twice with the same input performs its external effect once."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.backend import BackendRollback
from activities.coordination import Coordination
from activities.database import DatabaseRollback
from activities.health import HttpHealth
from activities.notify import Notifier
from rollback.payloads import LockInput, Notification, RecordInput
from rollback.targets.backend.contract import BatchInput, SwitchInput
from rollback.state import StateStore
from tests.conftest import write_config
from tests.helpers import front_version
from tests.test_rollback_workflow import notifications, restarts


async def test_switch_traffic_twice_reloads_nginx_once(blue_green, tmp_path, http):
    blue_green.deploy("v2", "errors")
    backend = BackendRollback(write_config(blue_green, tmp_path), HttpHealth(http))
    env = ActivityEnvironment()
    switch = SwitchInput(environment="demo", colour="blue", expect_version="v1")

    first = await env.run(backend.switch_traffic, switch)
    second = await env.run(backend.switch_traffic, switch)

    assert (first.reloaded, second.reloaded) == (True, False)
    assert await front_version(blue_green.front_url) == "v1"


async def test_a_configuration_nginx_refuses_is_undone_and_traffic_stays_where_it_was(blue_green, tmp_path, http):
    """The router writes the upstream file, then runs test_command: when that fails, the file nginx
    last accepted is put back (a later reload by anyone must not pick up ours), nothing is reloaded,
    and the step fails with nginx's words."""
    blue_green.deploy("v2", "errors")  # green serves v2 and takes the traffic
    config = write_config(blue_green, tmp_path)
    raw = yaml.safe_load(config.path.read_text())
    raw["environments"]["demo"]["targets"]["backend"]["router"]["test_command"] = [
        sys.executable, "-c", "import sys; sys.exit('nginx: [emerg] host not found in upstream (test)')"]
    config.path.write_text(yaml.safe_dump(raw))
    upstream = blue_green.upstream_path.read_text()
    backend = BackendRollback(config, HttpHealth(http))

    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(backend.switch_traffic, SwitchInput(environment="demo", colour="blue", expect_version="v1"))

    assert refused.value.type == "RouterError" and "host not found in upstream (test)" in refused.value.message
    assert blue_green.upstream_path.read_text() == upstream
    assert await front_version(blue_green.front_url) == "v2"


async def test_roll_batch_twice_restarts_each_instance_once(rolling, tmp_path, http):
    rolling.deploy("v2", "errors")
    backend = BackendRollback(write_config(rolling, tmp_path), HttpHealth(http))
    env = ActivityEnvironment()
    batch = BatchInput(environment="demo", instances=["app-1", "app-2"], version="v1")
    before = len(restarts(rolling))

    first = await env.run(backend.roll_batch, batch)
    second = await env.run(backend.roll_batch, batch)

    assert sorted(first.restarted) == ["app-1", "app-2"] and second.restarted == []
    assert second.reloads == 0
    assert sorted(r["instance"] for r in restarts(rolling)[before:]) == ["app-1", "app-2"]


async def test_record_and_notify_and_lock_are_idempotent(blue_green, tmp_path, http, client):
    config = write_config(blue_green, tmp_path)
    backend = BackendRollback(config, HttpHealth(http))
    coordination = Coordination(config, {"backend": backend, "database": DatabaseRollback(config)}, client)
    notifier = Notifier(config)
    env = ActivityEnvironment()
    store = StateStore(blue_green.base_dir / "state")

    record = RecordInput(environment="demo", target="backend", version="v1", key="rollback-demo-x:record:backend")
    assert await env.run(coordination.record_restored, record) is True
    assert await env.run(coordination.record_restored, record) is False
    assert [h["event"] for h in store.versions("demo", "backend").history].count("restored") == 1

    note = Notification(environment="demo", event="started", key="rollback-demo-x:started", message="hello")
    await env.run(notifier.send, note)
    result = await env.run(notifier.send, note)
    assert result.delivered == ["log"]
    assert [n["key"] for n in notifications(blue_green)] == ["rollback-demo-x:started"]

    lock = LockInput(environment="demo", holder="rollback-demo-x")
    await env.run(coordination.acquire_lock, lock)
    await env.run(coordination.acquire_lock, lock)  # re-acquire by the holder renews, never refuses
    assert store.lock_holder("demo") == "rollback-demo-x"
    assert await env.run(coordination.release_lock, lock) is True
    assert await env.run(coordination.release_lock, lock) is False
    assert json.loads((blue_green.base_dir / "state" / "demo.json").read_text())["lock"] is None

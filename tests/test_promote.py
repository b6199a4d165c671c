"""`rollback promote`: the forward switch pipelines run, through the rollback's own steps (checked standby,
atomic switch, front door, smoke), behind the deployment gate and the lock, recorded as a deploy."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rollback.models import RollbackRequest
from rollback.state import StateStore
from tests.helpers import front_version
from tests.test_cli import cli
from tests.test_frontend_rollback import config_of, frontend_of


async def test_promote_switches_the_backend_then_the_frontend_forward_and_records_each_as_a_deploy(
        blue_green, tmp_path, client, task_queue, run_worker):
    frontend = frontend_of(blue_green)
    try:
        frontend.start("v1")
        blue_green.redeploy_colour("green", "v2")  # the pipeline's deploy to the standby colour
        frontend.publish("v2")  # built and published, not live
        config = config_of(blue_green, frontend, tmp_path)
        await run_worker(config)

        backend = await cli(client, task_queue, "promote", "-e", "demo", "-t", "backend", "--version", "v2", "--by", "ci",
                            config=config.path)
        assert backend.returncode == 0, backend.stdout + backend.stderr
        assert await front_version(blue_green.front_url) == "v2"
        shown = await cli(client, task_queue, "promote", "-e", "demo", "-t", "frontend", "--version", "v2", "--by", "ci",
                          config=config.path)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert (frontend.serving() or {}).get("version") == "v2"
    finally:
        frontend.stop()
    state = StateStore(blue_green.state_dir)
    for target in ("backend", "frontend"):
        versions = state.versions("demo", target)
        assert (versions.current, versions.known_good) == ("v2", "v1"), (target, versions)
    assert state.bad_releases("demo") == {}  # a promotion rolls nothing back


async def test_promote_asks_the_gate_first(blue_green, tmp_path, client, task_queue):
    config = config_of(blue_green, frontend_of(blue_green), tmp_path)  # never started: the gate refuses before any of it
    StateStore(blue_green.state_dir).record_restored("demo", "backend", "v1", key="rb-9:record", rolled_back_from="v3",
                                                     rollback="rb-9", by="ana")
    refused = await cli(client, task_queue, "promote", "-e", "demo", "-t", "backend", "--version", "v3", config=config.path)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: refused by the deployment gate: backend v3 of 'demo' was rolled back by rb-9"), refused.stderr


@pytest.mark.parametrize("fields", [{"targets": ["backend"]}, {"targets": ["full"], "to_version": {"backend": "v2"}},
                                    {"targets": ["backend", "frontend"], "to_version": {"backend": "v2", "frontend": "v2"}}])
def test_a_promotion_names_one_target_and_its_version(fields):
    with pytest.raises(ValidationError, match="promote: name exactly one target"):
        RollbackRequest.model_validate({"environment": "demo", "promote": True, **fields})

"""coordination.plan without the world: the request checked against rollback.yaml, each target's
slice asked for its part (test slices under the registry's names), and the approval policy. No
server, nginx or PostgreSQL: the slices' own assessments are tested against those elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.coordination import Coordination
from rollback.config import ConfigSource
from rollback.models import DatabaseOptions, RollbackPlan, RollbackRequest, TargetPlan
from rollback.state import TargetVersions
from rollback.targets.backend.contract import RollingParams
from rollback.targets.database.contract import PitrParams

BACKEND = {"strategy": "rolling", "router": {"upstream_file": "/tmp/upstream.conf", "reload_command": ["true"],
                                             "front_url": "http://127.0.0.1:1"},
           "instances": [{"name": "app-1", "address": "127.0.0.1:2"}], "deploy_command": ["true"],
           "versions": {"current": "v2", "known_good": "v1"}}
DATABASE = {"dsn_env": "SHOP_DSN", "migrations": "migrations", "versions": {"current": "0003", "known_good": "0001"}}


class Slice:
    """A target's activities as the planner sees them: it records what it was asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.asked: list[tuple[str, TargetVersions, str | None]] = []

    async def assess(self, request: RollbackRequest, versions: TargetVersions, to_version: str | None) -> TargetPlan:
        self.asked.append((request.environment, versions, to_version))
        to = to_version or versions.known_good or "?"
        if to == versions.current:  # what every slice says when there is nothing to do
            raise ApplicationError(f"{self.name} already runs {to}: nothing to roll back", type="NothingToRollBack", non_retryable=True)
        if self.name == "backend":
            return TargetPlan(target="backend", strategy="rolling", from_version=versions.current, to_version=to, checks=[],
                              params=RollingParams(batches=[["app-1"]]))
        options = request.database or DatabaseOptions()
        params = PitrParams(restore_point="rp") if options.strategy == "pitr" else None
        if params is None:
            from rollback.targets.database.contract import MigrationToUndo, SchemaRollbackParams
            undo = [MigrationToUndo(revision="0003", label="0003_x", backup_id="b")]
            return TargetPlan(target="database", strategy="schema_rollback", from_version=versions.current, to_version=to,
                              checks=[], params=SchemaRollbackParams(undo=undo, target_backup_id="b"))
        return TargetPlan(target="database", strategy="pitr", from_version=versions.current, to_version=to, checks=[],
                          params=params, evidence={"loses": "writes after 10:00"})


def planner(tmp_path: Path, *, policy: dict | None = None, targets: dict | None = None) -> tuple[Coordination, dict[str, Slice]]:
    config = {"state_dir": str(tmp_path / "state"), "rollback": {"notification_channels": ["log"]},
              "environments": {"shop": {"policy": policy or {}, "targets": targets or {"backend": BACKEND, "database": DATABASE}}}}
    path = tmp_path / "rollback.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    slices = {"backend": Slice("backend"), "database": Slice("database")}
    return Coordination(ConfigSource(path), slices, client=None), slices  # type: ignore[arg-type]  # no lock asked


async def plan(coordination: Coordination, **request: object) -> RollbackPlan:
    return await ActivityEnvironment().run(coordination.plan, RollbackRequest.model_validate({"environment": "shop", **request}))


async def test_full_asks_every_configured_target_in_execution_order_with_its_recorded_versions(tmp_path):
    coordination, slices = planner(tmp_path)
    made = await plan(coordination, targets=["full"], to_version=None)
    assert [t.target.value for t in made.targets] == ["backend", "database"]
    [(environment, versions, to_version)] = slices["backend"].asked
    assert (environment, versions.current, versions.known_good, to_version) == ("shop", "v2", "v1", None)
    assert (slices["database"].asked[0][1].current, slices["database"].asked[0][1].known_good) == ("0003", "0001")
    assert not made.require_approval and made.on_approval_timeout == "reject"


async def test_full_leaves_a_target_with_nothing_to_roll_back_alone_and_refuses_only_when_all_are(tmp_path):
    settled = {**DATABASE, "versions": {"current": "0001", "known_good": "0001"}}
    coordination, _ = planner(tmp_path, targets={"backend": BACKEND, "database": settled})
    made = await plan(coordination, targets=["full"])
    assert [t.target.value for t in made.targets] == ["backend"]
    assert made.skipped == {"database": "database already runs 0001: nothing to roll back"}
    assert made.step_detail() == "backend: rolling v2 -> v1; database: left alone (database already runs 0001: nothing to roll back)"
    # Named explicitly, the same target is a refusal: the caller asked for something that cannot be done.
    with pytest.raises(ApplicationError, match="database already runs 0001: nothing to roll back"):
        await plan(coordination, targets=["database"])
    nothing = {**BACKEND, "versions": {"current": "v1", "known_good": "v1"}}
    coordination, _ = planner(tmp_path / "all", targets={"backend": nothing, "database": settled})
    with pytest.raises(ApplicationError) as refused:
        await plan(coordination, targets=["full"])
    assert refused.value.message == ("full: nothing to roll back: backend already runs v1: nothing to roll back; "
                                     "database already runs 0001: nothing to roll back")


async def test_a_recovery_that_loses_data_always_waits_for_a_person_and_silence_never_approves(tmp_path):
    coordination, _ = planner(tmp_path, policy={"require_approval": False, "on_approval_timeout": "proceed"})
    made = await plan(coordination, targets=["database"], database={"strategy": "pitr"})
    assert made.require_approval and made.on_approval_timeout == "reject"
    assert made.approval_reason == "point-in-time recovery loses data: writes after 10:00"


async def test_a_request_may_add_an_approval_never_waive_one(tmp_path):
    coordination, _ = planner(tmp_path, policy={"require_approval": True})
    assert (await plan(coordination, targets=["backend"], require_approval=False)).require_approval
    coordination, _ = planner(tmp_path / "other")
    added = await plan(coordination, targets=["backend"], require_approval=True)
    assert added.require_approval and added.approval_reason == "requested by the caller"


@pytest.mark.parametrize("request_fields, targets, message", [
    ({"environment": "prod", "targets": ["backend"]}, None, "environment: unknown environment 'prod'; configured: shop"),
    ({"targets": ["database"]}, {"backend": BACKEND}, "targets: database not configured for 'shop' (configured: backend)"),
    ({"targets": ["frontend"]}, None, "targets: frontend not configured for 'shop' (configured: backend, database)"),
    ({"targets": ["backend"], "to_version": {"database": "0001"}}, None, "to_version: names targets not being rolled back: database"),
], ids=["unknown-environment", "unconfigured-target", "unconfigured-frontend", "to-version-of-another-target"])
async def test_requests_the_config_cannot_serve_are_refused_naming_the_field(tmp_path, request_fields, targets, message):
    coordination, slices = planner(tmp_path, targets=targets)
    with pytest.raises(ApplicationError) as refused:
        await plan(coordination, **request_fields)
    assert refused.value.type == "InvalidRequest" and refused.value.non_retryable
    assert refused.value.message.startswith(message), refused.value.message
    assert all(not s.asked for s in slices.values()), "no target is assessed for a request that cannot be served"

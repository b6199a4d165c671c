"""rollback.yaml validation: one clear error naming the file and the field; and no secret in history."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rollback.client import RollbackOrchestrator
from rollback.config import ConfigError, load_config
from rollback.models import RollbackTarget
from rollback.settings import TemporalSettings
from tests.conftest import write_config
from tests.helpers import history_without

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["environments"]["demo"]["targets"]["backend"].update(strategy="canary"), "environments.demo.targets.backend.strategy"),
    (lambda c: c["environments"]["demo"]["targets"]["backend"].update(colours={"blue": c["environments"]["demo"]["targets"]["backend"]["colours"]["blue"]}),
     "blue_green needs at least two entries under 'colours'"),
    (lambda c: c["environments"]["demo"]["policy"].update(on_approval_timeout="maybe"), "environments.demo.policy.on_approval_timeout"),
    (lambda c: c["environments"]["demo"]["targets"]["backend"]["health"].update(samples=0), "health.samples"),
    (lambda c: c["rollback"].update(max_rollback_attempts="three"), "rollback.max_rollback_attempts"),
    (lambda c: c["environments"]["demo"].update(colour="blue"), "environments.demo.colour: Extra inputs are not permitted"),
    (lambda c: c.pop("environments"), "environments: Field required"),
    (lambda c: c["environments"].update({"x" * 64: c["environments"]["demo"]}), "at most 63 characters"),
    (lambda c: c["environments"]["demo"]["targets"]["backend"].update(releases_command=["list", "{version}"]),
     "releases_command: Value error, unexpected field {version}"),
    # A seed version reaches deploy_command's arguments like any other: the same rule as a request's.
    (lambda c: c["environments"]["demo"]["targets"]["backend"]["versions"].update(known_good="--help; $(curl x|sh) ../../etc"),
     "environments.demo.targets.backend.versions.known_good: '--help; $(curl x|sh) ../../etc' is not a valid version"),
    (lambda c: c["environments"]["demo"]["targets"]["backend"]["versions"].update(current="v1/../../etc"),
     "environments.demo.targets.backend.versions.current: 'v1/../../etc' is not a valid version"),
])
def test_config_errors_name_file_and_field(blue_green, tmp_path, mutate, expected):
    config = blue_green.config_dict()
    config.setdefault("rollback", {})
    config["environments"]["demo"].setdefault("policy", {})
    mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_not_yaml_and_worker_refuses_to_start(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("environments: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    done = subprocess.run([sys.executable, str(ROOT / "worker.py")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ROLLBACK_CONFIG": str(path)})
    assert done.returncode == 2 and "broken.yaml: not valid YAML" in done.stderr and "Traceback" not in done.stderr


async def test_no_secret_reaches_the_workflow_history(blue_green, tmp_path, client, task_queue, run_worker):
    planted = "ghp_PLANTEDsecretVALUE0123456789"
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))
    orch = RollbackOrchestrator(github_token=planted, client=client, environment="demo",
                                settings=TemporalSettings(address="unused", namespace=client.namespace, task_queue=task_queue))
    started = await orch.initiate_rollback(targets=[RollbackTarget.BACKEND], initiated_by="tester")
    await orch.wait(started.execution_id)
    history = await history_without(client, started.execution_id, [planted])
    assert "tester" in history, "payloads were decoded and searched"
    assert planted not in (tmp_path / "bg" / "state" / "demo.json").read_text()


def _frontend_config(tmp_path: Path, **fields) -> dict:
    frontend = {"store": {"kind": "directory", "root": "site"}, "front_url": "http://127.0.0.1:8088",
                "cdn": [{"provider": "varnish", "url": "http://127.0.0.1:8088"}], **fields}
    return {"state_dir": str(tmp_path / "state"), "environments": {"demo": {"targets": {"frontend": frontend}}}}


@pytest.mark.parametrize("fields, expected", [
    ({"cdn": [{"provider": "akamai"}]}, "environments.demo.targets.frontend.cdn.0: Input tag 'akamai' found using 'provider' does "
                                        "not match any of the expected tags: 'none', 'varnish', 'cloudflare', 'fastly', 'cloudfront'"),
    ({"cdn": [{"provider": "cloudflare", "zone_id": "z", "site_url": "https://shop.example", "token_env": "my token"}]},
     "environments.demo.targets.frontend.cdn.0.cloudflare.token_env: String should match pattern"),
    ({"cdn": [{"provider": "fastly", "token_env": "FASTLY_TOKEN"}]}, "environments.demo.targets.frontend.cdn.0.fastly.service_id: Field required"),
    ({"store": {"kind": "ftp", "root": "site"}}, "environments.demo.targets.frontend.store: Input tag 'ftp' found using 'kind'"),
    ({"store": {"kind": "s3", "bucket": "b"}}, "environments.demo.targets.frontend.store.s3.bucket: String should have at least 3 characters"),
    ({"keep_releases": 0}, "environments.demo.targets.frontend.keep_releases: Input should be greater than or equal to 1"),
    ({"front_url": None}, "environments.demo.targets.frontend.front_url"),
])
def test_frontend_config_errors_name_the_field(tmp_path, fields, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_frontend_config(tmp_path, **fields)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_frontend_store_root_is_relative_to_the_config_file(tmp_path):
    path = tmp_path / "conf" / "rollback.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(_frontend_config(tmp_path)))
    frontend = load_config(path).environment("demo").targets.get("frontend")
    assert frontend is not None and frontend.store.root == tmp_path / "conf" / "site"  # type: ignore[union-attr]

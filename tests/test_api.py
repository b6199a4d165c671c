"""The inbound HTTP API over real uvicorn, a real Temporal dev server and worker, a real Alertmanager.

Each test serves the app in-process (uvicorn on a free port) and records every exchange,
so the teardown can check that no response ever carried a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import httpx
import pytest
import pytest_asyncio
import uvicorn
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from rollback.api import ApiSettings, SettingsError, create_app
from rollback.client import workflow_id_for
from rollback.config import ConfigSource
from rollback.ports import free_port
from rollback.models import Phase
from rollback.monitoring import TriggerRequest
from rollback.settings import SA_TRIGGER
from rollback.triggers import route_trigger
from tests.alertmanager import Alertmanager
from tests.conftest import make_stack, write_config
from tests.helpers import eventually, front_version, history_without, orchestrator, status_when

API_TOKEN = f"api-token-{uuid.uuid4().hex}"
AM_TOKEN = f"am-token-{uuid.uuid4().hex}"
PIPELINE_SECRET = f"pipeline-secret-{uuid.uuid4().hex}"
SECRETS = (API_TOKEN, AM_TOKEN, PIPELINE_SECRET)

AM_PATH = "/v1/triggers/alertmanager"
PIPELINE_PATH = "/v1/triggers/pipeline"


# -- serving the app in-process, recording every exchange -------------------------------------

@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    status: int = 0
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response: bytes = b""
    done: bool = False

    def json(self) -> Any:
        return json.loads(self.response)


class Recorder:
    """ASGI wrapper keeping each request (as sent, e.g. by Alertmanager) and its response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = Exchange(scope["method"], scope["path"],
                            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]})
        self.exchanges.append(exchange)

        async def recording_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                exchange.body += message.get("body", b"")
            return message

        async def recording_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                exchange.status, exchange.response_headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                exchange.response += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, recording_receive, recording_send)
        finally:
            exchange.done = True

    def to(self, path: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.path == path and e.done]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest keeps its own signal handlers


@dataclass
class RunningApi:
    url: str
    recorder: Recorder


@pytest_asyncio.fixture
async def serve_api(client: Client, task_queue: str):
    """`await serve_api(config, **settings)`: the API on a free port, wired to the test's Temporal and task queue."""
    running: list[tuple[_Server, asyncio.Task, Recorder]] = []

    async def start(config: ConfigSource, **overrides: Any) -> RunningApi:
        secrets = {"token": API_TOKEN, "alertmanager_token": AM_TOKEN, "pipeline_secret": PIPELINE_SECRET}
        settings = ApiSettings(config=config.path, **{**secrets, **overrides})
        recorder = Recorder(create_app(settings=settings, orchestrator=orchestrator(client, task_queue)))
        port = free_port()
        server = _Server(uvicorn.Config(recorder, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve())
        running.append((server, task, recorder))
        await eventually(lambda: asyncio.sleep(0, server.started), bool, timeout=10, interval=0.02, what="uvicorn")
        return RunningApi(f"http://127.0.0.1:{port}", recorder)

    yield start
    for server, task, recorder in running:
        server.should_exit = True
        await task
        for exchange in recorder.exchanges:
            sent = exchange.response + b"".join(v for _, v in exchange.response_headers)
            for secret in SECRETS:
                assert secret.encode() not in sent, f"a secret leaked in the response to {exchange.method} {exchange.path}"


@pytest_asyncio.fixture(autouse=True)
async def no_leftovers(client: Client) -> AsyncIterator[None]:
    """Rollbacks and monitors of `demo` share the session's Temporal server: end ours."""
    yield
    query = "WorkflowType = 'RollbackWorkflow' AND RollbackEnvironment = 'demo' AND ExecutionStatus = 'Running'"
    async for execution in client.list_workflows(query):
        await client.get_workflow_handle(execution.id).terminate(reason="test cleanup")
    with contextlib.suppress(Exception):
        await client.get_workflow_handle("monitor-demo").terminate(reason="test cleanup")


@pytest.fixture
def offline_config(tmp_path: Path) -> ConfigSource:
    """A valid config for `demo` whose stack is not running: enough for everything but a real rollback."""
    return write_config(make_stack(tmp_path / "offline", "blue_green", ["blue", "green"]), tmp_path)


# -- helpers -----------------------------------------------------------------------------------

def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sign(body: bytes, delivery: str, timestamp: int | str, secret: str = PIPELINE_SECRET) -> str:
    """As docs/http-api.md tells pipelines to sign: HMAC-SHA256 of `v1:<timestamp>:<delivery id>:<raw body>`."""
    message = f"v1:{timestamp}:{delivery}:".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


async def rollback_runs(client: Client) -> set[tuple[str, str]]:
    """(workflow id, run id) of every demo rollback. Not ids alone: a rollback started in the second a
    terminated one (of the test before) started has that one's id."""
    query = "WorkflowType = 'RollbackWorkflow' AND RollbackEnvironment = 'demo'"
    return {(execution.id, execution.run_id) async for execution in client.list_workflows(query)}


async def assert_no_rollback_started(client: Client, since: datetime) -> None:
    """No demo rollback started since `since`, read without visibility's lag (a listing trails a start):
    a rollback started at second S has the id rollback-demo-S (the contract), and describing an id
    reads the execution itself."""
    second = since.replace(microsecond=0) - timedelta(seconds=1)
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    while second <= until:
        try:
            described = await client.get_workflow_handle(workflow_id_for("demo", second)).describe()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        else:  # an earlier test's rollback may have that id; a run started since may not
            assert described.start_time < since, f"{described.id} started at {described.start_time:%H:%M:%S.%f}, after {since:%H:%M:%S.%f}"
        second += timedelta(seconds=1)


async def started_since(client: Client, before: set[tuple[str, str]]) -> set[str]:
    """Ids of the demo rollbacks started since `before` was listed."""
    return {workflow_id for workflow_id, _ in await rollback_runs(client) - before}


async def assert_no_secrets_in_history(client: Client, workflow_id: str) -> str:
    return await history_without(client, workflow_id, SECRETS)


async def post_pipeline(http: httpx.AsyncClient, api: RunningApi, body: bytes, *, delivery: str | None,
                        signature: str | None | Literal[True] = True, timestamp: int | str | None = None) -> httpx.Response:
    """A pipeline report; by default stamped now and signed as a pipeline would (`signature=True`)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    headers = {"Content-Type": "application/json", "X-Signature-Timestamp": str(stamp)}
    if delivery is not None:
        headers["X-Delivery-Id"] = delivery
    if signature is True:
        signature = sign(body, delivery or "", stamp)
    if signature is not None:
        headers["X-Signature-256"] = signature
    return await http.post(api.url + PIPELINE_PATH, content=body, headers=headers)


def alertmanager_payload(*alerts: dict[str, Any], common: dict[str, str] | None = None) -> dict[str, Any]:
    return {"version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "rollback-api", "groupLabels": {},
            "commonLabels": common or {}, "commonAnnotations": {}, "externalURL": "http://am.invalid", "alerts": list(alerts)}


def alert(**labels: str) -> dict[str, Any]:
    return {"status": "firing", "labels": {"alertname": "HighErrors", **labels}, "annotations": {},
            "startsAt": "2024-05-01T10:00:00.123456789Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "", "fingerprint": uuid.uuid4().hex[:16]}


# -- Alertmanager ------------------------------------------------------------------------------

async def test_alertmanager_delivery_starts_one_rollback(blue_green, tmp_path, client, task_queue, run_worker,
                                                         serve_api, http):
    blue_green.deploy("v2", "errors")
    config = write_config(blue_green, tmp_path)
    await run_worker(config)
    api = await serve_api(config)
    before = await rollback_runs(client)
    manager = Alertmanager(tmp_path / "alertmanager", webhook_url=api.url + AM_PATH, token=AM_TOKEN).start()
    try:
        await manager.fire("DemoHighErrorRate", summary="error rate 100% on demo after v2")
        deliveries = await eventually(lambda: asyncio.sleep(0, api.recorder.to(AM_PATH)), bool, timeout=20,
                                      what=f"Alertmanager's webhook delivery; its log: {manager.log_tail()}")
    finally:
        manager.stop()

    delivered = deliveries[0]
    assert delivered.headers["authorization"] == f"Bearer {AM_TOKEN}"
    sent = json.loads(delivered.body)
    assert (sent["version"], sent["receiver"], sent["alerts"][0]["labels"]["environment"]) == ("4", "rollback-api", "demo")
    assert delivered.status == 200, delivered.response
    result = delivered.json()["results"][0]
    assert (result["environment"], result["duplicate"]) == ("demo", False)
    assert (result["outcome"]["routed_to"], result["outcome"]["started"]) == ("rollback", True)
    execution_id = result["outcome"]["workflow_id"]

    orch = orchestrator(client, task_queue)
    outcome = await orch.wait(execution_id)
    assert outcome is not None and outcome.state == Phase.SUCCEEDED
    assert await front_version(blue_green.front_url) == "v1"
    status = await orch.get_rollback_status(execution_id)
    assert (status.trigger, status.initiated_by) == ("external", "alertmanager")
    assert "DemoHighErrorRate" in status.reason and "error rate 100% on demo after v2" in status.reason
    await assert_no_secrets_in_history(client, execution_id)

    # The same delivery again (a replay, or Alertmanager retrying): nothing new starts.
    replay = await http.post(api.url + AM_PATH, content=delivered.body,
                             headers={"Authorization": delivered.headers["authorization"], "Content-Type": "application/json"})
    assert replay.status_code == 200
    assert replay.json()["results"][0]["duplicate"] is True and replay.json()["results"][0]["outcome"] is None
    assert await started_since(client, before) == {execution_id}


async def test_alertmanager_through_the_real_monitor(blue_green, tmp_path, client, task_queue, run_worker, serve_api, http):
    # A monitor whose own rule cannot fire (an error ratio is never > 1): only the alert can start a rollback.
    monitoring = {"interval_seconds": 1, "probes": [{"name": "api", "url": f"{blue_green.front_url}/api/items", "requests": 2}],
                  "rules": [{"name": "api_error_rate", "threshold": 1.0, "window_seconds": 5, "severity": "high"}]}
    config = write_config(blue_green, tmp_path, extra={"environments": {"demo": {"monitoring": monitoring}}})
    await run_worker(config)
    orch = orchestrator(client, task_queue)
    assert await orch.start_monitor("demo") is True
    blue_green.deploy("v2", "errors")
    api = await serve_api(config)
    manager = Alertmanager(tmp_path / "alertmanager", webhook_url=api.url + AM_PATH, token=AM_TOKEN).start()
    try:
        await manager.fire("DemoHighErrorRate", summary="error rate 100% on demo")
        deliveries = await eventually(lambda: asyncio.sleep(0, api.recorder.to(AM_PATH)), bool, timeout=20,
                                      what="Alertmanager's webhook delivery")
    finally:
        manager.stop()

    result = deliveries[0].json()["results"][0]
    assert (result["outcome"]["routed_to"], result["outcome"]["workflow_id"]) == ("monitor", "monitor-demo")
    key = result["keys"][0]
    monitored = await eventually(lambda: orch.monitor_status("demo"),
                                 lambda s: any(i.key == key and i.rollback_id for i in s.incidents), what="the incident")
    incident = next(i for i in monitored.incidents if i.key == key)
    assert incident.outcome == "started" and "DemoHighErrorRate" in incident.reason
    outcome = await orch.wait(incident.rollback_id)
    assert outcome is not None and outcome.state == Phase.SUCCEEDED
    assert await front_version(blue_green.front_url) == "v1"
    status = await orch.get_rollback_status(incident.rollback_id)
    assert (status.trigger, status.initiated_by) == ("external", "alertmanager")
    await assert_no_secrets_in_history(client, incident.rollback_id)
    await assert_no_secrets_in_history(client, "monitor-demo")


async def test_alertmanager_with_a_wrong_token_starts_nothing(offline_config, tmp_path, client, serve_api, http):
    api = await serve_api(offline_config)
    since = datetime.now(timezone.utc)
    manager = Alertmanager(tmp_path / "alertmanager", webhook_url=api.url + AM_PATH, token="not-the-token-0123456789").start()
    try:
        await manager.fire("DemoHighErrorRate", summary="error rate high")
        deliveries = await eventually(lambda: asyncio.sleep(0, api.recorder.to(AM_PATH)), bool, timeout=20,
                                      what="Alertmanager's webhook delivery")
    finally:
        manager.stop()
    assert deliveries[0].status == 401
    assert dict(deliveries[0].response_headers)[b"www-authenticate"] == b"Bearer"

    body = json.dumps(alertmanager_payload(alert(environment="demo"))).encode()
    for headers in ({}, bearer("wrong-token-0123456789"), {"Authorization": f"Basic {AM_TOKEN}"}, bearer(API_TOKEN)):
        response = await http.post(api.url + AM_PATH, content=body, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", headers
        assert "bearer token" in response.json()["detail"]
    await assert_no_rollback_started(client, since)


async def test_alertmanager_payload_errors_name_the_problem(offline_config, client, serve_api, http):
    api = await serve_api(offline_config)
    since = datetime.now(timezone.utc)

    async def post(payload: Any) -> httpx.Response:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await http.post(api.url + AM_PATH, content=raw, headers=bearer(AM_TOKEN))

    def locs(response: httpx.Response) -> list[list]:
        assert response.status_code == 422, response.text
        return [error["loc"] for error in response.json()["detail"]]

    assert (await post(b'{"version": "4", ')).status_code == 400
    assert "not valid JSON" in (await post(b"{not json")).json()["detail"]
    assert locs(await post({**alertmanager_payload(alert(environment="demo")), "version": "3"})) == [["body", "version"]]
    assert ["body", "alerts", 0, "fingerprint"] in locs(await post(alertmanager_payload(
        {k: v for k, v in alert(environment="demo").items() if k != "fingerprint"})))
    missing = await post(alertmanager_payload(alert()))
    assert locs(missing) == [["body", "alerts", 0, "labels", "environment"]]
    assert "label 'environment' is required" in missing.json()["detail"][0]["msg"]
    unknown = await post(alertmanager_payload(alert(environment="demo"), alert(environment="prod")))
    assert locs(unknown) == [["body", "alerts", 1, "labels", "environment"]]
    assert unknown.json()["detail"][0]["msg"] == "unknown environment 'prod'; configured: demo"
    targets = await post(alertmanager_payload(alert(environment="demo", rollback_targets="backend,cache")))
    assert locs(targets) == [["body", "alerts", 0, "labels", "rollback_targets"]]

    resolved = alertmanager_payload({**alert(environment="demo"), "status": "resolved"})
    answer = await post({**resolved, "status": "resolved"})
    assert answer.status_code == 200
    assert answer.json() == {"results": [], "ignored_resolved": 1, "detail": "no firing alerts: nothing to do"}
    await assert_no_rollback_started(client, since)


# -- pipelines ---------------------------------------------------------------------------------

async def test_pipeline_trigger_is_signed_and_never_replayed(offline_config, client, task_queue, serve_api, http):
    api = await serve_api(offline_config)
    orch = orchestrator(client, task_queue)
    before = await rollback_runs(client)
    since = datetime.now(timezone.utc)
    body = json.dumps({"environment": "demo", "reason": "smoke tests failed after deploy", "pipeline": "ci",
                       "run_url": "https://ci.invalid/runs/42", "commit": "abc123"}).encode()

    stamp = int(time.time())
    body_only = "sha256=" + hmac.new(PIPELINE_SECRET.encode(), body, hashlib.sha256).hexdigest()  # the old scheme
    for signature in (None, "sha256=" + "0" * 64, sign(body, "d-0", stamp, "some-other-secret-0123"),
                      sign(body + b" ", "d-0", stamp), sign(body, "d-1", stamp), body_only, "garbage"):
        refused = await post_pipeline(http, api, body, delivery="d-0", signature=signature, timestamp=stamp)
        assert refused.status_code == 401, signature
        assert "X-Signature-256" in refused.json()["detail"]
    unsigned_delivery = await post_pipeline(http, api, body, delivery=None)
    assert unsigned_delivery.status_code == 422
    assert unsigned_delivery.json()["detail"][0]["loc"] == ["header", "X-Delivery-Id"]
    await assert_no_rollback_started(client, since)

    accepted = await post_pipeline(http, api, body, delivery="d-1", timestamp=stamp)
    assert accepted.status_code == 200, accepted.text
    outcome = accepted.json()["results"][0]["outcome"]
    assert (outcome["routed_to"], outcome["started"]) == ("rollback", True)
    execution_id = outcome["workflow_id"]
    described = await client.get_workflow_handle(execution_id).describe()
    assert described.typed_search_attributes.get(SA_TRIGGER) == "external"
    history = await assert_no_secrets_in_history(client, execution_id)
    assert "pipeline:ci" in history and "smoke tests failed after deploy" in history

    replay = await post_pipeline(http, api, body, delivery="d-1", timestamp=stamp)
    assert replay.status_code == 200 and replay.json()["results"][0]["duplicate"] is True

    # A new delivery while that rollback runs is reported against it; no second rollback.
    await eventually(lambda: orch.running_rollback("demo"), lambda found: found == execution_id, what="listing")
    again = await post_pipeline(http, api, body, delivery="d-2")
    assert again.json()["results"][0]["outcome"] == {
        "routed_to": "rollback", "workflow_id": execution_id, "started": False,
        "detail": f"a rollback is already running for demo: {execution_id}; none started"}
    twins = await asyncio.gather(*(post_pipeline(http, api, body, delivery="d-5", timestamp=stamp) for _ in range(2)))
    assert sorted(t.json()["results"][0]["duplicate"] for t in twins) == [False, True], "one copy of a delivery counts"
    assert await started_since(client, before) == {execution_id}

    bad = json.dumps({"environment": "prod", "reason": "x"}).encode()
    unknown = await post_pipeline(http, api, bad, delivery="d-3")
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "environment"]
    typo = json.dumps({"environment": "demo", "reason": "x", "target": ["backend"]}).encode()
    extra = await post_pipeline(http, api, typo, delivery="d-4")
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "target"]


async def test_a_captured_pipeline_delivery_cannot_be_replayed(offline_config, client, task_queue, serve_api, http):
    """The signature covers the timestamp and the delivery id with the body: a captured request resent under a
    new delivery id, or later, is refused; only the exact copy inside the 5-minute window passes, as a duplicate."""
    api = await serve_api(offline_config)
    orch = orchestrator(client, task_queue)
    before = await rollback_runs(client)
    body = json.dumps({"environment": "demo", "reason": "smoke tests failed", "pipeline": "deploy-api"}).encode()
    stamp = int(time.time())
    captured = {"delivery": "deploy-api-7731-1", "timestamp": stamp, "signature": sign(body, "deploy-api-7731-1", stamp)}
    first = await post_pipeline(http, api, body, **captured)
    assert first.status_code == 200, first.text
    assert first.json()["results"][0]["outcome"]["started"] is True
    started = first.json()["results"][0]["outcome"]["workflow_id"]

    for delivery in ("deploy-api-7731-2", "replayed"):
        replayed = await post_pipeline(http, api, body, delivery=delivery, timestamp=stamp, signature=captured["signature"])
        assert replayed.status_code == 401, replayed.text
        assert replayed.json()["detail"].startswith("X-Signature-256 does not match")
    restamped = await post_pipeline(http, api, body, delivery=captured["delivery"], timestamp=stamp + 1,
                                    signature=captured["signature"])
    assert restamped.status_code == 401 and restamped.json()["detail"].startswith("X-Signature-256 does not match")
    copy = await post_pipeline(http, api, body, **captured)
    assert copy.status_code == 200 and copy.json()["results"][0]["duplicate"] is True

    # Correctly signed, but not now: refused, whichever delivery id it carries.
    for skew in (-301, 301, -86_400):
        late = await post_pipeline(http, api, body, delivery=f"late{skew}", timestamp=int(time.time()) + skew)
        assert late.status_code == 401, late.text
        assert "X-Signature-Timestamp" in late.json()["detail"] and "300 s" in late.json()["detail"]
    for bad in ("", "soon", "1.5", "-5", "1" * 5000):
        malformed = await post_pipeline(http, api, body, delivery="malformed", timestamp=bad)
        assert malformed.status_code == 401, (bad[:10], malformed.text)
        assert "X-Signature-Timestamp" in malformed.json()["detail"]
    colon = await post_pipeline(http, api, body, delivery="deploy:1")
    assert colon.status_code == 422 and colon.json()["detail"][0]["loc"] == ["header", "X-Delivery-Id"]
    await eventually(lambda: orch.running_rollback("demo"), lambda found: found == started, what="listing")
    fresh = await post_pipeline(http, api, body, delivery="deploy-api-7732-1")
    assert fresh.status_code == 200 and fresh.json()["results"][0]["duplicate"] is False
    assert fresh.json()["results"][0]["outcome"]["workflow_id"] == started, "a new report, against the running rollback"
    assert await started_since(client, before) == {started}


async def test_replay_keys_are_not_pushed_out_by_a_flood_of_alerts(offline_config, client, serve_api, http):
    """Two deliveries of 1,000 alerts used to push older keys out of a journal trimmed by count."""
    api = await serve_api(offline_config, max_body_bytes=1024 * 1024)

    async def deliver(payload: dict[str, Any]) -> dict[str, Any]:
        # A generous timeout: this is about what is remembered, not how fast (the old journal took seconds here).
        response = await http.post(api.url + AM_PATH, content=json.dumps(payload).encode(), headers=bearer(AM_TOKEN),
                                   timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    def flood() -> dict[str, Any]:
        return alertmanager_payload(*(alert(environment="demo") for _ in range(1000)))

    earlier = alertmanager_payload(alert(environment="demo"))
    assert (await deliver(earlier))["duplicate"] is False
    for _ in range(2):
        assert (await deliver(flood()))["duplicate"] is False
    again = await deliver(earlier)
    assert again["duplicate"] is True, "an alert seen before the flood was forgotten"

    body = json.dumps({"environment": "demo", "reason": "canary failed", "pipeline": "ci"}).encode()
    stamp = int(time.time())
    assert (await post_pipeline(http, api, body, delivery="p-1", timestamp=stamp)).status_code == 200
    for _ in range(2):
        await deliver(flood())
    replay = await post_pipeline(http, api, body, delivery="p-1", timestamp=stamp)
    assert replay.json()["results"][0]["duplicate"] is True, "a pipeline delivery id was forgotten inside its window"


async def test_replay_keys_recorded_before_the_upgrade_still_count(offline_config, client, serve_api, http):
    """State files from before kept trigger keys in the effects journal: an alert recorded there stays a duplicate."""
    api = await serve_api(offline_config)
    since = datetime.now(timezone.utc)
    firing = alert(environment="demo")
    key = f"alertmanager:{firing['fingerprint']}:2024-05-01T10:00:00.123456+00:00"
    state_file = offline_config.get().state_dir / "demo.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"effects": {key: {
        "effect": "trigger", "source": "alertmanager", "routed_to": "rollback", "workflow_id": "rollback-demo-old",
        "started": True, "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}}}))
    response = await http.post(api.url + AM_PATH, content=json.dumps(alertmanager_payload(firing)).encode(),
                               headers=bearer(AM_TOKEN))
    assert response.status_code == 200 and response.json()["results"][0]["duplicate"] is True, response.text
    await assert_no_rollback_started(client, since)


async def test_bodies_nested_too_deeply_or_with_huge_numbers_answer_400(offline_config, client, serve_api, http):
    api = await serve_api(offline_config)
    since = datetime.now(timezone.utc)
    deep_evidence = b'{"environment": "demo", "targets": ["backend"], "evidence": ' + b'{"a": ' * 500 + b"1" + b"}" * 501
    bodies = {
        b"[" * 100_000: "body is not valid JSON: nested too deeply",
        deep_evidence: "body is not valid JSON: nested too deeply",
        b'{"environment": "demo", "targets": ["backend"], "evidence": {"n": ' + b"9" * 5000 + b"}}":
            "body is not valid JSON: number too large",
        b'{"environment": "demo", "targets": ["backend"], "evidence": {"n": NaN}}': "body is not valid JSON: NaN",
    }
    for body, detail in bodies.items():
        answers = {
            "alertmanager": await http.post(api.url + AM_PATH, content=body, headers=bearer(AM_TOKEN)),
            "rollbacks": await http.post(api.url + "/v1/rollbacks", content=body, headers=bearer(API_TOKEN)),
            "pipeline": await post_pipeline(http, api, body, delivery=f"deep-{len(body)}"),
        }
        for endpoint, answer in answers.items():
            assert answer.status_code == 400, (endpoint, body[:20], answer.status_code, answer.text[:200])
            assert answer.json()["detail"].startswith(detail), (endpoint, answer.json())
    await assert_no_rollback_started(client, since)


# -- starting and inspecting rollbacks ----------------------------------------------------------

async def test_rollbacks_endpoint_starts_refuses_and_reports(blue_green, tmp_path, client, task_queue, run_worker,
                                                            serve_api, http):
    blue_green.deploy("v2", "errors")
    config = write_config(blue_green, tmp_path)
    await run_worker(config)
    api = await serve_api(config, max_body_bytes=4096)
    url = api.url + "/v1/rollbacks"
    good = {"environment": "demo", "targets": ["backend"], "initiated_by": "api-user", "reason": "v2 broken",
            "require_approval": True}

    for headers in ({}, bearer("wrong-token-0123456789"), bearer(AM_TOKEN)):
        refused = await http.post(url, json=good, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    malformed = await http.post(url, content=b'{"environment": ', headers=bearer(API_TOKEN))
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["detail"]
    wrong = await http.post(url, json={"environment": "demo", "targets": "backend", "dry_run": "maybe"}, headers=bearer(API_TOKEN))
    assert wrong.status_code == 422
    assert [e["loc"] for e in wrong.json()["detail"]] == [["body", "targets"], ["body", "dry_run"]]
    unknown = await http.post(url, json={**good, "environment": "staging"}, headers=bearer(API_TOKEN))
    assert unknown.status_code == 422 and "unknown environment 'staging'" in unknown.json()["detail"][0]["msg"]
    declared = await http.post(url, content=b"{" + b" " * 5000 + b"}", headers=bearer(API_TOKEN))
    assert declared.status_code == 413 and "4096" in declared.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the bytes actually read count
        for _ in range(5):
            yield b" " * 1000

    streamed = await http.post(url, content=chunks(), headers=bearer(API_TOKEN))
    assert streamed.status_code == 413 and "4096" in streamed.json()["detail"]

    started = await http.post(url, json=good, headers=bearer(API_TOKEN))
    assert started.status_code == 202, started.text
    execution_id = started.json()["execution_id"]
    assert started.headers["location"] == f"/v1/rollbacks/{execution_id}"
    orch = orchestrator(client, task_queue)
    await status_when(orch, execution_id, lambda s: s.approval.decision == "pending", what="approval wait")
    await eventually(lambda: orch.running_rollback("demo"), lambda found: found == execution_id, what="listing")
    second = await http.post(url, json=good, headers=bearer(API_TOKEN))
    assert second.status_code == 409 and execution_id in second.json()["detail"]

    status = await http.get(f"{url}/{execution_id}", headers=bearer(API_TOKEN))
    assert status.status_code == 200
    assert (status.json()["approval"]["decision"], status.json()["initiated_by"]) == ("pending", "api-user")
    assert (await http.get(f"{url}/{execution_id}")).status_code == 401
    assert (await http.get(f"{url}/rollback-demo-nope", headers=bearer(API_TOKEN))).status_code == 404

    await orch.reject(execution_id, by="tester", comment="test over")
    await orch.wait(execution_id)
    final = await http.get(f"{url}/{execution_id}", headers=bearer(API_TOKEN))
    assert final.json()["state"] == "rejected"
    await assert_no_secrets_in_history(client, execution_id)


# -- routing to a running monitor ----------------------------------------------------------------

@workflow.defn(name="HealthMonitorWorkflow")
class StandInMonitor:
    """Stands in for the real monitor: records `trigger_rollback` payloads, answers them by query."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    @workflow.run
    async def run(self, environment: str) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.signal(name="trigger_rollback")
    def trigger_rollback(self, payload: dict[str, Any]) -> None:
        self.received.append(payload)

    @workflow.query(name="triggers")
    def triggers(self) -> list[dict[str, Any]]:
        return self.received


async def test_triggers_go_to_a_running_monitor(offline_config, client, task_queue, serve_api, http):
    api = await serve_api(offline_config)
    orch = orchestrator(client, task_queue)
    before = await rollback_runs(client)
    since = datetime.now(timezone.utc)
    async with Worker(client, task_queue=f"{task_queue}-monitor", workflows=[StandInMonitor],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        monitor = await client.start_workflow(StandInMonitor.run, "demo", id="monitor-demo", task_queue=f"{task_queue}-monitor")
        request = TriggerRequest(reason="direct call", initiated_by="tester", key="k-1")
        routed = await route_trigger(orch, "demo", request)
        assert (routed.routed_to, routed.workflow_id, routed.started) == ("monitor", "monitor-demo", False)

        body = json.dumps({"environment": "demo", "reason": "canary failed", "pipeline": "deploy", "targets": ["backend"]}).encode()
        response = await post_pipeline(http, api, body, delivery="m-1")
        assert response.json()["results"][0]["outcome"]["routed_to"] == "monitor"

        received = await eventually(lambda: monitor.query("triggers", result_type=list[dict]), lambda r: len(r) == 2,
                                    what="both signals")
        assert TriggerRequest.model_validate(received[0]) == request
        via_api = TriggerRequest.model_validate(received[1])
        assert (via_api.key, via_api.initiated_by, via_api.trigger.value) == ("pipeline:m-1", "pipeline:deploy", "external")
        assert via_api.reason == "pipeline deploy: canary failed" and via_api.evidence["delivery_id"] == "m-1"
        await assert_no_secrets_in_history(client, "monitor-demo")
        await assert_no_rollback_started(client, since)

        # A monitor that has ended gets nothing: the trigger starts the rollback itself.
        await monitor.terminate(reason="test")
        assert (await monitor.describe()).status == WorkflowExecutionStatus.TERMINATED
        direct = await route_trigger(orch, "demo", TriggerRequest(reason="after the monitor", key="k-2"))
        assert (direct.routed_to, direct.started) == ("rollback", True)
        # Listed once visibility catches up (it lags a start, more so on a loaded machine); any other start shows too.
        await eventually(lambda: started_since(client, before), lambda ids: ids == {direct.workflow_id},
                         what="only the direct rollback in the listing")


async def test_alert_evidence_stays_small_whatever_alertmanager_sends(offline_config, client, task_queue, serve_api, http):
    """1,000 alerts with long labels and summaries: the evidence the trigger carries (into the monitor's signal,
    and the rollback's input) is bounded, and says how many alerts there were."""
    api = await serve_api(offline_config, max_body_bytes=8 * 1024 * 1024)
    alerts = [{**alert(environment="demo", **{f"label_{j}": f"{n}-" + "v" * 300 for j in range(5)}),
               "annotations": {"summary": "s" * 1500}, "generatorURL": "http://prometheus.invalid/" + "g" * 1000}
              for n in range(1000)]
    async with Worker(client, task_queue=f"{task_queue}-monitor", workflows=[StandInMonitor],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        monitor = await client.start_workflow(StandInMonitor.run, "demo", id="monitor-demo", task_queue=f"{task_queue}-monitor")
        response = await http.post(api.url + AM_PATH, content=json.dumps(alertmanager_payload(*alerts)).encode(),
                                   headers=bearer(AM_TOKEN))
        assert response.status_code == 200, response.text
        assert len(response.json()["results"][0]["keys"]) == 1000
        received = await eventually(lambda: monitor.query("triggers", result_type=list[dict]), bool, what="the signal")
    size = len(json.dumps(received[0]))
    assert size < 24 * 1024, f"the trigger signal carries {size} bytes"
    evidence = received[0]["evidence"]
    assert evidence["source"] == "alertmanager" and evidence["alerts_total"] == 1000
    listed = evidence["alerts"]
    assert 1 <= len(listed) <= 20 and evidence["alerts_omitted"] == 1000 - len(listed)
    assert listed[0]["fingerprint"] == alerts[0]["fingerprint"] and listed[0]["labels"]["environment"] == "demo"
    assert all(len(a["summary"]) <= 300 and all(len(v) <= 300 for v in a["labels"].values()) for a in listed)


# -- configuration, documentation, the CLI --------------------------------------------------------

async def test_openapi_documents_paths_bodies_and_security(offline_config, serve_api, http):
    api = await serve_api(offline_config)
    spec = (await http.get(api.url + "/openapi.json")).json()
    assert set(spec["paths"]) == {AM_PATH, PIPELINE_PATH, "/v1/rollbacks", "/v1/rollbacks/{execution_id}",
                                  "/v1/environments/{environment}/gate"}
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiToken"]["scheme"] == schemes["AlertmanagerToken"]["scheme"] == "bearer"
    assert (schemes["PipelineSignature"]["in"], schemes["PipelineSignature"]["name"]) == ("header", "X-Signature-256")
    expected = {AM_PATH: ("AlertmanagerToken", "AlertmanagerWebhook"), PIPELINE_PATH: ("PipelineSignature", "PipelineTrigger"),
                "/v1/rollbacks": ("ApiToken", "RollbackRequest")}
    for path, (scheme, body) in expected.items():
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{scheme: []}]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{body}" and body in spec["components"]["schemas"]
    assert "environment" in spec["components"]["schemas"]["RollbackRequest"]["required"]
    assert spec["paths"]["/v1/rollbacks/{execution_id}"]["get"]["security"] == [{"ApiToken": []}]
    assert spec["paths"]["/v1/environments/{environment}/gate"]["get"]["security"] == [{"ApiToken": []}]
    refs = {ref for ref in _refs(spec)}
    assert refs <= {f"#/components/schemas/{name}" for name in spec["components"]["schemas"]}, "dangling $ref"
    docs = await http.get(api.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_endpoints_without_a_secret_are_closed(offline_config, serve_api, http):
    api = await serve_api(offline_config, token=None, alertmanager_token="", pipeline_secret=None)
    body = json.dumps({"environment": "demo", "reason": "x"}).encode()
    answers = [
        await http.post(api.url + AM_PATH, content=body, headers=bearer(AM_TOKEN)),
        await post_pipeline(http, api, body, delivery="x"),
        await http.post(api.url + "/v1/rollbacks", content=body, headers=bearer(API_TOKEN)),
        await http.get(api.url + "/v1/rollbacks/anything", headers=bearer(API_TOKEN)),
    ]
    assert [a.status_code for a in answers] == [503] * 4
    assert "ROLLBACK_API_ALERTMANAGER_TOKEN" in answers[0].json()["detail"]


def test_weak_secrets_are_refused_without_echoing_them(offline_config, monkeypatch):
    monkeypatch.setenv("ROLLBACK_API_PIPELINE_SECRET", "tiny-secret")
    monkeypatch.setenv("ROLLBACK_API_CONFIG", str(offline_config.path))
    with pytest.raises(SettingsError) as refused:
        create_app(settings=ApiSettings())
    assert str(refused.value) == "ROLLBACK_API_PIPELINE_SECRET must be at least 16 characters"
    assert "tiny-secret" not in repr(ApiSettings())


def test_serve_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "rollback.yaml"
    bad.write_text("environments: [")
    env = {**os.environ, "ROLLBACK_CONFIG": str(bad), "ROLLBACK_API_TOKEN": API_TOKEN}
    done = subprocess.run([sys.executable, "-m", "rollback.cli", "serve", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {bad}: not valid YAML")

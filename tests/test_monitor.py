"""HealthMonitorWorkflow against real probes, a real nginx + demo app, and the real RollbackWorkflow."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError

from rollback.client import RollbackError, RollbackOrchestrator
from rollback.models import Phase
from rollback.monitoring import Rule, TriggerRequest
from tests.conftest import write_config
from tests.helpers import eventually, front_version, keep_history, orchestrator, previous_run
from tests.prometheus import metrics_target, prometheus  # noqa: F401 - fixtures
from tests.test_rollback_workflow import notifications


async def _terminate_monitor(client) -> None:
    handle = client.get_workflow_handle("monitor-demo")
    try:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate(reason="test isolation")
    except RPCError:
        pass  # never started


@pytest_asyncio.fixture(autouse=True)
async def no_monitor_left(client):
    """All tests share one dev server and the id monitor-demo: none may leak into the next."""
    await _terminate_monitor(client)
    yield
    await _terminate_monitor(client)


def monitoring(front_url: str, **overrides: Any) -> dict:
    block = {
        "interval_seconds": 1,
        "cooldown_minutes": 10,
        "consecutive_error_limit": 3,
        "probes": [{"name": "api", "url": f"{front_url}/api/items", "requests": 5, "timeout_seconds": 3}],
        "rules": [
            {"name": "api_error_rate", "threshold": 0.05, "window_seconds": 10, "severity": "high", "min_samples": 5},
            {"name": "response_time_p95", "threshold": 2000, "window_seconds": 10, "severity": "high", "min_samples": 5},
        ],
    }
    block.update(overrides)
    return {"environments": {"demo": {"monitoring": block}}}


async def start_monitor(blue_green, tmp_path, client, task_queue, run_worker, **overrides) -> RollbackOrchestrator:
    await run_worker(write_config(blue_green, tmp_path, extra=monitoring(blue_green.front_url, **overrides)))
    orch = orchestrator(client, task_queue)
    assert await orch.start_monitor("demo") is True
    assert await orch.start_monitor("demo") is False, "starting twice is idempotent"
    return orch


async def status(orch: RollbackOrchestrator, accept, *, timeout: float = 60, what: str = "monitor status"):
    return await eventually(lambda: orch.monitor_status("demo"), accept, timeout=timeout, what=what)


def rule(current, name: str):
    found = [v for v in current.rules if v.rule.name == name]
    assert found, f"rule {name} not in the monitor's status: {[v.rule.name for v in current.rules]}"
    return found[0]


async def largest_written_event(handle: WorkflowHandle) -> int:
    """Bytes of the largest event of the workflow's current run other than the signals sent to it: its
    input (the state carried by continue-as-new), activity inputs and results. What Temporal limits."""
    history = await handle.fetch_history()
    return max(event.ByteSize() for event in history.events
               if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)


def evaluated(name: str, times: int):
    """A status the named rule has been judged in, at least `times` evaluations in."""
    return lambda s: s.evaluations >= times and any(v.rule.name == name and v.state.last for v in s.rules)


async def test_fires_on_a_hard_failure_and_restores_traffic(blue_green, tmp_path, client, task_queue, run_worker):
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker)
    healthy = await status(orch, lambda s: s.evaluations >= 3, what="three evaluations")
    assert all(not v.state.firing and v.state.last.outcome.value == "ok" for v in healthy.rules)

    blue_green.deploy("v2", "errors")
    fired = await status(orch, lambda s: any(i.outcome == "started" for i in s.incidents), what="a rollback")
    incident = next(i for i in fired.incidents if i.outcome == "started")
    assert incident.source == "api_error_rate"
    assert re.search(r"api_error_rate = 0?\.\d+|1 > 0\.05 over 10s \(\d+ samples\)", incident.reason), incident.reason
    result = await orch.wait(incident.rollback_id)
    assert result is not None and result.state == Phase.SUCCEEDED
    assert await front_version(blue_green.front_url) == "v1"
    rollback = await orch.get_rollback_status(incident.rollback_id)
    assert rollback.trigger == "automatic" and rollback.reason == incident.reason
    assert rollback.plan.trigger_evidence["evaluation"]["outcome"] == "breach"
    assert rollback.plan.trigger_evidence["window"]["points"], "the samples that decided it are on the plan"
    # One incident, one rollback: the still-firing rule does not start another.
    later = await status(orch, lambda s: s.evaluations >= fired.evaluations + 3)
    assert [i.outcome for i in later.incidents].count("started") == 1


async def test_noisy_but_healthy_service_never_rolls_back(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "noisy")  # 1% errors, 2.5% slow requests
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker)
    final = await status(orch, lambda s: s.evaluations >= 20, timeout=90, what="20 evaluations")
    assert final.incidents == []
    assert all(not v.state.firing for v in final.rules)
    assert rule(final, "api_error_rate").state.last.samples >= 40


async def test_no_data_never_rolls_back_and_alerts(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    # Too little traffic to judge: every evaluation is NO_DATA, although v2 fails.
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker, rules=[
        {"name": "api_error_rate", "threshold": 0.05, "window_seconds": 10, "severity": "high", "min_samples": 1000}])
    final = await status(orch, evaluated("api_error_rate", 6), what="six evaluations of api_error_rate")
    state = rule(final, "api_error_rate").state
    assert state.last.outcome.value == "no_data" and not state.firing and state.error_alerted
    assert final.incidents == []
    alerts = [n for n in notifications(blue_green) if n["event"] == "monitor_alert"]
    assert len(alerts) == 1 and "without usable data" in alerts[0]["message"]
    assert await front_version(blue_green.front_url) == "v2"


async def test_provider_down_never_rolls_back_and_alerts(blue_green, tmp_path, client, task_queue, run_worker):
    blue_green.deploy("v2", "errors")
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker,
                               prometheus={"url": "http://127.0.0.1:1", "timeout_seconds": 1},
                               metrics={"http_error_ratio": {"source": "prometheus", "query": "sum(rate(x[{window}]))"}},
                               rules=[{"name": "http_error_ratio", "threshold": 0.05, "window_seconds": 10, "severity": "high"}])
    final = await status(orch, evaluated("http_error_ratio", 5), what="five evaluations of http_error_ratio")
    state = rule(final, "http_error_ratio").state
    assert state.last.outcome.value == "provider_down" and not state.firing
    assert final.incidents == []
    assert any(n["event"] == "monitor_alert" and "provider_down" in n["message"] for n in notifications(blue_green))


async def test_cooldown_pause_and_external_triggers(blue_green, tmp_path, client, task_queue, run_worker):
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker)
    handle = client.get_workflow_handle("monitor-demo")
    blue_green.deploy("v2", "errors")
    first = await status(orch, lambda s: any(i.outcome == "started" for i in s.incidents), what="first rollback")
    rollback_id = next(i.rollback_id for i in first.incidents if i.outcome == "started")
    assert (await orch.wait(rollback_id)).state == Phase.SUCCEEDED
    await status(orch, lambda s: all(not v.state.firing for v in s.rules), what="the rule to clear")

    blue_green.deploy("v3", "errors")  # broken again, inside the cooldown
    again = await status(orch, lambda s: any(i.outcome == "suppressed_cooldown" for i in s.incidents), what="cooldown")
    assert [i.outcome for i in again.incidents].count("started") == 1
    assert await front_version(blue_green.front_url) == "v3"

    await orch.pause_monitor("demo", by="sre", reason="maintenance")
    trigger = TriggerRequest(reason="pipeline reports failed smoke tests", key="delivery-1", initiated_by="pipeline:ci")
    await handle.signal("trigger_rollback", trigger)
    paused = await status(orch, lambda s: any(i.key == "delivery-1" for i in s.incidents))
    assert next(i for i in paused.incidents if i.key == "delivery-1").outcome == "suppressed_paused"

    await orch.resume_monitor("demo", by="sre")
    await handle.signal("trigger_rollback", trigger.model_copy(update={"key": "delivery-2"}))
    started = await status(orch, lambda s: any(i.key == "delivery-2" for i in s.incidents))
    external = next(i for i in started.incidents if i.key == "delivery-2")
    assert external.outcome == "started", "external triggers are explicit decisions: no cooldown"
    assert (await orch.wait(external.rollback_id)).state == Phase.SUCCEEDED
    await handle.signal("trigger_rollback", trigger.model_copy(update={"key": "delivery-2"}))
    replay = await status(orch, lambda s: [i.key for i in s.incidents].count("delivery-2") == 2)
    assert replay.incidents[-1].outcome == "duplicate"


async def test_what_was_measured_while_paused_is_not_acted_on_after_the_resume(blue_green, tmp_path, client, task_queue,
                                                                              run_worker):
    """An SRE pauses the monitor, sees the broken release and fixes it by hand, then resumes: the errors
    measured during the pause must not start a rollback of a release that is already gone."""
    rules = [{"name": "api_error_rate", "threshold": 0.05, "window_seconds": 10, "severity": "high", "min_samples": 5,
              "for_evaluations": 8}]
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker, rules=rules)
    await orch.pause_monitor("demo", by="sre", reason="handling v2 by hand")
    blue_green.deploy("v2", "errors")
    await status(orch, lambda s: rule(s, "api_error_rate").state.breaches >= 1, what="a breach while paused")
    blue_green.deploy("v3")  # fixed by hand
    await orch.resume_monitor("demo", by="sre")
    resumed = await orch.monitor_status("demo")

    later = await status(orch, lambda s: s.evaluations >= resumed.evaluations + 15, what="15 evaluations after the resume")
    assert [i.outcome for i in later.incidents if i.outcome == "started"] == [], later.incidents
    assert not rule(later, "api_error_rate").state.firing
    assert await front_version(blue_green.front_url) == "v3"


async def test_update_rules_validates_before_recording(blue_green, tmp_path, client, task_queue, run_worker):
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker)
    with pytest.raises(WorkflowUpdateFailedError) as bad:
        await orch.update_rules("demo", [Rule(name="nonsense_metric", threshold=1, window_seconds=5)])
    assert "unknown metric 'nonsense_metric'" in str(bad.value.cause)
    handle = client.get_workflow_handle("monitor-demo")
    with pytest.raises(WorkflowUpdateFailedError) as malformed:
        await handle.execute_update("update_rules", [{"name": "api_error_rate", "threshold": "high", "window_seconds": 5}])
    assert "rules[0].threshold" in str(malformed.value.cause)

    applied = await orch.update_rules("demo", [Rule(name="api_error_rate", threshold=0.5, window_seconds=5, severity="low")])
    assert [r.threshold for r in applied] == [0.5]
    current = await orch.monitor_status("demo")
    assert [v.rule.name for v in current.rules] == ["api_error_rate"] and current.rules[0].rule.threshold == 0.5

    await orch.stop_monitor("demo")
    stopped = await eventually(handle.describe, lambda d: d.status != WorkflowExecutionStatus.RUNNING, what="monitor stop")
    assert stopped.status == WorkflowExecutionStatus.CANCELED


async def test_a_monitor_that_cannot_start_says_why(blue_green, tmp_path, client, task_queue, run_worker):
    await run_worker(write_config(blue_green, tmp_path))  # no monitoring block
    with pytest.raises(RollbackError, match="monitor-demo failed: .*environment 'demo' has no 'monitoring' block in "):
        await orchestrator(client, task_queue).start_monitor("demo")


async def test_state_survives_continue_as_new_and_a_worker_restart(blue_green, tmp_path, client, task_queue, run_worker):
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker)
    await orch.pause_monitor("demo", by="sre", reason="kept across runs")
    before = await status(orch, lambda s: s.runs >= 2, timeout=120, what="a continue-as-new")
    await keep_history(client, "monitor-demo", "monitor_continue_as_new", run_id=await previous_run(client, "monitor-demo"))
    assert before.paused is not None and before.paused.by == "sre"
    assert rule(before, "api_error_rate").state.oks >= 1

    await run_worker.stop_all()
    await run_worker(write_config(blue_green, tmp_path, extra=monitoring(blue_green.front_url)))
    after = await status(orch, lambda s: s.evaluations >= before.evaluations + 3, what="evaluations after restart")
    assert after.paused is not None and after.paused.reason == "kept across runs"
    assert after.runs >= before.runs
    history_ok = json.dumps(after.model_dump(mode="json"))
    assert "api_error_rate" in history_ok


async def test_a_prometheus_rule_fires_a_rollback(blue_green, tmp_path, client, task_queue, run_worker,
                                                  prometheus, metrics_target):  # noqa: F811 - fixtures
    target = metrics_target(error_ratio=0.0)
    server = prometheus([target.address])
    server.wait_for_data("sum(rate(http_requests_total[5s]))", timeout=30)
    query = 'sum(rate(http_requests_total{code="500"}[{window}])) / sum(rate(http_requests_total[{window}]))'
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker,
                               prometheus={"url": server.url, "timeout_seconds": 2},
                               metrics={"http_error_ratio": {"source": "prometheus", "query": query}},
                               rules=[{"name": "http_error_ratio", "threshold": 0.05, "window_seconds": 5, "severity": "critical"}])
    await status(orch, lambda s: rule(s, "http_error_ratio").state.oks >= 2, what="healthy evaluations")

    blue_green.deploy("v2", "errors")
    target.error_ratio = 1.0  # what the application's own metrics now say
    fired = await status(orch, lambda s: any(i.outcome == "started" for i in s.incidents), what="a rollback")
    incident = next(i for i in fired.incidents if i.outcome == "started")
    assert "rule http_error_ratio (critical)" in incident.reason and "over 5s" in incident.reason
    assert (await orch.wait(incident.rollback_id)).state == Phase.SUCCEEDED
    assert await front_version(blue_green.front_url) == "v1"


async def test_big_alerts_keep_the_monitor_within_temporal_payload_limits(blue_green, tmp_path, client, task_queue,
                                                                           run_worker):
    """Evidence as big as the API used to send (20 alerts with long labels and summaries, ~240 KB) must not
    pile up in the monitor's state: nine such incidents made its continue-as-new input pass 2 MB."""
    orch = await start_monitor(blue_green, tmp_path, client, task_queue, run_worker)
    await orch.pause_monitor("demo", by="sre", reason="incidents recorded, nothing rolled back")
    handle = client.get_workflow_handle("monitor-demo")
    alerts = [{"alertname": f"Big{n}", "fingerprint": f"{n:016x}", "labels": {f"label_{j}": "v" * 1000 for j in range(10)},
               "summary": "s" * 2000} for n in range(20)]
    keys = [f"alertmanager:big-{n}" for n in range(12)]
    for key in keys:
        # A plain dict, as `temporal workflow signal` or any other client would send it: the monitor bounds it.
        await handle.signal("trigger_rollback", {"reason": f"Alertmanager: {key}", "initiated_by": "alertmanager", "key": key,
                                                 "evidence": {"source": "alertmanager", "alerts": alerts}})
    recorded = await status(orch, lambda s: {i.key for i in s.incidents} >= set(keys), timeout=90, what="the 12 incidents")
    # Carried across a continue-as-new since: the next run starts from what was recorded.
    carried = await status(orch, lambda s: s.runs > recorded.runs, timeout=90, what="a continue-as-new after the incidents")

    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert {i.key for i in carried.incidents} >= set(keys)
    assert all(i.outcome == "suppressed_paused" for i in carried.incidents if i.key in keys)
    kept = next(i for i in carried.incidents if i.key == keys[-1]).evidence
    assert kept["source"] == "alertmanager" and kept["alerts"][0]["alertname"] == "Big0", "the evidence is cut, not lost"
    assert kept["truncated"]["bytes"] > 200_000
    assert len(json.dumps(carried.model_dump(mode="json"))) < 200_000, "the status stays small"
    assert await largest_written_event(handle) < 200_000, "the carried state stays far below 256 KB"

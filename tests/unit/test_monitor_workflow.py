"""HealthMonitorWorkflow without the world: test activities under the real names, on the
time-skipping test server. The monitor's clock is skipped forward (`env.sleep`), so minutes of
evaluations take a second; what it starts and what it says are recorded by the test activities.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from rollback.models import RollbackTrigger
from rollback.monitoring import Collection, MetricSpec, MonitorInput, MonitorSettings, MonitorStatus, Reading, Rule
from rollback.payloads import CollectInput, Notification, NotifyResult, StartRollbackInput, StartRollbackResult
from tests.unit.test_rollback_saga import time_skipping_server
from workflows.monitor import HealthMonitorWorkflow

INTERVAL = 15


@pytest_asyncio.fixture
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    # One server per test: a monitor is terminated mid-cycle, and the activity it had scheduled would
    # hold the next test's clock still until its timeout passed in real time.
    async with time_skipping_server() as environment:
        yield environment


def errors_rule(**fields: object) -> Rule:
    return Rule.model_validate({"name": "errors", "metric": "app.errors", "threshold": 0.5, "window_seconds": 60,
                                "for_evaluations": 2, "severity": "high", **fields})


class Service:
    """The monitored world: `value` is what the next collection reads; every start and notification is kept."""

    def __init__(self, rule: Rule, *, auto_rollback: bool = True, collect_fails: bool = False) -> None:
        self.rule, self.auto_rollback, self.collect_fails = rule, auto_rollback, collect_fails
        self.value = 0.0
        self.starts: list[StartRollbackInput] = []
        self.notes: list[Notification] = []

    @activity.defn(name="monitor.settings")
    async def settings(self, environment: str) -> MonitorSettings:
        return MonitorSettings(environment=environment, interval_seconds=INTERVAL, cooldown_minutes=15, consecutive_error_limit=2,
                               auto_rollback_enabled=self.auto_rollback, rules=[self.rule],
                               metrics=[MetricSpec(name="app.errors", source="gauge", stat="last")])

    @activity.defn(name="monitor.collect")
    async def collect(self, inp: CollectInput) -> Collection:
        if self.collect_fails:
            raise ApplicationError("collector down (test)", non_retryable=True)
        return Collection(readings={"app.errors": Reading(value=self.value)})

    @activity.defn(name="monitor.start_rollback")
    async def start_rollback(self, inp: StartRollbackInput) -> StartRollbackResult:
        self.starts.append(inp)
        return StartRollbackResult(workflow_id=inp.workflow_id, started=True)

    @activity.defn(name="notify.send")
    async def send(self, note: Notification) -> NotifyResult:
        self.notes.append(note)
        return NotifyResult(delivered=["log"], skipped={})

    def activities(self) -> list[Callable]:
        return [self.settings, self.collect, self.start_rollback, self.send]


async def watch(env: WorkflowEnvironment, service: Service, scenario) -> MonitorStatus:
    """Run a monitor of `demo` with `service`'s activities while `scenario(handle, advance)` drives it."""
    queue = f"unit-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=queue, workflows=[HealthMonitorWorkflow], activities=service.activities()):
        handle: WorkflowHandle = await env.client.start_workflow(
            HealthMonitorWorkflow.run, MonitorInput(environment="demo"), id=f"monitor-{queue}", task_queue=queue)

        async def advance(evaluations: int) -> MonitorStatus:
            """Let `evaluations` more evaluations happen (the clock skips, queries wait for none)."""
            before = (await handle.query(HealthMonitorWorkflow.status)).evaluations
            for _ in range(200):
                status = await handle.query(HealthMonitorWorkflow.status)
                if status.evaluations >= before + evaluations:
                    return status
                await env.sleep(INTERVAL)
            raise AssertionError(f"the monitor did not evaluate {evaluations} more times")

        try:
            await scenario(handle, advance)
            return await handle.query(HealthMonitorWorkflow.status)
        finally:
            await handle.terminate("test over")


async def test_a_breach_held_for_its_evaluations_starts_one_automatic_rollback_and_cooldown_holds_the_next(time_skipping):
    service = Service(errors_rule())

    async def scenario(handle, advance) -> None:
        await advance(2)
        assert service.starts == [], "healthy readings start nothing"
        service.value = 0.9
        await advance(1)
        assert service.starts == [], "one breaching evaluation is not enough (for_evaluations: 2)"
        await advance(1)
        assert len(service.starts) == 1
        await advance(4)  # still breaching: the rule has fired, it does not fire again for the same breach
        assert len(service.starts) == 1
        service.value = 0.0
        await advance(2)
        service.value = 0.9
        await advance(2)  # a new breach, inside the 15-minute cooldown

    status = await watch(time_skipping, service, scenario)
    [start] = service.starts
    assert start.request.trigger == RollbackTrigger.AUTOMATIC and start.request.environment == "demo"
    assert start.request.evidence["rule"]["name"] == "errors" and "app.errors = 0.9 > 0.5" in start.request.reason
    assert [i.outcome for i in status.incidents][0] == "started" and status.active_rollback == start.workflow_id
    assert "suppressed_cooldown" in [i.outcome for i in status.incidents], status.incidents


@pytest.mark.parametrize("rule, auto_rollback, said", [
    (errors_rule(severity="low"), True, "rule errors (low)"),
    (errors_rule(), False, "(auto_rollback_enabled is false)"),
], ids=["low-severity-alerts", "auto-rollback-disabled"])
async def test_a_rule_that_may_not_roll_back_alerts_instead(time_skipping, rule, auto_rollback, said):
    service = Service(rule, auto_rollback=auto_rollback)
    service.value = 0.9

    async def scenario(handle, advance) -> None:
        await advance(3)

    status = await watch(time_skipping, service, scenario)
    assert service.starts == []
    assert [n.event for n in service.notes][:1] == ["monitor_alert"] and said in service.notes[0].message
    assert status.incidents[0].outcome == "alerted"


async def test_a_paused_monitor_suppresses_and_a_resume_judges_only_what_comes_after(time_skipping):
    service = Service(errors_rule())

    async def scenario(handle, advance) -> None:
        await handle.signal(HealthMonitorWorkflow.pause, {"by": "oncall", "reason": "maintenance"})
        service.value = 0.9
        await advance(3)
        assert service.starts == []
        await handle.signal(HealthMonitorWorkflow.resume, {})
        await advance(1)  # the breach measured while paused is forgotten: one evaluation after it is not enough
        assert service.starts == []
        await advance(1)  # ... two are: the breach is judged afresh, and acted on
        assert len(service.starts) == 1

    status = await watch(time_skipping, service, scenario)
    assert [i.outcome for i in status.incidents] == ["suppressed_paused", "started"]
    assert any("monitor paused by oncall" in n.message for n in service.notes)


async def test_a_collector_that_fails_never_breaches_and_raises_a_data_alert(time_skipping):
    service = Service(errors_rule(), collect_fails=True)

    async def scenario(handle, advance) -> None:
        await advance(3)

    status = await watch(time_skipping, service, scenario)
    assert service.starts == [] and status.incidents == []
    assert any("without usable data" in n.message and "provider_down" in n.message for n in service.notes), service.notes


async def test_an_alert_rule_alerts_again_on_each_new_breach_and_never_for_the_same_one(time_skipping):
    service = Service(errors_rule(severity="low"))

    async def scenario(handle, advance) -> None:
        service.value = 0.9
        await advance(4)  # one breach, held: one alert
        service.value = 0.0
        await advance(2)
        service.value = 0.9
        await advance(2)  # a new breach: a new alert

    status = await watch(time_skipping, service, scenario)
    assert [i.outcome for i in status.incidents] == ["alerted", "alerted"]
    assert [n.event for n in service.notes] == ["monitor_alert", "monitor_alert"] and service.starts == []

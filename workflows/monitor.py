"""HealthMonitorWorkflow: one per environment (`monitor-<environment>`), running continuously.

Every interval it collects readings (an activity), evaluates the rules over bounded
windows kept in its own state, and starts a rollback when a rollback rule fires.
It continues-as-new before its history grows large, carrying windows, rule states
and the recent incidents (bounded: what the status shows), so nothing is lost across
runs or worker restarts.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from rollback.models import RollbackRequest, RollbackTrigger
    from rollback.monitoring import (
        Action, Collection, Evaluation, Incident, MonitorInput, MonitorSettings, MonitorState, MonitorStatus,
        PauseRequest, Reading, Rule, RuleState, RuleView, Transition, TriggerRequest, Windows, evaluate, step,
    )
    from rollback.payloads import (
        COLLECT_READINGS, MONITOR_SETTINGS, SEND_NOTIFICATION, START_ROLLBACK, CollectInput, Notification, StartRollbackInput,
        StartRollbackResult,
    )

from workflows.saga import describe_failure, retry_policy

# Continue-as-new well before Temporal's suggestion at 10k events; an evaluation
# is about 8 events.
MAX_EVALUATIONS_PER_RUN = 500
# The state carried across continue-as-new holds what the status shows and no more: the last 20 incidents,
# each with evidence cut to INCIDENT_EVIDENCE_MAX_BYTES (rollback.monitoring), so the carried input stays
# far below Temporal's payload limits however big the alerts behind them were.
INCIDENTS_KEPT = 20
SEEN_KEYS_KEPT = 500
SETTINGS_REFRESH_EVALUATIONS = 20


@workflow.defn(name="HealthMonitorWorkflow")
class HealthMonitorWorkflow:
    def __init__(self) -> None:
        self._environment = ""
        self._state = MonitorState()
        self._settings: MonitorSettings | None = None
        self._triggers: list[TriggerRequest] = []
        self._evaluations_this_run = 0

    @workflow.run
    async def run(self, raw: Any) -> None:
        try:
            inp = MonitorInput.model_validate(raw)
        except ValidationError as err:
            raise ApplicationError(f"invalid MonitorInput: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}",
                                   type="InvalidRequest", non_retryable=True) from None
        self._environment = inp.environment
        if inp.state is not None:
            self._state = inp.state
            # A run from before INCIDENTS_KEPT was 20 may hand over more.
            self._state.incidents = self._state.incidents[-INCIDENTS_KEPT:]
            self._triggers, self._state.pending_triggers = self._state.pending_triggers, []
        await self._refresh_settings()
        next_due = workflow.now()
        while True:
            timeout = max(0.0, (next_due - workflow.now()).total_seconds())
            try:
                await workflow.wait_condition(lambda: bool(self._triggers), timeout=timedelta(seconds=timeout))
            except asyncio.TimeoutError:
                pass
            while self._triggers:
                await self._handle_trigger(self._triggers.pop(0))
            if workflow.now() >= next_due:
                await self._evaluate()
                next_due = workflow.now() + timedelta(seconds=self.settings.interval_seconds)
            if self._evaluations_this_run >= MAX_EVALUATIONS_PER_RUN or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                self._state.runs += 1
                self._state.pending_triggers = list(self._triggers)
                workflow.continue_as_new(MonitorInput(environment=self._environment, state=self._state))

    # -- interface ------------------------------------------------------------

    @workflow.signal
    def pause(self, payload: Any) -> None:
        try:
            self._state.paused = PauseRequest.model_validate(payload)
        except ValidationError as err:
            workflow.logger.warning("ignoring pause with invalid payload: %s", err.errors()[:1])

    @workflow.signal
    def resume(self, payload: Any) -> None:
        if self._state.paused is not None and workflow.patched("resume-starts-fresh"):
            # What was measured while paused describes a time someone chose to handle by hand (a
            # manual rollback, maintenance): judged after the resume, a rule would act on a past
            # that is over (roll back a release already rolled back). Windows and rule states restart.
            self._state.windows = Windows()
            self._state.rules = {}
        self._state.paused = None

    @workflow.signal
    def trigger_rollback(self, payload: Any) -> None:
        try:
            self._triggers.append(TriggerRequest.model_validate(payload))
        except ValidationError as err:
            workflow.logger.warning("ignoring trigger_rollback with invalid payload: %s", err.errors()[:1])

    @workflow.update
    async def update_rules(self, rules: list[Any]) -> list[Rule]:
        # Metric names can only be checked once the settings are loaded (first activity).
        await workflow.wait_condition(lambda: self._settings is not None)
        parsed = self._parse_rules(rules)
        self._state.rules_override = parsed
        # Keep the debounce state of rules that stay; new rules start fresh.
        self._state.rules = {r.name: self._state.rules.get(r.name, RuleState()) for r in parsed}
        return parsed

    @update_rules.validator
    def _validate_rules(self, rules: list[Any]) -> None:
        self._parse_rules(rules)

    @workflow.query
    def status(self) -> MonitorStatus:
        settings = self.settings
        return MonitorStatus(
            environment=self._environment, paused=self._state.paused, cooldown_until=self._state.cooldown_until,
            active_rollback=self._state.active_rollback, evaluations=self._state.evaluations,
            last_evaluated_at=self._state.last_evaluated_at, runs=self._state.runs,
            interval_seconds=settings.interval_seconds,
            rules=[RuleView(rule=r, state=self._state.rules.get(r.name, RuleState())) for r in self.rules],
            incidents=self._state.incidents,
        )

    # -- evaluation -------------------------------------------------------------

    @property
    def settings(self) -> MonitorSettings:
        return self._settings or MonitorSettings(environment=self._environment)

    @property
    def rules(self) -> list[Rule]:
        return self._state.rules_override if self._state.rules_override is not None else self.settings.rules

    def _parse_rules(self, rules: list[Any]) -> list[Rule]:
        """Rules as an update gives them: each valid, names unique, metrics known. Raises to reject."""
        if not isinstance(rules, list) or not rules:
            raise ApplicationError("rules: expected a non-empty list of rules", type="InvalidRules")
        parsed: list[Rule] = []
        for index, raw in enumerate(rules):
            try:
                parsed.append(Rule.model_validate(raw))
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "rule"
                raise ApplicationError(f"rules[{index}].{where}: {first['msg']}", type="InvalidRules") from None
        names = [r.name for r in parsed]
        if len(set(names)) != len(names):
            raise ApplicationError("rules: names must be unique", type="InvalidRules")
        known = {m.name for m in self._settings.metrics} if self._settings else None
        for index, rule in enumerate(parsed):
            if known is not None and rule.metric_name not in known:
                raise ApplicationError(f"rules[{index}]: unknown metric {rule.metric_name!r}; known: {', '.join(sorted(known))}",
                                       type="InvalidRules")
        return parsed

    async def _refresh_settings(self) -> None:
        self._settings = await workflow.execute_activity(
            MONITOR_SETTINGS, self._environment, result_type=MonitorSettings,
            start_to_close_timeout=timedelta(seconds=30), retry_policy=retry_policy(5))

    async def _evaluate(self) -> None:
        if self._state.evaluations and self._state.evaluations % SETTINGS_REFRESH_EVALUATIONS == 0:
            try:
                await self._refresh_settings()
            except ActivityError as err:
                _reraise_cancel(err)
                # A config broken mid-flight must not stop monitoring: keep the last good settings.
                await self._alert(f"could not reload monitoring settings, keeping the previous ones: {describe_failure(err)}",
                                  key=f"settings:{self._state.evaluations}")
        settings = self.settings
        windows = self._prometheus_windows()
        try:
            collection: Collection = await workflow.execute_activity(
                COLLECT_READINGS, CollectInput(environment=self._environment, prometheus_windows=windows),
                result_type=Collection, start_to_close_timeout=timedelta(seconds=max(30, settings.interval_seconds * 2)),
                heartbeat_timeout=timedelta(seconds=10), retry_policy=retry_policy(2))
        except ActivityError as err:
            _reraise_cancel(err)
            # The collector itself failed: every rule sees PROVIDER_DOWN, never a breach.
            collection = Collection(probe_errors={m.probe or "": describe_failure(err) for m in settings.metrics if m.probe},
                                    readings={m.name: Reading(status="provider_down", detail=describe_failure(err)[:200])
                                              for m in settings.metrics if m.source != "probe"})
        now = workflow.now()
        keep = max((r.window for r in self.rules), default=timedelta(minutes=10))
        self._state.windows.add(now, collection, keep)
        specs = {m.name: m for m in settings.metrics}
        for rule in self.rules:
            state = self._state.rules.setdefault(rule.name, RuleState())
            result = evaluate(rule, specs.get(rule.metric_name), self._state.windows, now, collection.probe_errors)
            transition = step(rule, state, result, now, error_limit=settings.consecutive_error_limit)
            if transition == Transition.FIRED:
                await self._on_fire(rule, result)
            elif transition == Transition.DATA_ALERT:
                await self._alert(f"rule {rule.name}: {state.errors} evaluations without usable data "
                                  f"({result.outcome.value}: {result.detail or 'no detail'}); no rollback will start on it",
                                  key=f"data:{rule.name}:{now.isoformat()}")
        self._state.evaluations += 1
        self._state.last_evaluated_at = now
        self._evaluations_this_run += 1

    def _prometheus_windows(self) -> dict[str, float]:
        windows: dict[str, float] = {}
        prometheus = {m.name for m in self.settings.metrics if m.source == "prometheus"}
        for rule in self.rules:
            if rule.metric_name in prometheus:
                windows[rule.metric_name] = max(windows.get(rule.metric_name, 0), rule.window.total_seconds())
        return windows

    # -- acting -------------------------------------------------------------------

    async def _on_fire(self, rule: Rule, result: Evaluation) -> None:
        window = _human(rule.window)
        reason = (f"rule {rule.name} ({rule.severity.value}): {rule.metric_name} = {result.value:g} "
                  f"{rule.comparison} {rule.threshold:g} over {window} ({result.samples} samples)")
        evidence = {"rule": rule.model_dump(mode="json"), "evaluation": result.model_dump(mode="json"),
                    "window": self._evidence(rule)}
        action = rule.effective_action
        if action == Action.ALERT or not self.settings.auto_rollback_enabled:
            why = "" if action == Action.ALERT else " (auto_rollback_enabled is false)"
            self._record(Incident(key=f"rule:{rule.name}:{workflow.now().isoformat()}", at=workflow.now(),
                                        source=rule.name, reason=reason + why, action=action.value, outcome="alerted",
                                        evidence=evidence))
            await self._alert(reason + why, key=f"alert:{rule.name}:{workflow.now().isoformat()}")
            return
        await self._rollback(TriggerRequest(
            reason=reason, trigger=RollbackTrigger.AUTOMATIC, initiated_by=f"monitor-{self._environment}",
            targets=rule.targets, require_approval=True if action == Action.ROLLBACK_WITH_APPROVAL else None,
            key=f"rule:{rule.name}:{workflow.now().isoformat()}", evidence=evidence), source=rule.name, action=action.value)

    def _evidence(self, rule: Rule) -> dict[str, Any]:
        """The last few points of the rule's window: what the decision saw."""
        spec = next((m for m in self.settings.metrics if m.name == rule.metric_name), None)
        if spec is None:
            return {}
        if spec.source == "probe":
            points = self._state.windows.probes.get(spec.probe or "", [])[-10:]
            return {"probe": spec.probe, "points": [{"at": p.at.isoformat(), "errors": p.errors, "total": p.total,
                                                      "max_latency_ms": max(p.latencies, default=None)} for p in points]}
        gauges = self._state.windows.gauges.get(spec.name, [])[-10:]
        return {"metric": spec.name, "points": [{"at": g.at.isoformat(), "status": g.status, "value": g.value} for g in gauges]}

    async def _handle_trigger(self, trigger: TriggerRequest) -> None:
        if trigger.key and trigger.key in self._state.seen_keys:
            self._record(Incident(key=trigger.key, at=workflow.now(), source=trigger.initiated_by,
                                        reason=trigger.reason, action="rollback", outcome="duplicate"))
            return
        await self._rollback(trigger, source=trigger.initiated_by, action="rollback")

    async def _rollback(self, trigger: TriggerRequest, *, source: str, action: str) -> None:
        now = workflow.now()
        key = trigger.key or f"trigger:{workflow.uuid4()}"
        incident = Incident(key=key, at=now, source=source, reason=trigger.reason, action=action, outcome="started",
                            evidence=trigger.evidence)
        if self._state.paused is not None:
            incident.outcome = "suppressed_paused"
            await self._alert(f"monitor paused by {self._state.paused.by}: not rolling back on {trigger.reason}", key=f"paused:{key}")
        elif self._state.cooldown_until and now < self._state.cooldown_until and trigger.trigger == RollbackTrigger.AUTOMATIC:
            incident.outcome = "suppressed_cooldown"
            await self._alert(f"in cooldown until {self._state.cooldown_until:%H:%M:%S} UTC: not rolling back on {trigger.reason}",
                              key=f"cooldown:{key}")
        else:
            request = RollbackRequest(
                environment=self._environment, targets=trigger.targets or self.settings.targets, trigger=trigger.trigger,
                initiated_by=trigger.initiated_by, reason=trigger.reason[:2000], require_approval=trigger.require_approval,
                evidence=trigger.evidence)
            start = StartRollbackInput(workflow_id=f"rollback-{self._environment}-{now:%Y%m%dT%H%M%S}", request=request,
                                       known_rollback=self._state.active_rollback, incident_key=key)
            try:
                result: StartRollbackResult = await workflow.execute_activity(
                    START_ROLLBACK, start, result_type=StartRollbackResult,
                    start_to_close_timeout=timedelta(seconds=30), retry_policy=retry_policy(5))
            except ActivityError as err:
                _reraise_cancel(err)
                incident.outcome = "failed"
                await self._alert(f"could not start a rollback for {trigger.reason}: {describe_failure(err)}", key=f"failed:{key}")
            else:
                incident.rollback_id = result.workflow_id
                incident.outcome = "started" if result.started else "attached"
                self._state.active_rollback = result.workflow_id
                if result.started:
                    self._state.cooldown_until = now + timedelta(minutes=self.settings.cooldown_minutes)
        self._record(incident)

    def _record(self, incident: Incident) -> None:
        self._state.incidents = (self._state.incidents + [incident])[-INCIDENTS_KEPT:]
        self._state.seen_keys = (self._state.seen_keys + [incident.key])[-SEEN_KEYS_KEPT:]

    async def _alert(self, message: str, *, key: str) -> None:
        note = Notification(environment=self._environment, event="monitor_alert", message=message,
                            key=f"{workflow.info().workflow_id}:{key}", fields={"monitor": workflow.info().workflow_id})
        try:
            await workflow.execute_activity(SEND_NOTIFICATION, note, start_to_close_timeout=timedelta(seconds=30),
                                            retry_policy=retry_policy(3))
        except ActivityError as err:
            _reraise_cancel(err)
            workflow.logger.warning("monitor alert failed: %s", describe_failure(err))


def _reraise_cancel(err: BaseException) -> None:
    """`rollback monitor stop` cancels the workflow: it must end the monitor, not count as a failed step."""
    if is_cancelled_exception(err):
        raise err


def _human(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    return f"{seconds // 60}m" if seconds % 60 == 0 and seconds >= 60 else f"{seconds}s"

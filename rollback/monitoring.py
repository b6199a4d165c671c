"""Health monitoring: rules, metric readings and the pure rule engine.

Workflow code imports this module, so it is deterministic and does no I/O: the
collection activity gathers readings, the engine here turns windows of readings
into one of four outcomes per rule and decides when a rule fires or clears.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rollback.models import RollbackTarget, RollbackTrigger


class Severity(str, Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Action(str, Enum):
    ROLLBACK = "rollback"
    ROLLBACK_WITH_APPROVAL = "rollback_with_approval"
    ALERT = "alert"


DEFAULT_ACTION = {Severity.CRITICAL: Action.ROLLBACK, Severity.HIGH: Action.ROLLBACK,
                  Severity.MEDIUM: Action.ROLLBACK_WITH_APPROVAL, Severity.LOW: Action.ALERT}


class Outcome(str, Enum):
    OK = "ok"
    BREACH = "breach"
    NO_DATA = "no_data"
    PROVIDER_DOWN = "provider_down"


class Rule(BaseModel):
    """`{"name": "api_error_rate", "threshold": 0.05, "window_minutes": 5, "severity": "high"}` and friends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    metric: str | None = Field(default=None, description="metric to evaluate; default: the rule's name")
    threshold: float
    window_minutes: float | None = Field(default=None, gt=0, le=24 * 60)
    window_seconds: float | None = Field(default=None, gt=0, le=24 * 3600)
    severity: Severity = Severity.MEDIUM
    comparison: Literal[">", ">=", "<", "<="] = ">"
    for_evaluations: int = Field(default=2, ge=1, le=100)
    min_samples: int = Field(default=1, ge=1)
    action: Action | None = None
    targets: list[RollbackTarget] | None = None

    @model_validator(mode="after")
    def _one_window(self) -> "Rule":
        if (self.window_minutes is None) == (self.window_seconds is None):
            raise ValueError("give exactly one of window_minutes or window_seconds")
        if not math.isfinite(self.threshold):
            raise ValueError("threshold must be a finite number")
        return self

    @property
    def metric_name(self) -> str:
        return self.metric or self.name

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_seconds if self.window_seconds is not None else self.window_minutes * 60)  # type: ignore[operator]

    @property
    def effective_action(self) -> Action:
        return self.action or DEFAULT_ACTION[self.severity]

    def breached(self, value: float) -> bool:
        return {">": value > self.threshold, ">=": value >= self.threshold,
                "<": value < self.threshold, "<=": value <= self.threshold}[self.comparison]


DEFAULT_RULES = [
    Rule(name="api_error_rate", threshold=0.05, window_minutes=5, severity=Severity.HIGH),
    Rule(name="response_time_p95", threshold=2000, window_minutes=10, severity=Severity.MEDIUM),
]


# -- readings from the collection activity ------------------------------------------

class ProbeSample(BaseModel):
    ok: bool
    latency_ms: float


class Reading(BaseModel):
    """One collected value of a metric (gauges, Prometheus) at one evaluation."""

    status: Literal["ok", "no_data", "provider_down"] = "ok"
    value: float | None = None
    detail: str = ""


class Collection(BaseModel):
    """What one collection activity returns: raw probe samples and metric readings."""

    probes: dict[str, list[ProbeSample]] = Field(default_factory=dict)
    probe_errors: dict[str, str] = Field(default_factory=dict, description="probe name -> why it could not run")
    readings: dict[str, Reading] = Field(default_factory=dict)


class MetricSpec(BaseModel):
    """How the monitor computes a metric over a window (decided by the config, carried in the workflow)."""

    name: str
    source: Literal["probe", "prometheus", "gauge"]
    probe: str | None = None
    stat: Literal["error_ratio", "latency_p95_ms", "latency_p99_ms", "mean", "max", "last"] = "last"


# -- bounded windows kept in workflow state -------------------------------------------

class ProbePoint(BaseModel):
    at: datetime
    errors: int
    total: int
    latencies: list[float]


class GaugePoint(BaseModel):
    at: datetime
    status: str
    value: float | None
    detail: str = ""


class Windows(BaseModel):
    probes: dict[str, list[ProbePoint]] = Field(default_factory=dict)
    gauges: dict[str, list[GaugePoint]] = Field(default_factory=dict)

    def add(self, at: datetime, collection: Collection, keep: timedelta) -> None:
        for name, samples in collection.probes.items():
            point = ProbePoint(at=at, errors=sum(not s.ok for s in samples), total=len(samples),
                               latencies=[round(s.latency_ms, 1) for s in samples])
            self.probes[name] = [p for p in self.probes.get(name, []) if at - p.at <= keep] + [point]
        for name, reading in collection.readings.items():
            gauge = GaugePoint(at=at, status=reading.status, value=reading.value,
                               detail=reading.detail[:200] if reading.status != "ok" else "")
            self.gauges[name] = [p for p in self.gauges.get(name, []) if at - p.at <= keep] + [gauge]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Evaluation(BaseModel):
    rule: str
    outcome: Outcome
    value: float | None = None
    samples: int = 0
    window_fill: float = Field(default=0.0, description="share of the window covered by data, 0..1")
    detail: str = ""


def evaluate(rule: Rule, spec: MetricSpec | None, windows: Windows, now: datetime,
             probe_errors: dict[str, str] | None = None) -> Evaluation:
    """One rule over its window: OK, BREACH, NO_DATA or PROVIDER_DOWN. Never BREACH without data."""
    if spec is None:
        return Evaluation(rule=rule.name, outcome=Outcome.NO_DATA, detail=f"no metric named {rule.metric_name!r}")
    window = rule.window
    if spec.source == "probe":
        error = (probe_errors or {}).get(spec.probe or "")
        if error:
            return Evaluation(rule=rule.name, outcome=Outcome.PROVIDER_DOWN, detail=error)
        points = [p for p in windows.probes.get(spec.probe or "", []) if now - p.at < window]
        total = sum(p.total for p in points)
        fill = _fill([p.at for p in points], window, now)
        if total < rule.min_samples or total == 0:
            return Evaluation(rule=rule.name, outcome=Outcome.NO_DATA, samples=total, window_fill=fill,
                              detail=f"{total} samples < min_samples {rule.min_samples}")
        if spec.stat == "error_ratio":
            value = sum(p.errors for p in points) / total
        else:
            latencies = [v for p in points for v in p.latencies]
            value = _percentile(latencies, 0.99 if spec.stat == "latency_p99_ms" else 0.95)
        return _judge(rule, value, total, fill)
    gauges = [p for p in windows.gauges.get(spec.name, []) if now - p.at < window]
    latest = gauges[-1] if gauges else None
    if latest is not None and latest.status == "provider_down":
        return Evaluation(rule=rule.name, outcome=Outcome.PROVIDER_DOWN, window_fill=_fill([p.at for p in gauges], window, now),
                          detail=latest.detail)
    values = [p.value for p in gauges if p.status == "ok" and p.value is not None and math.isfinite(p.value)]
    fill = _fill([p.at for p in gauges if p.status == "ok"], window, now)
    needed = rule.min_samples
    if spec.source == "prometheus":
        # The query already aggregates over the window: judge the latest answer only
        # (min_samples belongs in the query, e.g. a count guard, not here).
        values = values[-1:] if latest is not None and latest.status == "ok" else []
        needed = 1
    if len(values) < needed or not values:
        return Evaluation(rule=rule.name, outcome=Outcome.NO_DATA, samples=len(values), window_fill=fill,
                          detail="no values in the window")
    stat = spec.stat
    value = {"mean": sum(values) / len(values), "max": max(values)}.get(stat, values[-1])
    return _judge(rule, value, len(values), fill)


def _fill(times: list[datetime], window: timedelta, now: datetime) -> float:
    if not times:
        return 0.0
    return round(min(1.0, (now - min(times)).total_seconds() / window.total_seconds()), 3)


def _judge(rule: Rule, value: float, samples: int, fill: float) -> Evaluation:
    outcome = Outcome.BREACH if rule.breached(value) else Outcome.OK
    return Evaluation(rule=rule.name, outcome=outcome, value=round(value, 6), samples=samples, window_fill=fill,
                      detail=f"{value:.4g} {rule.comparison} {rule.threshold:g}" if outcome == Outcome.BREACH else "")


class RuleState(BaseModel):
    """Debounce state of one rule: consecutive outcomes, whether it is firing."""

    firing: bool = False
    breaches: int = 0
    oks: int = 0
    errors: int = 0
    error_alerted: bool = False
    last: Evaluation | None = None
    fired_at: datetime | None = None
    cleared_at: datetime | None = None


class Transition(str, Enum):
    NONE = "none"
    FIRED = "fired"
    CLEARED = "cleared"
    DATA_ALERT = "data_alert"


def step(rule: Rule, state: RuleState, result: Evaluation, now: datetime, *, error_limit: int) -> Transition:
    """Advance a rule's state by one evaluation; say whether it fired, cleared, or needs a data alert."""
    state.last = result
    if result.outcome == Outcome.BREACH:
        state.breaches += 1
        state.oks = state.errors = 0
        state.error_alerted = False
        if not state.firing and state.breaches >= rule.for_evaluations:
            state.firing, state.fired_at = True, now
            return Transition.FIRED
        return Transition.NONE
    if result.outcome == Outcome.OK:
        state.oks += 1
        state.breaches = state.errors = 0
        state.error_alerted = False
        if state.firing and state.oks >= rule.for_evaluations:
            state.firing, state.cleared_at = False, now
            return Transition.CLEARED
        return Transition.NONE
    # NO_DATA / PROVIDER_DOWN: never a breach; a breach streak does not survive a gap.
    state.errors += 1
    state.breaches = 0
    if state.errors >= error_limit and not state.error_alerted:
        state.error_alerted = True
        return Transition.DATA_ALERT
    return Transition.NONE


# -- evidence: shown to people, bounded -------------------------------------------------

# Evidence (the alerts, samples or report behind a trigger) travels in signals, workflow inputs and the
# monitor's carried state, where Temporal warns from 256 KB and refuses 2 MB. Unbounded, 20 alerts with
# long labels were ~240 KB per trigger and nine such incidents broke the monitor's continue-as-new. It is
# shown (status, plan), never decided on, so cutting it is safe.
TRIGGER_EVIDENCE_MAX_BYTES = 16 * 1024  # what a trigger hands to the rollback it starts
INCIDENT_EVIDENCE_MAX_BYTES = 4 * 1024  # what each of the monitor's recent incidents keeps
# Ever smaller cuts (characters of a string, entries of a list or object), tried until one fits.
_CUTS = ((1000, 50), (200, 20), (80, 10), (40, 6), (20, 3))
_CUT_DEPTH = 6


def json_size(value: Any) -> int:
    """Bytes of `value` as compact JSON; a value that cannot be encoded (too deep) counts as too large."""
    try:
        return len(json.dumps(value, separators=(",", ":"), default=str).encode())
    except (RecursionError, ValueError):
        return 1 << 40


def bounded_evidence(evidence: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """`evidence` itself when its JSON fits `max_bytes`; else a copy cut down until it fits (strings
    shortened, lists and objects keep their first entries), marked `"truncated": {"bytes": <original size>}`."""
    size = json_size(evidence)
    if size <= max_bytes:
        return evidence
    # Cut twice (a trigger's, then its incident's): the size said is still the original's.
    earlier = evidence.get("truncated")
    if isinstance(earlier, dict) and isinstance(earlier.get("bytes"), int):
        size = max(size, earlier["bytes"])
    for text, entries in _CUTS:
        cut = _cut(evidence, text, entries, _CUT_DEPTH)
        cut["truncated"] = {"bytes": size}
        if json_size(cut) <= max_bytes:
            return cut
    return {"truncated": {"bytes": size}}


def _cut(value: Any, text: int, entries: int, depth: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= text else value[:text] + "..."
    if isinstance(value, dict):
        if depth == 0:
            return f"<{len(value)} entries>"
        return {str(k)[:text]: _cut(v, text, entries, depth - 1) for k, v in list(value.items())[:entries]}
    if isinstance(value, list | tuple):
        if depth == 0:
            return f"<{len(value)} entries>"
        return [_cut(v, text, entries, depth - 1) for v in value[:entries]]
    return value if value is None or isinstance(value, bool | int | float) else _cut(str(value), text, entries, 0)


# -- monitor configuration, signals and state -------------------------------------------

class MonitorSettings(BaseModel):
    """What the monitor workflow needs from rollback.yaml (read by an activity)."""

    environment: str
    interval_seconds: float = 15
    cooldown_minutes: float = 15
    consecutive_error_limit: int = 4
    targets: list[RollbackTarget] = Field(default_factory=lambda: [RollbackTarget.BACKEND])
    auto_rollback_enabled: bool = True
    rules: list[Rule] = Field(default_factory=lambda: list(DEFAULT_RULES))
    metrics: list[MetricSpec] = Field(default_factory=list)
    # Prometheus metrics need the window substituted: the collector gets these.
    prometheus_windows: dict[str, float] = Field(default_factory=dict)


class TriggerRequest(BaseModel):
    """Payload of the monitor's `trigger_rollback` signal (inbound API, pipelines, people)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    trigger: RollbackTrigger = RollbackTrigger.EXTERNAL
    initiated_by: str = Field(default="external", max_length=200)
    targets: list[RollbackTarget] | None = None
    require_approval: bool | None = None
    key: str | None = Field(default=None, max_length=200, description="dedupe key: delivery id or alert fingerprint")
    evidence: dict = Field(default_factory=dict, description=f"cut to {TRIGGER_EVIDENCE_MAX_BYTES} bytes of JSON")

    @field_validator("evidence")
    @classmethod
    def _bounded(cls, evidence: dict) -> dict:
        # Any sender may signal the monitor (the API, `temporal workflow signal`): bounded here, whoever sent it.
        return bounded_evidence(evidence, TRIGGER_EVIDENCE_MAX_BYTES)


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2000)


class Incident(BaseModel):
    key: str
    at: datetime
    source: str = Field(description="rule name, or the external trigger")
    reason: str
    action: str
    rollback_id: str | None = None
    outcome: str = Field(description="started | attached | alerted | suppressed_cooldown | suppressed_paused | duplicate | failed")
    evidence: dict = Field(default_factory=dict, description=f"cut to {INCIDENT_EVIDENCE_MAX_BYTES} bytes of JSON")

    @field_validator("evidence")
    @classmethod
    def _bounded(cls, evidence: dict) -> dict:
        # Incidents are carried across continue-as-new and shown by the status query: each one small.
        # (Also applied to incidents of a state carried from a run that kept them whole.)
        return bounded_evidence(evidence, INCIDENT_EVIDENCE_MAX_BYTES)


# -- the monitor workflow's input, carried state and status -------------------------------

class MonitorInput(BaseModel):
    environment: str
    state: "MonitorState | None" = None


class MonitorState(BaseModel):
    """Everything carried across continue-as-new."""

    windows: Windows = Field(default_factory=Windows)
    rules: dict[str, RuleState] = Field(default_factory=dict)
    rules_override: list[Rule] | None = None
    incidents: list[Incident] = Field(default_factory=list)
    seen_keys: list[str] = Field(default_factory=list)
    paused: PauseRequest | None = None
    cooldown_until: datetime | None = None
    active_rollback: str | None = None
    evaluations: int = 0
    last_evaluated_at: datetime | None = None
    runs: int = 1
    # Triggers signalled while the previous run was handing over: handled first in the next.
    pending_triggers: list[TriggerRequest] = Field(default_factory=list)


MonitorInput.model_rebuild()


class RuleView(BaseModel):
    rule: Rule
    state: RuleState


class MonitorStatus(BaseModel):
    environment: str
    paused: PauseRequest | None
    cooldown_until: datetime | None
    active_rollback: str | None
    evaluations: int
    last_evaluated_at: datetime | None
    runs: int
    interval_seconds: float
    rules: list[RuleView]
    incidents: list[Incident]

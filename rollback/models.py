"""The public contract as pydantic models: what goes into and comes out of workflows.

Workflows import this module, so it stays free of I/O and heavy imports.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rollback.targets.frontend.contract import CompatibilityReport
from rollback.targets.registry import TargetParams
from rollback.versions import Version


# Triggers hand a rollback at most 16 KB of evidence (rollback/monitoring.py); a request may carry twice that.
REQUEST_EVIDENCE_MAX_BYTES = 32 * 1024


class RollbackTarget(str, Enum):
    DATABASE = "database"
    BACKEND = "backend"
    FRONTEND = "frontend"
    FULL = "full"


class RollbackTrigger(str, Enum):
    MANUAL = "manual"
    AUTOMATIC = "automatic"
    EXTERNAL = "external"
    CROSS_REPO = "cross_repo"


class Phase(str, Enum):
    PENDING = "pending"
    ASSESSMENT = "assessment"
    COORDINATION = "coordination"
    EXECUTION = "execution"
    VALIDATION = "validation"
    # terminal
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATED = "compensated"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


TERMINAL_STATES = {Phase.SUCCEEDED, Phase.FAILED, Phase.COMPENSATED, Phase.REJECTED, Phase.CANCELLED}

# Reverse of the deployment order: the frontend depends on the backend, which depends on the database.
EXECUTION_ORDER = [RollbackTarget.FRONTEND, RollbackTarget.BACKEND, RollbackTarget.DATABASE]


class DatabaseOptions(BaseModel):
    """How the database target is rolled back (optional part of a request)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["schema_rollback", "pitr"] = Field(
        default="schema_rollback",
        description="schema_rollback keeps every row written since; pitr (last resort) recovers to a point and loses later writes")
    restore_point: str | None = Field(default=None, max_length=63, description="pitr: default, the restore point of the oldest backup undone")
    target_time: datetime | None = Field(default=None, description="pitr: recover to this moment instead (with a timezone)")

    @field_validator("target_time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a timezone, e.g. 2026-11-26T10:00:00Z")
        return value

    @model_validator(mode="after")
    def _pitr_options(self) -> "DatabaseOptions":
        if self.restore_point and self.target_time:
            raise ValueError("give restore_point or target_time, not both")
        if self.strategy == "schema_rollback" and (self.restore_point or self.target_time):
            raise ValueError("restore_point and target_time are for strategy 'pitr'")
        return self


class RollbackRequest(BaseModel):
    """Input of RollbackWorkflow; plain JSON from the UI or `temporal workflow start`."""

    model_config = ConfigDict(extra="forbid")

    environment: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    targets: list[RollbackTarget] = Field(min_length=1)
    trigger: RollbackTrigger = RollbackTrigger.MANUAL
    initiated_by: str = Field(default="unknown", max_length=200)
    reason: str = Field(default="", max_length=2000)
    to_version: dict[RollbackTarget, Version] | None = None
    require_approval: bool | None = None
    dry_run: bool = False
    # What a monitor or an external trigger saw (rule, value, samples); shown in the plan.
    evidence: dict[str, Any] = Field(default_factory=dict, description=f"at most {REQUEST_EVIDENCE_MAX_BYTES} bytes of JSON")
    database: DatabaseOptions | None = None
    promote: bool = Field(default=False, description="a forward switch (`rollback promote`): the one target named goes to its "
                                                     "to_version, recorded as a deploy; nothing is marked as rolled back from")

    @field_validator("evidence")
    @classmethod
    def _evidence_bounded(cls, evidence: dict[str, Any]) -> dict[str, Any]:
        # It travels in the plan, the status, every query and the memo: bounded like any state.
        try:
            size = len(json.dumps(evidence, separators=(",", ":"), default=str).encode())
        except (RecursionError, ValueError):
            raise ValueError("cannot be written as JSON (nested too deeply?)") from None
        if size > REQUEST_EVIDENCE_MAX_BYTES:
            raise ValueError(f"{size} bytes of JSON; at most {REQUEST_EVIDENCE_MAX_BYTES}")
        return evidence

    @field_validator("targets")
    @classmethod
    def _full_is_alone(cls, targets: list[RollbackTarget]) -> list[RollbackTarget]:
        if RollbackTarget.FULL in targets and len(targets) > 1:
            raise ValueError("'full' cannot be combined with other targets")
        if len(set(targets)) != len(targets):
            raise ValueError("targets must not repeat")
        return targets

    @model_validator(mode="after")
    def _a_promotion_names_its_target_and_version(self) -> "RollbackRequest":
        if self.promote and (len(self.targets) != 1 or self.targets[0] == RollbackTarget.FULL
                             or set(self.to_version or {}) != set(self.targets)):
            raise ValueError("promote: name exactly one target (not full) and its to_version")
        return self


class Approval(BaseModel):
    """Payload of the `approve` and `reject` signals."""

    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=200)
    comment: str | None = Field(default=None, max_length=2000)


class ApprovalRecord(BaseModel):
    required: bool = False
    reason: str = ""
    decision: Literal["pending", "approved", "rejected", "timed_out", "not_required"] = "not_required"
    by: str | None = None
    comment: str | None = None
    decided_at: datetime | None = None
    deadline: datetime | None = None


class HealthSample(BaseModel):
    ok: bool
    status: int | None = None
    latency_ms: float | None = None
    version: str | None = None
    error: str | None = None


class HealthReport(BaseModel):
    """Outcome of one health validation: N samples against a threshold."""

    url: str
    healthy: bool
    samples: int
    successes: int
    success_ratio: float
    required_ratio: float
    p95_latency_ms: float | None = None
    versions: dict[str, int] = Field(default_factory=dict)
    detail: str = ""

    def step_detail(self) -> str:
        versions = f", versions {self.versions}" if self.versions else ""
        return f"{self.successes}/{self.samples} healthy, p95 {self.p95_latency_ms} ms{versions}"


class Step(BaseModel):
    """One step of a rollback, declared once by its target's flow: the plan shows it, the status
    records it and the execution runs it under this identity (never matched by its text)."""

    id: str = Field(description="unique within a rollback, e.g. backend.batch.2")
    name: str = Field(description="what a person reads")
    target: str = Field(description="a target, or 'all'")


# The coordination phase's step: a rollback that got it holds the environment (rollback start returns then).
LOCK_STEP = Step(id="lock", name="acquire deployment lock", target="all")


class TargetPlan(BaseModel):
    target: RollbackTarget
    strategy: str
    from_version: str | None
    to_version: str
    steps: list[str] = Field(default_factory=list, description="the names of the steps its flow declares for this plan")
    checks: list[str]
    # What the execution phase needs (colours, batches), decided here so that the
    # workflow replays the same plan even if the config file changes meanwhile.
    params: TargetParams
    evidence: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _params_name_their_strategy(cls, data: Any) -> Any:
        # Plans recorded before the parameters were typed carry the strategy beside them only.
        if isinstance(data, dict) and isinstance(data.get("params"), dict) and "strategy" not in data["params"]:
            data = {**data, "params": {**data["params"], "strategy": data.get("strategy")}}
        return data

    @model_validator(mode="after")
    def _one_strategy(self) -> "TargetPlan":
        if self.params.strategy != self.strategy:  # type: ignore[attr-defined]
            raise ValueError(f"params are for strategy {self.params.strategy!r}, the plan says {self.strategy!r}")  # type: ignore[attr-defined]
        return self


class RollbackPlan(BaseModel):
    environment: str
    targets: list[TargetPlan]
    require_approval: bool
    approval_reason: str
    approval_timeout_seconds: int
    on_approval_timeout: str
    on_failure: str
    max_attempts: int
    health_check_timeout_seconds: int
    notification_channels: list[str]
    trigger_evidence: dict[str, Any] = Field(default_factory=dict)
    compatibility: CompatibilityReport | None = Field(default=None, description="the frontend and backend the rollback leaves live")
    skipped: dict[str, str] = Field(default_factory=dict, description="targets of `full` already where they should be, and why")

    def step_detail(self) -> str:
        moves = "; ".join(f"{t.target.value}: {t.strategy} {t.from_version} -> {t.to_version}" for t in self.targets)
        moves += "".join(f"; {target}: left alone ({why})" for target, why in self.skipped.items())
        return moves + (f"; {self.compatibility.summary()}" if self.compatibility else "")


class StepRecord(BaseModel):
    id: str = Field(default="", description="Step.id")
    name: str
    target: str
    state: Literal["pending", "running", "succeeded", "failed", "skipped", "compensated"] = "pending"
    attempts: int = 0
    started: datetime | None = None
    finished: datetime | None = None
    detail: str = ""


class RollbackStatus(BaseModel):
    """The `status` query: everything a person needs to see what happened and why."""

    workflow_id: str
    environment: str
    targets: list[str]
    trigger: str
    initiated_by: str
    reason: str
    phase: Phase
    state: Phase
    plan: RollbackPlan | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    approval: ApprovalRecord = Field(default_factory=ApprovalRecord)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    phase_started: dict[str, datetime] = Field(default_factory=dict)
    error: str | None = None
    dry_run: bool = False
    # Incidents that happened while this rollback ran (attached by the monitor).
    incidents: list[dict[str, Any]] = Field(default_factory=list)
    # Reports of verification steps, by name (e.g. the database integrity report).
    reports: dict[str, Any] = Field(default_factory=dict)


class MigrateRequest(BaseModel):
    """Input of DatabaseMigrationWorkflow (`rollback db migrate`)."""

    model_config = ConfigDict(extra="forbid")

    environment: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    to_revision: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$", description="SQL: the number (0003); Alembic: the revision id")
    initiated_by: str = Field(default="unknown", max_length=200)


class MigrateResult(BaseModel):
    execution_id: str
    environment: str
    from_revision: str | None
    revision: str | None
    applied: list[str] = Field(default_factory=list)
    backups: list[str] = Field(default_factory=list)


class RollbackResult(BaseModel):
    execution_id: str
    environment: str
    state: Phase
    restored: dict[str, str] = Field(default_factory=dict)
    phase_seconds: dict[str, float] = Field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None

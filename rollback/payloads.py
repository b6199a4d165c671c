"""Inputs and results of activities: what workflows send to and get back from them.

The ones every target shares (the lock, the version record, notifications, the monitor's);
each target's own are in rollback/targets/<target>/contract.py. Kept apart from the activity
implementations so workflow modules can import them without pulling in httpx, asyncpg or
subprocess code.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from rollback.models import RollbackRequest
from rollback.versions import Version


# The shared activities, by the names they are registered under.
PLAN_ROLLBACK = "coordination.plan"
ACQUIRE_LOCK = "coordination.acquire_lock"
RELEASE_LOCK = "coordination.release_lock"
RECORD_RESTORED = "coordination.record_restored"
RECORD_DEPLOYED = "coordination.record_deployed"
SEND_NOTIFICATION = "notify.send"
MONITOR_SETTINGS = "monitor.settings"
COLLECT_READINGS = "monitor.collect"
START_ROLLBACK = "monitor.start_rollback"
CHECK_HTTP = "health.check_http"
APPLY_RETENTION = "retention.apply"

# A target's assessment found it already at the version to return to: `full` leaves such a target alone
# (rolling back what is not broken helps nobody); a rollback that names the target is refused.
NOTHING_TO_ROLL_BACK = "NothingToRollBack"


class LockInput(BaseModel):
    environment: str
    holder: str


class RecordInput(BaseModel):
    environment: str
    target: str
    version: Version
    key: str = Field(description="idempotency key: workflow id + step")
    rolled_back_from: str | None = Field(default=None, description="the release rolled back from: marked bad for the deploy gate")
    rollback: str = Field(default="", description="the rollback's workflow id")
    by: str = Field(default="", description="who initiated the rollback")


class Notification(BaseModel):
    environment: str
    event: str
    key: str = Field(description="idempotency key: workflow id + event")
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)


class NotifyResult(BaseModel):
    delivered: list[str]
    skipped: dict[str, str]


class CollectInput(BaseModel):
    environment: str
    # Prometheus metric name -> the window (seconds) substituted for {window} in its query.
    prometheus_windows: dict[str, float] = Field(default_factory=dict)


class StartRollbackInput(BaseModel):
    workflow_id: str = Field(description="derived from the incident: a retried start finds its own rollback")
    request: RollbackRequest
    known_rollback: str | None = Field(default=None, description="the last rollback this monitor started")
    incident_key: str


class StartRollbackResult(BaseModel):
    workflow_id: str
    started: bool = Field(description="False: attached to a rollback already running")


class RetentionInput(BaseModel):
    dry_run: bool = False


class RetentionReport(BaseModel):
    """What a retention run deleted and kept, per environment."""

    retention_days: int
    deleted: list[str] = Field(default_factory=list, description="backup ids")
    pinned: dict[str, list[str]] = Field(default_factory=dict, description="backup ids kept whatever their age, per environment")
    archives_dropped: list[str] = Field(default_factory=list, description="tables in rollback_archive")
    skipped: dict[str, str] = Field(default_factory=dict, description="environments left alone, and why")
    releases_retired: dict[str, list[str]] = Field(default_factory=dict, description="frontend releases removed, per environment")

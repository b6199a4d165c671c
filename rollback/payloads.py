"""Inputs and results of activities: what workflows send to and get back from them.

Kept apart from the activity implementations so workflow modules can import them
without pulling in httpx, asyncpg or subprocess code.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from rollback.models import RollbackRequest, Version



class LockInput(BaseModel):
    environment: str
    holder: str


class RecordInput(BaseModel):
    environment: str
    target: str
    version: Version
    key: str = Field(description="idempotency key: workflow id + step")


class SwitchInput(BaseModel):
    environment: str
    colour: str
    expect_version: Version


class SwitchResult(BaseModel):
    colour: str
    reloaded: bool
    front_door_versions: dict[str, int]
    attempt: int


class BatchInput(BaseModel):
    environment: str
    instances: list[str] = Field(min_length=1)
    version: Version
    require_healthy: bool = True


class BatchResult(BaseModel):
    instances: list[str]
    restarted: list[str]
    reloads: int
    attempt: int


class ValidateInput(BaseModel):
    environment: str
    expect_version: str


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


# -- database target (results are plain dicts in the workflow: their models live beside asyncpg code) --

class DbStepInput(BaseModel):
    environment: str
    key: str = Field(description="idempotency key: workflow id + step; names archives and restore records")


class BackupInput(DbStepInput):
    backup_id: str
    revision: str | None = Field(description="the revision the database is at")
    next_revision: str | None = Field(default=None, description="the migration about to be applied")


class MigrationInput(DbStepInput):
    revision: str
    backup_id: str | None = None
    restore_key: str | None = Field(default=None, description="re-apply: the key of the restore step after the revert")


class RestoreInput(DbStepInput):
    revision: str
    backup_id: str
    revert: dict[str, Any] = Field(description="the revert step's result: what changed and its transaction id")
    integrity_snapshot: str | None = Field(default=None, description="SnapshotRef.pg_snapshot: a table rebuild records "
                                           "who wrote the rows written after it")


class IntegrityInput(DbStepInput):
    target_backup_id: str = Field(description="backup taken before the oldest migration undone: the known-good shape")


class SnapshotRef(BaseModel):
    """An integrity snapshot kept in the database (rollback_meta.integrity_snapshots): its fingerprints
    grow with the database (~90 KB per table), so only this travels through Temporal."""

    label: str = Field(description="the key it is stored under")
    pg_snapshot: str
    tables: int
    rows: int
    seconds: float


class ValidateDbInput(DbStepInput):
    snapshot_label: str = Field(description="SnapshotRef.label of the snapshot taken before")
    restore_keys: list[str] = Field(default_factory=list, description="keys of the restore steps whose writes are expected")
    revert_keys: list[str] = Field(default_factory=list)


class PitrInput(DbStepInput):
    restore_point: str | None = None
    target_time: str | None = Field(default=None, description="ISO 8601 with a timezone")
    retired_name: str = Field(description="the live database is renamed to this; nothing is dropped")


class SwapBackInput(DbStepInput):
    retired_name: str


class RetentionInput(BaseModel):
    dry_run: bool = False

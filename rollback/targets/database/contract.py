"""What the workflows and the database activities exchange: inputs, results, plan parameters.

Pure pydantic (workflows import it): the engine modules (asyncpg) import their result models from
here. Activities are called by the name constants below, which `activities/database.py` registers
under. Every result renders its own step detail (`step_detail()`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

ARCHIVE_SCHEMA = "rollback_archive"

BACKUP = "database.backup"
PLAN_MIGRATION = "database.plan_migration"
APPLY_MIGRATION = "database.apply_migration"
VERIFY_BACKUP = "database.verify_backup"
INTEGRITY_BEFORE = "database.integrity_before"
REVERT_MIGRATION = "database.revert_migration"
RESTORE_DATA = "database.restore_data"
VALIDATE = "database.validate"
REAPPLY_MIGRATION = "database.reapply_migration"
DISCARD_SNAPSHOT = "database.discard_snapshot"
RECOVER_TO_POINT = "database.pitr"
SWAP_BACK = "database.swap_back"
CURRENT_REVISION = "database.current_revision"


# -- plan parameters, one model per strategy ------------------------------------------------

class MigrationToUndo(BaseModel):
    revision: str
    label: str
    backup_id: str = Field(description="the backup taken before it: its data and its shape")


class SchemaRollbackParams(BaseModel):
    strategy: Literal["schema_rollback"] = "schema_rollback"
    undo: list[MigrationToUndo] = Field(min_length=1, description="newest first: the order they are reverted in")
    target_backup_id: str = Field(description="backup taken before the oldest migration undone: the known-good shape")


class PitrParams(BaseModel):
    strategy: Literal["pitr"] = "pitr"
    database: str = Field(default="the database", description="the live database's name (never a DSN)")
    restore_point: str | None = None
    target_time: str | None = Field(default=None, description="ISO 8601 with a timezone")
    approval_required: bool = Field(default=True, description="a recovery loses data: a person always decides")

    def describe(self) -> str:
        point = f"restore point {self.restore_point}" if self.restore_point else f"time {self.target_time}"
        return f"recover {self.database} to {point} into a new database and swap it in"


# -- inputs -------------------------------------------------------------------------------------

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


class IntegrityInput(DbStepInput):
    target_backup_id: str = Field(description="backup taken before the oldest migration undone: the known-good shape")


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


# -- what the engine records (stored in rollback_meta as JSON, and returned) ---------------------

class CapturedObject(BaseModel):
    """One archive table of a migration's capture."""

    table: str = Field(description="schema.table as named when captured")
    initial_table: str = Field(description="schema.table as named when the migration started (before any rename)")
    kind: Literal["rows", "new", "table", "columns", "retyped", "retyped_after"]
    statement: int = Field(description="1-based statement that destroyed it (rows, new: the first; each row has its own)")
    archive_table: str = Field(description=f"table in {ARCHIVE_SCHEMA}")
    key: list[str]
    columns: list[str] = Field(description="captured columns of the table, with their types below")
    types: dict[str, str]
    rows: int = 0


class Capture(BaseModel):
    """What a migration destroyed and where its before-images are (rollback_meta.migrations.capture)."""

    statements: int
    objects: list[CapturedObject] = Field(default_factory=list)
    uncaptured: list[str] = Field(default_factory=list, description="what could not be captured, and why")

    def destroys(self) -> list[str]:
        """In words, for plans and refusals."""
        said: dict[str, list[str]] = {}
        for o in self.objects:
            if o.kind == "table":
                said.setdefault(o.table, []).append("dropped")
            elif o.kind in ("columns", "retyped"):
                verb = "dropped" if o.kind == "columns" else "changed the type of"
                said.setdefault(o.table, []).append(f"{verb} {', '.join(c for c in o.columns if c not in o.key)}")
            elif o.kind == "rows" and o.rows:
                said.setdefault(o.table, []).append(f"{o.rows} rows updated or deleted")
        return [f"{table}: {'; '.join(parts)}" for table, parts in said.items()]


class AppliedMigration(BaseModel):
    revision: str
    name: str
    xid: int
    backup_id: str | None = None
    checksum: str | None = None
    capture: Capture | None = Field(default=None, description="what it destroyed, captured when applied (None: "
                                    "applied before captures existed; its rollback restores from the backup)")


class SchemaDiff(BaseModel):
    """How the live schema differs from the shape the backup recorded (before the migration)."""

    added_tables: list[str] = Field(default_factory=list)
    dropped_tables: list[str] = Field(default_factory=list)
    added_columns: dict[str, list[str]] = Field(default_factory=dict)
    dropped_columns: dict[str, list[str]] = Field(default_factory=dict)
    retyped_columns: dict[str, list[str]] = Field(default_factory=dict, description="columns whose type changed")

    def describe(self, limit: int = 40) -> str:
        """One line for a plan or a step (at most `limit` changes named: it travels through Temporal)."""
        parts = [f"added table {t}" for t in self.added_tables]
        parts += [f"added {t}({', '.join(c)})" for t, c in self.added_columns.items()]
        parts += [f"dropped table {t}" for t in self.dropped_tables]
        parts += [f"dropped {t}({', '.join(c)})" for t, c in self.dropped_columns.items()]
        parts += [f"changed the type of {t}({', '.join(c)})" for t, c in self.retyped_columns.items()]
        more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
        return "; ".join(parts[:limit])[:4000] + more or "no table or column added or dropped"


class ArchivedObject(BaseModel):
    source: str = Field(description="schema.table the data came from")
    archive_table: str = Field(description=f"table in {ARCHIVE_SCHEMA}")
    columns: list[str]
    key: list[str]
    rows: int
    whole_table: bool


class RevertResult(BaseModel):
    revision: str
    xid: int
    migration_xid: int = Field(description="the reverted migration's transaction: rows it last wrote still carry it")
    diff: SchemaDiff
    archived: list[ArchivedObject] = Field(default_factory=list)
    repeated: bool = Field(default=False, description="True: an earlier attempt had already done it")
    capture: Capture | None = Field(default=None, description="what the migration destroyed, captured when it was "
                                    "applied: the restore's source (None: restored from the backup)")
    attempt: int = Field(default=1, description="the activity attempt that reported it")

    def step_detail(self) -> str:
        archived = ", ".join(f"{a.source} -> {ARCHIVE_SCHEMA}.{a.archive_table} ({a.rows} rows)" for a in self.archived)
        again = " (done by an earlier attempt)" if self.repeated else ""
        return f"down SQL applied{again}; archived: {archived or 'nothing'}"


class TableRestore(BaseModel):
    table: str
    mode: str = Field(description="rows (dropped table), columns (dropped columns), rewritten (rows the migration changed); "
                                  "captured: from the images the migration's capture took (every kind, three-way)")
    columns: list[str]
    backup_rows: int = 0
    restored: int = 0
    missing_in_live: int = Field(default=0, description="backup rows whose key is gone from the live table (deleted since)")
    kept_application_version: int = Field(default=0, description="rewritten rows the application changed since: left as they are")
    reinserted: int = Field(default=0, description="captured: rows the migration deleted, inserted again")
    key_reused: int = Field(default=0, description="captured: deleted rows whose key the application has used since (its row stays)")
    mismatches_after: int = Field(default=0, description="restored values that do not match the backup afterwards: must be 0")
    method: Literal["merge", "rebuild"] = Field(default="merge", description="merged in place, or the table rebuilt and swapped")
    caught_up: int = Field(default=0, description="rebuild: changes the application made during it, re-synced before the swap")
    authors: str | None = Field(default=None, description="rebuild: the table (in rollback_archive) of who last wrote each "
                                "row it re-synced from the live table, for the integrity check")
    rebuild_xids: list[int] = Field(default_factory=list, description="rebuild: the transactions that wrote the new table")
    note: str | None = Field(default=None, description="why a big table was merged in place rather than rebuilt")

    def step_detail(self) -> str:
        captured = (f"{self.reinserted} deleted rows inserted again, {self.key_reused} keys re-used by the application "
                    "(its rows kept), " if self.mode == "captured" else "")
        if self.method == "rebuild":
            method = f" (table rebuilt; {self.caught_up} changes made during the rebuild re-synced)"
        else:
            method = f" ({self.note[:200]})" if self.note else ""
        return (f"{self.table} {self.mode}: {self.restored} restored, {captured}{self.missing_in_live} deleted since, "
                f"{self.kept_application_version} kept as the application wrote them{method}")


class RestoreResult(BaseModel):
    tables: list[TableRestore] = Field(default_factory=list)
    attempt: int = Field(default=1, description="the activity attempt that reported it")

    def step_detail(self) -> str:
        return "; ".join(t.step_detail() for t in self.tables) or "nothing to restore"

    @property
    def rows_restored(self) -> int:
        return sum(t.restored for t in self.tables)


Kind = Literal["missing", "inserted", "changed", "bucket"]
Cause = Literal["concurrent_write", "rollback_write", "allowed_delete", "unexplained"]


class Difference(BaseModel):
    table: str
    kind: Kind = Field(description="bucket: a table without kept rows or primary key; only its bucket is known")
    key: dict[str, str | None] | None = None
    bucket: int
    after_xmin: int | None = Field(default=None, description="32-bit xmin of the live row; None for missing rows")
    cause: Cause
    detail: str


class TableReport(BaseModel):
    table: str
    rows_before: int
    rows_after: int
    differing_buckets: int
    keyed: bool = Field(description="differences name primary keys (kept rows and a primary key)")
    missing: int = 0
    inserted: int = 0
    changed: int = 0
    concurrent: int = 0
    rollback: int = 0
    unexplained: int = 0


class IntegrityBrief(BaseModel):
    """What a workflow keeps of a report: bounded whatever the number of tables and differences
    (the whole report stays in rollback_meta.integrity_reports under `stored_as`)."""

    ok: bool
    summary: str
    label: str
    stored_as: str
    tables_checked: int
    tables: dict[str, TableReport] = Field(description="tables with differences, unexplained first, at most 20")
    tables_with_differences: int
    differences: list[Difference] = Field(description="the first 20, unexplained first; key values cut at 200 characters")
    differences_total: int
    notes: list[str]
    seconds: float

    def step_detail(self) -> str:
        return self.summary



class RestoreInput(DbStepInput):
    revision: str
    backup_id: str
    revert: RevertResult = Field(description="the revert step's result: what changed and its transaction id")
    integrity_snapshot: str | None = Field(default=None, description="SnapshotRef.pg_snapshot: a table rebuild records "
                                           "who wrote the rows written after it")


# -- results of the other steps ---------------------------------------------------------------

class BackupSummary(BaseModel):
    """A backup in the catalog, as a step reports it."""

    id: str
    revision: str | None
    next_revision: str | None
    total_bytes: int
    files: int
    restore_point: str | None
    verified_at: datetime | None
    created_at: datetime

    def step_detail(self) -> str:
        return f"backup {self.id}: {self.files} files, {self.total_bytes} bytes, checksums verified"


class MigrationPlan(BaseModel):
    """Which migrations take the database to the requested revision, oldest first."""

    current: str | None
    pending: list[str]
    labels: list[str]


class SnapshotRef(BaseModel):
    """An integrity snapshot kept in the database (rollback_meta.integrity_snapshots): its fingerprints
    grow with the database (~90 KB per table), so only this travels through Temporal."""

    label: str = Field(description="the key it is stored under")
    pg_snapshot: str
    tables: int
    rows: int
    seconds: float

    def step_detail(self) -> str:
        return (f"{self.tables} tables, {self.rows} rows fingerprinted in one REPEATABLE READ snapshot "
                f"({self.seconds:.2f} s), kept in the database as {self.label}")


class SnapshotDiscarded(BaseModel):
    label: str = ""
    discarded: bool = False

    def step_detail(self) -> str:
        return f"integrity snapshot {self.label} " + ("discarded" if self.discarded else "was not there: nothing to discard")


class Reapplied(BaseModel):
    reapplied: bool
    why: str | None = Field(default=None, description="why nothing was done")
    archives_restored: list[str] = Field(default_factory=list)

    def step_detail(self) -> str:
        if not self.reapplied:
            return f"not re-applied: {self.why}"
        return f"re-applied; archived data put back from {', '.join(self.archives_restored) or 'nothing'}"


class Recovered(BaseModel):
    recovered_to: str
    live: str
    retired: str

    def step_detail(self) -> str:
        return f"recovered to {self.recovered_to}; previous database kept as {self.retired}"


class SwappedBack(BaseModel):
    swapped_back: bool
    why: str | None = None

    def step_detail(self) -> str:
        return "the pre-recovery database is live again" if self.swapped_back else f"nothing to swap back: {self.why}"

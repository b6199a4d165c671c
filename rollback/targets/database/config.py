"""rollback.yaml's `targets.database`: a PostgreSQL database changed by migrations run through the system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rollback.config_parts import ENV_NAME, Strict, TargetConfig


class PgBouncerSettings(BaseModel):
    """How to reach one PgBouncer's admin console, and which of its database entries to pause."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    admin_user: str = Field(min_length=1)
    # The NAME of an environment variable holding the admin password: the password itself
    # never travels through workflow inputs or configs.
    password_env: str | None = None
    database: str = Field(min_length=1)
    pause_timeout_seconds: float = Field(default=10, gt=0)


class PitrConfig(Strict):
    """Point-in-time recovery: a base backup and the WAL archive of the database's server."""

    base_backup_dir: Path = Field(description="a pg_basebackup (plain format) of the server")
    wal_archive_dir: Path = Field(description="where the server's archive_command copies WAL segments")
    pg_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    work_dir: Path | None = Field(default=None, description="scratch space for the recovered instance; default <state_dir>/pitr")
    terminate_sessions: bool = Field(default=False, description="terminate sessions on the live database to swap it; else wait for them")
    swap_timeout_seconds: float = Field(default=120, gt=0)


class DatabaseTarget(TargetConfig):
    """A PostgreSQL database whose schema is changed by migrations run through the system."""

    dsn_env: str = Field(pattern=ENV_NAME, description="NAME of the environment variable holding the DSN (never the DSN itself)")
    migrations: Path = Field(description="directory of NNNN_name.up.sql / NNNN_name.down.sql files, or an Alembic project's alembic.ini")
    backup_dir: Path | None = Field(default=None, description="default: <state_dir>/backups")
    backup_jobs: int = Field(default=2, ge=1, le=32, description="pg_dump --jobs")
    lock_timeout_ms: int = Field(default=2000, ge=10, le=60000, description="how long any DDL statement may wait for its lock")
    lock_attempts: int = Field(default=20, ge=1, le=1000, description="attempts of a DDL transaction that timed out on a lock, with jittered pauses")
    terminate_blockers: bool = Field(default=False, description="after half the attempts, terminate the sessions blocking the DDL")
    restore_chunk_rows: int = Field(default=50_000, ge=100, description="rows per merge transaction when restoring in place")
    restore_workers: int = Field(default=2, ge=1, le=16, description="connections merging restored data in parallel")
    rebuild_min_rows: int | None = Field(
        default=1_000_000, ge=1,
        description="a restore that puts back at least this many rows of a table (or, from a backup, a dropped column "
                    "of a table this big) rebuilds it (bulk copy + short swap) instead of updating every row; "
                    "null: always update in place")
    allow_concurrent_deletes: bool = Field(default=False, description="integrity check: rows deleted during the rollback are the application's, not a loss")
    pgbouncer: PgBouncerSettings | None = Field(default=None, description="PAUSE this pool around each DDL transaction")
    pitr: PitrConfig | None = None

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], *, base: Path, state_dir: Path) -> None:
        raw["migrations"] = base / raw["migrations"]
        raw["backup_dir"] = base / (raw["backup_dir"] or state_dir / "backups")
        if raw.get("pitr"):
            pitr = raw["pitr"]
            for key in ("base_backup_dir", "wal_archive_dir"):
                pitr[key] = base / pitr[key]
            pitr["work_dir"] = base / (pitr["work_dir"] or state_dir / "pitr")

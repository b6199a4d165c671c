"""The project's schema migrations, applied through the system.

Plain SQL directories: `NNNN_name.up.sql` with an optional `NNNN_name.down.sql`; the
revision is the number (`0003`). Every applied migration is recorded in
`rollback_meta.migrations` in the same transaction as its DDL, with that transaction's
id: a row whose xmin is still that id was last written by the migration itself, which
is how a rollback tells rows a migration rewrote from rows the application changed since.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import asyncpg

from rollback.targets.database.capture import CaptureError, MigrationCapture
from rollback.targets.database.migration_model import Migration, MigrationError
from rollback.targets.database.pgschema import snapshot
from rollback.targets.database.contract import AppliedMigration, Capture

FILE_NAME = re.compile(r"^(?P<revision>\d{1,12})_(?P<name>[A-Za-z0-9_-]+)\.(?P<direction>up|down)\.sql$")

TRACKING_DDL = """
CREATE SCHEMA IF NOT EXISTS rollback_meta;
CREATE TABLE IF NOT EXISTS rollback_meta.migrations (
    revision   text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    xid        bigint NOT NULL,
    backup_id  text,
    applied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE rollback_meta.migrations ADD COLUMN IF NOT EXISTS shape_after jsonb;
ALTER TABLE rollback_meta.migrations ADD COLUMN IF NOT EXISTS capture jsonb;
"""


def revision_key(revision: str) -> int:
    return int(revision)


def load_migrations(source: Path) -> list[Migration]:
    """The project's migrations in order: a directory of SQL files, or an Alembic project's alembic.ini."""
    if source.suffix == ".ini":
        from rollback.targets.database.alembic_migrations import load_alembic_migrations  # SQLAlchemy only for Alembic projects

        return load_alembic_migrations(source)
    return load_sql_migrations(source)


def load_sql_migrations(directory: Path) -> list[Migration]:
    """Every migration in the directory, in revision order; refuses gaps in pairing and duplicates."""
    if not directory.is_dir():
        raise MigrationError(f"{directory}: migrations directory not found")
    found: dict[str, dict[str, Path]] = {}
    names: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(".sql"):
            continue
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration file names must look like 0001_create_users.up.sql or .down.sql")
        revision = match["revision"]
        if names.setdefault(revision, match["name"]) != match["name"]:
            raise MigrationError(f"{directory}: revision {revision} is used by two migrations "
                                 f"({names[revision]!r} and {match['name']!r})")
        found.setdefault(revision, {})[match["direction"]] = path
    if not found:
        raise MigrationError(f"{directory}: no migrations (*.up.sql) found")
    keys = [revision_key(r) for r in found]
    if len(set(keys)) != len(keys):
        raise MigrationError(f"{directory}: two revisions have the same number")
    migrations = []
    for revision in sorted(found, key=revision_key):
        files = found[revision]
        if "up" not in files:
            raise MigrationError(f"{files['down']}: has no matching .up.sql")
        up = files["up"].read_text()
        down = files["down"].read_text() if "down" in files else None
        checksum = hashlib.sha256(up.encode() + b"\0" + (down or "").encode()).hexdigest()
        migrations.append(Migration(revision=revision, name=names[revision], up_sql=up, down_sql=down, checksum=checksum))
    return migrations


def position(migrations: list[Migration], revision: str) -> int:
    """Where a revision sits in the project's order (SQL: `3` and `0003` are the same revision)."""
    for index, migration in enumerate(migrations):
        if migration.revision == revision or (revision.isdigit() and migration.revision.isdigit()
                                              and int(migration.revision) == int(revision)):
            return index
    known = ", ".join(m.revision for m in migrations)
    raise MigrationError(f"unknown revision {revision!r} (known: {known})")


def find(migrations: list[Migration], revision: str) -> Migration:
    return migrations[position(migrations, revision)]


async def ensure_tracking(conn: asyncpg.Connection) -> None:
    await conn.execute(TRACKING_DDL)


async def applied(conn: asyncpg.Connection) -> list[AppliedMigration]:
    """Applied migrations, oldest first (empty when nothing was ever applied through the system)."""
    exists = await conn.fetchval("SELECT to_regclass('rollback_meta.migrations') IS NOT NULL")
    if not exists:
        return []
    has_capture = await conn.fetchval("SELECT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = "
                                      "'rollback_meta' AND table_name = 'migrations' AND column_name = 'capture')")
    rows = await conn.fetch("SELECT revision, name, xid, backup_id, checksum"
                            f"{', capture' if has_capture else ''} FROM rollback_meta.migrations")
    # Transaction ids grow with time: the order in which they were applied.
    return sorted((AppliedMigration(**{**dict(r), "capture": json.loads(r["capture"]) if has_capture and r["capture"] else None})
                   for r in rows), key=lambda m: m.xid)


def edited_since_applied(migrations: list[Migration], done: list[AppliedMigration]) -> list[str]:
    """Applied migrations whose files no longer match what ran (sha256 of up and down SQL), as sentences."""
    edited = []
    for record in done:
        try:
            migration = find(migrations, record.revision)
        except MigrationError:
            continue  # a file that is gone is reported where it is needed (plan, revert)
        if record.checksum and record.checksum != migration.checksum:
            edited.append(f"{migration.label} (checksum {record.checksum[:12]} when applied, {migration.checksum[:12]} now)")
    return edited


async def current_revision(conn: asyncpg.Connection) -> str | None:
    done = await applied(conn)
    return done[-1].revision if done else None


def plan_upgrade(migrations: list[Migration], current: str | None, to: str) -> list[Migration]:
    start = position(migrations, current) if current is not None else -1
    target = position(migrations, to)
    if target < start:
        raise MigrationError(f"revision {to} is older than the current {current}: going back is a rollback "
                             f"(rollback start --target database), not a migration")
    return migrations[start + 1:target + 1]


AttemptWrapper = Callable[[], AbstractAsyncContextManager[object]]


async def in_transaction_with_lock_timeout(
    conn: asyncpg.Connection, body: Callable[[asyncpg.Connection], Awaitable[object]], *,
    lock_timeout_ms: int, attempts: int, what: str,
    on_blocked: Callable[[int], Awaitable[None]] | None = None, around_attempt: AttemptWrapper | None = None,
) -> object:
    """Run `body` in one transaction whose every lock waits at most `lock_timeout_ms`.

    A DDL statement waiting for its lock makes every later query on the table queue
    behind it; a short lock_timeout bounds that queue, and a failed attempt retries
    after a jittered pause, so the application is never stuck behind us for long.
    `on_blocked(attempt)` runs between attempts (e.g. to terminate blockers when allowed);
    `around_attempt()` wraps each attempt (e.g. a PgBouncer PAUSE that must end with it).
    """
    for attempt in range(1, attempts + 1):
        try:
            async with around_attempt() if around_attempt else contextlib.nullcontext():
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                    return await body(conn)
        except asyncpg.LockNotAvailableError:
            if attempt == attempts:
                raise MigrationError(f"{what}: could not get its locks within {lock_timeout_ms} ms in {attempts} attempts "
                                     "(a long transaction holds them; see pg_stat_activity / pg_blocking_pids)") from None
            if on_blocked is not None:
                await on_blocked(attempt)
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


async def run_captured(conn: asyncpg.Connection, migration: Migration) -> tuple[int, Capture]:
    """Run the migration's up SQL in the caller's transaction, capturing what it destroys (rollback/targets/database/capture.py):
    (the transaction's id, the capture)."""
    xid = await conn.fetchval("SELECT txid_current()")
    try:
        capture = await MigrationCapture(conn, key=f"capture:{migration.revision}:{xid}").apply(migration.up_sql)
    except (CaptureError, ValueError) as err:  # ValueError: SqlSplitError, the script is not complete SQL
        raise MigrationError(f"migration {migration.label} was not applied: {err}") from None
    return xid, capture


async def record_applied(conn: asyncpg.Connection, migration: Migration, *, xid: int, backup_id: str | None,
                         capture: Capture | None) -> None:
    # The shape right after the migration: what it added is this minus the backup's shape,
    # whatever else is created in the database later.
    shape = (await snapshot(conn)).model_dump_json()
    await conn.execute("INSERT INTO rollback_meta.migrations (revision, name, checksum, xid, backup_id, shape_after, capture) "
                       "VALUES ($1, $2, $3, $4, $5, $6, $7)", migration.revision, migration.name, migration.checksum, xid,
                       backup_id, shape, capture.model_dump_json() if capture else None)


async def apply_up(conn: asyncpg.Connection, migration: Migration, *, backup_id: str | None,
                   lock_timeout_ms: int, attempts: int) -> AppliedMigration:
    """Apply one migration and record it, atomically: a failure half-way leaves nothing behind."""
    await ensure_tracking(conn)

    async def body(c: asyncpg.Connection) -> AppliedMigration:
        already = await c.fetchrow("SELECT revision, name, xid, backup_id FROM rollback_meta.migrations WHERE revision = $1",
                                   migration.revision)
        if already is not None:
            return AppliedMigration(**dict(already))  # a retried activity: applied once, reported again
        xid, capture = await run_captured(c, migration)
        await record_applied(c, migration, xid=xid, backup_id=backup_id, capture=capture)
        return AppliedMigration(revision=migration.revision, name=migration.name, xid=xid, backup_id=backup_id,
                                capture=capture)

    try:
        return await in_transaction_with_lock_timeout(conn, body, lock_timeout_ms=lock_timeout_ms, attempts=attempts,
                                                      what=f"migration {migration.label}")  # type: ignore[return-value]
    except asyncpg.PostgresError as err:
        raise MigrationError(f"migration {migration.label} failed and was rolled back, the database is unchanged: "
                             f"{type(err).__name__}: {err}".replace("\n", " ")) from None

"""Schema rollback that keeps every row written after the migration.

Undoing one migration has two halves:

1. `revert_schema`, one short transaction under `lock_timeout` (retried with jitter):
   lock the tables involved, copy the data that lives only in objects the migration
   added (its new tables and columns) into `rollback_archive`, run the migration's
   down SQL, check the result has the shape the pre-migration backup recorded, and
   record what was done. Atomic: it either all happened or none of it did.
2. `restore_data`, outside any long lock: stream the backup's copy of each table the
   migration damaged, chunk by chunk, into a temporary side table and merge it into the
   live table by primary key. Dropped tables get their rows back, dropped columns their
   values, rows the migration itself rewrote (their xmin is still the migration's
   transaction) their old values. Rows the application wrote since are never overwritten.
   Every merge statement is guarded by IS DISTINCT FROM, so a retry after a crash redoes
   nothing that was already done.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from rollback.targets.database.backups import TableCopy, open_table_copy
from rollback.targets.database.migrations import AttemptWrapper, Migration, MigrationError, in_transaction_with_lock_timeout
from rollback.targets.database.names import derived_name
from rollback.targets.database.pg import ident, qualified, written_after
from rollback.targets.database.pgschema import SchemaSnapshot, TableShape, snapshot
from rollback.targets.database.contract import ARCHIVE_SCHEMA, ArchivedObject, Capture, RestoreResult, RevertResult, SchemaDiff, TableRestore
from rollback.targets.database.table_rebuild import BackupRows, LockPolicy, RebuildRefused, rebuild_table

XID_MASK = 0xFFFFFFFF  # a row's xmin is the low 32 bits of the 64-bit txid

BOOKKEEPING_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {ARCHIVE_SCHEMA};
CREATE SCHEMA IF NOT EXISTS rollback_meta;
CREATE TABLE IF NOT EXISTS rollback_meta.reverts (
    key        text PRIMARY KEY,
    revision   text NOT NULL,
    xid        bigint NOT NULL,
    result     jsonb NOT NULL,
    done_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS rollback_meta.restore_xids (
    key  text NOT NULL,
    xid  bigint NOT NULL,
    PRIMARY KEY (key, xid)
);
CREATE TABLE IF NOT EXISTS rollback_meta.rebuilds (
    key        text NOT NULL,
    table_name text NOT NULL,
    report     jsonb NOT NULL,
    done_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, table_name)
);
"""


def diff(before: SchemaSnapshot, live: SchemaSnapshot) -> SchemaDiff:
    result = SchemaDiff(
        added_tables=sorted(set(live.tables) - set(before.tables)),
        dropped_tables=sorted(set(before.tables) - set(live.tables)),
    )
    for name in sorted(set(before.tables) & set(live.tables)):
        old = {c.name for c in before.tables[name].columns}
        new = {c.name for c in live.tables[name].columns}
        if new - old:
            result.added_columns[name] = [c.name for c in live.tables[name].columns if c.name not in old]
        if old - new:
            result.dropped_columns[name] = [c.name for c in before.tables[name].columns if c.name not in new]
        retyped = [c.name for c in before.tables[name].columns
                   if (now := live.tables[name].column(c.name)) is not None and now.type != c.type]
        if retyped:
            result.retyped_columns[name] = retyped
    return result


def _existing(changes: SchemaDiff, live: SchemaSnapshot) -> SchemaDiff:
    """Only the added objects still there to archive and drop, and the dropped ones still missing."""
    return SchemaDiff(
        added_tables=[t for t in changes.added_tables if t in live.tables],
        dropped_tables=[t for t in changes.dropped_tables if t not in live.tables],
        added_columns={t: [c for c in cols if live.tables[t].column(c) is not None]
                       for t, cols in changes.added_columns.items() if t in live.tables
                       and any(live.tables[t].column(c) is not None for c in cols)},
        dropped_columns={t: cols for t, cols in changes.dropped_columns.items()
                         if t in live.tables and all(live.tables[t].column(c) is None for c in cols)},
        retyped_columns={t: cols for t, cols in changes.retyped_columns.items() if t in live.tables},
    )


async def ensure_bookkeeping(conn: asyncpg.Connection) -> None:
    await conn.execute(BOOKKEEPING_DDL)


def _archive_name(key: str, live: TableShape, whole: bool) -> str:
    return derived_name(key, live.qualified_name, "table" if whole else "columns")


def _archived_columns(live: TableShape, columns: list[str], whole: bool) -> list[str]:
    return [c.name for c in live.columns] if whole or not live.primary_key else live.primary_key + columns


async def _archive(conn: asyncpg.Connection, key: str, live: TableShape, columns: list[str], whole: bool,
                   copied_at: str | None = None) -> ArchivedObject:
    """Copy what an added table or column holds into rollback_archive (under the revert's lock).

    With `copied_at` (the snapshot of a copy made before the lock, see `_copy_ahead`) only the
    rows written since are copied again, and rows deleted since are dropped from the copy.
    """
    name = _archive_name(key, live, whole)
    keep = _archived_columns(live, columns, whole)
    target, source = qualified(ARCHIVE_SCHEMA, name), qualified(live.schema_name, live.name)
    if copied_at is None:
        status = await conn.execute(f"CREATE TABLE {target} AS SELECT {_cols(keep)} FROM {source}")
        rows = int(status.split()[-1])
    else:
        def on(left: str, right: str) -> str:
            return " AND ".join(f"{left}.{ident(k)} = {right}.{ident(k)}" for k in live.primary_key)

        await conn.execute(f"DROP TABLE IF EXISTS pg_temp.rb_changed_since_copy; CREATE TEMP TABLE rb_changed_since_copy "
                           f"ON COMMIT DROP AS SELECT {_cols(live.primary_key, 't.')} FROM {source} t "
                           f"WHERE {written_after(copied_at)}")
        await conn.execute(f"DELETE FROM {target} a USING rb_changed_since_copy c WHERE {on('a', 'c')}")
        await conn.execute(f"INSERT INTO {target} ({_cols(keep)}) SELECT {_cols(keep, 't.')} FROM {source} t "
                           f"JOIN rb_changed_since_copy c ON {on('t', 'c')}")
        rows, live_rows = (await conn.fetchval(f"SELECT count(*) FROM {target}"),
                           await conn.fetchval(f"SELECT count(*) FROM {source}"))
        if rows != live_rows:  # keys deleted since the copy (never fewer: every live key is in it now)
            await conn.execute(f"DELETE FROM {target} a WHERE NOT EXISTS (SELECT FROM {source} c WHERE {on('a', 'c')})")
            rows = live_rows
    return ArchivedObject(source=live.qualified_name, archive_table=name, columns=keep if whole else columns,
                          key=live.primary_key, rows=rows, whole_table=whole)


async def _copy_ahead(conn: asyncpg.Connection, key: str, migration: Migration, target_shape: SchemaSnapshot) -> dict[str, str]:
    """Copy what the migration's added objects hold BEFORE the revert takes its locks, one snapshot each.

    A big added table or column then costs the application only the copy of the rows written
    since (under the lock), not the whole copy. {archive table: pg_snapshot of its copy}.
    """
    if await conn.fetchval("SELECT EXISTS (SELECT FROM rollback_meta.reverts WHERE key = $1)", key):
        return {}
    record = await conn.fetchrow("SELECT shape_after FROM rollback_meta.migrations WHERE revision = $1", migration.revision)
    if record is None or not record["shape_after"]:
        return {}
    live = await snapshot(conn)
    changes = _existing(diff(target_shape, SchemaSnapshot.model_validate_json(record["shape_after"])), live)
    objects: list[tuple[str, list[str], bool]] = [(t, [], True) for t in changes.added_tables] + [(t, c, False) for t, c in changes.added_columns.items()]
    copied: dict[str, str] = {}
    for table, columns, whole in objects:
        shape = live.tables[table]
        if not shape.primary_key:
            continue  # without a key, rows written since cannot be matched: copied under the lock
        name = qualified(ARCHIVE_SCHEMA, _archive_name(key, shape, whole))
        async with conn.transaction(isolation="repeatable_read"):
            taken = await conn.fetchval("SELECT pg_current_snapshot()::text")
            await conn.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} AS SELECT "
                               f"{_cols(_archived_columns(shape, columns, whole))} FROM {qualified(shape.schema_name, shape.name)}")
        copied[_archive_name(key, shape, whole)] = taken
    return copied


def _shape_problems(target: SchemaSnapshot, now: SchemaSnapshot, tables: set[str]) -> list[str]:
    """What the down SQL failed to bring back, among the tables this rollback is about."""
    problems = []
    for name in sorted(tables):
        want = target.tables.get(name)
        have = now.tables.get(name)
        if want is None:
            if have is not None:
                problems.append(f"table {name} still exists")
            continue
        if have is None:
            problems.append(f"table {name} is missing")
            continue
        for column in want.columns:
            got = have.column(column.name)
            if got is None:
                problems.append(f"column {name}.{column.name} is missing")
            elif got.type != column.type:
                problems.append(f"column {name}.{column.name} is {got.type}, the backup had {column.type}")
        extra = [c.name for c in have.columns if want.column(c.name) is None]
        if extra:
            problems.append(f"{name} still has column(s) {', '.join(extra)}")
    return problems


def lock_order(tables: list[str], attempt: int) -> list[str]:
    """The order to lock `tables` in on this attempt: the sorted list, rotated by the attempt.

    Holding one table's lock while waiting for the next deadlocks with an application
    transaction that holds the next and then wants the first (insert an order, then update its
    customer): our short lock_timeout ends the wait first, and the same order would deadlock
    again on every attempt. Each attempt starts from another table, so one of them locks in
    the application's order, where no such cycle can form.
    """
    if not tables:
        return []
    turn = (attempt - 1) % len(tables)
    return tables[turn:] + tables[:turn]


async def revert_schema(conn: asyncpg.Connection, *, migration: Migration, target_shape: SchemaSnapshot, key: str,
                        lock_timeout_ms: int, attempts: int, around_attempt: AttemptWrapper | None = None,
                        on_blocked: Callable[[int], Awaitable[None]] | None = None) -> RevertResult:
    """Archive what only the migration's new objects hold, run its down SQL, in one transaction."""
    if not migration.down_sql:
        raise MigrationError(f"migration {migration.label} has no .down.sql: its schema change cannot be reverted")
    await ensure_bookkeeping(conn)
    copied = await _copy_ahead(conn, key, migration, target_shape)
    attempts_made = 0

    async def body(c: asyncpg.Connection) -> RevertResult:
        nonlocal attempts_made
        attempts_made += 1
        done = await c.fetchval("SELECT result FROM rollback_meta.reverts WHERE key = $1", key)
        if done is not None:
            return RevertResult.model_validate({**json.loads(done), "repeated": True})
        record = await c.fetchrow("SELECT xid, shape_after, capture FROM rollback_meta.migrations WHERE revision = $1",
                                  migration.revision)
        if record is None:
            raise MigrationError(f"migration {migration.label} is not applied: nothing to revert")
        migration_xid = record["xid"]
        live = await snapshot(c)
        # What the migration changed: its recorded after-shape against the backup's, limited to
        # what still exists (objects created outside migrations since are not its doing).
        after_migration = SchemaSnapshot.model_validate_json(record["shape_after"]) if record["shape_after"] else live
        changes = _existing(diff(target_shape, after_migration), live)
        involved = sorted(set(changes.added_tables) | set(changes.added_columns) | set(changes.dropped_columns)
                          | set(changes.retyped_columns))
        for name in lock_order(involved, attempts_made):
            shape = live.tables[name]
            await c.execute(f"LOCK TABLE {qualified(shape.schema_name, shape.name)} IN ACCESS EXCLUSIVE MODE")
        archived = [await _archive(c, key, live.tables[t], [], True, copied.get(_archive_name(key, live.tables[t], True)))
                    for t in changes.added_tables]
        archived += [await _archive(c, key, live.tables[t], cols, False, copied.get(_archive_name(key, live.tables[t], False)))
                     for t, cols in changes.added_columns.items()]
        await c.execute(migration.down_sql)
        after = await snapshot(c)
        problems = _shape_problems(target_shape, after, set(involved) | set(changes.dropped_tables))
        if problems:
            raise MigrationError(f"the down SQL of {migration.label} does not restore the pre-migration shape "
                                 f"({'; '.join(problems[:5])}); nothing was changed")
        xid = await c.fetchval("SELECT txid_current()")
        await c.execute("DELETE FROM rollback_meta.migrations WHERE revision = $1", migration.revision)
        result = RevertResult(revision=migration.revision, xid=xid, migration_xid=migration_xid, diff=changes,
                              archived=archived, capture=Capture.model_validate_json(record["capture"]) if record["capture"] else None)
        await c.execute("INSERT INTO rollback_meta.reverts (key, revision, xid, result) VALUES ($1, $2, $3, $4)",
                        key, migration.revision, xid, result.model_dump_json())
        return result

    try:
        return await in_transaction_with_lock_timeout(conn, body, lock_timeout_ms=lock_timeout_ms, attempts=attempts,
                                                      what=f"revert of {migration.label}", on_blocked=on_blocked,
                                                      around_attempt=around_attempt)  # type: ignore[return-value]
    except asyncpg.PostgresError as err:
        await _drop_copies(conn, copied)
        raise MigrationError(f"the down SQL of {migration.label} failed and was rolled back, nothing changed: "
                             f"{type(err).__name__}: {err}".replace("\n", " ")) from None
    except MigrationError:
        await _drop_copies(conn, copied)
        raise


async def _drop_copies(conn: asyncpg.Connection, copied: dict[str, str]) -> None:
    """A revert that did not happen leaves no archive copies behind."""
    for name in copied:
        await conn.execute(f"DROP TABLE IF EXISTS {qualified(ARCHIVE_SCHEMA, name)}")


# -- restoring destroyed data from the backup -------------------------------------------

def _cols(names: list[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{ident(n)}" for n in names)


def restorable_condition(columns: list[str], defaults: dict[str, str] | None, revert_xid: int) -> str:
    """SQL over the live row `t`: may its restored columns take the backup's values?

    Yes for rows not written since the revert committed (age() compares transaction ids
    wraparound-safely), and for rows written since whose restored columns still hold what
    the down SQL left there (NULL, or the column's constant default): the application
    updated other columns of the row. A value the restored release wrote into a re-added
    column since the revert is the application's, and stays.
    """
    untouched = " AND ".join(
        f"(t.{ident(c)} IS NULL" + (f" OR t.{ident(c)} IS NOT DISTINCT FROM ({defaults[c]})" if defaults and c in defaults else "") + ")"
        for c in columns)
    return f"(age(t.xmin) >= age('{revert_xid & XID_MASK}'::xid) OR ({untouched}))"


class _Merge:
    """Merge statements for one table; `s` is the chunk's temporary side table."""

    def __init__(self, live: TableShape, mode: str, columns: list[str], system_xids: list[int], revert_xid: int,
                 defaults: dict[str, str] | None = None, *, saved: list[str]) -> None:
        # Only the columns the backup saved: a STORED generated column is not in the dump (nor
        # writable); the database computes it again from the restored values.
        self.live, self.mode, self.saved = live, mode, saved
        self.columns = [c for c in columns if c in saved]
        self.restorable = restorable_condition(columns, defaults, revert_xid)
        self.target = qualified(live.schema_name, live.name)
        self.key = live.primary_key
        self.join = " AND ".join(f"t.{ident(k)} = s.{ident(k)}" for k in self.key)
        self.xids = [x & XID_MASK for x in system_xids]

    def key_range(self) -> str:
        """For a one-column key, the chunk's key range: the planner then reads only that slice of
        the live table's index instead of scanning the whole table once per chunk."""
        if len(self.key) != 1:
            return ""
        k = ident(self.key[0])
        return f" AND t.{k} BETWEEN (SELECT min({k}) FROM rb_side) AND (SELECT max({k}) FROM rb_side)"

    def statements(self) -> list[tuple[str, list[object]]]:
        tuple_t, tuple_s = f"({_cols(self.columns, 't.')})", f"({_cols(self.columns, 's.')})"
        if self.mode == "rows":
            all_cols = [c.name for c in self.live.columns if c.name in self.saved]
            conflict = f"ON CONFLICT ({_cols(self.key)}) DO NOTHING" if self.key else ""
            return [(f"INSERT INTO {self.target} ({_cols(all_cols)}) SELECT {_cols(all_cols)} FROM rb_side {conflict}", [])]
        sets = ", ".join(f"{ident(c)} = s.{ident(c)}" for c in self.columns)
        guard = f"{tuple_t} IS DISTINCT FROM {tuple_s}"
        where = f"{self.join}{self.key_range()} AND {guard}"
        if self.mode == "columns":
            return [(f"UPDATE {self.target} t SET {sets} FROM rb_side s WHERE {where} AND {self.restorable}", [])]
        # rewritten: only rows whose last writer is still the migration (or our revert).
        return [(f"UPDATE {self.target} t SET {sets} FROM rb_side s WHERE {where} "
                 f"AND t.xmin::text::bigint = ANY($1::bigint[])", [self.xids])]

    def check(self) -> str:
        """After the merge, one pass over the chunk: backup rows whose key is gone from the live table
        (deleted since), and rows whose restored values still differ from the backup."""
        tuple_t, tuple_s = f"({_cols(self.columns, 't.')})", f"({_cols(self.columns, 's.')})"
        present = f"t.{ident(self.key[0])} IS NOT NULL"
        differs = f"{present} AND {tuple_t} IS DISTINCT FROM {tuple_s}"
        if self.mode == "columns":
            # Differences in rows written before the revert are a failed restore; after it, the application's.
            failed, kept = f"{differs} AND {self.restorable}", f"{differs} AND NOT {self.restorable}"
        else:  # rewritten: whatever still differs was changed by the application since the migration
            failed, kept = "FALSE", differs
        return (f"SELECT count(*) FILTER (WHERE NOT {present}) AS missing, count(*) FILTER (WHERE {failed}) AS failed, "
                f"count(*) FILTER (WHERE {kept}) AS kept FROM rb_side s LEFT JOIN {self.target} t ON {self.join}{self.key_range()}")


async def _affected_tables(conn: asyncpg.Connection, target_shape: SchemaSnapshot, changes: SchemaDiff,
                           system_xids: list[int]) -> list[tuple[TableShape, str, list[str]]]:
    """(backup shape, mode, columns) of each table whose data the migration destroyed."""
    work: list[tuple[TableShape, str, list[str]]] = []
    for name in changes.dropped_tables:
        shape = target_shape.tables[name]
        work.append((shape, "rows", [c.name for c in shape.columns]))
    xids = [x & XID_MASK for x in system_xids]
    for name, shape in target_shape.tables.items():
        if name in changes.dropped_tables or not shape.primary_key:
            continue
        touched = await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {qualified(shape.schema_name, shape.name)} "
                                      f"WHERE xmin::text::bigint = ANY($1::bigint[]))", xids)
        if touched:
            dropped = set(changes.dropped_columns.get(name, []))
            rest = [c.name for c in shape.columns if c.name not in shape.primary_key and c.name not in dropped]
            if rest:
                work.append((shape, "rewritten", rest))
    # After the rewritten rows: restoring a column rewrites every row, and would hide
    # which rows the migration itself had last written.
    for name, columns in changes.dropped_columns.items():
        work.append((target_shape.tables[name], "columns", columns))
    return work


@dataclass(frozen=True)
class RebuildOptions:
    """When a `columns` restore rebuilds the table instead of updating every row (see table_rebuild)."""

    backup_snapshot: str  # the backup's pg_current_snapshot(): which live rows are still the backup's
    min_rows: int  # smaller tables are merged in place
    locks: LockPolicy


async def restore_data(dsn: str, *, backup_path: Path, target_shape: SchemaSnapshot, changes: SchemaDiff,
                       system_xids: list[int], revert_xid: int, key: str, rows_per_chunk: int = 50_000, workers: int = 2,
                       rebuild: RebuildOptions | None = None, timeout: float = 3600,
                       progress: Callable[[str], None] | None = None) -> RestoreResult:
    """Merge what the migration destroyed back from the backup, table by table, chunk by chunk."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await ensure_bookkeeping(conn)
        work = await _affected_tables(conn, target_shape, changes, system_xids)
        live = await snapshot(conn)
        # to_regclass parses its text as SQL: an unquoted "Events" would fold to events and find nothing.
        partitioned = sorted({s.qualified_name for s, _, _ in work if await conn.fetchval(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)", qualified(s.schema_name, s.name))})
    finally:
        await conn.close()
    if partitioned:
        raise MigrationError(f"{', '.join(partitioned)}: partitioned tables are not supported by the schema rollback "
                             "(pg_dump keeps their rows under each partition); use point-in-time recovery")
    result = RestoreResult()
    for shape, mode, columns in work:
        if not shape.primary_key:
            # Without a key, a retried merge could insert rows twice or update the wrong ones.
            raise MigrationError(f"{shape.qualified_name} has no primary key: what the migration destroyed in it "
                                 "cannot be merged back safely; restore it by hand from the backup or use point-in-time recovery")
        live_shape = live.tables.get(shape.qualified_name)
        if live_shape is None:
            raise MigrationError(f"{shape.qualified_name} does not exist after the revert: cannot restore its rows")
        report = TableRestore(table=shape.qualified_name, mode=mode, columns=columns)
        defaults = await constant_defaults(dsn, live_shape, columns) if mode == "columns" else {}
        if mode == "columns" and rebuild is not None and await _rebuilt(
                dsn, backup_path, shape, live_shape, columns, restorable_condition(columns, defaults, revert_xid), report,
                key=key, rebuild=rebuild, timeout=timeout, progress=progress):
            result.tables.append(report)
            continue
        async with asyncio.timeout(timeout), open_table_copy(backup_path, shape) as copy:
            merge = _Merge(live_shape, mode, columns, system_xids, revert_xid, defaults, saved=copy.columns)
            report.columns = merge.columns
            if mode == "rows" or merge.columns:
                await _merge_table(dsn, copy, shape, merge, report, key=key, rows_per_chunk=rows_per_chunk,
                                   workers=workers, progress=progress)
            else:
                report.note = "only generated columns: the database computed them again"
        result.tables.append(report)
    return result


async def _rebuilt(dsn: str, backup_path: Path, shape: TableShape, live: TableShape, columns: list[str], restorable: str,
                   report: TableRestore, *, key: str, rebuild: RebuildOptions, timeout: float,
                   progress: Callable[[str], None] | None) -> bool:
    """Restore the columns by rebuilding the table if it is big and nothing in it forbids that; False: merge instead."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetchval("SELECT reltuples::int8 FROM pg_class WHERE oid = to_regclass($1)",
                                   qualified(live.schema_name, live.name))
        if rows is None or rows < 0:  # never analyzed
            rows = await conn.fetchval(f"SELECT count(*) FROM {qualified(live.schema_name, live.name)}")
    finally:
        await conn.close()
    if rows < rebuild.min_rows:
        return False
    if set(columns) & set(live.primary_key):
        report.note = "a restored column is part of the primary key: merged in place"
        return False
    try:
        async with asyncio.timeout(timeout), open_table_copy(backup_path, shape) as copy:
            counts = await rebuild_table(
                dsn, source=BackupRows(copy=copy, backup_snapshot=rebuild.backup_snapshot, columns=columns,
                                       restorable=restorable),
                live=live, key=key, locks=rebuild.locks, progress=progress)
    except RebuildRefused as err:
        report.note = f"{err}: merged in place"
        return False
    report.method = "rebuild"
    for name, value in counts.items():
        setattr(report, name, value)
    return True


async def constant_defaults(dsn: str, table: TableShape, columns: list[str]) -> dict[str, str]:
    """The re-added columns' defaults that are constants (what the down SQL's ADD COLUMN filled in)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            """SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) AS expression, d.adbin::text AS tree
               FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
               WHERE d.adrelid = to_regclass($1) AND a.attname = ANY($2::text[])""",
            qualified(table.schema_name, table.name), columns)
    finally:
        await conn.close()
    return {r["attname"]: r["expression"] for r in rows if _is_constant(r["tree"])}


def _is_constant(tree: str) -> bool:
    """A default's parse tree that is a constant, or one cast of a constant (`''::character(84)`)."""
    if tree.startswith(("{CONST", "{RELABELTYPE")):
        return True
    return (tree.startswith("{FUNCEXPR") and tree.count("{FUNCEXPR") == 1
            and (":funcformat 1" in tree or ":funcformat 2" in tree) and "{CONST" in tree)


async def _merge_table(dsn: str, copy: TableCopy, shape: TableShape, merge: _Merge, report: TableRestore, *,
                       key: str, rows_per_chunk: int, workers: int, progress: Callable[[str], None] | None) -> None:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=workers * 2)
    side_columns = ", ".join(f"{ident(c.name)} {c.type}" for c in shape.columns)

    async def merge_chunks() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            # Each chunk commits on its own: row locks last one chunk, never the whole table.
            await conn.execute("SET synchronous_commit = off; SET work_mem = '64MB'")
            await conn.execute(f"CREATE TEMP TABLE rb_side ({side_columns}) ON COMMIT DELETE ROWS")
            while (chunk := await queue.get()) is not None:
                async with conn.transaction():
                    await conn.copy_to_table("rb_side", source=_one(chunk), columns=copy.columns,
                                             encoding=copy.encoding)
                    if not merge.key_range():
                        await conn.execute("ANALYZE rb_side")  # no key range to steer the plan: statistics must
                    for sql, args in merge.statements():
                        status = await conn.execute(sql, *args)
                        report.restored += int(status.split()[-1])
                    if merge.mode != "rows":
                        missing, failed, kept = await conn.fetchrow(merge.check())
                        report.missing_in_live += missing
                        report.mismatches_after += failed
                        report.kept_application_version += kept
                    report.backup_rows += chunk.count(b"\n")
                    await conn.execute("INSERT INTO rollback_meta.restore_xids (key, xid) VALUES ($1, txid_current()) "
                                       "ON CONFLICT DO NOTHING", key)
                if progress:
                    progress(f"{shape.qualified_name}: {report.backup_rows} backup rows merged")
        finally:
            await conn.close()

    async def read() -> None:
        try:
            async for chunk in copy.chunks(rows_per_chunk):
                await queue.put(chunk)
        finally:
            for _ in range(workers):
                await queue.put(None)

    tasks = [asyncio.create_task(read())] + [asyncio.create_task(merge_chunks()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk


async def restore_xids(conn: asyncpg.Connection, key: str) -> list[int]:
    """Every transaction id the restore of `key` committed (kept in the database, so a retry after a crash sees them too)."""
    rows = await conn.fetch("SELECT xid FROM rollback_meta.restore_xids WHERE key = $1", key)
    return [r["xid"] for r in rows]

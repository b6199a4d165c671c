"""Capture at the moment of destruction: what a migration destroys, recorded in its own transaction.

`rollback db migrate` applies a migration statement by statement (rollback/targets/database/sql_statements.py),
inside the one transaction that also records it. Before a statement destroys anything, the
before-image of what it destroys is copied into `rollback_archive`:

- rows it updates or deletes (or truncates): statement-level triggers with transition tables
  copy the old rows (`rows` captures, one archive table per table and shape) and, of an update,
  the new ones (`new`);
- tables it drops: the whole table (`table`);
- columns it drops (`columns`) or whose type it changes (`retyped`, and `retyped_after` right
  after the statement): the key and those columns.

Only what existed when the migration started is captured: a table or column the migration
created itself holds nothing to give back.

Nothing written between a backup's snapshot and the migration's commit can be lost: the images
are taken under the migration's own locks. The images of what the migration wrote (`new`,
`retyped_after`) let a rollback tell, column by column, a value the migration wrote from one the
application wrote since.

Which statement destroys what is predicted where it is cheap (EXPLAIN names the tables a DML
statement modifies, FK cascades add the ones it reaches) and always checked afterwards: each
statement runs in a savepoint, and the schema, the table files and the transaction's own row
counters are compared before and after it. Anything destroyed that was not captured rolls the
statement back to its savepoint; the capture is set up and the statement runs again. A statement
therefore never runs twice unless it destroyed something unforeseen (DDL, a function, a trigger).

The capture triggers exist only inside the migration's transaction (they are dropped before it
commits), so the application never runs them. Creating them locks the table against writes
(SHARE ROW EXCLUSIVE) until the migration commits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from rollback.targets.database.names import derived_name
from rollback.targets.database.contract import ARCHIVE_SCHEMA, Capture, CapturedObject
from rollback.targets.database.pg import ident, qualified
from rollback.targets.database.sql_statements import first_keyword, split_statements

CAPTURE_FUNCTIONS = f"""
CREATE SCHEMA IF NOT EXISTS rollback_meta;
CREATE SCHEMA IF NOT EXISTS {ARCHIVE_SCHEMA};
CREATE OR REPLACE FUNCTION rollback_meta.capture_old_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- TG_ARGV[0]: the archive of old rows (quoted, schema-qualified); rb_old: the statement's old rows.
  EXECUTE format('INSERT INTO %s SELECT o.*, %s, %L FROM rb_old o', TG_ARGV[0],
                 current_setting('rollback.capture_statement')::int, lower(left(TG_OP, 1)));
  RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION rollback_meta.capture_updated_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- TG_ARGV[0], TG_ARGV[1]: the archives of old and new rows; rb_old, rb_new: the statement's.
  EXECUTE format('INSERT INTO %s SELECT o.*, %s, %L FROM rb_old o', TG_ARGV[0],
                 current_setting('rollback.capture_statement')::int, 'u');
  EXECUTE format('INSERT INTO %s SELECT n.*, %s, %L FROM rb_new n', TG_ARGV[1],
                 current_setting('rollback.capture_statement')::int, 'n');
  RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION rollback_meta.capture_truncated_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('INSERT INTO %s SELECT t.*, %s, %L FROM ONLY %s t', TG_ARGV[0],
                 current_setting('rollback.capture_statement')::int, 't', TG_RELID::regclass);
  RETURN NULL;
END $$;
"""
# How many times a statement may run again after destroying something unforeseen.
RERUNS = 3


# --------------------------------------------------------------------------- observing a statement

@dataclass(frozen=True)
class _Table:
    oid: int
    name: str  # schema.table
    filenode: int
    changed_rows: int  # updated + deleted by this transaction so far
    columns: dict[int, tuple[str, str]]  # attnum -> (name, type)
    key: tuple[str, ...]
    partitioned: bool  # a partitioned table or a partition: their rows are not captured


_OBSERVE = """
SELECT c.oid, n.nspname || '.' || c.relname AS name, pg_relation_filenode(c.oid) AS filenode,
       coalesce(s.n_tup_upd + s.n_tup_del, 0) AS changed_rows,
       (SELECT jsonb_object_agg(a.attnum, jsonb_build_array(a.attname, format_type(a.atttypid, a.atttypmod)))
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       ARRAY(SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.ord) AS key,
       c.relkind = 'p' OR c.relispartition AS partitioned
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_xact_user_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'rollback_meta', 'rollback_archive')
  AND c.relname <> 'alembic_version' -- Alembic's bookkeeping: the down SQL sets it back itself
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
"""


async def _observe(conn: asyncpg.Connection) -> dict[int, _Table]:
    tables = {}
    for r in await conn.fetch(_OBSERVE):
        columns = {int(k): (v[0], v[1]) for k, v in json.loads(r["columns"] or "{}").items()}
        tables[r["oid"]] = _Table(oid=r["oid"], name=r["name"], filenode=r["filenode"] or 0,
                                  changed_rows=r["changed_rows"], columns=columns, key=tuple(r["key"]),
                                  partitioned=r["partitioned"])
    return tables


@dataclass
class _Destroyed:
    """What one statement destroyed, compared with the capture in place for it."""

    dropped_tables: list[_Table] = field(default_factory=list)
    dropped_columns: dict[int, list[str]] = field(default_factory=dict)  # oid -> column names
    retyped_columns: dict[int, list[str]] = field(default_factory=dict)
    rows: list[_Table] = field(default_factory=list)  # tables whose rows it updated, deleted or truncated

    def __bool__(self) -> bool:
        return bool(self.dropped_tables or self.dropped_columns or self.retyped_columns or self.rows)


# --------------------------------------------------------------------------- the capture of one migration

class MigrationCapture:
    """Applies one migration's statements inside the caller's transaction, capturing as it goes."""

    def __init__(self, conn: asyncpg.Connection, key: str) -> None:
        self.conn = conn
        self.key = key  # unique per applied migration: names the archive tables
        self.capture = Capture(statements=0)
        self._rows_archive: dict[int, CapturedObject] = {}  # oid -> current `rows` archive (its shape)
        self._triggers: dict[int, str] = {}  # oid -> capture trigger name prefix
        self._initial: dict[int, _Table] = {}  # the tables when the migration started
        self._statement = 0
        self._copied: set[tuple[int, str]] = set()  # (oid, column or '') copied for the current statement
        self._refused: set[str] = set()  # tables named in capture.uncaptured

    async def apply(self, sql: str) -> Capture:
        await self.conn.execute(CAPTURE_FUNCTIONS)
        statements = _without_transaction_control(split_statements(sql))
        self._initial = await _observe(self.conn)
        self.capture.statements = len(statements)
        for number, statement in enumerate(statements, 1):
            self._statement = number
            await self.conn.execute(f"SET LOCAL rollback.capture_statement = {number}")
            await self._run(statement)
        await self._finish()
        return self.capture

    # -- one statement ------------------------------------------------------------

    async def _run(self, statement: str) -> None:
        self._copied = set()
        await self._predict(statement)
        for _ in range(RERUNS + 1):
            before = await _observe(self.conn)
            await self.conn.execute("SAVEPOINT rb_capture")
            await self.conn.execute(statement)
            after = await _observe(self.conn)
            destroyed = await self._uncaptured(before, after)
            if not destroyed:
                await self.conn.execute("RELEASE SAVEPOINT rb_capture")
                await self._copy_retyped_after(before, after)
                await self._follow_shapes(before, after)
                return
            # It destroyed something before we could copy it: undo the statement, capture, run it again.
            await self.conn.execute("ROLLBACK TO SAVEPOINT rb_capture")
            await self.conn.execute("RELEASE SAVEPOINT rb_capture")
            await self._capture(destroyed, before)
        raise CaptureError(f"statement {self._statement} kept destroying data it was not captured for after "
                           f"{RERUNS} attempts: {statement[:200]}")

    async def _predict(self, statement: str) -> None:
        """Capture triggers on the tables a DML statement will change, so it need not run twice."""
        if first_keyword(statement) not in ("UPDATE", "DELETE", "INSERT", "MERGE", "WITH"):
            return
        try:
            await self.conn.execute("SAVEPOINT rb_explain")
            plan = await self.conn.fetchval(f"EXPLAIN (VERBOSE, FORMAT JSON) {statement}")
            await self.conn.execute("RELEASE SAVEPOINT rb_explain")
        except asyncpg.PostgresError:
            await self.conn.execute("ROLLBACK TO SAVEPOINT rb_explain")
            await self.conn.execute("RELEASE SAVEPOINT rb_explain")
            return  # the check after the statement will catch what it changes
        targets = {(t["Schema"], t["Relation Name"]) for t in _modify_targets(json.loads(plan))
                   if t.get("Operation") != "Insert" or t.get("Conflict Resolution") == "UPDATE"}
        tables = await _observe(self.conn)
        by_name = {t.name: t for t in tables.values()}
        oids = {by_name[f"{schema}.{name}"].oid for schema, name in targets if f"{schema}.{name}" in by_name}
        for oid in await _cascades(self.conn, oids):
            if oid in self._initial and oid in tables:
                await self._capture_rows(tables[oid])

    async def _uncaptured(self, before: dict[int, _Table], after: dict[int, _Table]) -> _Destroyed:
        """What the statement just run destroyed of what existed when the migration started."""
        found = _Destroyed()
        for oid, old in before.items():
            initial = self._initial.get(oid)
            if initial is None:
                continue  # created by the migration itself
            new = after.get(oid)
            if new is None:
                if (oid, "") not in self._copied:
                    found.dropped_tables.append(old)
                continue
            original = [n for n in old.columns if n in initial.columns and initial.columns[n][1] == old.columns[n][1]
                        and (oid, old.columns[n][0]) not in self._copied]
            dropped = [old.columns[n][0] for n in original if n not in new.columns]
            retyped = [old.columns[n][0] for n in original if n in new.columns and new.columns[n][1] != old.columns[n][1]]
            if dropped:
                found.dropped_columns[oid] = dropped
            if retyped:
                found.retyped_columns[oid] = retyped
            if oid in self._rows_archive:
                continue  # its updates, deletes and truncations are captured as they happen
            if new.changed_rows > old.changed_rows or (new.filenode != old.filenode and not dropped and not retyped
                                                       and await _emptied(self.conn, new)):
                found.rows.append(old)
        return found

    async def _capture(self, destroyed: _Destroyed, tables: dict[int, _Table]) -> None:
        partitioned = {t.name for t in [*destroyed.rows, *destroyed.dropped_tables] if t.partitioned}
        partitioned |= {tables[oid].name for oid in [*destroyed.dropped_columns, *destroyed.retyped_columns]
                        if tables[oid].partitioned}
        for name in sorted(partitioned - self._refused):
            self._refused.add(name)
            self.capture.uncaptured.append(f"{name}: partitioned tables and partitions are not captured")
        for table in destroyed.rows:
            await self._capture_rows(table)
        for table in destroyed.dropped_tables:
            await self._lock(table)
            await self._copy(table, "table", list(dict(table.columns.values())))
            self._copied.add((table.oid, ""))
        for kind, by_table in (("columns", destroyed.dropped_columns), ("retyped", destroyed.retyped_columns)):
            for oid, columns in by_table.items():
                table = tables[oid]
                if not table.key:
                    self.capture.uncaptured.append(f"{table.name}: columns {', '.join(columns)} have no primary key to "
                                                   "restore them by")
                    continue
                await self._lock(table)
                await self._copy(table, kind, [*table.key, *[c for c in columns if c not in table.key]])  # type: ignore[arg-type]
                self._copied |= {(oid, c) for c in columns}

    async def _copy_retyped_after(self, before: dict[int, _Table], after: dict[int, _Table]) -> None:
        """What the statement made of the columns whose type it changed: the rollback compares the live value with it."""
        for captured in [o for o in self.capture.objects if o.kind == "retyped" and o.statement == self._statement]:
            oid = next(o for o, t in before.items() if t.name == captured.table)
            table = after[oid]
            attnums = [n for n, (name, _) in before[oid].columns.items() if name in captured.columns]
            columns = [table.columns[n][0] for n in attnums if n in table.columns]
            if set(table.key) <= set(columns):  # the key itself renamed away: nothing to match by (said by the restore)
                await self._copy(table, "retyped_after", columns)

    async def _follow_shapes(self, before: dict[int, _Table], after: dict[int, _Table]) -> None:
        """A captured table whose columns changed needs an archive of its new shape for later statements."""
        for oid in list(self._rows_archive):
            new = after.get(oid)
            if new is None or new.columns != before[oid].columns:
                await self._drop_triggers(oid)
                del self._rows_archive[oid]
                if new is not None:
                    await self._capture_rows(new)

    # -- captures --------------------------------------------------------------------

    async def _capture_rows(self, table: _Table) -> None:
        """Old rows of every update, delete and truncate of `table`, by triggers, from now on."""
        if table.oid in self._rows_archive:
            return
        if not table.key and table.name not in self._refused:
            self._refused.add(table.name)
            self.capture.uncaptured.append(f"{table.name}: rows changed by the migration have no primary key to "
                                           "restore them by")
        columns = [name for name, _ in table.columns.values()]
        source = _quoted(table.name)
        archives = {}
        for kind in ("rows", "new"):
            archives[kind] = self._name(table, f"{kind}{self._statement}")
            await self.conn.execute(
                f"CREATE TABLE {qualified(ARCHIVE_SCHEMA, archives[kind])} AS SELECT * FROM ONLY {source} WITH NO DATA; "
                f"ALTER TABLE {qualified(ARCHIVE_SCHEMA, archives[kind])} ADD COLUMN _rb_statement int, ADD COLUMN _rb_op text")
        archive = archives["rows"]
        target = qualified(ARCHIVE_SCHEMA, archive).replace("'", "''")
        new_rows = qualified(ARCHIVE_SCHEMA, archives["new"]).replace("'", "''")
        trigger = self._triggers[table.oid] = derived_name(self.key, table.name, f"capture{self._statement}")
        await self.conn.execute(
            f"CREATE TRIGGER {ident(trigger + '_u')} AFTER UPDATE ON {source} REFERENCING OLD TABLE AS rb_old "
            f"NEW TABLE AS rb_new FOR EACH STATEMENT EXECUTE FUNCTION rollback_meta.capture_updated_rows('{target}', "
            f"'{new_rows}'); "
            f"CREATE TRIGGER {ident(trigger + '_d')} AFTER DELETE ON {source} REFERENCING OLD TABLE AS rb_old "
            f"FOR EACH STATEMENT EXECUTE FUNCTION rollback_meta.capture_old_rows('{target}'); "
            f"CREATE TRIGGER {ident(trigger + '_t')} BEFORE TRUNCATE ON {source} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION rollback_meta.capture_truncated_rows('{target}')")
        for kind, name in archives.items():
            captured = CapturedObject(table=table.name, initial_table=self._initial[table.oid].name, kind=kind,  # type: ignore[arg-type]
                                      statement=self._statement, archive_table=name, key=list(table.key), columns=columns,
                                      types=dict(table.columns.values()))
            self.capture.objects.append(captured)
            if kind == "rows":
                self._rows_archive[table.oid] = captured

    async def _drop_triggers(self, oid: int) -> None:
        # By oid: the statement may have renamed the table since.
        current = await self.conn.fetchval("SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = $1", oid)
        trigger = self._triggers.pop(oid)
        if current is not None:
            for suffix in ("_u", "_d", "_t"):
                await self.conn.execute(f"DROP TRIGGER IF EXISTS {ident(trigger + suffix)} ON {current}")

    async def _lock(self, table: _Table) -> None:
        # Writes wait from here until the statement (which takes its own lock) and the commit: the copy
        # is exactly what the statement destroys. Readers go on.
        await self.conn.execute(f"LOCK TABLE ONLY {_quoted(table.name)} IN SHARE ROW EXCLUSIVE MODE")

    async def _copy(self, table: _Table, kind: Literal["table", "columns", "retyped", "retyped_after"], columns: list[str],
                    where: str = "") -> None:
        archive = self._name(table, f"{kind}{self._statement}")
        types = dict(table.columns.values())
        status = await self.conn.execute(
            f"CREATE TABLE {qualified(ARCHIVE_SCHEMA, archive)} AS SELECT {', '.join(ident(c) for c in columns)} "
            f"FROM ONLY {_quoted(table.name)} t {where}")
        self.capture.objects.append(CapturedObject(
            table=table.name, initial_table=self._initial[table.oid].name, kind=kind, statement=self._statement,
            archive_table=archive,
            key=list(table.key), columns=columns, types={c: types[c] for c in columns}, rows=int(status.split()[-1])))

    async def _finish(self) -> None:
        """Drop the triggers (the application must never run them); count what the triggers archived."""
        for oid in list(self._triggers):
            await self._drop_triggers(oid)
        for captured in self.capture.objects:
            if captured.kind in ("rows", "new"):
                captured.rows = await self.conn.fetchval(
                    f"SELECT count(*) FROM {qualified(ARCHIVE_SCHEMA, captured.archive_table)}")

    def _name(self, table: _Table, what: str) -> str:
        return derived_name(self.key, table.name, what)


class CaptureError(RuntimeError):
    """The migration could not be captured; nothing of it was applied."""


_TRANSACTION_CONTROL = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "PREPARE"}


def _without_transaction_control(statements: list[str]) -> list[str]:
    """The migration runs in the system's own transaction (with its record and capture): a BEGIN
    first and a COMMIT last around the whole script are dropped; any other transaction control
    would commit or roll back half of it, and is refused."""
    if statements and first_keyword(statements[0]) in ("BEGIN", "START") and first_keyword(statements[-1]) in ("COMMIT", "END"):
        statements = statements[1:-1]
    for number, statement in enumerate(statements, 1):
        if first_keyword(statement) in _TRANSACTION_CONTROL:
            raise CaptureError(f"statement {number} ({statement[:60]}) controls the transaction: a migration runs in the "
                               "system's own transaction; remove BEGIN, COMMIT, SAVEPOINT and the like from it")
    return statements


def _modify_targets(plan: Any) -> list[dict[str, Any]]:
    """Every ModifyTable node of an EXPLAIN (FORMAT JSON) plan (data-modifying CTEs have several)."""
    found = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("Node Type") == "ModifyTable" and "Relation Name" in node:
                found.append(node)
            stack.extend(v for v in node.values() if isinstance(v, (list, dict)))
    return found


async def _cascades(conn: asyncpg.Connection, oids: set[int]) -> set[int]:
    """These tables and every table a delete or key update reaches from them through a foreign key
    with ON DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT."""
    reached = set(oids)
    frontier = set(oids)
    while frontier:
        rows = await conn.fetch("SELECT DISTINCT conrelid FROM pg_constraint WHERE contype = 'f' AND confrelid = ANY($1::oid[]) "
                                "AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd'))", list(frontier))
        frontier = {r["conrelid"] for r in rows} - reached
        reached |= frontier
    return reached


async def _emptied(conn: asyncpg.Connection, table: _Table) -> bool:
    """After a statement that replaced the table's file: is it empty now (truncated)?"""
    return not await conn.fetchval(f"SELECT EXISTS (SELECT FROM ONLY {_quoted(table.name)})")


def _quoted(name: str) -> str:
    schema, _, table = name.partition(".")
    return qualified(schema, table)

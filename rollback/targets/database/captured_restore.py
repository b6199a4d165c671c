"""Restore what a captured migration destroyed (rollback/targets/database/capture.py), column by column, three-way.

For every table of the pre-migration shape that the capture touched, three images meet per row:

- before: the value each column had before the migration first touched the row, folded from the
  captures in statement order (the first image of a (row, column) wins);
- after: what the migration left, folded the other way (the last image wins) from the new rows
  of its updates (`new`), its type changes (`retyped_after`) and its deletes;
- live: the table now, after the revert, with whatever the application has written since.

Then, per row and column:
- a row the migration deleted (its last image is a delete, or its whole table was dropped) is
  inserted again, unless the application has used its key since: then the application's row
  stays (`key_reused`);
- a column the migration dropped gets its value back where the re-added column still holds what
  the down SQL put there (NULL or its constant default) or the row was not written since the revert;
- any other column gets its before value back where the live value is still the migration's
  (`live IS NOT DISTINCT FROM after`, cast to the column's type); a value the application wrote since
  stays (`kept_application_version`);
- a row the application deleted since the migration stays deleted (`missing_in_live`).

Chunks of keys commit one by one (row locks last one chunk) and record their transaction ids for
the integrity check. Every statement is guarded so that a retry after a crash redoes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from rollback.targets.database.capture import ARCHIVE_SCHEMA, Capture, CapturedObject
from rollback.targets.database.migrations import MigrationError
from rollback.targets.database.names import derived_name
from rollback.targets.database.pg import BULK_SESSION_SETTINGS, ident, qualified, written_after
from rollback.targets.database.pgschema import SchemaSnapshot, TableShape, snapshot
from rollback.targets.database.schema_rollback import TableRestore, constant_defaults, ensure_bookkeeping, restorable_condition, restore_xids
from rollback.targets.database.table_rebuild import (
    LockPolicy, RebuildRefused, RebuildSql, author_of_resynced_rows, rebuild_blockers, rebuild_table,
)


class _Source:
    """One image of some rows, as a subquery: the key, the columns it holds (by target column), its statement.

    A before-image holds a column only in the column's own type (an image taken after the type changed
    cannot hold the value from before); an after-image holds every column it has, cast to the column's
    type (as the down SQL casts the live value back). A `gone` source marks the rows a statement deleted.
    """

    def __init__(self, obj: CapturedObject, target: TableShape, statement: int, alias: str, *, after: bool = False,
                 gone: bool = False) -> None:
        archive = qualified(ARCHIVE_SCHEMA, obj.archive_table)
        self.statement, self.alias, self.gone = statement, alias, gone
        self.columns = [] if gone else [
            c.name for c in target.columns if c.name in obj.columns and c.name not in target.primary_key
            and (after or obj.types.get(c.name) == c.type)]
        wanted = ", ".join([*(ident(k) for k in target.primary_key), *(
            f"CAST({ident(c)} AS {target.column(c).type}) AS {ident(c)}" if after else ident(c)  # type: ignore[union-attr]
            for c in self.columns)])
        where = []
        if obj.kind in ("rows", "new"):
            where.append(f"_rb_statement = {int(statement)}")
        if gone:
            where.append("_rb_op IN ('d', 't')")
        # One image per key: a statement writes a row once, and copies hold a table's rows once (the
        # fold's primary key would refuse a second).
        self.sql = f"(SELECT {wanted} FROM {archive}{' WHERE ' + ' AND '.join(where) if where else ''})"


async def _statements(conn: asyncpg.Connection, obj: CapturedObject, ops: tuple[str, ...]) -> list[int]:
    rows = await conn.fetch(f"SELECT DISTINCT _rb_statement FROM {qualified(ARCHIVE_SCHEMA, obj.archive_table)} "
                            "WHERE _rb_op = ANY($1::text[]) ORDER BY 1", list(ops))
    return [r["_rb_statement"] for r in rows]


async def _before_sources(conn: asyncpg.Connection, captures: list[CapturedObject], target: TableShape) -> list[_Source]:
    """Every image of the table's rows from before a statement changed them, earliest statement first."""
    found: list[tuple[int, CapturedObject]] = []
    for obj in captures:
        if obj.kind == "rows":
            found += [(statement, obj) for statement in await _statements(conn, obj, ("u", "d", "t"))]
        elif obj.kind in ("table", "columns", "retyped"):
            found.append((obj.statement, obj))
    found.sort(key=lambda item: item[0])
    return [_Source(obj, target, statement, f"s{n}") for n, (statement, obj) in enumerate(found)]


async def _after_sources(conn: asyncpg.Connection, captures: list[CapturedObject], target: TableShape) -> list[_Source]:
    """Every image of what a statement left in the rows (or that it deleted them), latest statement first."""
    found: list[tuple[int, CapturedObject, bool]] = []
    for obj in captures:
        if obj.kind == "new":
            found += [(statement, obj, False) for statement in await _statements(conn, obj, ("n",))]
        elif obj.kind == "rows":
            found += [(statement, obj, True) for statement in await _statements(conn, obj, ("d", "t"))]
        elif obj.kind == "retyped_after":
            found.append((obj.statement, obj, False))
    found.sort(key=lambda item: -item[0])
    return [_Source(obj, target, statement, f"a{n}", after=True, gone=gone) for n, (statement, obj, gone) in enumerate(found)]


def _fold_sql(sources: list[_Source], target: TableShape, into: str, *, numbered: bool) -> str:
    """CREATE TABLE `into` with, per key, each column's value from the first source (in the order given) that
    has the row, a flag saying whether one had it, and whether that first source says the row was deleted."""
    keys = [ident(k) for k in target.primary_key]
    joined = sources[0].sql + f" {sources[0].alias}"
    for source in sources[1:]:
        joined += f" FULL JOIN {source.sql} {source.alias} USING ({', '.join(keys)})"

    def present(source: _Source) -> str:
        return f"{source.alias}.{keys[0]} IS NOT NULL"

    columns = []
    for column in (c.name for c in target.columns if c.name not in target.primary_key):
        holders = [s for s in sources if column in s.columns or s.gone]
        if holders:
            arms = " ".join(f"WHEN {present(s)} THEN {'NULL' if s.gone else f'{s.alias}.{ident(column)}'}" for s in holders)
            columns.append(f"CASE {arms} END AS {ident(column)}")
            columns.append(f"({' OR '.join(present(s) for s in holders)}) AS {ident('_rb_has_' + column)}")
        else:
            columns.append(f"NULL::{target.column(column).type} AS {ident(column)}")  # type: ignore[union-attr]
            columns.append(f"false AS {ident('_rb_has_' + column)}")
    gone = " ".join(f"WHEN {present(s)} THEN {'true' if s.gone else 'false'}" for s in sources)
    # _rb_n numbers the keys when the restore walks them in chunks (a rebuild reads them all at once).
    numbers = [f"row_number() OVER (ORDER BY {', '.join(keys)}) AS _rb_n"] if numbered else ["1 AS _rb_n"]
    selected = ", ".join([*numbers, *keys, *columns, f"CASE {gone} END AS _rb_gone"])
    if len(sources) == 1 and not numbered:
        # One image and no chunks (a table rebuilt from one drop or type change): read it where it is.
        return f"CREATE VIEW {into} AS SELECT {selected} FROM {joined}"
    return (f"CREATE UNLOGGED TABLE {into} AS SELECT {selected} "
            f"FROM {joined}; ALTER TABLE {into} ADD PRIMARY KEY ({', '.join(keys)})")


class _Plan:
    """The SQL of one table's restore."""

    def __init__(self, target: TableShape, before: str, after: str | None, after_columns: set[str], dropped_table: bool,
                 dropped_columns: set[str], writable: list[str], restorable: Callable[[list[str]], str]) -> None:
        self.target, self.before, self.after, self.dropped_table = target, before, after, dropped_table
        self.key = [ident(k) for k in target.primary_key]
        self.live = qualified(target.schema_name, target.name)
        self.writable = writable  # target columns an INSERT or UPDATE may set (not generated)
        values = [c for c in writable if c not in target.primary_key]
        # Per column: when its before value goes back (over the live row t, before b, after a).
        self.conditions: dict[str, str] = {}
        for column in values:
            has = f"b.{ident('_rb_has_' + column)}"
            if column in dropped_columns and column not in after_columns:
                self.conditions[column] = f"{has} AND {restorable([column])}"
            elif self.after and column in after_columns:
                self.conditions[column] = (f"{has} AND a.{ident('_rb_has_' + column)} AND NOT a._rb_gone AND "
                                           f"t.{ident(column)} IS NOT DISTINCT FROM a.{ident(column)}")

    def on(self, left: str, right: str) -> str:
        return " AND ".join(f"{left}.{k} = {right}.{k}" for k in self.key)

    @property
    def chunk(self) -> str:
        return f"(SELECT * FROM {self.before} WHERE _rb_n BETWEEN $1 AND $2) b"

    @property
    def deleted_by_migration(self) -> str:
        """Over b: the migration deleted this row (its table, or the row itself)."""
        if self.dropped_table:
            return "true"
        if self.after is None:
            return "false"
        return f"EXISTS (SELECT FROM {self.after} x WHERE {self.on('x', 'b')} AND x._rb_gone)"

    @property
    def deleted_by_migration_joined(self) -> str:
        """The same over b joined to the after image as `a` (by b's key): no subquery per row. Inside an
        aggregate's FILTER an EXISTS cannot become a join, and 7M index probes cost ~20 s."""
        if self.dropped_table:
            return "true"
        return "false" if self.after is None else "coalesce(a._rb_gone, false)"

    @property
    def to_reinsert(self) -> str:
        """Over b: a row the migration deleted, every column of it captured, its key not in the live table."""
        complete = " AND ".join(f"b.{ident('_rb_has_' + c)}" for c in self.writable if c not in self.target.primary_key) or "true"
        return (f"{self.deleted_by_migration} AND {complete} "
                f"AND NOT EXISTS (SELECT FROM ONLY {self.live} t WHERE {self.on('t', 'b')})")

    def reinsert(self, overriding: bool) -> str:
        columns = ", ".join(ident(c) for c in self.writable)
        return (f"INSERT INTO {self.live} ({columns}){' OVERRIDING SYSTEM VALUE' if overriding else ''} "
                f"SELECT {', '.join(f'b.{ident(c)}' for c in self.writable)} FROM {self.chunk} "
                f"WHERE {self.to_reinsert} ON CONFLICT ({', '.join(self.key)}) DO NOTHING")

    def merged(self, columns: list[str]) -> str:
        """The select list of the live row `t` with every restorable column's before value put back."""
        return ", ".join(f"CASE WHEN {self.conditions[c]} THEN b.{ident(c)} ELSE t.{ident(c)} END" if c in self.conditions
                         else f"t.{ident(c)}" for c in columns)

    def images(self, row: str) -> str:
        """LEFT JOINs of the before (b) and after (a) images to the row aliased `row`."""
        after = f" LEFT JOIN {self.after} a ON {self.on('a', row)}" if self.after else ""
        return f"LEFT JOIN {self.before} b ON {self.on('b', row)}{after}"

    @property
    def restores_something(self) -> str:
        """Over t, b, a: at least one of the row's values goes back."""
        return " OR ".join(f"({cond} AND t.{ident(c)} IS DISTINCT FROM b.{ident(c)})" for c, cond in self.conditions.items()) or "false"

    def update(self) -> str | None:
        if not self.conditions:
            return None
        sets = ", ".join(f"{ident(c)} = CASE WHEN {cond} THEN b.{ident(c)} ELSE t.{ident(c)} END"
                         for c, cond in self.conditions.items())
        after = f" LEFT JOIN {self.after} a ON {self.on('a', 'b')}" if self.after else ""
        return (f"UPDATE {self.live} t SET {sets} FROM {self.chunk}{after} "
                f"WHERE {self.on('t', 'b')} AND ({self.restores_something})")

    def check(self, *, whole: bool = False) -> str:
        """After the chunk (or, `whole`, over every row): (rows the application deleted since, rows keeping its
        values, keys it re-used, rows with values that should be back and are not, rows with values back)."""
        after = f" LEFT JOIN {self.after} a ON {self.on('a', 'b')}" if self.after else ""
        differs = {c: f"(t.{ident(c)} IS DISTINCT FROM b.{ident(c)} AND b.{ident('_rb_has_' + c)})" for c in self.conditions}
        kept = " OR ".join(f"({d} AND NOT coalesce({self.conditions[c]}, false))" for c, d in differs.items()) or "false"
        failed = " OR ".join(f"({d} AND coalesce({self.conditions[c]}, false))" for c, d in differs.items()) or "false"
        # Back: the value is the before image's, and the migration had taken it (dropped it, or left another).
        changed = {c: ("true" if "a._rb_gone" not in cond else f"a.{ident(c)} IS DISTINCT FROM b.{ident(c)}")
                   for c, cond in self.conditions.items()}
        back = " OR ".join(f"(b.{ident('_rb_has_' + c)} AND t.{ident(c)} IS NOT DISTINCT FROM b.{ident(c)} AND {changed[c]})"
                           for c in self.conditions) or "false"
        rows = f"{self.before} b" if whole else self.chunk
        deleted = self.deleted_by_migration_joined
        return (f"SELECT count(*) FILTER (WHERE t.{self.key[0]} IS NULL AND NOT ({deleted})) AS missing, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND NOT ({deleted}) AND ({kept})) AS kept, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND ({deleted}) "
                f"AND NOT t.xmin::text::int8 = ANY($3::int8[])) AS reused, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND ({failed})) AS failed, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND ({back})) AS back "
                f"FROM {rows} LEFT JOIN {self.live} t ON {self.on('t', 'b')}{after}"
                + (" WHERE $1::int8 IS NOT NULL AND $2::int8 IS NOT NULL" if whole else ""))


@dataclass(frozen=True)
class CapturedRebuild:
    """When a table's restore rebuilds it (rollback/targets/database/table_rebuild.py) instead of updating its rows in place."""

    min_rows: int  # rows to put back; fewer are merged in place
    locks: LockPolicy
    since_snapshot: str | None  # the integrity check's before-snapshot: who wrote a row after it is recorded


@dataclass
class CapturedRows:
    """A rebuild's rows: the live table's, with the captured before-images put back (the same rules as the
    in-place merge, see _Plan), and the rows the migration deleted inserted again. Every row is written
    once, in bulk, instead of updated in place.

    Who wrote each row (the authors table the integrity check reads): the rollback, for a row inserted
    again or whose fingerprinted values were put back; the live row's writer, for a row written after
    the integrity snapshot; nobody (the row must equal the snapshot) for the rest.
    """

    plan: _Plan
    fingerprinted: list[str]
    since_snapshot: str | None
    revert_xid: int
    reinserted: int = 0
    key_reused: int = 0

    def temp_tables(self, sql: RebuildSql) -> str:
        return f"DROP TABLE IF EXISTS pg_temp.rb_batch; CREATE TEMP TABLE rb_batch ({sql.key_defs});"

    def _columns(self, sql: RebuildSql) -> list[str]:
        return [c.name for c in sql.live.columns]

    async def fill(self, conn: asyncpg.Connection, sql: RebuildSql, say: Callable[[str], None]) -> int:
        n, plan, columns = sql.names, self.plan, self._columns(sql)
        say(f"{sql.live.qualified_name}: building a restored copy from the live rows and the captured images")
        rows = int((await conn.execute(f"INSERT INTO {n.new} ({_cols(columns)}) SELECT {plan.merged(columns)} "
                                       f"FROM ONLY {n.live} t {plan.images('t')}")).split()[-1])
        ours = "txid_current() % 4294967296"
        # The rows inserted again, and (in the same pass) their author: the rollback.
        self.reinserted = int((await conn.execute(
            f"WITH reinserted AS (INSERT INTO {n.new} ({_cols(plan.writable)}) SELECT {_cols(plan.writable, 'b.')} "
            f"FROM {plan.before} b WHERE {plan.to_reinsert} RETURNING {', '.join(plan.key)}) "
            f"INSERT INTO {n.authors} SELECT {', '.join(plan.key)}, {ours} FROM reinserted")).split()[-1])
        self.key_reused = await conn.fetchval(f"SELECT count(*) FROM {plan.before} b WHERE {plan.deleted_by_migration} "
                                              f"AND EXISTS (SELECT FROM ONLY {n.live} t WHERE {plan.on('t', 'b')})")
        if fingerprinted := [c for c in self.fingerprinted if c in plan.conditions]:
            put_back = " OR ".join(f"({plan.conditions[c]} AND t.{ident(c)} IS DISTINCT FROM b.{ident(c)})" for c in fingerprinted)
            await conn.execute(f"INSERT INTO {n.authors} SELECT {', '.join(f't.{k}' for k in plan.key)}, {ours} "
                               f"FROM ONLY {n.live} t {plan.images('t')} WHERE {put_back} ON CONFLICT DO NOTHING")
        # Rows written after the integrity snapshot: the application's. (Not the revert's: a type change it
        # undid rewrote every row, which holds the migration's values, cast back, as the snapshot saw them.)
        recent = written_after(self.since_snapshot) if self.since_snapshot else "true"
        await conn.execute(f"INSERT INTO {n.authors} SELECT {', '.join(f't.{k}' for k in plan.key)}, t.xmin::text::int8 "
                           f"FROM ONLY {n.live} t WHERE {recent} AND t.xmin::text::int8 <> {int(self.revert_xid) & 0xFFFFFFFF} "
                           "ON CONFLICT DO NOTHING")
        return rows + self.reinserted

    async def after_indexes(self, conn: asyncpg.Connection, sql: RebuildSql, rows: int, say: Callable[[str], None]) -> None:
        return None

    def sync(self, sql: RebuildSql) -> list[str]:
        n, plan, columns = sql.names, self.plan, self._columns(sql)
        keys = ", ".join(f"b.{k}" for k in plan.key)
        return [
            f"DELETE FROM {n.new} n USING rb_batch k WHERE {sql.on('n', 'k')}",
            f"INSERT INTO {n.new} ({_cols(columns)}) SELECT {plan.merged(columns)} FROM rb_batch k "
            f"JOIN ONLY {n.live} t ON {sql.on('t', 'k')} {plan.images('t')}",
            f"INSERT INTO {n.new} ({_cols(plan.writable)}) SELECT {_cols(plan.writable, 'b.')} FROM rb_batch k "
            f"JOIN {plan.before} b ON {sql.on('b', 'k')} WHERE {plan.to_reinsert}",
            author_of_resynced_rows(sql),
            f"INSERT INTO {n.authors} SELECT {keys}, txid_current() % 4294967296 FROM rb_batch k JOIN {plan.before} b "
            f"ON {sql.on('b', 'k')} WHERE {plan.to_reinsert} ON CONFLICT ({sql.key_cols}) DO UPDATE SET "
            "source_xmin = excluded.source_xmin",
        ]

    async def counts(self, conn: asyncpg.Connection, sql: RebuildSql, rows: int) -> dict[str, Any]:
        """After the swap, over every captured row (the re-used keys were counted when the copy was built:
        every row of the rebuilt table now carries the rebuild's transaction id)."""
        total = await conn.fetchval(f"SELECT count(*) FROM {self.plan.before}")
        missing, kept, _, failed, restored = await conn.fetchrow(self.plan.check(whole=True), 1, total, [])
        return {"restored": restored, "reinserted": self.reinserted, "missing_in_live": missing,
                "kept_application_version": kept, "key_reused": self.key_reused, "mismatches_after": failed}


def _cols(names: list[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{ident(n)}" for n in names)


async def restore_captured(dsn: str, *, capture: Capture, target_shape: SchemaSnapshot, revert_xid: int, key: str,
                           rows_per_chunk: int = 50_000, rebuild: CapturedRebuild | None = None,
                           progress: Callable[[str], None] | None = None) -> list[TableRestore]:
    """Restore every table of `target_shape` the capture holds images of; a report per table."""
    if capture.uncaptured:  # the plan refuses these; a restore never quietly skips them
        raise MigrationError(f"the capture could not keep everything: {'; '.join(capture.uncaptured)}")
    # Custom plans: a chunk's bounds ($1, $2) must steer the plan to the index on _rb_n; a generic plan
    # (chosen after five executions) scans the whole before-image for every chunk.
    conn = await asyncpg.connect(dsn, timeout=10, server_settings={"application_name": "rollback-restore",
                                                                    "plan_cache_mode": "force_custom_plan",
                                                                    **BULK_SESSION_SETTINGS})
    try:
        await ensure_bookkeeping(conn)
        by_table: dict[str, list[CapturedObject]] = {}
        for obj in capture.objects:
            by_table.setdefault(obj.initial_table, []).append(obj)
        live = await snapshot(conn)
        reports = []
        for name, objects in by_table.items():
            target = target_shape.tables.get(name)
            if target is None:
                continue  # a table the migration created
            if not target.primary_key:
                raise MigrationError(f"{name} has no primary key: what the migration destroyed in it cannot be put back "
                                     "by key; restore it by hand from rollback_archive or use point-in-time recovery")
            if name not in live.tables:
                raise MigrationError(f"{name} does not exist after the revert: cannot restore its rows")
            reports.append(await _restore_table(conn, dsn, target, objects, revert_xid=revert_xid, key=key,
                                                rows_per_chunk=rows_per_chunk, rebuild=rebuild, progress=progress))
        return reports
    finally:
        await conn.close()


async def _restore_table(conn: asyncpg.Connection, dsn: str, target: TableShape, objects: list[CapturedObject], *,
                         revert_xid: int, key: str, rows_per_chunk: int, rebuild: CapturedRebuild | None,
                         progress: Callable[[str], None] | None) -> TableRestore:
    name = target.qualified_name
    before = qualified(ARCHIVE_SCHEMA, derived_name(key, name, "before"))
    # Rebuilt when it puts back at least min_rows rows and nothing forbids it; else merged in chunks.
    captured_rows = max((o.rows for o in objects if o.kind != "new"), default=0)
    rebuilding = (rebuild is not None and captured_rows >= rebuild.min_rows
                  and not await rebuild_blockers(conn, target, trigger=derived_name(key, name, "trigger")))
    before_sources = await _before_sources(conn, objects, target)

    async def fold(sources: list[_Source], into: str, numbered: bool) -> None:
        await _drop_folds(conn, into)  # an earlier attempt's
        sql = _fold_sql(sources, target, into, numbered=numbered)
        await conn.execute(sql + (f"; CREATE INDEX ON {into} (_rb_n)" if numbered else "")
                           + ("" if "CREATE VIEW" in sql else f"; ANALYZE {into}"))

    async def fold_before(numbered: bool) -> None:
        await fold(before_sources, before, numbered)

    await fold_before(numbered=not rebuilding)
    after_sources = await _after_sources(conn, objects, target)
    after = qualified(ARCHIVE_SCHEMA, derived_name(key, name, "after")) if after_sources else None
    if after:
        await fold(after_sources, after, numbered=False)
    flags = await conn.fetch("SELECT attname, attgenerated <> '' AS generated, attidentity = 'a' AS always "
                             "FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                             qualified(target.schema_name, target.name))
    generated = {r["attname"] for r in flags if r["generated"]}
    dropped_columns = {c for o in objects if o.kind == "columns" for c in o.columns if c not in o.key}
    defaults = await constant_defaults(dsn, target, sorted(dropped_columns)) if dropped_columns else {}
    plan = _Plan(target, before, after, {c for s in after_sources for c in s.columns},
                 dropped_table=any(o.kind == "table" for o in objects),
                 dropped_columns=dropped_columns, writable=[c.name for c in target.columns if c.name not in generated],
                 restorable=lambda columns: restorable_condition(columns, defaults, revert_xid))
    report = TableRestore(table=name, mode="captured", columns=sorted(plan.conditions), method="merge")
    total = await conn.fetchval(f"SELECT count(*) FROM {before}")
    report.backup_rows = total
    if rebuilding:
        assert rebuild is not None
        # The columns the integrity snapshot fingerprints: the ones with the same type before and after the migration.
        fingerprinted = [c for c in plan.conditions if c not in dropped_columns
                         and not any(o.kind == "retyped" and c in o.columns for o in objects)]
        source = CapturedRows(plan, fingerprinted=fingerprinted, since_snapshot=rebuild.since_snapshot, revert_xid=revert_xid)
        try:
            counts = await rebuild_table(dsn, source=source, live=target, key=key, locks=rebuild.locks, progress=progress)
        except RebuildRefused as err:  # abandoned before its swap, nothing changed: merge in chunks instead
            report.note = f"{err}: merged in place"
            await fold_before(numbered=True)
        else:
            report.method = "rebuild"
            for field_name, value in counts.items():
                setattr(report, field_name, value)
            await _drop_folds(conn, before, after)
            return report
    reinsert, update, check = plan.reinsert(any(r["always"] for r in flags)), plan.update(), plan.check()
    for low in range(1, total + 1, rows_per_chunk):
        high = low + rows_per_chunk - 1
        async with conn.transaction():
            inserted = await conn.execute(reinsert, low, high)
            report.reinserted += int(inserted.split()[-1])
            if update:
                await conn.execute(update, low, high)
            await conn.execute("INSERT INTO rollback_meta.restore_xids (key, xid) VALUES ($1, txid_current()) "
                               "ON CONFLICT DO NOTHING", key)
            ours = [x & 0xFFFFFFFF for x in await restore_xids(conn, key)]
            missing, kept, reused, failed, back = await conn.fetchrow(check, low, high, ours)
        report.restored += back
        report.missing_in_live += missing
        report.kept_application_version += kept
        report.key_reused += reused
        report.mismatches_after += failed
        if progress:
            progress(f"{name}: {min(high, total)} of {total} captured rows restored")
    await _drop_folds(conn, before, after)
    return report


async def _drop_folds(conn: asyncpg.Connection, *folds: str | None) -> None:
    for fold in filter(None, folds):
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", fold)
        if kind is not None:
            await conn.execute(f"DROP {'VIEW' if kind == 'v' else 'TABLE'} {fold}")

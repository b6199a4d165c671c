"""Restore what a captured migration destroyed (rollback/capture.py), column by column, three-way.

For every table of the pre-migration shape that the capture touched, three images meet per row:

- before: the value each column had before the migration first touched the row, folded from the
  captures in statement order (the first image of a (row, column) wins);
- after: what the migration left (the `after` capture), for tables whose rows or column types it changed;
- live: the table now, after the revert, with whatever the application has written since.

Then, per row and column:
- a row the migration deleted (in `before`, not in `after`, or its whole table dropped) is inserted
  again, unless the application has used its key since: then the application's row stays
  (`key_reused`);
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

import asyncpg

from rollback.capture import ARCHIVE_SCHEMA, Capture, CapturedObject
from rollback.migrations import MigrationError
from rollback.names import derived_name
from rollback.pg import ident, qualified
from rollback.pgschema import SchemaSnapshot, TableShape, snapshot
from rollback.schema_rollback import TableRestore, constant_defaults, ensure_bookkeeping, restorable_condition, restore_xids


class _Source:
    """One image of some rows, as a subquery: the key, the columns it holds (by target column), its statement."""

    def __init__(self, obj: CapturedObject, target: TableShape, statement: int, alias: str) -> None:
        archive = qualified(ARCHIVE_SCHEMA, obj.archive_table)
        self.statement = statement
        self.alias = alias
        self.columns = [c.name for c in target.columns
                        if c.name in obj.columns and obj.types.get(c.name) == c.type and c.name not in target.primary_key]
        keys = ", ".join(ident(k) for k in target.primary_key)
        wanted = ", ".join([*(ident(k) for k in target.primary_key), *(ident(c) for c in self.columns)])
        where = f" WHERE _rb_statement = {int(statement)}" if obj.kind == "rows" else ""
        self.sql = f"(SELECT DISTINCT ON ({keys}) {wanted} FROM {archive}{where} ORDER BY {keys})"


async def _sources(conn: asyncpg.Connection, captures: list[CapturedObject], target: TableShape) -> list[_Source]:
    """Every image of the table's rows, earliest statement first."""
    found: list[tuple[int, CapturedObject]] = []
    for obj in captures:
        if obj.kind == "rows":
            statements = await conn.fetch(f"SELECT DISTINCT _rb_statement FROM {qualified(ARCHIVE_SCHEMA, obj.archive_table)}")
            found += [(r["_rb_statement"], obj) for r in statements]
        elif obj.kind in ("table", "columns", "retyped"):
            found.append((obj.statement, obj))
    found.sort(key=lambda item: item[0])
    return [_Source(obj, target, statement, f"s{n}") for n, (statement, obj) in enumerate(found)]


def _fold_sql(sources: list[_Source], target: TableShape, into: str) -> str:
    """CREATE TABLE `into` with, per key, each column's earliest image and a flag saying it has one."""
    keys = [ident(k) for k in target.primary_key]
    joined = sources[0].sql + f" {sources[0].alias}"
    for source in sources[1:]:
        joined += f" FULL JOIN {source.sql} {source.alias} USING ({', '.join(keys)})"
    columns = []
    for column in (c.name for c in target.columns if c.name not in target.primary_key):
        holders = [s for s in sources if column in s.columns]
        present = [f"{s.alias}.{keys[0]} IS NOT NULL" for s in holders]
        if holders:
            arms = " ".join(f"WHEN {s.alias}.{keys[0]} IS NOT NULL THEN {s.alias}.{ident(column)}" for s in holders)
            columns.append(f"CASE {arms} END AS {ident(column)}")
            columns.append(f"({' OR '.join(present)}) AS {ident('_rb_has_' + column)}")
        else:
            columns.append(f"NULL::{target.column(column).type} AS {ident(column)}")  # type: ignore[union-attr]
            columns.append(f"false AS {ident('_rb_has_' + column)}")
    # _rb_n numbers the keys: the restore walks them in chunks.
    selected = ", ".join([f"row_number() OVER (ORDER BY {', '.join(keys)}) AS _rb_n", *keys, *columns])
    return (f"DROP TABLE IF EXISTS {into}; CREATE UNLOGGED TABLE {into} AS SELECT {selected} "
            f"FROM {joined}; ALTER TABLE {into} ADD PRIMARY KEY ({', '.join(keys)})")


class _Plan:
    """The SQL of one table's restore."""

    def __init__(self, target: TableShape, before: str, after: CapturedObject | None, dropped_table: bool,
                 dropped_columns: set[str], writable: list[str], restorable: Callable[[list[str]], str]) -> None:
        self.target, self.before, self.dropped_table = target, before, dropped_table
        self.key = [ident(k) for k in target.primary_key]
        self.live = qualified(target.schema_name, target.name)
        self.after = qualified(ARCHIVE_SCHEMA, after.archive_table) if after else None
        after_columns = set(after.columns) if after else set()
        self.writable = writable  # target columns an INSERT or UPDATE may set (not generated)
        values = [c for c in writable if c not in target.primary_key]
        # Per column: when its before value goes back (over the live row t, before b, after a).
        self.conditions: dict[str, str] = {}
        for column in values:
            has = f"b.{ident('_rb_has_' + column)}"
            if column in dropped_columns and column not in after_columns:
                self.conditions[column] = f"{has} AND {restorable([column])}"
            elif self.after and column in after_columns:
                type_ = target.column(column).type  # type: ignore[union-attr]
                self.conditions[column] = (f"{has} AND a.{self.key[0]} IS NOT NULL AND "
                                           f"t.{ident(column)} IS NOT DISTINCT FROM CAST(a.{ident(column)} AS {type_})")

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
        return f"NOT EXISTS (SELECT FROM {self.after} x WHERE {self.on('x', 'b')})"

    def reinsert(self, overriding: bool) -> str:
        columns = ", ".join(ident(c) for c in self.writable)
        complete = " AND ".join(f"b.{ident('_rb_has_' + c)}" for c in self.writable if c not in self.target.primary_key) or "true"
        return (f"INSERT INTO {self.live} ({columns}){' OVERRIDING SYSTEM VALUE' if overriding else ''} "
                f"SELECT {', '.join(f'b.{ident(c)}' for c in self.writable)} FROM {self.chunk} "
                f"WHERE {self.deleted_by_migration} AND {complete} "
                f"AND NOT EXISTS (SELECT FROM {self.live} t WHERE {self.on('t', 'b')}) "
                f"ON CONFLICT ({', '.join(self.key)}) DO NOTHING")

    def update(self) -> str | None:
        if not self.conditions:
            return None
        sets = ", ".join(f"{ident(c)} = CASE WHEN {cond} THEN b.{ident(c)} ELSE t.{ident(c)} END"
                         for c, cond in self.conditions.items())
        any_change = " OR ".join(f"({cond} AND t.{ident(c)} IS DISTINCT FROM b.{ident(c)})" for c, cond in self.conditions.items())
        after = f" LEFT JOIN {self.after} a ON {self.on('a', 'b')}" if self.after else ""
        return (f"UPDATE {self.live} t SET {sets} FROM {self.chunk}{after} "
                f"WHERE {self.on('t', 'b')} AND ({any_change})")

    def check(self) -> str:
        """After the chunk: (rows the application deleted since, rows keeping its values, keys it re-used, values
        that should be back and are not)."""
        after = f" LEFT JOIN {self.after} a ON {self.on('a', 'b')}" if self.after else ""
        differs = {c: f"(t.{ident(c)} IS DISTINCT FROM b.{ident(c)} AND b.{ident('_rb_has_' + c)})" for c in self.conditions}
        kept = " OR ".join(f"({d} AND NOT coalesce({self.conditions[c]}, false))" for c, d in differs.items()) or "false"
        failed = " OR ".join(f"({d} AND coalesce({self.conditions[c]}, false))" for c, d in differs.items()) or "false"
        return (f"SELECT count(*) FILTER (WHERE t.{self.key[0]} IS NULL AND NOT ({self.deleted_by_migration})) AS missing, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND NOT ({self.deleted_by_migration}) AND ({kept})) AS kept, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND ({self.deleted_by_migration}) "
                f"AND NOT t.xmin::text::int8 = ANY($3::int8[])) AS reused, "
                f"count(*) FILTER (WHERE t.{self.key[0]} IS NOT NULL AND ({failed})) AS failed "
                f"FROM {self.chunk} LEFT JOIN {self.live} t ON {self.on('t', 'b')}{after}")


async def restore_captured(dsn: str, *, capture: Capture, target_shape: SchemaSnapshot, revert_xid: int, key: str,
                           rows_per_chunk: int = 50_000, progress: Callable[[str], None] | None = None) -> list[TableRestore]:
    """Restore every table of `target_shape` the capture holds images of; a report per table."""
    if capture.uncaptured:  # the plan refuses these; a restore never quietly skips them
        raise MigrationError(f"the capture could not keep everything: {'; '.join(capture.uncaptured)}")
    conn = await asyncpg.connect(dsn, timeout=10, server_settings={"application_name": "rollback-restore"})
    try:
        await ensure_bookkeeping(conn)
        by_table: dict[str, list[CapturedObject]] = {}
        for obj in capture.objects:
            by_table.setdefault(obj.initial_table, []).append(obj)
        live = await snapshot(conn)
        reports = []
        for name, objects in by_table.items():
            target = target_shape.tables.get(name)
            if target is None or not any(o.kind != "after" for o in objects):
                continue  # a table the migration created, or one it only left rows in
            if not target.primary_key:
                raise MigrationError(f"{name} has no primary key: what the migration destroyed in it cannot be put back "
                                     "by key; restore it by hand from rollback_archive or use point-in-time recovery")
            if name not in live.tables:
                raise MigrationError(f"{name} does not exist after the revert: cannot restore its rows")
            reports.append(await _restore_table(conn, dsn, target, objects, revert_xid=revert_xid, key=key,
                                                rows_per_chunk=rows_per_chunk, progress=progress))
        return reports
    finally:
        await conn.close()


async def _restore_table(conn: asyncpg.Connection, dsn: str, target: TableShape, objects: list[CapturedObject], *,
                         revert_xid: int, key: str, rows_per_chunk: int,
                         progress: Callable[[str], None] | None) -> TableRestore:
    name = target.qualified_name
    before = qualified(ARCHIVE_SCHEMA, derived_name(key, name, "before"))
    sources = await _sources(conn, objects, target)
    await conn.execute(_fold_sql(sources, target, before))
    await conn.execute(f"CREATE INDEX ON {before} (_rb_n); ANALYZE {before}")
    flags = await conn.fetch("SELECT attname, attgenerated <> '' AS generated, attidentity = 'a' AS always "
                             "FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                             qualified(target.schema_name, target.name))
    generated = {r["attname"] for r in flags if r["generated"]}
    after = next((o for o in objects if o.kind == "after"), None)
    dropped_columns = {c for o in objects if o.kind == "columns" for c in o.columns if c not in o.key}
    defaults = await constant_defaults(dsn, target, sorted(dropped_columns)) if dropped_columns else {}
    plan = _Plan(target, before, after, dropped_table=any(o.kind == "table" for o in objects),
                 dropped_columns=dropped_columns, writable=[c.name for c in target.columns if c.name not in generated],
                 restorable=lambda columns: restorable_condition(columns, defaults, revert_xid))
    report = TableRestore(table=name, mode="captured", columns=sorted(plan.conditions), method="merge")
    total = await conn.fetchval(f"SELECT count(*) FROM {before}")
    report.backup_rows = total
    reinsert, update, check = plan.reinsert(any(r["always"] for r in flags)), plan.update(), plan.check()
    for low in range(1, total + 1, rows_per_chunk):
        high = low + rows_per_chunk - 1
        async with conn.transaction():
            inserted = await conn.execute(reinsert, low, high)
            report.reinserted += int(inserted.split()[-1])
            if update:
                updated = await conn.execute(update, low, high)
                report.restored += int(updated.split()[-1])
            await conn.execute("INSERT INTO rollback_meta.restore_xids (key, xid) VALUES ($1, txid_current()) "
                               "ON CONFLICT DO NOTHING", key)
            ours = [x & 0xFFFFFFFF for x in await restore_xids(conn, key)]
            missing, kept, reused, failed = await conn.fetchrow(check, low, high, ours)
        report.missing_in_live += missing
        report.kept_application_version += kept
        report.key_reused += reused
        report.mismatches_after += failed
        if progress:
            progress(f"{name}: {min(high, total)} of {total} captured rows restored")
    await conn.execute(f"DROP TABLE IF EXISTS {before}")
    return report

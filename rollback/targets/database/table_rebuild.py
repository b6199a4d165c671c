"""Restore dropped columns of a big table by rebuilding it, instead of updating every row.

Putting a dropped column's values back with UPDATE writes a new version of every row
(rarely HOT: the row grows), an index entry for each and as much WAL: ~50 s for 7M rows
on 2 cores, with the application's writes queueing on row locks chunk after chunk. A
rebuild writes each row once, in bulk, into a new table and swaps it in (what pg_repack
does for bloat), which takes a fraction of that:

1. **capture** — a row trigger on the live table logs the primary key of every row the
   application inserts, updates or deletes from now on (installing it waits for the
   writers in flight, under the usual lock_timeout with retries);
2. **build**, in one REPEATABLE READ transaction S: the new table (same columns, defaults,
   constraints, storage) is filled with the backup's rows by COPY, its indexes built; the
   live rows S sees that differ from the backup are found by their xmin (a row version the
   backup's snapshot could not see was written since; the manifest records that snapshot)
   and re-synced from the live table, keys deleted since are dropped (an anti join, run only
   when the row counts say there are such keys);
3. **catch-up**: the logged keys are re-synced in batches while the application keeps going;
4. **swap**, one short transaction under lock_timeout (inside the PgBouncer pause when one is
   configured): ACCESS EXCLUSIVE on the live table, the last logged keys re-synced, trigger
   dropped, owner, grants, comment and owned sequences carried over, the old table dropped,
   the new one and its indexes renamed to the old names, the rebuild recorded.

Re-syncing a key writes the live row as it is, except that each restored column takes the
backup's value when the same rule as the in-place merge allows it (the row was written
before the revert, or the column still holds what the revert left there: NULL or its
constant default); a key absent from the live table is dropped. The backup's values are
remembered the first time a key is touched, so a key re-synced twice still finds them.

Tables with anything a rebuild would lose or break are refused (`rebuild_blockers`) and
restored in place instead: dependent views, foreign keys in either direction, triggers,
rules and row-level security, identity or generated columns, column privileges,
exclusion or deferrable constraints, inheritance and partitions, publications, unlogged
tables, and an owner the worker cannot act as.

An attempt that fails or is interrupted before the swap leaves the live table untouched;
the next attempt starts again from the backup (the trigger is replaced, the half-built
table dropped). The swap records itself in `rollback_meta.rebuilds` in its own
transaction, so an attempt that finds that record reports it instead of rebuilding again.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from rollback.targets.database.backups import TableCopy
from rollback.targets.database.migrations import AttemptWrapper, MigrationError, in_transaction_with_lock_timeout
from rollback.targets.database.names import derived_name
from rollback.targets.database.pg import BULK_SESSION_SETTINGS, ident, qualified, quote_literal, written_after
from rollback.targets.database.contract import ARCHIVE_SCHEMA
from rollback.targets.database.pgschema import TableShape

CATCH_UP_BATCH = 20_000  # logged changes re-synced per catch-up transaction
SWAP_BACKLOG = 2_000  # swap once a catch-up round found no more than this many logged changes
CATCH_UP_ROUNDS = 50  # an application writing faster than we catch up still gets its swap


class RebuildRefused(MigrationError):
    """The table cannot be rebuilt (something a rebuild would lose or break), or a rebuild was
    abandoned before its swap with the live table untouched: restore it in place instead."""


@dataclass(frozen=True)
class LockPolicy:
    """How the swap takes its ACCESS EXCLUSIVE lock (the same rules as every DDL of the rollback)."""

    lock_timeout_ms: int
    attempts: int
    around_attempt: AttemptWrapper | None = None
    on_blocked: Callable[[int], Awaitable[None]] | None = None


_FACTS = """
SELECT c.relkind::text, c.relpersistence::text, c.relrowsecurity, c.relhasrules, c.relreplident::text,
       pg_has_role(c.relowner, 'USAGE') AS can_act_as_owner, pg_get_userbyid(c.relowner) AS owner,
       EXISTS (SELECT FROM pg_inherits WHERE inhrelid = c.oid OR inhparent = c.oid) AS inherits,
       c.reltablespace <> 0 OR EXISTS (SELECT FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                                       WHERE x.indrelid = c.oid AND i.reltablespace <> 0) AS own_tablespace,
       EXISTS (SELECT FROM pg_policy WHERE polrelid = c.oid) AS policies,
       EXISTS (SELECT FROM pg_publication_rel WHERE prrelid = c.oid)
         OR EXISTS (SELECT FROM pg_publication WHERE puballtables) AS published,
       (SELECT string_agg(tgname, ', ') FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal AND tgname::text NOT IN ($2::text, $2::text || '_t'))
         AS triggers,
       (SELECT string_agg(DISTINCT conrelid::regclass::text, ', ') FROM pg_constraint
         WHERE confrelid = c.oid AND contype = 'f') AS referenced_by,
       (SELECT string_agg(conname, ', ') FROM pg_constraint WHERE conrelid = c.oid AND contype = 'f') AS foreign_keys,
       (SELECT string_agg(conname, ', ') FROM pg_constraint WHERE conrelid = c.oid
         AND (contype = 'x' OR (contype IN ('p', 'u') AND condeferrable))) AS special_constraints,
       (SELECT string_agg(DISTINCT r.ev_class::regclass::text, ', ') FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
         WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = c.oid AND r.ev_class <> c.oid) AS views,
       (SELECT string_agg(attname, ', ') FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped
         AND (attidentity <> '' OR attgenerated <> '')) AS special_columns,
       (SELECT string_agg(attname, ', ') FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped
         AND attacl IS NOT NULL) AS column_grants,
       (SELECT string_agg(indexrelid::regclass::text, ', ') FROM pg_index WHERE indrelid = c.oid AND NOT indisvalid)
         AS invalid_indexes
FROM pg_class c WHERE c.oid = to_regclass($1)
"""


async def rebuild_blockers(conn: asyncpg.Connection, table: TableShape, *, trigger: str = "") -> list[str]:
    """What in this table a rebuild would lose or break (empty: it can be rebuilt)."""
    facts = await conn.fetchrow(_FACTS, qualified(table.schema_name, table.name), trigger)
    if facts is None:
        return [f"{table.qualified_name} does not exist"]
    checks = [
        (facts["relkind"] != "r", "it is not an ordinary table"),
        (facts["relpersistence"] != "p", "it is unlogged or temporary"),
        (facts["inherits"], "it has inheritance parents or children"),
        (facts["own_tablespace"], "it or one of its indexes is in a tablespace of its own"),
        (facts["relrowsecurity"] or facts["policies"], "it has row-level security"),
        (facts["relhasrules"], "it has rules"),
        (facts["relreplident"] not in ("d", "n"), "it has a non-default replica identity"),
        (facts["published"], "it is (or may be, FOR ALL TABLES) in a publication"),
        (not facts["can_act_as_owner"], f"its owner {facts['owner']} is a role the worker cannot act as"),
        (not table.primary_key, "it has no primary key"),
    ]
    named = [("triggers", "triggers"), ("referenced_by", "foreign keys from"), ("foreign_keys", "foreign keys"),
             ("special_constraints", "exclusion or deferrable constraints"), ("views", "dependent views"),
             ("special_columns", "identity or generated columns"), ("column_grants", "column privileges on"),
             ("invalid_indexes", "invalid indexes")]
    reasons = [why for failed, why in checks if failed]
    reasons += [f"{what} {facts[field]}" for field, what in named if facts[field]]
    return reasons


def _name(key: str, table: TableShape, what: str) -> str:
    return derived_name(key, table.qualified_name, what)


@dataclass(frozen=True)
class _Names:
    live: str  # schema.table, quoted
    new_name: str  # unquoted, in the live table's schema
    new: str
    log: str
    authors: str  # who last wrote each re-synced row, for the integrity check
    function: str
    trigger: str  # unquoted

    @classmethod
    def of(cls, key: str, table: TableShape) -> _Names:
        new_name = _name(key, table, "rebuild")
        return cls(live=qualified(table.schema_name, table.name), new_name=new_name,
                   new=qualified(table.schema_name, new_name),
                   log=qualified(ARCHIVE_SCHEMA, _name(key, table, "changes")),
                   authors=qualified(ARCHIVE_SCHEMA, _name(key, table, "authors")),
                   function=qualified(ARCHIVE_SCHEMA, _name(key, table, "capture")),
                   trigger=_name(key, table, "trigger"))


class RebuildSql:
    """The statements of one rebuild: `t` is the live table, `n` the new one, temp tables on our session."""

    def __init__(self, names: _Names, live: TableShape) -> None:
        self.names, self.live = names, live
        self.key = live.primary_key
        self.key_cols = ", ".join(ident(k) for k in self.key)
        self.key_defs = ", ".join(f"{ident(k)} {live.column(k).type}" for k in self.key)  # type: ignore[union-attr]

    def on(self, a: str, b: str) -> str:
        return " AND ".join(f"{a}.{ident(k)} = {b}.{ident(k)}" for k in self.key)

    def capture(self) -> str:
        old = ", ".join(f"OLD.{ident(k)}" for k in self.key)
        new = ", ".join(f"NEW.{ident(k)}" for k in self.key)
        n = self.names
        return f"""
CREATE TABLE IF NOT EXISTS {n.log} (seq bigserial, truncated bool NOT NULL DEFAULT false, {self.key_defs});
CREATE OR REPLACE FUNCTION {n.function}() RETURNS trigger LANGUAGE plpgsql AS $rb$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO {n.log} (truncated) VALUES (true);
    RETURN NULL;
  END IF;
  IF TG_OP <> 'INSERT' THEN INSERT INTO {n.log} ({self.key_cols}) VALUES ({old}); END IF;
  IF TG_OP <> 'DELETE' THEN INSERT INTO {n.log} ({self.key_cols}) VALUES ({new}); END IF;
  RETURN NULL;
END $rb$;
CREATE OR REPLACE TRIGGER {ident(n.trigger)} AFTER INSERT OR UPDATE OR DELETE ON {n.live}
  FOR EACH ROW EXECUTE FUNCTION {n.function}();
CREATE OR REPLACE TRIGGER {ident(n.trigger + '_t')} AFTER TRUNCATE ON {n.live}
  FOR EACH STATEMENT EXECUTE FUNCTION {n.function}();
"""

    def take_logged(self, limit: int | None) -> str:
        """Move up to `limit` logged keys (all without a limit) into rb_batch; returns how many log rows."""
        n = self.names
        where = f"WHERE seq IN (SELECT seq FROM {n.log} ORDER BY seq LIMIT {int(limit)})" if limit else ""
        return f"""
WITH taken AS (DELETE FROM {n.log} {where} RETURNING truncated, {self.key_cols}),
     moved AS (INSERT INTO rb_batch SELECT DISTINCT {self.key_cols} FROM taken WHERE NOT truncated)
SELECT count(*) AS changes, bool_or(truncated) AS truncated FROM taken
"""


class RebuildSource(Protocol):
    """Where a rebuilt table's rows come from, and how a key the application changed meanwhile is re-synced."""

    def temp_tables(self, sql: RebuildSql) -> str: ...

    async def fill(self, conn: asyncpg.Connection, sql: RebuildSql, say: Callable[[str], None]) -> int:
        """Fill the new table (in the build's snapshot, before its indexes exist): how many rows."""

    async def after_indexes(self, conn: asyncpg.Connection, sql: RebuildSql, rows: int, say: Callable[[str], None]) -> None:
        """Anything of the build that needs the new table's indexes."""

    def sync(self, sql: RebuildSql) -> list[str]:
        """Statements re-syncing the keys in rb_batch from the live table."""

    async def counts(self, conn: asyncpg.Connection, sql: RebuildSql, rows: int) -> dict[str, Any]:
        """After the swap: how the restored values ended up."""


@dataclass(frozen=True)
class BackupRows:
    """Columns restored from the backup's COPY stream, the rows changed since the backup re-synced.

    `restorable` is the SQL condition (over the live row aliased `t`) under which a restored
    column takes the backup's value; `backup_snapshot` the backup's pg_current_snapshot().
    """

    copy: TableCopy
    backup_snapshot: str
    columns: list[str]
    restorable: str

    def temp_tables(self, sql: RebuildSql) -> str:
        restored = ", ".join(f"{ident(c)} {sql.live.column(c).type}" for c in self.columns)  # type: ignore[union-attr]
        return f"""
DROP TABLE IF EXISTS pg_temp.rb_batch, pg_temp.rb_vals;
CREATE TEMP TABLE rb_batch ({sql.key_defs});
CREATE TEMP TABLE rb_vals ({sql.key_defs}, {restored}, _rb_in_backup bool NOT NULL, PRIMARY KEY ({sql.key_cols}));
"""

    async def fill(self, conn: asyncpg.Connection, sql: RebuildSql, say: Callable[[str], None]) -> int:
        say(f"{sql.live.qualified_name}: loading the backup's rows into a new table")
        status = await conn.copy_to_table(sql.names.new_name, schema_name=sql.live.schema_name, source=self.copy.rows(),
                                          columns=self.copy.columns, encoding=self.copy.encoding)
        return int(status.split()[-1])

    async def after_indexes(self, conn: asyncpg.Connection, sql: RebuildSql, rows: int, say: Callable[[str], None]) -> None:
        changed, deleted = await self._changed_since_backup(conn, sql, rows)
        say(f"{sql.live.qualified_name}: {changed} rows changed and {deleted} deleted since the backup; re-syncing them")
        for statement in self.sync(sql):
            await conn.execute(statement)
        await conn.execute("TRUNCATE rb_batch")

    async def _changed_since_backup(self, conn: asyncpg.Connection, sql: RebuildSql, backup_rows: int) -> tuple[int, int]:
        """Fill rb_batch with the keys whose live row may differ from the backup's (a few more: see
        written_after; re-syncing an unchanged row changes nothing); (changed, deleted) counts."""
        n = sql.names
        await conn.execute(f"INSERT INTO rb_batch SELECT {', '.join(f't.{ident(k)}' for k in sql.key)} FROM {n.live} t "
                           f"WHERE {written_after(self.backup_snapshot)}")
        changed = await conn.fetchval("SELECT count(*) FROM rb_batch")
        live_rows = await conn.fetchval(f"SELECT count(*) FROM {n.live}")
        changed_in_backup = await conn.fetchval(f"SELECT count(*) FROM rb_batch b JOIN {n.new} n ON {sql.on('n', 'b')}")
        # Every unchanged live row is in the backup; what else the backup holds was deleted since.
        deleted = backup_rows - (live_rows - changed) - changed_in_backup
        if deleted:
            await conn.execute(f"INSERT INTO rb_batch SELECT {', '.join(f'n.{ident(k)}' for k in sql.key)} FROM {n.new} n "
                               f"WHERE NOT EXISTS (SELECT FROM {n.live} t WHERE {sql.on('t', 'n')})")
        return changed, deleted

    def sync(self, sql: RebuildSql) -> list[str]:
        """Re-sync the keys in rb_batch: remember their backup values once, then rewrite them from the live table.

        The live row's xmin goes to the authors table too: the new row's own xmin is the
        rebuild's, and the integrity check must still tell who really wrote its values.
        """
        n = sql.names
        restored = ", ".join(f"n.{ident(c)}" for c in self.columns)
        first_key = ident(sql.key[0])
        values = ", ".join(
            f"CASE WHEN v._rb_in_backup AND {self.restorable} THEN v.{ident(c.name)} ELSE t.{ident(c.name)} END"
            if c.name in self.columns else f"t.{ident(c.name)}" for c in sql.live.columns)
        all_cols = ", ".join(ident(c.name) for c in sql.live.columns)
        return [
            f"INSERT INTO rb_vals SELECT {', '.join(f'b.{ident(k)}' for k in sql.key)}, {restored}, "
            f"n.{first_key} IS NOT NULL FROM rb_batch b LEFT JOIN {n.new} n ON {sql.on('n', 'b')} "
            f"ON CONFLICT ({sql.key_cols}) DO NOTHING",
            f"DELETE FROM {n.new} n USING rb_batch b WHERE {sql.on('n', 'b')}",
            f"INSERT INTO {n.new} ({all_cols}) SELECT {values} FROM rb_batch b "
            f"JOIN {n.live} t ON {sql.on('t', 'b')} JOIN rb_vals v ON {sql.on('v', 'b')}",
            author_of_resynced_rows(sql),
        ]

    async def counts(self, conn: asyncpg.Connection, sql: RebuildSql, rows: int) -> dict[str, Any]:
        """How the backup's rows ended up, from the keys that were re-synced (rb_vals); run after the rename."""
        row = await conn.fetchrow(
            f"SELECT count(*) FILTER (WHERE t.{ident(sql.key[0])} IS NULL) AS missing, "
            f"count(*) FILTER (WHERE t.{ident(sql.key[0])} IS NOT NULL AND ({', '.join(f't.{ident(c)}' for c in self.columns)}) "
            f"IS DISTINCT FROM ({', '.join(f'v.{ident(c)}' for c in self.columns)})) AS kept "
            f"FROM rb_vals v LEFT JOIN {sql.names.live} t ON {sql.on('t', 'v')} WHERE v._rb_in_backup")
        return {"restored": rows - row["missing"] - row["kept"], "missing_in_live": row["missing"],
                "kept_application_version": row["kept"]}


def author_of_resynced_rows(sql: RebuildSql) -> str:
    """Who last wrote each row re-synced from the live table (rb_batch): its live xmin, for the integrity check."""
    n = sql.names
    return (f"INSERT INTO {n.authors} SELECT {', '.join(f't.{ident(k)}' for k in sql.key)}, t.xmin::text::int8 "
            f"FROM rb_batch b JOIN {n.live} t ON {sql.on('t', 'b')} "
            f"ON CONFLICT ({sql.key_cols}) DO UPDATE SET source_xmin = excluded.source_xmin")


async def rebuild_table(dsn: str, *, source: RebuildSource, live: TableShape, key: str, locks: LockPolicy,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Rebuild `live` with its rows from `source` and swap it in; the counts of what happened.

    Raises RebuildRefused before touching anything when the table cannot be rebuilt.
    """
    names = _Names.of(key, live)
    say = progress or (lambda _: None)
    conn = await asyncpg.connect(dsn, timeout=10, server_settings={"application_name": "rollback-rebuild",
                                                                    **BULK_SESSION_SETTINGS})
    try:
        done = await conn.fetchval("SELECT report FROM rollback_meta.rebuilds WHERE key = $1 AND table_name = $2",
                                   key, live.qualified_name)
        if done is not None:  # swapped by an earlier attempt
            await conn.execute(f"DROP FUNCTION IF EXISTS {names.function}(); DROP TABLE IF EXISTS {names.log}")
            return json.loads(done)
        reasons = await rebuild_blockers(conn, live, trigger=names.trigger)
        if reasons:
            raise RebuildRefused(f"{live.qualified_name} cannot be rebuilt: {'; '.join(reasons)}")
        sql = RebuildSql(names, live)
        try:
            say(f"{live.qualified_name}: installing the change-capture trigger")
            await in_transaction_with_lock_timeout(
                conn, lambda c: c.execute(sql.capture()), lock_timeout_ms=locks.lock_timeout_ms,
                attempts=locks.attempts, what=f"change capture on {live.qualified_name}", on_blocked=locks.on_blocked)
            await conn.execute(source.temp_tables(sql))
            counts = await _build(conn, sql, source, key, say)
            counts["caught_up"] = await _catch_up(conn, sql, source, key, counts["xids"], say)
            report = await _swap(conn, sql, source, key, locks, counts, say)
        except BaseException as err:
            await _clean_up(conn, names, locks, key=key, table=live.qualified_name)
            if isinstance(err, (asyncpg.PostgresError, MigrationError)) and not isinstance(err, RebuildRefused):
                # A swap that cannot get its lock, DDL the catalog checks did not foresee, a TRUNCATE
                # meanwhile: the live table is untouched, and an in-place merge needs none of that.
                raise RebuildRefused(f"{live.qualified_name}: rebuild abandoned, nothing changed "
                                     f"({type(err).__name__}: {err})".replace("\n", " ")) from None
            raise
        # Swapped. Counted after the lock is released (the keys re-synced can be many), outside the
        # clean-up above: from here on nothing may undo what is done.
        await conn.execute(f"DROP FUNCTION IF EXISTS {names.function}(); DROP TABLE IF EXISTS {names.log}")
        report.update(await source.counts(conn, sql, report["backup_rows"]))
        await conn.execute("UPDATE rollback_meta.rebuilds SET report = $3 WHERE key = $1 AND table_name = $2",
                           key, live.qualified_name, json.dumps(report))
        return report
    finally:
        await conn.close()


async def _build(conn: asyncpg.Connection, sql: RebuildSql, source: RebuildSource, key: str,
                 say: Callable[[str], None]) -> dict[str, Any]:
    n, live = sql.names, sql.live
    async with conn.transaction(isolation="repeatable_read"):
        # The first query fixes the snapshot S that the new table is built from.
        await conn.fetchval("SELECT pg_current_snapshot()")
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute(f"DELETE FROM {n.log}")  # changes S already sees
        await conn.execute(f"DROP TABLE IF EXISTS {n.authors}; CREATE TABLE {n.authors} ({sql.key_defs}, "
                           f"source_xmin int8 NOT NULL, PRIMARY KEY ({sql.key_cols}))")
        reloptions = await conn.fetchval("SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = to_regclass($1)",
                                         n.live)
        await conn.execute(
            f"DROP TABLE IF EXISTS {n.new}; CREATE TABLE {n.new} (LIKE {n.live} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING STATISTICS)"
            + (f" WITH ({reloptions})" if reloptions else ""))
        rows = await source.fill(conn, sql, say)
        say(f"{live.qualified_name}: {rows} rows in the new table; building indexes")
        await _build_indexes(conn, sql)
        await source.after_indexes(conn, sql, rows, say)
        await conn.execute(f"ANALYZE {n.new}")
        xid = await _record_xid(conn, key)
    return {"backup_rows": rows, "xids": [xid]}


async def _build_indexes(conn: asyncpg.Connection, sql: RebuildSql) -> None:
    """The live table's indexes on the new table, under temporary names; keys and unique constraints on them."""
    n = sql.names
    rows = await conn.fetch(
        """SELECT quote_ident(i.relname) AS name, pg_get_indexdef(x.indexrelid) AS definition,
                  quote_ident(ns.nspname) || '.' || quote_ident(t.relname) AS on_table,
                  c.contype::text AS contype, obj_description(x.indexrelid, 'pg_class') AS comment
           FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
           JOIN pg_namespace ns ON ns.oid = t.relnamespace
           LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid AND c.contype IN ('p', 'u')
           WHERE x.indrelid = to_regclass($1) ORDER BY x.indisprimary DESC, i.relname""", n.live)
    for number, row in enumerate(rows):
        temporary = f"{n.new_name[:55]}_i{number}"
        head = f" INDEX {row['name']} ON {row['on_table']} USING "
        definition = row["definition"]
        if head not in definition:
            raise MigrationError(f"cannot rebuild index {row['name']} of {sql.live.qualified_name}: "
                                 f"unexpected definition {definition[:200]}")
        await conn.execute(definition.replace(head, f" INDEX {ident(temporary)} ON {n.new} USING ", 1))
        if row["contype"]:
            kind = "PRIMARY KEY" if row["contype"] == "p" else "UNIQUE"
            await conn.execute(f"ALTER TABLE {n.new} ADD CONSTRAINT {ident(temporary)} {kind} USING INDEX {ident(temporary)}")
        if row["comment"] is not None:
            await conn.execute(f"COMMENT ON INDEX {qualified(sql.live.schema_name, temporary)} IS {await quote_literal(conn, row['comment'])}")
    # Remember which temporary index takes which name at the swap.
    await conn.execute("DROP TABLE IF EXISTS pg_temp.rb_index_names; CREATE TEMP TABLE rb_index_names (temporary text, original text)")
    await conn.executemany("INSERT INTO rb_index_names VALUES ($1, $2)",
                           [(f"{n.new_name[:55]}_i{number}", row["name"]) for number, row in enumerate(rows)])


async def _record_xid(conn: asyncpg.Connection, key: str) -> int:
    # Every transaction that writes rows of the new table: the integrity check recognises them as the rollback's.
    return await conn.fetchval("INSERT INTO rollback_meta.restore_xids (key, xid) VALUES ($1, txid_current()) "
                               "ON CONFLICT (key, xid) DO UPDATE SET xid = excluded.xid RETURNING xid", key)


async def _sync_logged(conn: asyncpg.Connection, sql: RebuildSql, source: RebuildSource, key: str, limit: int | None,
                       xids: list[int]) -> int:
    row = await conn.fetchrow(sql.take_logged(limit))
    if row["truncated"]:
        raise MigrationError(f"{sql.live.qualified_name} was truncated during the rebuild: rebuild abandoned, "
                             "nothing changed; run the rollback again")
    if row["changes"]:
        for statement in source.sync(sql):
            await conn.execute(statement)
        xids.append(await _record_xid(conn, key))
    await conn.execute("TRUNCATE rb_batch")
    return row["changes"]


async def _catch_up(conn: asyncpg.Connection, sql: RebuildSql, source: RebuildSource, key: str, xids: list[int],
                    say: Callable[[str], None]) -> int:
    total = 0
    for _ in range(CATCH_UP_ROUNDS):
        async with conn.transaction():
            changes = await _sync_logged(conn, sql, source, key, CATCH_UP_BATCH, xids)
        total += changes
        say(f"{sql.live.qualified_name}: caught up with {changes} changes made during the rebuild")
        if changes <= SWAP_BACKLOG:
            break
    return total


async def _swap(conn: asyncpg.Connection, sql: RebuildSql, source: RebuildSource, key: str, locks: LockPolicy,
                counts: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    n, live = sql.names, sql.live
    renames = await conn.fetch("SELECT temporary, original FROM rb_index_names")

    async def body(c: asyncpg.Connection) -> dict[str, Any]:
        xids = list(counts["xids"])
        await c.execute(f"LOCK TABLE {n.live} IN ACCESS EXCLUSIVE MODE")
        last = await _sync_logged(c, sql, source, key, None, xids)  # nobody writes now: the log is complete
        facts = await c.fetchrow("SELECT pg_get_userbyid(relowner) AS owner, obj_description(oid, 'pg_class') AS comment, "
                                 "ARRAY(SELECT format('GRANT %s ON %s TO %s%s', a.privilege_type, $2::text, "
                                 "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, "
                                 "CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) "
                                 "FROM aclexplode(relacl) a WHERE a.grantee <> relowner) AS grants "
                                 "FROM pg_class WHERE oid = to_regclass($1)", n.live, n.new)
        sequences = await c.fetch(
            "SELECT d.objid::regclass::text AS sequence, quote_ident(a.attname) AS col FROM pg_depend d "
            "JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
            "WHERE d.refobjid = to_regclass($1) AND d.classid = 'pg_class'::regclass AND d.deptype = 'a' "
            "AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'S'", n.live)
        await c.execute(f"DROP TRIGGER {ident(n.trigger)} ON {n.live}; DROP TRIGGER {ident(n.trigger + '_t')} ON {n.live}")
        await c.execute(f"ALTER TABLE {n.new} OWNER TO {ident(facts['owner'])}")
        for grant in facts["grants"]:
            await c.execute(grant)
        for s in sequences:
            await c.execute(f"ALTER SEQUENCE {s['sequence']} OWNED BY {n.new}.{s['col']}")
        await c.execute(f"COMMENT ON TABLE {n.new} IS {await quote_literal(c, facts['comment'])}")
        await c.execute(f"DROP TABLE {n.live}")
        await c.execute(f"ALTER TABLE {n.new} RENAME TO {ident(live.name)}")
        for r in renames:
            await c.execute(f"ALTER INDEX {qualified(live.schema_name, r['temporary'])} RENAME TO {r['original']}")
        xids.append(await _record_xid(c, key))
        report = {"backup_rows": counts["backup_rows"], "caught_up": counts["caught_up"] + last,
                  "authors": n.authors, "rebuild_xids": sorted(set(xids))}
        await c.execute("INSERT INTO rollback_meta.rebuilds (key, table_name, report) VALUES ($1, $2, $3)",
                        key, live.qualified_name, json.dumps(report))
        return report

    say(f"{live.qualified_name}: swapping the rebuilt table in")
    report: dict[str, Any] = await in_transaction_with_lock_timeout(  # type: ignore[assignment]
        conn, body, lock_timeout_ms=locks.lock_timeout_ms, attempts=locks.attempts,
        what=f"swap of the rebuilt {live.qualified_name}", on_blocked=locks.on_blocked, around_attempt=locks.around_attempt)
    return report


async def _clean_up(conn: asyncpg.Connection, names: _Names, locks: LockPolicy, *, key: str, table: str) -> None:
    """After a failed or cancelled attempt: the live table as it was, no half-built copy, no capture.

    Replacing the trigger's function with a no-op needs no lock on the live table, so the
    capture stops even when the trigger itself cannot be dropped (DROP TRIGGER waits for an
    ACCESS EXCLUSIVE lock, and whatever blocked the swap may block that too).
    """
    if conn.is_closed():
        return  # a dead session: the next attempt replaces the trigger and drops the copy
    try:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        if await conn.fetchval("SELECT EXISTS (SELECT FROM rollback_meta.rebuilds WHERE key = $1 AND table_name = $2)",
                               key, table):
            return  # the swap committed (an error came after it): its authors table is needed, nothing to undo
        await conn.execute(f"CREATE OR REPLACE FUNCTION {names.function}() RETURNS trigger LANGUAGE plpgsql "
                           "AS $rb$ BEGIN RETURN NULL; END $rb$; "
                           f"DROP TABLE IF EXISTS {names.new}, {names.log}, {names.authors}")
        await in_transaction_with_lock_timeout(
            conn, lambda c: c.execute(f"DROP TRIGGER IF EXISTS {ident(names.trigger)} ON {names.live}; "
                                      f"DROP TRIGGER IF EXISTS {ident(names.trigger + '_t')} ON {names.live}; "
                                      f"DROP FUNCTION {names.function}()"),
            lock_timeout_ms=locks.lock_timeout_ms, attempts=locks.attempts, what=f"clean-up of the rebuild of {names.live}")
    except (asyncpg.PostgresError, MigrationError, OSError):
        pass  # best effort: the failure being raised matters more; the no-op trigger goes with the next rebuild

"""Integrity validation: prove a database rollback lost or altered no row except as intended.

Before the rollback `take_snapshot` fingerprints the affected tables in one REPEATABLE READ
snapshot; after it `compare` fingerprints them again and explains every difference by WHO
wrote the live row (its xmin): an application transaction that ran concurrently (expected
while the application keeps writing), a rollback transaction that was meant to rewrite rows,
or nothing we can explain (the step fails and the rollback compensates).

Fingerprints are order independent and bucketed by a hash of the primary key, so compare
drills down only into the buckets that differ. With kept rows compare first tries a faster,
equally exact check (see `_recent_differences`): only the few live rows whose xmin is not
older than the before-snapshot are looked at row by row, and every other live row is proven
unchanged by exact totals; when that proof fails (deletes, rewrites of most rows) the bucket
drill-down names the differences instead. A rollback that rewrote more rows than that (every
row of a table, with the same values) keeps the fast path: the rows its own transactions wrote
are then proven unchanged by the same exact totals instead of being looked at one by one.
With `keep_rows=True` the snapshot also keeps (bucket, key, row hash) per row in an UNLOGGED
table in schema `rollback_archive`, which lets compare NAME the primary keys that are missing,
inserted or changed; without kept rows it can only name buckets.

Tables without a primary key get a row-count and row-hash multiset fingerprint only; their
differences are reported per bucket (bucketed by the row hash), where an update looks like a
delete plus an insert. No rows are kept for them.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Literal

import asyncpg
from pydantic import BaseModel, Field, field_validator

from rollback.targets.database.pg import ident, qualified
from rollback.targets.database.contract import ARCHIVE_SCHEMA, Cause, Difference, IntegrityBrief, TableReport

XID_MODULUS = 2**32

# Per-column seeds and NULL marks. Each column is hashed with its own seed (so values swapped
# between columns differ) and a NULL contributes a fixed per-position mark instead of a hash,
# so NULL and '' (or 0) fingerprint differently.
_KEY_SEED = 0x6B65790000
_ROW_SEED = 0x726F770000
_NULL_MARK = 0x6E756C6C000000

# Session settings for the fingerprint transaction (SET LOCAL, gone at commit):
# - text-converted values (types without a typed hash) must not depend on the session;
# - JIT compilation costs ~2 s on this query shape and buys nothing;
# - the planner cannot know there are only `buckets` groups (it assumes one per key), so it
#   would sort 7M rows for a GroupAggregate (3x slower) and refuse the parallel partial
#   aggregate: sorting is discouraged and parallel plans made free.
_SETTINGS = {
    "TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres", "extra_float_digits": "3",
    "bytea_output": "hex", "jit": "off", "enable_sort": "off", "parallel_setup_cost": "0", "parallel_tuple_cost": "0",
    # The bucket drill-down joins up to every kept row with every live row: with the default 4 MB
    # the hash join splits into ~100 batches written to temporary files.
    "work_mem": "256MB",
    # Array parameters must be planned as constants: `= ANY(constant array)` is hashed and
    # filtered inside the parallel workers (0.5 s for 7M kept rows against 1.9 s as a semi-join).
    "plan_cache_mode": "force_custom_plan",
}

# At most this many recent live rows (xmin not older than the before-snapshot's xmin) are
# checked one by one; beyond it (a rollback that rewrote most rows) the bucket drill-down is cheaper.
RECENT_ROWS_LIMIT = 100_000


class IntegrityError(RuntimeError):
    """Base class: integrity validation could not be carried out."""


class TableNotFound(IntegrityError):
    """A table to fingerprint does not exist."""


class ColumnNotFound(IntegrityError):
    """A key or fingerprinted column does not exist in its table."""


class SnapshotMismatch(IntegrityError):
    """compare() was given specs that differ from the ones the snapshot was taken with."""


class KeptRowsMissing(IntegrityError):
    """The snapshot's kept rows were dropped before compare() needed them."""


class TableSpec(BaseModel):
    table: str = Field(description="schema.table")
    key: list[str] = Field(default_factory=list, description="primary key columns; empty if the table has none")
    columns: list[str] = Field(description="columns whose values are fingerprinted")

    @field_validator("table")
    @classmethod
    def _qualified(cls, value: str) -> str:
        schema, dot, name = value.partition(".")
        if not dot or not schema or not name:
            raise ValueError(f"table {value!r} must be written schema.table")
        return value

    @property
    def schema_name(self) -> str:
        return self.table.partition(".")[0]

    @property
    def name(self) -> str:
        return self.table.partition(".")[2]


class BucketFingerprint(BaseModel):
    rows: int
    keys: str = Field(description="exact sum of the 64-bit key hashes, decimal; empty without a primary key")
    values: str = Field(description="exact sum of the 64-bit row hashes, decimal")


class TableFingerprint(BaseModel):
    table: str
    key: list[str]
    columns: list[str]
    rows: int
    keys: str
    values: str
    buckets: dict[int, BucketFingerprint] = Field(description="non-empty buckets only")
    kept_rows: str | None = Field(default=None, description="rollback_archive.<table> holding the per-row hashes")


class Snapshot(BaseModel):
    label: str
    taken_at: datetime
    pg_snapshot: str = Field(description="pg_current_snapshot() of the fingerprint transaction")
    buckets: int
    tables: dict[str, TableFingerprint]
    seconds: float




class IntegrityReport(BaseModel):
    ok: bool
    summary: str
    label: str
    tables: dict[str, TableReport]
    differences: list[Difference] = Field(description="the first `limit`, unexplained first")
    differences_total: int
    notes: list[str] = Field(default_factory=list)
    seconds: float


# --------------------------------------------------------------------------- hashing SQL


_OPCLASS_HASH = """
SELECT p.amproc::regproc::text
FROM pg_opclass oc
JOIN pg_am am ON am.oid = oc.opcmethod AND am.amname = 'hash'
JOIN pg_amproc p ON p.amprocfamily = oc.opcfamily AND p.amprocnum = 2
     AND p.amproclefttype = oc.opcintype AND p.amprocrighttype = oc.opcintype
JOIN pg_proc f ON f.oid = p.amproc
WHERE oc.opcdefault AND oc.opcintype = $1 AND ($2 OR f.proargtypes[0] = $1)
LIMIT 1
"""


async def _hash_function(conn: asyncpg.Connection, type_oid: int, *, timeout: float) -> str | None:
    """The typed 64-bit seeded hash function that accepts this type as is, or None (hash its text)."""
    row = await conn.fetchrow("SELECT typtype, typbasetype, typelem, typcategory FROM pg_type WHERE oid = $1",
                              type_oid, timeout=timeout)
    if row["typtype"] == "d":
        return await _hash_function(conn, row["typbasetype"], timeout=timeout)
    # Only a function whose argument is exactly this type: boolean's opclass uses hashcharextended("char"),
    # which SQL would not accept for a boolean. Those types fall back to text (settings pinned above).
    if fn := await conn.fetchval(_OPCLASS_HASH, type_oid, False, timeout=timeout):
        return fn
    if row["typtype"] == "e":
        return "hashenumextended"
    if row["typcategory"] == "A" and row["typelem"]:
        # hash_array_extended hashes elements through their opclass, whatever its argument type.
        element = await conn.fetchrow("SELECT typtype, typbasetype FROM pg_type WHERE oid = $1", row["typelem"],
                                      timeout=timeout)
        element_oid = element["typbasetype"] if element["typtype"] == "d" else row["typelem"]
        if element["typtype"] == "e" or await conn.fetchval(_OPCLASS_HASH, element_oid, True, timeout=timeout):
            return "hash_array_extended"
    if row["typcategory"] == "S":  # varchar and other string types: their text is their value
        return "hashtextextended"
    return None


async def _column_types(conn: asyncpg.Connection, spec: TableSpec, *, timeout: float) -> dict[str, int]:
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", qualified(spec.schema_name, spec.name), timeout=timeout)
    if oid is None:
        raise TableNotFound(f"table {spec.table} does not exist")
    rows = await conn.fetch("SELECT attname, atttypid FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 "
                            "AND NOT attisdropped", oid, timeout=timeout)
    types = {r["attname"]: r["atttypid"] for r in rows}
    absent = [c for c in [*spec.key, *spec.columns] if c not in types]
    if absent:
        raise ColumnNotFound(f"table {spec.table} has no column(s) {', '.join(absent)}")
    return types


async def _hash_expression(conn: asyncpg.Connection, columns: Sequence[str], types: dict[str, int], *,
                           seed: int, timeout: float) -> str:
    """A bigint SQL expression hashing these columns of one row; NULLs hash to a per-position mark."""
    if not columns:
        return "0::int8"
    parts = []
    for position, column in enumerate(columns):
        fn = await _hash_function(conn, types[column], timeout=timeout)
        value = ident(column) if fn else f"{ident(column)}::text"
        parts.append(f"coalesce({fn or 'hashtextextended'}({value}, {seed + position}), {_NULL_MARK + position})")
    if len(parts) == 1:
        return parts[0]
    # XOR of per-column hashes is linear; one more hash mixes it, so that summing row hashes
    # over rows cannot cancel out values moved between rows.
    return f"hashint8extended({' # '.join(parts)}, 0)"


class RebuiltTable(BaseModel):
    """A table the rollback rebuilt (rollback/targets/database/table_rebuild.py): the transactions that wrote it, and
    the table (schema.name, quoted) of who last wrote each row it copied from the live table."""

    authors: str
    xids: list[int]


class _Hashes(BaseModel):
    """The SQL of one table's per-row hashes (bigint expressions over the table's columns).

    They are written inline wherever used: computing them once in a subquery needs a
    set-returning function to stop the planner from inlining it, and that ProjectSet costs
    more (~0.35 us a row) than hashing the key twice.
    """

    source: str
    key_columns: list[str]
    key_hash: str
    row_hash: str
    buckets: int
    rebuilt: RebuiltTable | None = None

    @property
    def bucket(self) -> str:
        # The high half of the key hash picks the bucket; sums use the whole hash.
        return f"((({self.key_hash} >> 32) & 2147483647) % {self.buckets})::int4"

    # Compare reads live rows through these: a rebuilt table's rows all carry the rebuild's
    # xmin, so who really wrote a row is its author's xmin (kept by the rebuild), and a row the
    # rebuild copied from the backup has no author: it counts as older than the before-snapshot.

    @property
    def rows(self) -> str:
        """FROM clause of the live rows (system column xmin as _rb_xid)."""
        if self.rebuilt is None:
            return f"(SELECT *, xmin AS _rb_xid FROM {self.source}) t"
        on = " AND ".join(f"a.{ident(k)} = s.{ident(k)}" for k in self.key_columns)
        return (f"(SELECT s.*, s.xmin AS _rb_xid, a.source_xmin AS _rb_author FROM {self.source} s "
                f"LEFT JOIN {self.rebuilt.authors} a ON {on}) t")

    @property
    def _rebuild_xids(self) -> str:
        assert self.rebuilt is not None
        return "ARRAY[" + (",".join(str(int(x) % XID_MODULUS) for x in self.rebuilt.xids) or "-1") + "]::int8[]"

    @property
    def writer_xmin(self) -> str:
        """The 32-bit xmin of whoever wrote the row's values."""
        if self.rebuilt is None:
            return "t._rb_xid::text::int8"
        # -1: the rebuild copied the row from the backup (no author): the rollback's own write.
        return (f"(CASE WHEN t._rb_xid::text::int8 = ANY({self._rebuild_xids}) THEN coalesce(t._rb_author, -1) "
                "ELSE t._rb_xid::text::int8 END)")

    def written_since(self, skip_rollback_writes: bool) -> str:
        """Rows whose writer may be newer than the before-snapshot ($4: its xmin's age; $2, $3: rollback xids)."""
        if self.rebuilt is not None:
            return (f"((age(t._rb_xid) <= $4::int4 AND NOT t._rb_xid::text::int8 = ANY({self._rebuild_xids})) "
                    "OR t._rb_author IS NOT NULL)")
        skip = " AND NOT t._rb_xid::text::int8 = ANY($2::int8[] || $3::int8[])" if skip_rollback_writes else ""
        return f"age(t._rb_xid) <= $4::int4{skip}"



async def _hashes(conn: asyncpg.Connection, spec: TableSpec, buckets: int, *, timeout: float) -> _Hashes:
    types = await _column_types(conn, spec, timeout=timeout)
    row_hash = await _hash_expression(conn, spec.columns, types, seed=_ROW_SEED, timeout=timeout)
    # Without a primary key the row itself is its identity: bucket by the row hash.
    key_hash = (await _hash_expression(conn, spec.key, types, seed=_KEY_SEED, timeout=timeout)
                if spec.key else row_hash)
    return _Hashes(source=qualified(spec.schema_name, spec.name), key_columns=spec.key, key_hash=key_hash,
                   row_hash=row_hash, buckets=buckets)


# Order-independent fingerprint of a multiset of rows: the count and the exact sum of their
# 64-bit hashes (PostgreSQL accumulates sum(bigint) in a 128-bit integer: no overflow, no
# numeric per row, and parallel workers combine partial sums). A random change goes unnoticed
# only if it keeps a bucket's count and its 64-bit hash sum, ~2^-64 per changed bucket, so
# one exact 64-bit sum already does what two 32-bit sums (or sum + xor) would; a second
# aggregate over the row hash measured 15-45% slower (the hash is recomputed). This is no
# defence against someone forging rows on purpose, which is outside the rollback's threat
# model. Tables without a primary key have no key sum.
def _aggregates(key_hash: str, row_hash: str, keyed: bool) -> str:
    keys = f"sum({key_hash})" if keyed else "NULL::numeric"
    return f"count(*) AS rows, {keys} AS key_sum, sum({row_hash}) AS row_sum"


def _fingerprint(spec: TableSpec, rows: Sequence[asyncpg.Record], kept_rows: str | None) -> TableFingerprint:
    def text(total: Decimal | int | None) -> str:
        return "" if total is None else str(int(total))  # decimal text: JSON numbers lose precision past 2^53

    buckets = {r["bucket"]: BucketFingerprint(rows=r["rows"], keys=text(r["key_sum"]), values=text(r["row_sum"]))
               for r in rows}
    return TableFingerprint(table=spec.table, key=spec.key, columns=spec.columns, rows=sum(r["rows"] for r in rows),
                            keys=text(sum(int(r["key_sum"]) for r in rows) if spec.key else None),
                            values=text(sum(int(r["row_sum"]) for r in rows)), buckets=buckets, kept_rows=kept_rows)


def kept_rows_table(label: str, table: str) -> str:
    """The kept-rows table's name: readable, [a-z0-9_] only, at most 63 bytes, unique by a hash suffix."""
    readable = re.sub(r"[^a-z0-9_]+", "_", f"{label}__{table}".lower())[:54]
    digest = hashlib.sha256(f"{label}\n{table}".encode()).hexdigest()[:8]
    return f"{readable}_{digest}"


async def _set_local(conn: asyncpg.Connection, *, timeout: float) -> None:
    for name, value in _SETTINGS.items():
        await conn.execute("SELECT set_config($1, $2, true)", name, value, timeout=timeout)


async def _fingerprint_table(conn: asyncpg.Connection, spec: TableSpec, h: _Hashes, *, kept: str | None,
                             timeout: float) -> TableFingerprint:
    if kept:
        # Keep the narrow rows, then fingerprint them: same transaction, same snapshot, so the
        # kept rows and the fingerprints agree exactly, and the table is read only once.
        target = qualified(ARCHIVE_SCHEMA, kept)
        keys = "".join(f"{ident(c)}, " for c in h.key_columns)
        await conn.execute(f"DROP TABLE IF EXISTS {target}", timeout=timeout)  # a retried activity
        # _rb_xmin: which version of the row the snapshot read (see SAME_VERSION).
        await conn.execute(f"CREATE UNLOGGED TABLE {target} AS SELECT {h.bucket} AS _rb_bucket, {keys}"
                           f"{h.key_hash} AS _rb_key_hash, {h.row_hash} AS _rb_row_hash, {h.writer_xmin} AS _rb_xmin "
                           f"FROM {h.rows}", timeout=timeout)
        source = (f"SELECT _rb_bucket AS bucket, {_aggregates('_rb_key_hash', '_rb_row_hash', bool(spec.key))} "
                  f"FROM {target} GROUP BY 1")
    else:
        # Grouping by the bucket expression, PostgreSQL 15 expects one group per row and will not
        # aggregate in the parallel workers: the leader hashes every row. Joined to the list of
        # bucket numbers it knows there are `buckets` groups, and each worker sums its share
        # (1.5 s against 1.9 s for 7M rows). Every row is in exactly one bucket: same sums.
        source = (f"SELECT g.bucket, {_aggregates(h.key_hash, h.row_hash, bool(spec.key))} "
                  f"FROM generate_series(0, {h.buckets - 1}) g(bucket) JOIN {h.source} ON g.bucket = {h.bucket} GROUP BY 1")
    return _fingerprint(spec, await conn.fetch(source, timeout=timeout), kept and f"{ARCHIVE_SCHEMA}.{kept}")


async def take_snapshot(conn: asyncpg.Connection, specs: Sequence[TableSpec], *, label: str, keep_rows: bool,
                        buckets: int = 1024, timeout: float = 1800, store: bool = False) -> Snapshot:
    """Fingerprint these tables in one REPEATABLE READ snapshot (and keep per-row hashes if asked).

    With `store` the snapshot is also written to rollback_meta.integrity_snapshots under its label,
    in the same transaction as its kept rows (both or neither): see `take_stored_snapshot`.
    """
    if not 1 <= buckets <= 1_000_000:
        raise ValueError(f"buckets must be between 1 and 1000000, not {buckets}")
    started = time.monotonic()
    if keep_rows or store:
        # Outside the snapshot transaction: a schema created there would be invisible to others until commit.
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(ARCHIVE_SCHEMA)}; {_STORE_DDL}", timeout=timeout)
    async with conn.transaction(isolation="repeatable_read", readonly=not (keep_rows or store)):
        await _set_local(conn, timeout=timeout)
        # The first query fixes the transaction's snapshot: everything below sees exactly this.
        pg_snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text", timeout=timeout)
        tables = {}
        for spec in specs:
            h = await _hashes(conn, spec, buckets, timeout=timeout)
            kept = kept_rows_table(label, spec.table) if keep_rows and spec.key else None
            tables[spec.table] = await _fingerprint_table(conn, spec, h, kept=kept, timeout=timeout)
        taken = Snapshot(label=label, taken_at=datetime.now(timezone.utc), pg_snapshot=pg_snapshot, buckets=buckets,
                         tables=tables, seconds=round(time.monotonic() - started, 3))
        if store:
            await conn.execute("INSERT INTO rollback_meta.integrity_snapshots (label, snapshot) VALUES ($1, $2)",
                               label, taken.model_dump_json(), timeout=timeout)
    return taken


# --------------------------------------------------------------------------- snapshots kept in the database

# A snapshot holds ~90 KB of bucket sums per table of 1,024 rows or more: 40 ordinary tables are
# beyond Temporal's 2 MB payload limit. Activities keep it here and pass its label instead.
_STORE_DDL = """CREATE SCHEMA IF NOT EXISTS rollback_meta;
CREATE TABLE IF NOT EXISTS rollback_meta.integrity_snapshots (
    label    text PRIMARY KEY,
    snapshot json NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS rollback_meta.integrity_reports (
    key     text PRIMARY KEY,
    report  json NOT NULL,
    done_at timestamptz NOT NULL DEFAULT now()
);"""


async def take_stored_snapshot(conn: asyncpg.Connection, specs: Sequence[TableSpec], *, label: str,
                               timeout: float = 1800) -> Snapshot:
    """The snapshot stored under `label`, taken (with kept rows) and stored if there is none yet.

    Idempotent: a retry after a completed attempt returns that attempt's snapshot, which is still
    the "before" of everything the rollback does next (nothing of the rollback ran in between).
    """
    stored = await load_snapshot(conn, label, timeout=timeout)
    if stored is not None:
        return stored
    return await take_snapshot(conn, specs, label=label, keep_rows=True, store=True, timeout=timeout)


async def load_snapshot(conn: asyncpg.Connection, label: str, *, timeout: float = 600) -> Snapshot | None:
    if not await conn.fetchval("SELECT to_regclass('rollback_meta.integrity_snapshots') IS NOT NULL", timeout=timeout):
        return None
    raw = await conn.fetchval("SELECT snapshot FROM rollback_meta.integrity_snapshots WHERE label = $1", label,
                              timeout=timeout)
    return None if raw is None else Snapshot.model_validate_json(raw)


async def discard_snapshot(conn: asyncpg.Connection, label: str, *, timeout: float = 600) -> bool:
    """Drop the stored snapshot `label` and its kept rows, in one transaction. False if there was none."""
    async with conn.transaction():
        stored = await load_snapshot(conn, label, timeout=timeout)
        if stored is None:
            return False
        await drop_kept_rows(conn, stored, timeout=timeout)
        await conn.execute("DELETE FROM rollback_meta.integrity_snapshots WHERE label = $1", label, timeout=timeout)
    return True


async def store_report(conn: asyncpg.Connection, key: str, report: IntegrityReport, *, timeout: float = 600) -> None:
    """Keep the report under `key` and discard the snapshot it was compared with, in one transaction:
    a retried validation finds the report (the kept rows it would need are gone)."""
    await conn.execute(_STORE_DDL, timeout=timeout)
    async with conn.transaction():
        await conn.execute("INSERT INTO rollback_meta.integrity_reports (key, report) VALUES ($1, $2) "
                           "ON CONFLICT (key) DO NOTHING", key, report.model_dump_json(), timeout=timeout)
        await discard_snapshot(conn, report.label, timeout=timeout)


async def load_report(conn: asyncpg.Connection, key: str, *, timeout: float = 600) -> IntegrityReport | None:
    if not await conn.fetchval("SELECT to_regclass('rollback_meta.integrity_reports') IS NOT NULL", timeout=timeout):
        return None
    raw = await conn.fetchval("SELECT report FROM rollback_meta.integrity_reports WHERE key = $1", key, timeout=timeout)
    return None if raw is None else IntegrityReport.model_validate_json(raw)


async def expire_stored(conn: asyncpg.Connection, cutoff: datetime, *, drop: bool, timeout: float = 600) -> list[str]:
    """Reports done and snapshots taken before `cutoff` (a snapshot is left behind only by a rollback
    that was terminated): deleted if `drop`; their labels or keys either way."""
    if not await conn.fetchval("SELECT to_regclass('rollback_meta.integrity_reports') IS NOT NULL", timeout=timeout):
        return []
    labels = [r[0] for r in await conn.fetch("SELECT label FROM rollback_meta.integrity_snapshots WHERE taken_at < $1",
                                             cutoff, timeout=timeout)]
    keys = [r[0] for r in await conn.fetch("SELECT key FROM rollback_meta.integrity_reports WHERE done_at < $1",
                                           cutoff, timeout=timeout)]
    if drop:
        for label in labels:
            await discard_snapshot(conn, label, timeout=timeout)
        await conn.execute("DELETE FROM rollback_meta.integrity_reports WHERE key = ANY($1::text[])", keys, timeout=timeout)
    return labels + keys


async def drop_kept_rows(conn: asyncpg.Connection, snapshot: Snapshot, *, timeout: float = 60) -> None:
    """Drop the snapshot's kept rows (idempotent: already dropped tables are fine)."""
    for fingerprint in snapshot.tables.values():
        if fingerprint.kept_rows:
            schema, _, name = fingerprint.kept_rows.partition(".")
            await conn.execute(f"DROP TABLE IF EXISTS {qualified(schema, name)}", timeout=timeout)


# --------------------------------------------------------------------------- compare

# Who wrote a live row, from its 32-bit xmin ($1 before's pg_snapshot, $2 rollback xids, $3
# expected xids, both reduced modulo 2^32 because xmin is 32-bit while pg_snapshot and
# pg_current_xact_id() are 64-bit). The 64-bit xid is rebuilt relative to the current
# snapshot's xmax ($5; a live row's xmin is below it and less than 2^31 older), and compared
# with before's pg_snapshot by pg_visible_in_snapshot. xids 1 and 2 (bootstrap, frozen) are
# older than everything; -1 marks a row a table rebuild copied from the backup ('copied').
#
# pg_current_snapshot() lists in-progress transactions but not their subtransactions: a row
# written in a savepoint (or an EXCEPTION block) of a transaction in progress at the snapshot
# looks visible to it. Such a subtransaction's xid is above the snapshot's xmin (its parent was
# in progress), so a "visible" writer from [xmin, xmax) is 'subtransaction'; only one below xmin
# (or frozen) is surely 'old'.
def _writer(row: str) -> str:
    """SQL naming who wrote the live row aliased `row` (which has _rb_xmin)."""
    xmin = f"{row}._rb_xmin"
    full = f"($5::int8 - (($5::int8 - {xmin}) % 4294967296 + 4294967296) % 4294967296)::text::xid8"
    return f"""CASE WHEN {xmin} = -1 THEN 'copied'
     WHEN {xmin} < 3 THEN 'old'
     WHEN {xmin} = ANY($3::int8[]) THEN 'expected'
     WHEN {xmin} = ANY($2::int8[]) THEN 'rollback'
     WHEN NOT pg_visible_in_snapshot({full}, $1::text::pg_snapshot) THEN 'concurrent'
     WHEN {full} >= pg_snapshot_xmin($1::text::pg_snapshot) THEN 'subtransaction'
     ELSE 'old' END"""


def _live(h: _Hashes, *, every_bucket: bool = False) -> str:
    """The live rows of the differing buckets ($4) with their row hash and 32-bit xmin."""
    keys = "".join(f"{ident(c)}, " for c in h.key_columns)
    # Every bucket: no bucket filter to compute, but $4 must still be referenced to have a type.
    where = "$4::int4[] IS NOT NULL" if every_bucket else f"{h.bucket} = ANY($4::int4[])"
    return (f"SELECT {keys}{h.bucket} AS _rb_bucket, {h.row_hash} AS _rb_row_hash, {h.writer_xmin} AS _rb_xmin "
            f"FROM {h.rows} WHERE {where}")


# A live row whose version is the very one the before-snapshot read (its kept row recorded the same
# xmin) cannot differ from it by any write: whatever its xmin's visibility says (an xmin at or above
# the snapshot's xmin looks like a subtransaction's while any transaction of the cluster, in any
# database, was older than the snapshot), a difference there is unexplained. Kept rows of snapshots
# taken before they recorded the version have no _rb_xmin: their rows are judged by visibility alone.
SAME_VERSION = "same_version"


def _kept_writer(kept_has_xmin: bool) -> str:
    """SQL naming who wrote the live row `l` joined to its kept row `k`."""
    if not kept_has_xmin:
        return _writer("l")
    return f"CASE WHEN k._rb_xmin = l._rb_xmin THEN '{SAME_VERSION}' ELSE {_writer('l')} END"


async def _kept_has_xmin(conn: asyncpg.Connection, kept: str, *, timeout: float) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = '_rb_xmin' "
                                    "AND NOT attisdropped", kept, timeout=timeout))


def _keyed_sql(h: _Hashes, kept: str, limit: int, *, every_bucket: bool = False, kept_has_xmin: bool = True) -> str:
    """Missing, inserted and changed keys of the differing buckets ($4): kept rows joined with live rows.

    Returns count rows per (kind, writer), then the first `limit` differences, unexplained ones
    first ($6 allow_concurrent_writes, $7 allow_deletes decide what is unexplained).

    With `every_bucket` (most buckets differ) the buckets are not filtered and the join is a
    LEFT join of live rows to kept rows (8.4 s against 9.5 s for the FULL join of 7M x 7M rows;
    bare, PostgreSQL 15 would run it as a parallel hash join in 5.4 s, but not below this CTE);
    kept rows without a live row are then looked for only if the row counts say there are some.
    """
    join = " AND ".join(f"k.{ident(c)} = l.{ident(c)}" for c in h.key_columns)
    key_text = ", ".join(f"coalesce(k.{ident(c)}, l.{ident(c)})::text" for c in h.key_columns)
    kept_rows = f"{kept} k" if every_bucket else f"(SELECT * FROM {kept} WHERE _rb_bucket = ANY($4::int4[])) k"
    joined = (f"({_live(h, every_bucket=True)}) l LEFT JOIN {kept_rows} ON {join}" if every_bucket
              else f"{kept_rows} FULL JOIN ({_live(h)}) l ON {join}")
    return f"""
WITH d AS MATERIALIZED (
  SELECT CASE WHEN l._rb_xmin IS NULL THEN 'missing' WHEN k._rb_bucket IS NULL THEN 'inserted' ELSE 'changed' END
           AS kind,
         coalesce(k._rb_bucket, l._rb_bucket) AS bucket, ARRAY[{key_text}] AS key, l._rb_xmin AS xmin,
         CASE WHEN l._rb_xmin IS NOT NULL THEN {_kept_writer(kept_has_xmin)} END AS writer
  FROM {joined}
  WHERE k._rb_row_hash IS DISTINCT FROM l._rb_row_hash
)
SELECT 'count' AS what, kind, writer, count(*) AS n, NULL::int4 AS bucket, NULL::text[] AS key, NULL::int8 AS xmin
FROM d GROUP BY kind, writer
UNION ALL
(SELECT 'row', kind, writer, NULL, bucket, key, xmin FROM d
 ORDER BY (CASE WHEN writer IS NULL THEN NOT $7::bool WHEN writer = 'concurrent' THEN NOT $6::bool
                ELSE writer <> 'expected' END) DESC, kind, key
 LIMIT {limit})
"""


def _missing_sql(h: _Hashes, kept: str, limit: int) -> str:
    """Kept rows without a live row (same output as _keyed_sql): an anti join."""
    keys = ", ".join(ident(c) for c in h.key_columns)
    join = " AND ".join(f"k.{ident(c)} = l.{ident(c)}" for c in h.key_columns)
    key_text = ", ".join(f"k.{ident(c)}::text" for c in h.key_columns)
    return f"""
WITH d AS MATERIALIZED (
  SELECT 'missing' AS kind, k._rb_bucket AS bucket, ARRAY[{key_text}] AS key, NULL::int8 AS xmin, NULL::text AS writer
  FROM {kept} k WHERE NOT EXISTS (SELECT FROM (SELECT {keys} FROM {h.source}) l WHERE {join})
)
SELECT 'count' AS what, kind, writer, count(*) AS n, NULL::int4 AS bucket, NULL::text[] AS key, NULL::int8 AS xmin
FROM d GROUP BY kind, writer
UNION ALL
(SELECT 'row', kind, writer, NULL, bucket, key, xmin FROM d ORDER BY key LIMIT {limit})
"""


def _bucket_sql(h: _Hashes) -> str:
    """Per differing bucket ($4): how many live rows each kind of writer left there."""
    return f"""
SELECT _rb_bucket AS bucket, writer, count(*) AS n, max(_rb_xmin) AS xmin
FROM (SELECT _rb_bucket, _rb_xmin, {_writer('l')} AS writer FROM ({_live(h)}) l) w
GROUP BY 1, 2
"""


class _Rules(BaseModel):
    allow_concurrent_writes: bool
    allow_deletes: bool


def _cause(kind: str, writer: str | None, rules: _Rules) -> tuple[Cause, str]:
    """The cause of one row difference and a sentence saying why."""
    if kind == "missing":
        if rules.allow_deletes:
            return "allowed_delete", "row is gone; deletes are allowed"
        return "unexplained", "row is gone and deletes are not allowed (who deleted it cannot be known)"
    if writer == "expected":
        return "rollback_write", "written by a rollback transaction that was meant to rewrite rows"
    if writer == "rollback":
        return "unexplained", "written by a rollback transaction that was not expected to change this table"
    if writer == SAME_VERSION:
        return "unexplained", ("the row differs from the before-snapshot, yet it is the very row version the snapshot "
                               "read: it was changed without a new row version")
    if writer == "copied":
        return "unexplained", "the rollback's table rebuild copied this row from the backup, and it differs from the before-snapshot"
    if writer in ("concurrent", "subtransaction"):
        # Every transaction of the rollback is named in $2, $3 or the rebuild's record: a version
        # newer than the snapshot that none of them wrote is the application's.
        detail = ("written by a transaction that was not visible to the before-snapshot" if writer == "concurrent" else
                  "written by a subtransaction (savepoint, EXCEPTION block) of a transaction in progress at the "
                  "before-snapshot")
        if rules.allow_concurrent_writes:
            return "concurrent_write", detail
        return "unexplained", f"{detail}, and concurrent writes are not allowed"
    return "unexplained", "the row differs but its version is older than the before-snapshot"


def _differing(before: TableFingerprint, after: TableFingerprint) -> list[int]:
    return sorted(b for b in before.buckets.keys() | after.buckets.keys()
                  if before.buckets.get(b) != after.buckets.get(b))


def _check_specs(before: Snapshot, specs: Sequence[TableSpec]) -> None:
    for spec in specs:
        taken = before.tables.get(spec.table)
        if taken is None:
            raise SnapshotMismatch(f"snapshot {before.label!r} has no fingerprint of {spec.table}")
        if taken.key != spec.key or taken.columns != spec.columns:
            raise SnapshotMismatch(f"snapshot {before.label!r} fingerprinted {spec.table} with key {taken.key} "
                                   f"and columns {taken.columns}, not key {spec.key} and columns {spec.columns}")


async def _keyed_differences(conn: asyncpg.Connection, spec: TableSpec, h: _Hashes, kept: str, buckets: list[int],
                             params: list, report: TableReport, rules: _Rules, *, limit: int, every_bucket: bool,
                             timeout: float) -> list[Difference]:
    schema, _, name = kept.partition(".")
    if await conn.fetchval("SELECT to_regclass($1)", qualified(schema, name), timeout=timeout) is None:
        raise KeptRowsMissing(f"the kept rows of {spec.table} ({kept}) are gone: was drop_kept_rows called early?")
    found = []
    has_xmin = await _kept_has_xmin(conn, qualified(schema, name), timeout=timeout)
    rows = await conn.fetch(_keyed_sql(h, qualified(schema, name), limit, every_bucket=every_bucket, kept_has_xmin=has_xmin),
                            *params[:3], buckets, *params[3:], timeout=timeout)  # $1..$7
    if every_bucket:
        # Keys are unique on both sides: every live row without a kept row is an insert, so the
        # kept rows that found their live row are rows_after - inserted; the rest are missing.
        inserted = sum(r["n"] for r in rows if r["what"] == "count" and r["kind"] == "inserted")
        if report.rows_before > report.rows_after - inserted:
            rows += await conn.fetch(_missing_sql(h, qualified(schema, name), limit), timeout=timeout)
    for r in rows:
        cause, detail = _cause(r["kind"], r["writer"], rules)
        if r["what"] == "count":
            setattr(report, r["kind"], getattr(report, r["kind"]) + r["n"])
            _count_cause(report, cause, r["n"])
        else:
            found.append(Difference(table=spec.table, kind=r["kind"], key=dict(zip(spec.key, r["key"], strict=True)),
                                    bucket=r["bucket"], after_xmin=r["xmin"], cause=cause, detail=detail))
    return found


def _count_cause(report: TableReport, cause: Cause, n: int) -> None:
    if cause == "concurrent_write":
        report.concurrent += n
    elif cause == "rollback_write":
        report.rollback += n
    elif cause == "unexplained":
        report.unexplained += n


_SEVERITY = {"unexplained": 3, "rollback_write": 2, "concurrent_write": 1, "allowed_delete": 0}


async def _bucket_differences(conn: asyncpg.Connection, spec: TableSpec, h: _Hashes, before: TableFingerprint,
                              buckets: list[int], params: list, report: TableReport,
                              rules: _Rules, *, timeout: float) -> list[Difference]:
    """Without keys: rows older than the before-snapshot must all still be there; newer ones are classified.

    A live row version whose xmin the before-snapshot saw existed then, so the bucket lost
    (rows_before - old) rows: deleted or rewritten, which without a key cannot be told apart.
    A version that only looks seen ('subtransaction', see `_writer`) counts as old unless the
    counts say it is one too many; then it is the new version of an application write.
    """
    writers: dict[int, dict[str, tuple[int, int]]] = {b: {} for b in buckets}
    for r in await conn.fetch(_bucket_sql(h), *params[:3], buckets, params[3], timeout=timeout):  # $1..$5
        writers[r["bucket"]][r["writer"]] = (r["n"], r["xmin"])
    found = []
    for bucket, by_writer in writers.items():
        rows_before = before.buckets[bucket].rows if bucket in before.buckets else 0
        sub_rows, sub_xmin = by_writer.pop("subtransaction", (0, 0))
        old = by_writer.pop("old", (0, 0))[0] + sub_rows
        if old > rows_before:
            by_writer["subtransaction"] = (old - rows_before, sub_xmin)
            old = rows_before
        causes: list[tuple[Cause, str, int | None]] = []
        if old < rows_before:
            report.missing += rows_before - old
            cause, detail = _cause("missing", None, rules)
            _count_cause(report, cause, rows_before - old)
            causes.append((cause, f"{rows_before - old} of {rows_before} row(s) gone or rewritten: {detail}", None))
        elif not by_writer and sub_rows:  # a row rewritten in a subtransaction: one version out, one in
            cause, detail = _cause("changed", "subtransaction", rules)
            report.changed += 1
            _count_cause(report, cause, 1)
            causes.append((cause, detail, sub_xmin))
        elif not by_writer:  # same old rows, no new ones, yet the fingerprint differs
            report.unexplained += 1
            causes.append(("unexplained", "rows older than the before-snapshot differ from it", None))
        for writer, (n, xmin) in by_writer.items():
            report.inserted += n
            cause, detail = _cause("inserted", writer, rules)
            _count_cause(report, cause, n)
            causes.append((cause, f"{n} new row version(s), newest xmin {xmin}: {detail}", xmin))
        worst = max(causes, key=lambda c: _SEVERITY[c[0]])
        found.append(Difference(table=spec.table, kind="bucket", bucket=bucket, after_xmin=worst[2], cause=worst[0],
                                detail="; ".join(d for _, d, _ in causes)))
    return found


# --------------------------------------------------------------------------- compare: recent rows

# Every live row version whose xmin precedes the before-snapshot's xmin was committed before
# that snapshot was taken (or is frozen: age() is then 2^31-1), so unless something rewrote
# rows without new versions it is one of the kept rows, unchanged. Which live rows are "recent"
# is only a way to choose the few rows to look at one by one; nothing is taken on trust: the
# other live rows must add up EXACTLY (count, key-hash sum, row-hash sum) to the kept rows
# minus the kept versions of the recent keys, which is as strong as the bucket fingerprints
# (the same sums, without the per-bucket split). A delete, a key rewritten in place, or a
# change that left no new row version breaks that equation, and the bucket drill-down runs.
#
# A rollback that rewrote more rows than the limit (a restore that updates every row, a table
# rebuilt by the rollback) would defeat this and cost a join of every kept row with every live
# row (8 s for 7M rows). Then the rows written by the rollback's own transactions ($2, $3) are
# left out of the selection, and so go into the equation with the old rows: if it holds, they
# are all unchanged too (rewritten with the same values), and only the application's few rows
# are looked at one by one. If the rollback changed values, the equation fails as before.
def _recent_sql(h: _Hashes, limit: int, *, skip_rollback_writes: bool = False) -> str:
    """Live rows at least as new as the before-snapshot's xmin ($4: its age), at most `limit` + 1,
    without the rows the rollback transactions wrote if `skip_rollback_writes`."""
    key_text = ", ".join(f"{ident(c)}::text" for c in h.key_columns)
    return f"""
SELECT l._rb_key, l._rb_bucket, l._rb_key_hash, l._rb_row_hash, l._rb_xmin, {_writer('l')} AS writer
FROM (SELECT ARRAY[{key_text}] AS _rb_key, {h.bucket} AS _rb_bucket, {h.key_hash} AS _rb_key_hash,
             {h.row_hash} AS _rb_row_hash, {h.writer_xmin} AS _rb_xmin
      FROM {h.rows} WHERE {h.written_since(skip_rollback_writes)} LIMIT {limit + 1}) l
"""


def _kept_of_sql(kept: str, key_columns: Sequence[str], *, kept_has_xmin: bool) -> str:
    """The kept rows whose key hash is one of $1 (the recent rows' key hashes)."""
    key_text = ", ".join(f"{ident(c)}::text" for c in key_columns)
    xmin = "_rb_xmin" if kept_has_xmin else "NULL::int8 AS _rb_xmin"
    return (f"SELECT ARRAY[{key_text}] AS _rb_key, _rb_bucket, _rb_key_hash, _rb_row_hash, {xmin} FROM {kept} "
            f"WHERE _rb_key_hash = ANY($1::int8[])")


class _Totals(BaseModel):
    rows: int
    keys: int
    values: int

    def minus(self, rows: Sequence[asyncpg.Record]) -> _Totals:
        return _Totals(rows=self.rows - len(rows), keys=self.keys - sum(r["_rb_key_hash"] for r in rows),
                       values=self.values - sum(r["_rb_row_hash"] for r in rows))


async def _recent_differences(conn: asyncpg.Connection, spec: TableSpec, h: _Hashes, taken: TableFingerprint,
                              params: list, rules: _Rules, *,
                              timeout: float) -> tuple[TableReport, list[Difference]] | None:
    """The differences found by looking at recent rows only, or None if that cannot prove the rest unchanged."""
    assert taken.kept_rows is not None
    schema, _, name = taken.kept_rows.partition(".")
    kept = qualified(schema, name)
    if await conn.fetchval("SELECT to_regclass($1)", kept, timeout=timeout) is None:
        raise KeptRowsMissing(f"the kept rows of {spec.table} ({taken.kept_rows}) are gone: "
                              "was drop_kept_rows called early?")
    before_xmin = int(params[0].partition(":")[0]) % XID_MODULUS
    age = await conn.fetchval("SELECT age($1::text::xid)", str(before_xmin), timeout=timeout)
    if not 0 <= age < 2**30:  # the before-snapshot is implausibly old or the xid counter wrapped: do not guess
        return None
    recent = await conn.fetch(_recent_sql(h, RECENT_ROWS_LIMIT), *params[:3], age, params[3], timeout=timeout)
    if len(recent) > RECENT_ROWS_LIMIT and (params[1] or params[2]):
        recent = await conn.fetch(_recent_sql(h, RECENT_ROWS_LIMIT, skip_rollback_writes=True), *params[:3], age,
                                  params[3], timeout=timeout)
    if len(recent) > RECENT_ROWS_LIMIT:
        return None
    row = await conn.fetchrow(f"SELECT count(*) AS rows, sum({h.key_hash}) AS keys, sum({h.row_hash}) AS values "
                              f"FROM {h.source}", timeout=timeout)
    live = _Totals(rows=row["rows"], keys=int(row["keys"] or 0), values=int(row["values"] or 0))
    by_key = {tuple(r["_rb_key"]): r for r in recent}
    key_hashes = sorted({r["_rb_key_hash"] for r in recent})
    has_xmin = await _kept_has_xmin(conn, kept, timeout=timeout)
    kept_rows = (await conn.fetch(_kept_of_sql(kept, h.key_columns, kept_has_xmin=has_xmin), key_hashes, timeout=timeout)
                 if recent else [])
    previous = [r for r in kept_rows if tuple(r["_rb_key"]) in by_key]  # not another key with the same hash
    before = _Totals(rows=taken.rows, keys=int(taken.keys), values=int(taken.values))
    if live.minus(recent) != before.minus(previous):
        return None
    report = TableReport(table=spec.table, rows_before=taken.rows, rows_after=live.rows, differing_buckets=0,
                         keyed=True)
    kept_by_key = {tuple(r["_rb_key"]): r for r in previous}
    found = []
    for key, r in by_key.items():
        old = kept_by_key.get(key)
        if old is not None and old["_rb_row_hash"] == r["_rb_row_hash"]:
            continue  # rewritten with the same values (or committed while the before-snapshot was taken)
        kind: Literal["inserted", "changed"] = "inserted" if old is None else "changed"
        same_version = old is not None and old["_rb_xmin"] is not None and old["_rb_xmin"] == r["_rb_xmin"]
        cause, detail = _cause(kind, SAME_VERSION if same_version else r["writer"], rules)
        setattr(report, kind, getattr(report, kind) + 1)
        _count_cause(report, cause, 1)
        found.append(Difference(table=spec.table, kind=kind, key=dict(zip(spec.key, key, strict=True)), bucket=r["_rb_bucket"],
                                after_xmin=r["_rb_xmin"], cause=cause, detail=detail))
    report.differing_buckets = len({d.bucket for d in found})
    found.sort(key=lambda d: (d.cause != "unexplained", d.kind, list(d.key.values()) if d.key else []))
    return report, found


async def compare(conn: asyncpg.Connection, before: Snapshot, specs: Sequence[TableSpec], *,
                  rollback_xids: set[int] | frozenset[int] = frozenset(),
                  expected_xids: set[int] | frozenset[int] = frozenset(),
                  allow_concurrent_writes: bool = True, allow_deletes: bool = False, limit: int = 100,
                  rebuilt: Mapping[str, RebuiltTable] | None = None, timeout: float = 1800) -> IntegrityReport:
    """Fingerprint the tables again and explain every difference from `before` (see the module doc)."""
    _check_specs(before, specs)
    started = time.monotonic()
    rules = _Rules(allow_concurrent_writes=allow_concurrent_writes, allow_deletes=allow_deletes)
    rollback32 = sorted({x % XID_MODULUS for x in rollback_xids})
    expected32 = sorted({x % XID_MODULUS for x in expected_xids})
    reports: dict[str, TableReport] = {}
    differences: list[Difference] = []
    notes: list[str] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await _set_local(conn, timeout=timeout)
        after_xmax = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
                                         timeout=timeout)
        # $1..$7 of the drill-down queries (the differing buckets, $4, are passed per table).
        params = [before.pg_snapshot, rollback32, expected32, after_xmax, allow_concurrent_writes, allow_deletes]
        for spec in specs:
            taken = before.tables[spec.table]
            h = await _hashes(conn, spec, before.buckets, timeout=timeout)
            if rebuilt and spec.table in rebuilt and spec.key:
                h = h.model_copy(update={"rebuilt": rebuilt[spec.table]})
            if spec.key and taken.kept_rows:
                quick = await _recent_differences(conn, spec, h, taken, params, rules, timeout=timeout)
                if quick is not None:
                    reports[spec.table], found = quick
                    differences += found[:limit]
                    continue
            after = await _fingerprint_table(conn, spec, h, kept=None, timeout=timeout)
            buckets = _differing(taken, after)
            report = TableReport(table=spec.table, rows_before=taken.rows, rows_after=after.rows,
                                 differing_buckets=len(buckets), keyed=bool(spec.key and taken.kept_rows))
            reports[spec.table] = report
            if not buckets:
                continue
            if report.keyed:
                assert taken.kept_rows is not None
                differences += await _keyed_differences(conn, spec, h, taken.kept_rows, buckets, params, report,
                                                        rules, limit=limit, timeout=timeout,
                                                        every_bucket=len(buckets) > before.buckets // 2)
            else:
                notes.append(f"{spec.table}: " + ("no primary key" if not spec.key else "no kept rows")
                             + ", so differences are named by bucket, not by primary key")
                differences += await _bucket_differences(conn, spec, h, taken, buckets, params, report, rules,
                                                         timeout=timeout)
    differences.sort(key=lambda d: -_SEVERITY[d.cause])
    total = sum(r.missing + r.inserted + r.changed for r in reports.values())
    ok = all(r.unexplained == 0 for r in reports.values())
    return IntegrityReport(ok=ok, summary=_summary(ok, reports), label=before.label, tables=reports,
                           differences=differences[:limit], differences_total=total, notes=notes,
                           seconds=round(time.monotonic() - started, 3))


SUMMARY_TABLES = 10


def _summary(ok: bool, reports: dict[str, TableReport]) -> str:
    changed = sorted((r for r in reports.values() if r.differing_buckets), key=lambda r: (-r.unexplained, r.table))
    if not changed:
        return f"integrity ok: {len(reports)} table(s) identical to the snapshot"
    parts = [f"{r.table}: {r.missing} missing, {r.inserted} inserted, {r.changed} changed "
             f"({r.concurrent} concurrent, {r.rollback} by the rollback, {r.unexplained} unexplained)"
             for r in changed[:SUMMARY_TABLES]]
    more = f"; and {len(changed) - SUMMARY_TABLES} more table(s) with differences" if len(changed) > SUMMARY_TABLES else ""
    return ("integrity ok" if ok else "integrity FAILED") + " - " + "; ".join(parts) + more


def brief(report: IntegrityReport, *, stored_as: str, tables: int = 20, differences: int = 20,
          text: int = 200) -> IntegrityBrief:
    differing = sorted((r for r in report.tables.values() if r.differing_buckets), key=lambda r: (-r.unexplained, r.table))
    shown = [d.model_copy(update={"key": {k: None if v is None else v[:text] for k, v in d.key.items()} if d.key else d.key,
                                  "detail": d.detail[:text]})
             for d in report.differences[:differences]]
    return IntegrityBrief(ok=report.ok, summary=report.summary, label=report.label, stored_as=stored_as,
                          tables_checked=len(report.tables), tables={r.table: r for r in differing[:tables]},
                          tables_with_differences=len(differing), differences=shown,
                          differences_total=report.differences_total, notes=[n[:text] for n in report.notes[:tables]],
                          seconds=report.seconds)

"""A snapshot of a database's user tables: what a migration added or destroyed.

Taken with every backup (stored in its manifest) and again before a rollback, so
the difference between two snapshots says which tables and columns a migration
created (archive before dropping) and which it dropped (restore from the backup).
"""

from __future__ import annotations

import asyncpg
from pydantic import BaseModel, Field

# Schemas that belong to PostgreSQL or to this tool, never to the application.
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", "rollback_archive", "rollback_meta")


class Column(BaseModel):
    name: str
    type: str = Field(description="format_type(), e.g. character varying(80)")
    not_null: bool = False


class TableShape(BaseModel):
    schema_name: str
    name: str
    columns: list[Column]
    primary_key: list[str] = Field(default_factory=list, description="empty when the table has none")

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_name}.{self.name}"

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


class SchemaSnapshot(BaseModel):
    tables: dict[str, TableShape] = Field(default_factory=dict, description="by schema.table")


_TABLES = """
SELECT n.nspname AS schema_name, c.relname AS name, c.oid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname <> ALL($1::text[]) AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY 1, 2
"""
_COLUMNS = """
SELECT a.attrelid AS oid, a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null
FROM pg_attribute a
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_PRIMARY_KEYS = """
SELECT i.indrelid AS oid, array_agg(a.attname ORDER BY k.ord) AS columns
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indisprimary AND i.indrelid = ANY($1::oid[])
GROUP BY i.indrelid
"""


async def snapshot(conn: asyncpg.Connection) -> SchemaSnapshot:
    tables = await conn.fetch(_TABLES, list(SYSTEM_SCHEMAS))
    oids = [t["oid"] for t in tables]
    columns: dict[int, list[Column]] = {}
    for row in await conn.fetch(_COLUMNS, oids):
        columns.setdefault(row["oid"], []).append(Column(name=row["name"], type=row["type"], not_null=row["not_null"]))
    keys = {row["oid"]: list(row["columns"]) for row in await conn.fetch(_PRIMARY_KEYS, oids)}
    shapes = [TableShape(schema_name=t["schema_name"], name=t["name"], columns=columns.get(t["oid"], []),
                         primary_key=keys.get(t["oid"], [])) for t in tables]
    return SchemaSnapshot(tables={s.qualified_name: s for s in shapes})

"""PostgreSQL plumbing shared by the database target: DSNs, identifiers, connections.

DSNs never travel through workflows: configs name an environment variable
(`dsn_env`), and only activities resolve it with `dsn_from_env`.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg


class MissingDsn(RuntimeError):
    """The environment variable that should hold a DSN is not set."""


def local_dsn(database: str | None = None) -> str:
    """The server this machine runs (DATABASE_URL, else PG* variables, else 127.0.0.1:5432 as postgres)."""
    if os.environ.get("DATABASE_URL"):
        dsn = os.environ["DATABASE_URL"]
    else:
        user = os.environ.get("PGUSER", "postgres")
        password = os.environ.get("PGPASSWORD")
        auth = quote(user) + (f":{quote(password)}" if password else "")
        host, port = os.environ.get("PGHOST", "127.0.0.1"), os.environ.get("PGPORT", "5432")
        dsn = f"postgresql://{auth}@{host}:{port}/{os.environ.get('PGDATABASE', 'postgres')}"
    return with_database(dsn, database) if database else dsn


def with_database(dsn: str, database: str, *, password: str | None = None) -> str:
    """The same server and user, another database (and optionally a password to embed)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if password and parts.password is None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user or 'postgres'}:{quote(password)}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


def database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/") or os.environ.get("PGDATABASE", "postgres")


def dsn_from_env(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise MissingDsn(f"environment variable {variable} (the database DSN) is not set on the worker")
    return value


def ident(name: str) -> str:
    """A quoted SQL identifier; names from catalogs and configs are never pasted raw."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    return f"{ident(schema)}.{ident(table)}"


async def quote_literal(conn: asyncpg.Connection, text: str | None) -> str:
    """A SQL string literal (NULL for None) for the few statements that take no parameters (DDL),
    quoted by the server itself: doubling quotes client-side is wrong under
    standard_conforming_strings = off, where a backslash escapes the quote that follows it."""
    return await conn.fetchval("SELECT quote_nullable($1::text)", text)


# Sessions that join, fold and index whole tables (the restore of captured images, a table rebuild):
# with the default 4 MB a hash join of two 7M-row images splits into ~100 batches written to
# temporary files, and a primary key on 7M rows sorts on disk; JIT compilation costs seconds on
# these one-off statements and buys nothing. One such session runs per rollback.
BULK_SESSION_SETTINGS = {"work_mem": "256MB", "maintenance_work_mem": "512MB", "jit": "off"}


async def connect(dsn: str, *, timeout: float = 10, application_name: str = "rollback") -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=timeout, server_settings={"application_name": application_name})


def written_after(snapshot: str, *, alias: str = "t") -> str:
    """SQL: the row `alias` may have been written by a transaction the snapshot (pg_current_snapshot()
    text) could not see. Conservative: every row whose xmin is not older than the snapshot's xmin.

    pg_visible_in_snapshot cannot decide it: the snapshot lists transactions in progress but not
    their subtransactions, so a row written in a savepoint of a transaction in progress then looks
    visible (and a table rebuild would put the backup's older value back). Rows that completed in
    the window [xmin, xmax) before the snapshot are taken too: re-syncing or re-copying them again
    is harmless. Frozen and bootstrap xids (< 3) are old. The snapshot text is checked by the
    pattern before it is pasted in.
    """
    if not re.fullmatch(r"\d+:\d+:[\d,]*", snapshot):
        raise ValueError(f"not a pg_snapshot: {snapshot[:80]!r}")
    oldest = int(snapshot.partition(":")[0]) & 0xFFFFFFFF
    return f"(age({alias}.xmin) <= age('{oldest}'::xid) AND {alias}.xmin::text::int8 >= 3)"

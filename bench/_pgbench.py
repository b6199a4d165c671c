"""The benchmarks' shared pgbench database: scale 70 (7,000,000 rows in pgbench_accounts).

Created once with `pgbench -i -s 70` and reused while its row count is right; benchmarks
that change it work on a copy (CREATE DATABASE ... TEMPLATE), never on this one.
"""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import asyncpg

from rollback.targets.database.pg import ident, local_dsn

DATABASE = "rb_bench_pgbench"
SCALE = 70
ROWS = SCALE * 100_000


def _pg_env() -> dict[str, str]:
    import os

    parts = urlsplit(local_dsn())
    env = dict(os.environ)
    env.update(PGHOST=parts.hostname or "127.0.0.1", PGPORT=str(parts.port or 5432), PGUSER=parts.username or "postgres")
    if parts.password:
        env["PGPASSWORD"] = parts.password
    return env


async def ensure_pgbench() -> str:
    """The DSN of the scale-70 pgbench database, initialising it if missing or wrong (~20 s)."""
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
        if exists:
            conn = await asyncpg.connect(local_dsn(DATABASE), timeout=10)
            try:
                rows = await conn.fetchval("SELECT count(*) FROM pgbench_accounts") if await conn.fetchval(
                    "SELECT to_regclass('public.pgbench_accounts') IS NOT NULL") else -1
            finally:
                await conn.close()
            if rows == ROWS:
                return local_dsn(DATABASE)
            await admin.execute(f"DROP DATABASE {ident(DATABASE)} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {ident(DATABASE)}")
    finally:
        await admin.close()
    subprocess.run(["pgbench", "-i", "-s", str(SCALE), "-q", DATABASE], env=_pg_env(), check=True,
                   capture_output=True, timeout=900)
    return local_dsn(DATABASE)


async def copy_of_pgbench(name: str) -> str:
    """A writable copy (CREATE DATABASE ... TEMPLATE; the template must have no sessions)."""
    await ensure_pgbench()
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {ident(name)} TEMPLATE {ident(DATABASE)}", timeout=600)
    finally:
        await admin.close()
    return local_dsn(name)


async def drop(name: str) -> None:
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
    finally:
        await admin.close()

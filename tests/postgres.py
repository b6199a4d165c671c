"""Fresh PostgreSQL databases on the machine's real server, dropped after each test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from rollback.targets.database.pg import ident, local_dsn


async def create_database(prefix: str = "rb_test", options: str = "") -> str:
    """A new database `<prefix>_<random>`; `options` are CREATE DATABASE's (e.g. ENCODING ...)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {ident(name)} {options}")
    finally:
        await admin.close()
    return name


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def database() -> AsyncIterator[str]:
    """The name of a new, empty database; its DSN is rollback.targets.database.pg.local_dsn(name)."""
    name = await create_database()
    try:
        yield name
    finally:
        await drop_database(name)

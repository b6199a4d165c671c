"""PAUSE/RESUME against a real PgBouncer in front of a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from rollback.targets.database.pgbouncer import PgBouncerError, PgBouncerSettings, is_paused, pause, paused, resume, waiting_clients
from tests.pgbouncer import PgBouncer, pgbouncer, stop_pgbouncer  # noqa: F401
from tests.postgres import database  # noqa: F401

DEADLINE_SECONDS = 10.0


async def app_connection(bouncer: PgBouncer, *, application_name: str = "app") -> asyncpg.Connection:
    # Transaction pooling: no named prepared statements across transactions.
    return await asyncpg.connect(bouncer.client_dsn, timeout=5, statement_cache_size=0,
                                 server_settings={"application_name": application_name})


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE_SECONDS:g}s: {what}")
        await asyncio.sleep(0.05)


async def test_queries_wait_while_paused_and_run_after_resume(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings()
    app = await app_connection(pgbouncer)
    try:
        async with paused(settings):
            assert await is_paused(settings)
            query = asyncio.create_task(app.fetchval("SELECT 41 + 1"))
            # PgBouncer itself reports the query's client as waiting for a server connection.
            await eventually(lambda: _at_least_one_waiting(settings), "the application query waits in pgbouncer")
            assert not query.done()
        assert await asyncio.wait_for(query, DEADLINE_SECONDS) == 42
        assert not await is_paused(settings)
    finally:
        await app.close()


async def _at_least_one_waiting(settings: PgBouncerSettings) -> bool:
    return await waiting_clients(settings) >= 1


async def test_resumes_when_the_body_raises(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings()
    with pytest.raises(RuntimeError, match="migration failed"):
        async with paused(settings):
            assert await is_paused(settings)
            raise RuntimeError("migration failed")
    assert not await is_paused(settings)
    app = await app_connection(pgbouncer)
    try:
        assert await asyncio.wait_for(app.fetchval("SELECT 1"), DEADLINE_SECONDS) == 1
    finally:
        await app.close()


async def test_resumes_when_the_task_is_cancelled_inside_the_block(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings()
    entered = asyncio.Event()

    async def critical_section() -> None:
        async with paused(settings):
            entered.set()
            await asyncio.Event().wait()  # until cancelled, like a long DDL step

    task = asyncio.create_task(critical_section())
    await asyncio.wait_for(entered.wait(), DEADLINE_SECONDS)
    assert await is_paused(settings)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_SECONDS)
    assert not await is_paused(settings)


async def test_a_second_cancellation_does_not_interrupt_the_resume(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings()
    entered = asyncio.Event()

    async def critical_section() -> None:
        async with paused(settings):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(critical_section())
    await asyncio.wait_for(entered.wait(), DEADLINE_SECONDS)
    task.cancel()
    # One loop turn: the task takes the first cancellation and starts RESUME in its `finally`
    # (nothing before that awaits), so the second cancellation lands while it resumes.
    await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_SECONDS)
    assert not await is_paused(settings)


async def test_pause_blocked_by_open_transaction_times_out_and_leaves_pool_running(pgbouncer: PgBouncer) -> None:
    holder = await app_connection(pgbouncer, application_name="nightly-report")
    transaction = holder.transaction()
    await transaction.start()
    backend_pid = await holder.fetchval("SELECT pg_backend_pid()")  # the transaction now owns a server
    settings = pgbouncer.settings(pause_timeout_seconds=1)
    try:
        with pytest.raises(PgBouncerError) as caught:
            async with paused(settings):
                pytest.fail("the body must not run when PAUSE timed out")
        message = str(caught.value)
        assert f"127.0.0.1:{pgbouncer.port}" in message and pgbouncer.database in message
        assert "PAUSE timed out after 1s" in message
        assert f"backend pid {backend_pid}" in message and "nightly-report" in message
        assert "the pool was resumed" in message
        assert not await is_paused(settings)
        other = await app_connection(pgbouncer)
        try:
            assert await asyncio.wait_for(other.fetchval("SELECT 2"), DEADLINE_SECONDS) == 2
        finally:
            await other.close()
    finally:
        await transaction.rollback()
        await holder.close()


async def test_cancelling_a_pending_pause_resumes_the_pool(pgbouncer: PgBouncer) -> None:
    holder = await app_connection(pgbouncer)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1")
    settings = pgbouncer.settings(pause_timeout_seconds=30)
    try:
        task = asyncio.create_task(pause(settings))
        # PgBouncer marks the pool paused as soon as PAUSE arrives, while it waits for the transaction.
        await eventually(lambda: is_paused(settings), "PAUSE reached pgbouncer")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE_SECONDS)
        assert not await is_paused(settings)
    finally:
        await transaction.rollback()
        await holder.close()


async def test_wrong_admin_password_fails_cleanly_without_the_password(
        pgbouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "not-the-admin-password-7f3a"
    monkeypatch.setenv("RB_TEST_WRONG_PGBOUNCER_PASSWORD", wrong)
    settings = pgbouncer.settings(password_env="RB_TEST_WRONG_PGBOUNCER_PASSWORD")
    with pytest.raises(PgBouncerError) as caught:
        async with paused(settings):
            pytest.fail("the body must not run without a PAUSE")
    message = str(caught.value)
    assert "authentication failed" in message and f"127.0.0.1:{pgbouncer.port}" in message
    assert wrong not in message and os.environ[pgbouncer.admin_password_env] not in message
    assert not await is_paused(pgbouncer.settings())


async def test_missing_password_variable_is_named(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings(password_env="RB_TEST_UNSET_PGBOUNCER_PASSWORD")
    with pytest.raises(PgBouncerError, match="RB_TEST_UNSET_PGBOUNCER_PASSWORD .*is not set"):
        await pause(settings)


async def test_unknown_database_entry_is_named(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings(database="no_such_entry")
    with pytest.raises(PgBouncerError, match="no_such_entry"):
        await pause(settings)
    with pytest.raises(PgBouncerError, match="no database entry named no_such_entry"):
        await is_paused(settings)


async def test_resume_is_idempotent(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings()
    await resume(settings)  # never paused
    assert not await is_paused(settings)
    await pause(settings)
    assert await is_paused(settings)
    await resume(settings)
    await resume(settings)
    assert not await is_paused(settings)


async def test_failed_resume_says_the_pool_is_still_paused_and_how_to_resume(pgbouncer: PgBouncer) -> None:
    settings = pgbouncer.settings()
    with pytest.raises(PgBouncerError) as caught:
        async with paused(settings):
            stop_pgbouncer(pgbouncer)  # the admin console is gone: RESUME cannot get through
    message = str(caught.value)
    assert "STILL PAUSED" in message
    assert f"psql -h 127.0.0.1 -p {pgbouncer.port} -U rb_admin pgbouncer -c 'RESUME \"{pgbouncer.database}\"'" in message

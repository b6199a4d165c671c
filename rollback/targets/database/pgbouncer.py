"""PAUSE and RESUME an application's PgBouncer pool around a database rollback's critical section.

While DDL waits for an ACCESS EXCLUSIVE lock, every application query behind it queues on
the lock and holds a server connection; pausing the pool instead makes the application's
queries wait inside PgBouncer, and they run normally once the pool is resumed. The hard
part is never leaving the pool paused: `paused()` resumes on success, exception,
cancellation (how a Temporal activity cancellation arrives) and when PAUSE itself times
out (PAUSE waits for running server transactions, so one long transaction blocks it).

The admin console (virtual database "pgbouncer") speaks only the simple query protocol.
asyncpg can send PAUSE/RESUME that way (`execute` without arguments) but cannot return
rows from a simple query, and SHOW DATABASES/SERVERS rows are what tell us whether a
pool is paused and which transactions block a PAUSE. So every admin command goes through
`psql --csv` (PostgreSQL's client, installed wherever pg_dump is): one mechanism, rows
included, the password passed only in the child's PGPASSWORD, never on a command line.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import os
import shlex
import shutil
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Literal, TypeVar


from rollback.targets.database.config import PgBouncerSettings
from rollback.targets.database.pg import ident

T = TypeVar("T")

ADMIN_DATABASE = "pgbouncer"
COMMAND_TIMEOUT_SECONDS = 5.0
RESUME_TIMEOUT_SECONDS = 3.0
RESUME_ATTEMPTS = 3
RESUME_RETRY_DELAY_SECONDS = 0.5

ShowWhat = Literal["DATABASES", "POOLS", "SERVERS"]


class PgBouncerError(RuntimeError):
    """An admin command failed; the message names the PgBouncer, the database and what failed."""


class _CommandTimedOut(PgBouncerError):
    """The admin command did not answer in time (it may still have taken effect)."""


def _where(settings: PgBouncerSettings) -> str:
    return f"pgbouncer {settings.host}:{settings.port} database {settings.database}"


def _password(settings: PgBouncerSettings) -> str | None:
    if settings.password_env is None:
        return None
    value = os.environ.get(settings.password_env)
    if not value:
        raise PgBouncerError(
            f"{_where(settings)}: environment variable {settings.password_env} "
            "(the pgbouncer admin password) is not set on the worker"
        )
    return value


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        raise PgBouncerError("psql (PostgreSQL client) is not installed; it is needed to talk to the pgbouncer admin console")
    return found


def _environment(settings: PgBouncerSettings, password: str | None, timeout: float) -> dict[str, str]:
    # Drop the worker's own PG* settings: PGOPTIONS, PGSERVICE or PGDATABASE meant for the
    # application database would break or redirect an admin console login.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(
        PGHOST=settings.host,
        PGPORT=str(settings.port),
        PGUSER=settings.admin_user,
        PGDATABASE=ADMIN_DATABASE,
        PGAPPNAME="rollback",
        # libpq wants whole seconds, at least 2.
        PGCONNECT_TIMEOUT=str(max(2, math.ceil(min(timeout, COMMAND_TIMEOUT_SECONDS)))),
    )
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def _clean(text: str, password: str | None) -> str:
    """psql's error as one line without its prefixes, and never the password even if echoed."""
    message = " ".join(text.split()) or "no error message"
    for prefix in ("psql: error: ", "ERROR: "):
        message = message.removeprefix(prefix)
    if password:
        message = message.replace(password, "***")
    return message


async def _admin(settings: PgBouncerSettings, command: str, *, timeout: float) -> str:
    """Run one admin console command; its CSV output (empty for PAUSE/RESUME)."""
    password = _password(settings)
    process = await asyncio.create_subprocess_exec(
        _psql(), "--no-psqlrc", "--no-password", "--csv", "--quiet", "-v", "ON_ERROR_STOP=1", "-c", command,
        env=_environment(settings, password, timeout),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        raise _CommandTimedOut(f"{_where(settings)}: {command} got no answer within {timeout:g}s") from None
    finally:
        # Timeout or cancellation: closing the admin connection does not undo a PAUSE that
        # was already sent; callers resume explicitly.
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise PgBouncerError(f"{_where(settings)}: {command} failed: {_clean(stderr.decode(errors='replace'), password)}")
    return stdout.decode(errors="replace")


async def _show(settings: PgBouncerSettings, what: ShowWhat, *, timeout: float = COMMAND_TIMEOUT_SECONDS) -> list[dict[str, str]]:
    """The rows of an admin console SHOW command, as column name -> text."""
    output = await _admin(settings, f"SHOW {what}", timeout=timeout)
    return list(csv.DictReader(io.StringIO(output)))


async def is_paused(settings: PgBouncerSettings) -> bool:
    """True from the moment PAUSE is sent (even while it still waits for transactions) until RESUME."""
    for row in await _show(settings, "DATABASES"):
        if row.get("name") == settings.database:
            return row.get("paused") == "1"
    raise PgBouncerError(f"{_where(settings)}: pgbouncer has no database entry named {settings.database}")


async def waiting_clients(settings: PgBouncerSettings) -> int:
    """How many application clients wait in pgbouncer for a server of this database (held by a PAUSE)."""
    rows = await _show(settings, "POOLS")
    return sum(int(row.get("cl_waiting") or 0) for row in rows if row.get("database") == settings.database)


async def resume(settings: PgBouncerSettings, *, timeout: float = RESUME_TIMEOUT_SECONDS) -> None:
    """RESUME the pool; a pool that is not paused is left as it is (idempotent)."""
    try:
        await _admin(settings, f"RESUME {ident(settings.database)}", timeout=timeout)
    except PgBouncerError as error:
        # pgbouncer answers "database X is not paused": the end state we want already holds.
        if "is not paused" not in str(error):
            raise


async def pause(settings: PgBouncerSettings) -> None:
    """PAUSE the pool, waiting at most settings.pause_timeout_seconds for running transactions.

    If PAUSE times out or the caller is cancelled meanwhile, the pool is resumed before
    this returns: a half-finished PAUSE keeps holding new application queries otherwise.
    """
    try:
        await _admin(settings, f"PAUSE {ident(settings.database)}", timeout=settings.pause_timeout_seconds)
    except _CommandTimedOut:
        pass
    except asyncio.CancelledError:
        await _uncancellable(_resume_reliably(settings))
        raise
    else:
        return
    # The PAUSE is still pending inside pgbouncer (it outlives our admin connection). List
    # the blockers while they are still there, and resume even if that listing is cancelled.
    try:
        busy = await _busy_servers(settings)
    finally:
        await _uncancellable(_resume_reliably(settings))
    raise PgBouncerError(
        f"{_where(settings)}: PAUSE timed out after {settings.pause_timeout_seconds:g}s "
        f"waiting for {busy}; the pool was resumed"
    )


@asynccontextmanager
async def paused(settings: PgBouncerSettings) -> AsyncIterator[None]:
    """Hold the pool paused for the body; RESUME on every way out (return, raise, cancel)."""
    await pause(settings)
    try:
        yield
    finally:
        await _uncancellable(_resume_reliably(settings))


async def _busy_servers(settings: PgBouncerSettings) -> str:
    """Which server connections still run a transaction (what a PAUSE is waiting for)."""
    try:
        rows = await _show(settings, "SERVERS")
    except PgBouncerError as error:
        return f"running transactions (could not list them: {error})"
    busy = [row for row in rows if row.get("database") == settings.database and row.get("state") == "active"]
    if not busy:
        return "running transactions (none visible any more)"
    described = ", ".join(
        f"backend pid {row.get('remote_pid', '?')} (user {row.get('user', '?')}, "
        f"application '{row.get('application_name', '')}', busy since {row.get('request_time', '?')})"
        for row in busy
    )
    return f"{len(busy)} transaction(s) still running: {described}"


async def _resume_reliably(settings: PgBouncerSettings) -> None:
    last: PgBouncerError | None = None
    for attempt in range(RESUME_ATTEMPTS):
        if attempt:
            await asyncio.sleep(RESUME_RETRY_DELAY_SECONDS)  # back-off between retries, not a sync wait
        try:
            await resume(settings)
            return
        except PgBouncerError as error:
            last = error
    command = shlex.join(["psql", "-h", settings.host, "-p", str(settings.port), "-U", settings.admin_user,
                          ADMIN_DATABASE, "-c", f"RESUME {ident(settings.database)}"])
    raise PgBouncerError(
        f"{_where(settings)}: the pool is STILL PAUSED (application queries are waiting): "
        f"RESUME failed {RESUME_ATTEMPTS} times, last: {last}; an operator must run: {command}"
    )


async def _uncancellable(awaitable: Awaitable[T]) -> T:
    """Finish the awaitable even if our task is cancelled meanwhile, then pass the cancellation on.

    Used for RESUME: a cancelled activity that exits with the pool still paused would
    stall the application until someone notices.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        task.result()  # a failed RESUME (pool still paused) matters more than the cancellation
        raise asyncio.CancelledError
    return task.result()

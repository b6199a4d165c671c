"""A real PgBouncer (/usr/sbin/pgbouncer) in front of one database of the local PostgreSQL.

Transaction pooling, like production setups that PAUSE around migrations. Clients and
the admin console authenticate with SCRAM against an auth_file, so the admin password is
really required (tests check a wrong one fails); PgBouncer then logs in to PostgreSQL as
the application user, with that user's upstream password if the server wants one.

PgBouncer refuses to run as root: as root (here and on CI) it runs with `-u` as an
unprivileged user, and its temporary directory is handed over to that user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import pytest_asyncio

from rollback.ports import free_port
from rollback.targets.database.pg import local_dsn
from rollback.targets.database.pgbouncer import PgBouncerError, PgBouncerSettings, is_paused

PGBOUNCER = "/usr/sbin/pgbouncer"
ADMIN_USER = "rb_admin"
READY_SECONDS = 10.0
STOP_SECONDS = 5.0
POLL_SECONDS = 0.05


class PgBouncerHarnessError(RuntimeError):
    """The test PgBouncer did not start or stop; the message includes its log."""


@dataclass
class PgBouncer:
    port: int
    database: str
    admin_password_env: str  # name of the environment variable holding the admin password
    client_dsn: str  # how the application reaches the database through PgBouncer
    directory: Path
    process: subprocess.Popen[bytes]

    def settings(self, **overrides: Any) -> PgBouncerSettings:
        values: dict[str, Any] = dict(host="127.0.0.1", port=self.port, admin_user=ADMIN_USER,
                                      password_env=self.admin_password_env, database=self.database)
        return PgBouncerSettings(**(values | overrides))

    def log(self) -> str:
        parts = [path.read_text(errors="replace") for path in (self.directory / "stderr.log", self.directory / "pgbouncer.log")
                 if path.exists()]
        return "\n".join(parts)[-3000:]


def _run_as() -> str | None:
    """The user PgBouncer switches to when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PgBouncerHarnessError("running as root, and neither user postgres nor nobody exists for pgbouncer -u")


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _write_config(directory: Path, *, port: int, database: str, admin_password: str) -> tuple[str, str]:
    """pgbouncer.ini and the auth_file; returns the application user and password."""
    upstream = urlsplit(local_dsn())
    app_user = upstream.username or "postgres"
    # With the upstream password in the auth_file PgBouncer can also log in to a server that asks for one.
    app_password = upstream.password or secrets.token_urlsafe(12)
    users = directory / "users.txt"
    users.write_text("".join(f'{_quoted(name)} {_quoted(secret)}\n' for name, secret in
                             ((ADMIN_USER, admin_password), (app_user, app_password))))
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{database} = host={upstream.hostname or '127.0.0.1'} port={upstream.port or 5432} dbname={database}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {users}\n"
        f"admin_users = {ADMIN_USER}\n"
        "pool_mode = transaction\n"
        "default_pool_size = 5\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
    )
    return app_user, app_password


def _hand_over(directory: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for path in [directory, *directory.iterdir()]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    (directory / "users.txt").chmod(0o600)  # passwords: readable by pgbouncer's user only


async def start_pgbouncer(database: str, *, admin_password_env: str) -> PgBouncer:
    """Start PgBouncer for `database`; the admin password is read from `admin_password_env`."""
    if not re.fullmatch(r"[a-z0-9_]+", database):
        raise PgBouncerHarnessError(f"database name {database!r} is not a plain identifier")
    directory = Path(tempfile.mkdtemp(prefix="rb-pgbouncer-"))
    port = free_port()
    app_user, app_password = _write_config(directory, port=port, database=database,
                                           admin_password=os.environ[admin_password_env])
    user = _run_as()
    _hand_over(directory, user)
    command = [PGBOUNCER, *(["-u", user] if user else []), str(directory / "pgbouncer.ini")]
    with open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(port=port, database=database, admin_password_env=admin_password_env,
                        client_dsn=f"postgresql://{quote(app_user)}:{quote(app_password)}@127.0.0.1:{port}/{database}",
                        directory=directory, process=process)
    try:
        await _wait_ready(bouncer)
    except BaseException:
        stop_pgbouncer(bouncer)
        raise
    return bouncer


async def _wait_ready(bouncer: PgBouncer) -> None:
    """Ready once the admin console logs us in and knows the database entry."""
    deadline = time.monotonic() + READY_SECONDS
    while True:
        if bouncer.process.poll() is not None:
            raise PgBouncerHarnessError(f"pgbouncer exited with {bouncer.process.returncode}: {bouncer.log()}")
        try:
            await is_paused(bouncer.settings())
            return
        except PgBouncerError as error:
            if time.monotonic() > deadline:
                raise PgBouncerHarnessError(f"pgbouncer not ready within {READY_SECONDS:g}s ({error}): {bouncer.log()}") from None
        await asyncio.sleep(POLL_SECONDS)


def stop_pgbouncer(bouncer: PgBouncer) -> None:
    """SIGTERM (immediate shutdown), SIGKILL if it lingers; then remove its directory."""
    try:
        if bouncer.process.poll() is None:
            bouncer.process.send_signal(signal.SIGTERM)
            try:
                bouncer.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                bouncer.process.kill()
                bouncer.process.wait(timeout=STOP_SECONDS)
    finally:
        shutil.rmtree(bouncer.directory, ignore_errors=True)


@pytest_asyncio.fixture
async def pgbouncer(database: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PgBouncer]:
    """A running PgBouncer in front of the fresh `database` (from tests.postgres)."""
    env = f"RB_TEST_PGBOUNCER_PASSWORD_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv(env, secrets.token_urlsafe(16))
    bouncer = await start_pgbouncer(database, admin_password_env=env)
    try:
        yield bouncer
    finally:
        stop_pgbouncer(bouncer)

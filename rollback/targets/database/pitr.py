"""Point-in-time recovery: the last resort of a database rollback.

A base backup plus archived WAL is replayed by a real `postgres` in a scratch instance up to
a restore point (or a timestamp); the target database is copied out of it into a NEW
database on the live server, and the live and new databases are swapped by renaming. The
live database is never dropped: it is renamed to `retired`, so nothing is destroyed.

Everything written after the target is lost; `describe_loss` says how much, for the person
who approves.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from rollback.targets.database.pg import connect, database_name, ident, quote_literal, with_database
from rollback.ports import free_port

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
# Marks a database copy_database is building, so a retry may drop it but never someone else's.
COPY_IN_PROGRESS = "rollback-pitr: copy in progress"
COPY_COMPLETE = "rollback-pitr: copy complete"
# Unix socket paths are limited to 107 bytes; the socket file name adds ".s.PGSQL.<port>".
MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535")

Progress = Callable[[str], None]


class PitrError(RuntimeError):
    """Base class: one step of point-in-time recovery failed."""


class CommandFailed(PitrError):
    """An external program (pg_basebackup, pg_dump, ...) failed or timed out."""


class BaseBackupFailed(PitrError):
    """The base backup could not be taken or read."""


class RecoveryFailed(PitrError):
    """The scratch instance did not recover to the requested target."""


class CopyFailed(PitrError):
    """The recovered database could not be copied into a new database."""


class SwapFailed(PitrError):
    """The live and replacement databases could not be swapped."""


class SessionsConnected(SwapFailed):
    """Sessions stayed connected to a database that must be renamed."""


def _default_run_as() -> str | None:
    # initdb and postgres refuse to run as root; as root we run them as the postgres OS user.
    return "postgres" if os.geteuid() == 0 else None


class PitrSource(BaseModel):
    """Where the base backup and the WAL archive are, and how to run PostgreSQL's binaries."""

    model_config = ConfigDict(frozen=True)

    base_backup_dir: Path
    wal_archive_dir: Path
    pg_bin_dir: Path = DEFAULT_PG_BIN
    run_as: str | None = Field(default_factory=_default_run_as)
    # The role to connect as in the recovered instance (over its private socket, trust auth).
    superuser: str = "postgres"


class BaseBackupInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    directory: Path
    start_lsn: str
    start_wal_file: str
    timeline: int
    # START TIME as the server wrote it in backup_label (its log_timezone), and parsed when possible.
    start_time_text: str
    start_time: datetime | None


class RecoveryTarget(BaseModel):
    """Exactly one of a restore point name (pg_create_restore_point) or a timezone-aware time."""

    model_config = ConfigDict(frozen=True)

    restore_point: str | None = None
    time: datetime | None = None
    inclusive: bool = True

    @model_validator(mode="after")
    def _exactly_one(self) -> RecoveryTarget:
        if (self.restore_point is None) == (self.time is None):
            raise ValueError("recovery target: give exactly one of restore_point or time")
        if self.restore_point is not None and not self.restore_point.strip():
            raise ValueError("recovery target: restore_point is empty")
        if self.time is not None and self.time.utcoffset() is None:
            raise ValueError("recovery target: time must be timezone-aware (e.g. 2026-01-01T12:00:00+00:00)")
        return self

    def describe(self) -> str:
        if self.restore_point is not None:
            return f"restore point {self.restore_point!r}"
        assert self.time is not None
        return f"time {self.time.isoformat()}"


class RecoveredInstance(BaseModel):
    """A promoted scratch PostgreSQL holding the recovered data; reachable only over its own socket."""

    data_dir: Path
    socket_dir: Path
    port: int
    log_file: Path
    user: str
    pg_bin_dir: Path = DEFAULT_PG_BIN
    run_as: str | None = None
    _process: asyncio.subprocess.Process | None = PrivateAttr(default=None)

    def dsn(self, database: str = "postgres") -> str:
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{quote(self.user)}@/{quote(database)}?host={host}&port={self.port}"

    async def stop(self, *, timeout: float = 60) -> None:
        """Fast shutdown; a no-op when it is not running (so stop() may be called twice)."""
        if (self.data_dir / "postmaster.pid").exists():
            await _run([str(self.pg_bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast",
                        "-w", "-t", str(int(timeout))], timeout=timeout + 10, run_as=self.run_as,
                       what="pg_ctl stop (recovered instance)", check=False)
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def __aenter__(self) -> RecoveredInstance:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---------------------------------------------------------------------------------------------
# Subprocesses and secrets


def _password(dsn: str) -> str | None:
    password = urlsplit(dsn).password
    return unquote(password) if password else None


def _without_password(dsn: str) -> str:
    """The DSN for argv (visible in ps): the password travels in PGPASSWORD instead."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def _redact(text: str, secrets: Sequence[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def _user_ids(run_as: str | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    try:
        entry = pwd.getpwnam(run_as)
    except KeyError:
        raise PitrError(f"OS user {run_as!r} (run_as, to run PostgreSQL's binaries) does not exist") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


async def _run(argv: list[str], *, timeout: float, what: str, run_as: str | None = None,
               password: str | None = None, check: bool = True, error: type[PitrError] = CommandFailed) -> str:
    """Run a program to completion within `timeout`; on failure raise `error` with its stderr (redacted)."""
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, **_user_ids(run_as))
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise error(f"{what} did not finish within {timeout:.0f} s") from None
    if check and process.returncode != 0:
        detail = _redact(err.decode(errors="replace").strip() or out.decode(errors="replace").strip(), [password])
        raise error(f"{what} failed (exit {process.returncode}): {detail[-2000:]}")
    return out.decode(errors="replace")


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


# ---------------------------------------------------------------------------------------------
# Base backup


async def take_base_backup(*, dsn: str, target_dir: Path, pg_bin_dir: Path = DEFAULT_PG_BIN,
                           timeout: float = 3600, progress: Progress | None = None) -> BaseBackupInfo:
    """A plain-format base backup without WAL (the archive supplies it), written atomically.

    The backup goes to `<target_dir>.partial` and is renamed when complete, so a retry after a
    crash starts over cleanly, and an existing target_dir is a finished backup (returned as is).
    """
    target_dir = Path(target_dir)
    if target_dir.exists():
        return read_backup_label(target_dir)
    partial = target_dir.with_name(target_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, f"taking base backup of {database_name(dsn)}'s server into {target_dir}")
    await _run([str(pg_bin_dir / "pg_basebackup"), "-d", _without_password(dsn), "-D", str(partial),
                "-Fp", "-X", "none", "--checkpoint=fast", "--no-password"],
               timeout=timeout, what="pg_basebackup", password=_password(dsn), error=BaseBackupFailed)
    partial.rename(target_dir)
    return read_backup_label(target_dir)


def read_backup_label(directory: Path) -> BaseBackupInfo:
    label_file = Path(directory) / "backup_label"
    try:
        text = label_file.read_text()
    except OSError as exc:
        raise BaseBackupFailed(f"{directory} is not a base backup: cannot read backup_label ({exc.strerror})") from None
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    start = re.fullmatch(r"(\S+) \(file (\S+)\)", fields.get("START WAL LOCATION", ""))
    if start is None or "START TIME" not in fields:
        raise BaseBackupFailed(f"{label_file} has no START WAL LOCATION / START TIME")
    return BaseBackupInfo(directory=Path(directory), start_lsn=start[1], start_wal_file=start[2],
                          timeline=int(fields.get("START TIMELINE", "1")),
                          start_time_text=fields["START TIME"], start_time=_parse_label_time(fields["START TIME"]))


def _parse_label_time(text: str) -> datetime | None:
    stamp, _, zone = text.rpartition(" ")
    try:
        naive = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        tz = timezone.utc if zone in ("UTC", "GMT") else ZoneInfo(zone)
    except (ValueError, KeyError, OSError):
        return None  # an abbreviation zoneinfo does not know: start_time_text still says it
    return naive.replace(tzinfo=tz)


# ---------------------------------------------------------------------------------------------
# Recovery into a scratch instance


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _recovery_settings(*, source: PitrSource, target: RecoveryTarget, port: int, socket_dir: Path,
                       hba_file: Path, ident_file: Path) -> str:
    restore = f"cp {_shell_quote(str(source.wal_archive_dir))}/%f %p"
    settings = {
        "restore_command": _conf_string(restore),
        "recovery_target_action": "'promote'",
        "recovery_target_inclusive": "on" if target.inclusive else "off",
        "recovery_target_timeline": "'current'",
        # A private instance: no TCP, its own socket, its own trust-only-locally hba, and it must
        # never push WAL into the production archive (the backup's config has archive_mode=on).
        "port": str(port),
        "listen_addresses": "''",
        "unix_socket_directories": _conf_string(str(socket_dir)),
        "unix_socket_permissions": "0700",
        "hba_file": _conf_string(str(hba_file)),
        "ident_file": _conf_string(str(ident_file)),
        "archive_mode": "off",
        # No reads before promotion (the data is not at the target yet), and then the
        # standby-only checks on max_connections etc. against the primary do not apply.
        "hot_standby": "off",
        "logging_collector": "off",
        "log_destination": "'stderr'",
        "lc_messages": "'C'",  # the log is parsed for "recovery stopping ..."
        "synchronous_standby_names": "''",
    }
    if target.restore_point is not None:
        settings["recovery_target_name"] = _conf_string(target.restore_point)
    else:
        assert target.time is not None
        settings["recovery_target_time"] = _conf_string(target.time.isoformat())
    lines = "".join(f"{name} = {value}\n" for name, value in settings.items())
    return f"\n# Added by rollback.targets.database.pitr.recover\n{lines}"


async def _prepare_data_dir(*, source: PitrSource, target: RecoveryTarget, work_dir: Path,
                            port: int) -> tuple[Path, Path, Path]:
    data, run_dir = work_dir / "data", work_dir / "run"
    leftover = data / "postmaster.pid"
    if leftover.exists():
        # A previous attempt died with its instance still up: stop it before starting over.
        await _run([str(source.pg_bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "60"],
                   timeout=70, run_as=source.run_as, what="pg_ctl stop (leftover instance)", check=False)
    await asyncio.to_thread(shutil.rmtree, data, True)
    await asyncio.to_thread(shutil.rmtree, run_dir, True)
    # symlinks=True keeps pg_tblspc links as links; the base backup itself is never written to.
    await asyncio.to_thread(shutil.copytree, source.base_backup_dir, data, symlinks=True)
    run_dir.mkdir(parents=True)
    for name in ("standby.signal", "postmaster.pid", "postmaster.opts"):
        (data / name).unlink(missing_ok=True)
    (data / "recovery.signal").write_text("")
    if not (data / "postgresql.conf").exists():
        (data / "postgresql.conf").write_text("")  # e.g. Debian keeps it in /etc, outside the backup
    hba, ident_map = run_dir / "pg_hba.conf", run_dir / "pg_ident.conf"
    hba.write_text("local all all trust\n")
    ident_map.write_text("")
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write(_recovery_settings(source=source, target=target, port=port, socket_dir=run_dir,
                                      hba_file=hba, ident_file=ident_map))
    data.chmod(0o700)
    run_dir.chmod(0o700)
    if source.run_as is not None:
        for path in (data, run_dir):
            await _run(["chown", "-R", f"{source.run_as}:", str(path)], timeout=600, what=f"chown {path}",
                       error=RecoveryFailed)
        await _run(["test", "-x", str(work_dir)], timeout=10, run_as=source.run_as, error=RecoveryFailed,
                   what=f"access check: OS user {source.run_as} reaching {work_dir}")
    return data, run_dir, run_dir / "postgres.log"


def _log_tail(log_file: Path, *, lines: int = 12) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    interesting = [line for line in text.splitlines()
                   if re.search(r"FATAL|PANIC|ERROR|recovery|restore point|consistent", line)]
    return "\n".join((interesting or text.splitlines())[-lines:])


async def _promoted(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False  # starting up, replaying WAL (no hot standby), or not listening yet
    try:
        return not await conn.fetchval("SELECT pg_is_in_recovery()", timeout=5)
    finally:
        await conn.close(timeout=5)


async def recover(*, source: PitrSource, target: RecoveryTarget, work_dir: Path, timeout: float = 1800,
                  progress: Progress | None = None) -> RecoveredInstance:
    """Replay the base backup + archived WAL up to `target` in a scratch instance under work_dir.

    Returns once the instance is promoted and accepting connections. Fails with RecoveryFailed
    (quoting the server log) when the target is not reached: PostgreSQL 13+ stops with FATAL when
    the WAL ends before the target, and we also require its "recovery stopping" log line, so the
    data is never silently recovered to another point.
    """
    work_dir = Path(work_dir).resolve()
    if not (source.base_backup_dir / "backup_label").exists():
        raise RecoveryFailed(f"{source.base_backup_dir} is not a base backup (no backup_label)")
    if not source.wal_archive_dir.is_dir():
        raise RecoveryFailed(f"WAL archive {source.wal_archive_dir} does not exist")
    if len(str(work_dir / "run")) > MAX_SOCKET_DIR:
        raise RecoveryFailed(f"work_dir {work_dir} is too long for a unix socket path; use a shorter one")
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    _say(progress, f"copying base backup {source.base_backup_dir} into {work_dir / 'data'}")
    data, run_dir, log_file = await _prepare_data_dir(source=source, target=target, work_dir=work_dir, port=port)
    instance = RecoveredInstance(data_dir=data, socket_dir=run_dir, port=port, log_file=log_file,
                                 user=source.superuser, pg_bin_dir=source.pg_bin_dir, run_as=source.run_as)
    _say(progress, f"replaying WAL up to {target.describe()}")
    with log_file.open("ab") as log:
        instance._process = await asyncio.create_subprocess_exec(
            str(source.pg_bin_dir / "postgres"), "-D", str(data), stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True, **_user_ids(source.run_as))
    try:
        await _wait_promoted(instance, target=target, timeout=timeout)
    except BaseException:
        await instance.stop()
        raise
    _say(progress, f"recovered to {target.describe()} and promoted")
    return instance


async def _wait_promoted(instance: RecoveredInstance, *, target: RecoveryTarget, timeout: float) -> None:
    process = instance._process
    assert process is not None
    deadline = time.monotonic() + timeout
    while True:
        if process.returncode is not None:
            raise RecoveryFailed(f"recovery to {target.describe()} failed: the server stopped "
                                 f"(exit {process.returncode}). Server log:\n{_log_tail(instance.log_file)}")
        if await _promoted(instance.dsn()):
            break
        if time.monotonic() > deadline:
            raise RecoveryFailed(f"recovery to {target.describe()} not finished within {timeout:.0f} s. "
                                 f"Server log:\n{_log_tail(instance.log_file)}")
        await asyncio.sleep(0.2)
    log = instance.log_file.read_text(errors="replace")
    if "recovery stopping" not in log:
        raise RecoveryFailed(f"the server promoted without reporting that it reached {target.describe()}; "
                             f"refusing to use it. Server log:\n{_log_tail(instance.log_file)}")


# ---------------------------------------------------------------------------------------------
# Copy out of the recovered instance


async def copy_database(*, source_dsn: str, target_admin_dsn: str, new_database: str, jobs: int = 2,
                        pg_bin_dir: Path = DEFAULT_PG_BIN, dump_dir: Path | None = None, timeout: float = 3600,
                        settings_from: str | None = None, progress: Progress | None = None) -> None:
    """Copy source_dsn's database into a NEW database on target_admin_dsn's server (pg_dump/pg_restore -Fd).

    `settings_from`: a database on the target server whose database-level privileges and
    `ALTER DATABASE / ALTER ROLE ... IN DATABASE ... SET` settings the copy gets (the live one:
    a dump restored into an existing database carries neither).

    The new database is marked with a comment while it is being built: a retry drops such a
    half-made copy and starts over, returns at once when the copy is complete, and refuses to
    touch a database of that name that is not ours.
    """
    admin = await _connect(target_admin_dsn, error=CopyFailed, what="the target server")
    try:
        if await _existing_copy(admin, new_database) == COPY_COMPLETE:
            _say(progress, f"{new_database} already holds a complete copy")
            return
        owner, encoding, collate, ctype = await _source_database_shape(source_dsn)
        await admin.execute(f"DROP DATABASE IF EXISTS {ident(new_database)}", timeout=120)
        # template0 + the source's encoding and locale, so every dumped object restores as it was;
        # owned like the source, so the application's role owns the database after the swap.
        await admin.execute(
            f"CREATE DATABASE {ident(new_database)} TEMPLATE template0 ENCODING {await quote_literal(admin, encoding)} "
            f"LC_COLLATE {await quote_literal(admin, collate)} LC_CTYPE {await quote_literal(admin, ctype)}", timeout=120)
        await admin.execute(f"COMMENT ON DATABASE {ident(new_database)} IS {await quote_literal(admin, COPY_IN_PROGRESS)}")
        if await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", owner):
            await admin.execute(f"ALTER DATABASE {ident(new_database)} OWNER TO {ident(owner)}")
        target_dsn = with_database(target_admin_dsn, new_database)
        with tempfile.TemporaryDirectory(prefix="rollback-pitr-dump-", dir=dump_dir) as scratch:
            dump = Path(scratch) / "dump"
            _say(progress, f"dumping {database_name(source_dsn)} from the recovered instance ({jobs} jobs)")
            await _run([str(pg_bin_dir / "pg_dump"), "-d", _without_password(source_dsn), "-Fd", "-j", str(jobs),
                        "-f", str(dump), "--no-password"], timeout=timeout, what="pg_dump (recovered database)",
                       password=_password(source_dsn), error=CopyFailed)
            _say(progress, f"restoring into {new_database} ({jobs} jobs)")
            await _run([str(pg_bin_dir / "pg_restore"), "-d", _without_password(target_dsn), "-j", str(jobs),
                        "--exit-on-error", "--no-password", str(dump)], timeout=timeout,
                       what=f"pg_restore into {new_database}", password=_password(target_dsn), error=CopyFailed)
        if settings_from:
            await _carry_database_settings(admin, settings_from, new_database)
        await admin.execute(f"COMMENT ON DATABASE {ident(new_database)} IS {await quote_literal(admin, COPY_COMPLETE)}")
        _say(progress, f"{new_database} holds the recovered data")
    finally:
        await admin.close(timeout=10)


# Settings whose value is a list: written back element by element, as pg_dump does (GUC_LIST_QUOTE).
_LIST_SETTINGS = {"search_path", "temp_tablespaces", "local_preload_libraries", "session_preload_libraries",
                  "shared_preload_libraries", "unix_socket_directories"}


async def _setting_value(conn: asyncpg.Connection, name: str, value: str) -> str:
    if name.lower() not in _LIST_SETTINGS:
        return await quote_literal(conn, value)
    elements = re.findall(r'\s*("(?:[^"]|"")*"|[^,]+)\s*(?:,|$)', value)
    return ", ".join([await quote_literal(conn, e[1:-1].replace('""', '"') if e.startswith('"') else e.strip())
                      for e in elements])


async def _carry_database_settings(admin: asyncpg.Connection, source: str, target: str) -> None:
    """Give `target` the privileges and per-database settings `source` has."""
    row = await admin.fetchrow("SELECT oid, datacl IS NOT NULL AS has_acl, ARRAY(SELECT format('GRANT %s ON DATABASE %I TO %s%s', "
                               "a.privilege_type, $2::text, CASE WHEN a.grantee = 0 THEN 'PUBLIC' "
                               "ELSE quote_ident(pg_get_userbyid(a.grantee)) END, "
                               "CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) "
                               "FROM aclexplode(datacl) a WHERE a.grantee <> datdba) AS grants "
                               "FROM pg_database WHERE datname = $1", source, target)
    if row is None:
        raise CopyFailed(f"database {source} (whose privileges and settings the copy should get) does not exist")
    if row["has_acl"]:  # otherwise both have the defaults
        await admin.execute(f"REVOKE ALL ON DATABASE {ident(target)} FROM PUBLIC")
        for grant in row["grants"]:
            await admin.execute(grant)
    for setting in await admin.fetch("SELECT pg_get_userbyid(setrole) AS role, setrole, setconfig FROM pg_db_role_setting "
                                     "WHERE setdatabase = $1", row["oid"]):
        scope = (f"DATABASE {ident(target)}" if setting["setrole"] == 0
                 else f"ROLE {ident(setting['role'])} IN DATABASE {ident(target)}")
        for item in setting["setconfig"]:
            name, _, value = item.partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                raise CopyFailed(f"setting {name[:60]!r} of database {source} has a name this tool will not paste into SQL")
            await admin.execute(f"ALTER {scope} SET {name} = {await _setting_value(admin, name, value)}")


async def _connect(dsn: str, *, error: type[PitrError], what: str) -> asyncpg.Connection:
    """asyncpg.connect, with its failure turned into our error (asyncpg never echoes the password)."""
    try:
        return await connect(dsn, application_name="rollback-pitr")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise error(f"cannot connect to {what} ({database_name(dsn)}): {exc}") from None



async def _existing_copy(admin: asyncpg.Connection, name: str) -> str | None:
    """None when absent; the marker comment when it is ours; CopyFailed when it is someone else's."""
    row = await admin.fetchrow(
        "SELECT shobj_description(oid, 'pg_database') AS comment FROM pg_database WHERE datname = $1", name)
    if row is None:
        return None
    if row["comment"] not in (COPY_IN_PROGRESS, COPY_COMPLETE):
        raise CopyFailed(f"database {name} already exists and was not made by rollback PITR; not touching it")
    return row["comment"]


async def _source_database_shape(source_dsn: str) -> tuple[str, str, str, str]:
    conn = await _connect(source_dsn, error=CopyFailed, what="the recovered database")
    try:
        row = await conn.fetchrow(
            "SELECT pg_get_userbyid(datdba) AS owner, pg_encoding_to_char(encoding) AS encoding, "
            "datcollate, datctype FROM pg_database WHERE datname = current_database()", timeout=30)
    finally:
        await conn.close(timeout=10)
    return row["owner"], row["encoding"], row["datcollate"], row["datctype"]


# ---------------------------------------------------------------------------------------------
# Swap


class _Session(BaseModel):
    pid: int
    database: str
    user: str | None
    application_name: str
    state: str | None

    def __str__(self) -> str:
        return (f"pid {self.pid} on {self.database} (user {self.user}, "
                f"application {self.application_name or '-'}, state {self.state or '-'})")


async def _sessions(admin: asyncpg.Connection, names: list[str]) -> list[_Session]:
    rows = await admin.fetch(
        "SELECT pid, datname, usename, application_name, state FROM pg_stat_activity "
        "WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid() ORDER BY pid", names, timeout=30)
    return [_Session(pid=r["pid"], database=r["datname"], user=r["usename"],
                     application_name=r["application_name"] or "", state=r["state"]) for r in rows]


class NameTaken(SwapFailed):
    """The name the live database is to be retired under belongs to another database."""


async def swap_databases(*, admin_dsn: str, live: str, replacement: str, retired: str, marker: str,
                         terminate_sessions: bool, timeout: float, progress: Progress | None = None) -> None:
    """Rename live -> retired and replacement -> live, in one transaction (both or neither).

    The database that goes live keeps the live one's comment; the retired one's comment becomes
    `marker` (unique to the step that swaps), which says what it is to whoever lists databases and
    lets a retry recognise its own swap. PostgreSQL refuses to rename a database with sessions on
    it: with terminate_sessions they are terminated (only those of the two databases), otherwise
    we wait for them to leave until the deadline and then fail naming them. Already swapped
    (replacement gone, retired present with our marker): done. A retired name taken by any other
    database is refused: taking it for our own would put someone else's data live on compensation.
    """
    if len({live, replacement, retired}) != 3:
        raise SwapFailed("live, replacement and retired must be three different database names")
    if database_name(admin_dsn) in (live, replacement):
        raise SwapFailed(f"admin_dsn must connect to another database than {live} or {replacement} "
                         f"(e.g. postgres): a database cannot be renamed while we are connected to it")
    admin = await _connect(admin_dsn, error=SwapFailed, what="the live server")
    try:
        present = {r["datname"] for r in await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", [live, replacement, retired])}
        if retired in present and await _comment(admin, retired) != marker:
            raise NameTaken(f"database {retired} already exists and was not retired by this step ({marker}); "
                            "not touching it")
        if replacement not in present and retired in present and live in present:
            _say(progress, f"{live} was already swapped ({retired} holds the old data)")
            return
        if present != {live, replacement}:
            raise SwapFailed(f"cannot swap: expected databases {live} and {replacement} and no {retired}; "
                             f"found {', '.join(sorted(present)) or 'none of them'}")
        await _rename_when_free(admin, live=live, replacement=replacement, retired=retired, marker=marker,
                                terminate_sessions=terminate_sessions, timeout=timeout, progress=progress)
    finally:
        await admin.close(timeout=10)


async def _comment(admin: asyncpg.Connection, database: str) -> str | None:
    return await admin.fetchval("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                                database)


async def _rename_when_free(admin: asyncpg.Connection, *, live: str, replacement: str, retired: str, marker: str,
                            terminate_sessions: bool, timeout: float, progress: Progress | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        sessions = await _sessions(admin, [live, replacement])
        if sessions and terminate_sessions:
            _say(progress, f"terminating {len(sessions)} session(s) on {live}/{replacement}")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid()", [live, replacement], timeout=30)
        elif not sessions:
            # A client can connect between the check and the rename: then the rename fails
            # with "being accessed by other users" and we go round again.
            try:
                async with admin.transaction():
                    comment = await _comment(admin, live)
                    await admin.execute(f"ALTER DATABASE {ident(live)} RENAME TO {ident(retired)}", timeout=30)
                    await admin.execute(f"ALTER DATABASE {ident(replacement)} RENAME TO {ident(live)}", timeout=30)
                    await admin.execute(f"COMMENT ON DATABASE {ident(live)} IS {await quote_literal(admin, comment)}")
                    await admin.execute(f"COMMENT ON DATABASE {ident(retired)} IS {await quote_literal(admin, marker)}")
                _say(progress, f"swapped: {replacement} is now {live}; the old data is in {retired}")
                return
            except asyncpg.ObjectInUseError:
                pass
        if time.monotonic() > deadline:
            remaining = await _sessions(admin, [live, replacement])
            listed = "; ".join(str(s) for s in remaining) or "(they left just now)"
            raise SessionsConnected(f"cannot rename {live}/{replacement}: sessions still connected after "
                                    f"{timeout:g} s: {listed}")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# What will be lost


def _lsn_text(lsn: str | int) -> str:
    """asyncpg decodes pg_lsn as an int: accept that too, and say it the way PostgreSQL does (X/Y)."""
    text = str(lsn).strip()
    if text.isdigit():
        value = int(text)
        return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
    return text


async def describe_loss(*, live_dsn: str, restore_point_lsn: str | int | None, since: datetime | None,
                        restore_point: str | None = None, max_tables: int = 10) -> str:
    """One or two lines, for the person approving: what recovering to the target throws away.

    Without a position (LSN) or a time, the restore point's place in the WAL is unknown (it was made
    by hand, or by a backup no longer in the catalog): the statement says everything after it is lost.
    """
    if restore_point_lsn is None and since is None and restore_point is None:
        raise PitrError("describe_loss needs restore_point_lsn, since or restore_point")
    conn = await _connect(live_dsn, error=PitrError, what="the live database")
    try:
        first = []
        if restore_point_lsn is None and since is None:
            first.append(f"everything written after restore point {restore_point!r}, which is not in the backup "
                         "catalog, so how much that is cannot be measured here")
        if restore_point_lsn is not None:
            restore_point_lsn = _lsn_text(restore_point_lsn)
            try:
                lost = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
                                           restore_point_lsn, timeout=30)
            except asyncpg.InvalidTextRepresentationError:
                raise PitrError(f"restore point LSN {restore_point_lsn!r} is not an LSN like 0/3000060") from None
            first.append(f"{max(lost, 0):,} bytes of WAL written after the restore point at {restore_point_lsn}")
        if since is not None:
            first.append(f"every transaction committed after {since.isoformat()}")
        tables = await conn.fetch(
            # reltuples is -1 until the first ANALYZE/VACUUM; the statistics' live count fills in.
            "SELECT n.nspname, c.relname, CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint "
            "ELSE coalesce(pg_stat_get_live_tuples(c.oid), 0) END AS rows FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
            "ORDER BY rows DESC, 1, 2", timeout=30)
    finally:
        await conn.close(timeout=10)
    database = database_name(live_dsn)
    shown = [f"{row['nspname']}.{row['relname']} ~{row['rows']:,}" for row in tables[:max_tables]]
    more = f", and {len(tables) - max_tables} more" if len(tables) > max_tables else ""
    return (f"Recovering {database} loses {' and '.join(first)} (WAL counts the whole server, not only "
            f"{database}).\nRows in {database} now, of which the newer are lost (estimates from "
            f"pg_class.reltuples, else the statistics' live counts): {', '.join(shown) or 'no tables'}{more}.")

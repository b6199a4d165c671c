"""Verified pg_dump backups taken before every migration, their catalog and retention.

A backup is a pg_dump directory-format dump plus `manifest.json`: what was dumped (database,
migration revision, schema snapshot taken in pg_dump's own snapshot), a restore point for
PITR, and the size and sha256 of every file. It is written under a hidden `.partial`
directory and renamed into place only once verified, so `root/<id>` always holds a complete
backup. A database rollback later streams one table's rows out of the backup into a side
table (`load_table_copy`) and merges them by primary key.

The catalog is a JSON file beside the backups, not in the database: it survives any
database rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal, Protocol, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
from pydantic import BaseModel, Field

from rollback.targets.database.pg import connect, database_name, ident, qualified
from rollback.targets.database.pgschema import SchemaSnapshot, TableShape, snapshot

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
MANIFEST = "manifest.json"
# Backup ids name directories and restore points: a plain file name, never a path.
_BACKUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# PostgreSQL refuses restore point names longer than 63 bytes.
_RESTORE_POINT_MAX = 63
# A migration holding an exclusive lock must fail the backup, not hang it for an hour.
LOCK_WAIT_SECONDS = 120
_HASH_CHUNK = 1 << 20
_PIPE_CHUNK = 1 << 20

Progress = Callable[[str], None]
T = TypeVar("T")


class BackupError(RuntimeError):
    """A backup could not be taken, read or loaded."""


class BackupCorrupt(BackupError):
    """A backup's files do not match its manifest, or pg_restore cannot read it."""


class BackupFile(BaseModel):
    name: str
    size: int
    sha256: str


class BackupManifest(BaseModel):
    id: str
    environment: str
    database: str = Field(description="the database name only, never a DSN")
    revision: str | None = Field(description="migration revision the database was at")
    next_revision: str | None = Field(description="migration about to be applied")
    created_at: datetime
    finished_at: datetime
    server_version: str
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    restore_point_note: str | None = Field(default=None, description="why there is no restore point")
    format: Literal["directory"] = "directory"
    jobs: int
    files: list[BackupFile]
    total_bytes: int
    # Named schema_snapshot: a field called `schema` shadows BaseModel.schema (pydantic warns).
    schema_snapshot: SchemaSnapshot = Field(description="tables as pg_dump saw them (same MVCC snapshot)")
    pg_snapshot: str | None = Field(default=None, description="pg_current_snapshot() of the dump: which row "
                                    "versions the backup holds (lets a restore tell rows changed since)")
    path: str
    verified_at: datetime | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _check_id(backup_id: str) -> None:
    if not _BACKUP_ID.fullmatch(backup_id):
        raise BackupError(f"backup id {backup_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                          "and start with a letter or digit")


def _partial_dir(root: Path, backup_id: str) -> Path:
    return root / f".{backup_id}.partial"


# ---------------------------------------------------------------------------------------------
# Secrets: the password travels in PGPASSWORD, never in argv (visible in ps) or messages.


def _password(dsn: str) -> str | None:
    parts = urlsplit(dsn)
    if parts.password is not None:
        return unquote(parts.password)
    return dict(parse_qsl(parts.query)).get("password")


def _without_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}@{host}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***").replace(quote(secret, safe=""), "***") if secret else text


def _pg_env(dsn: str) -> dict[str, str]:
    env = dict(os.environ)
    password = _password(dsn)
    if password:
        env["PGPASSWORD"] = password
    return env


# ---------------------------------------------------------------------------------------------
# Checksums and verification


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        # hashlib releases the GIL on large updates, so a thread pool hashes files in parallel.
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256, paths))


def _dump_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name != MANIFEST)


def _describe_files(directory: Path) -> list[BackupFile]:
    paths = _dump_files(directory)
    digests = _hash_all(paths)
    return [BackupFile(name=p.name, size=p.stat().st_size, sha256=d) for p, d in zip(paths, digests, strict=True)]


def _read_manifest(path: Path) -> BackupManifest:
    try:
        return BackupManifest.model_validate_json((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupCorrupt(f"backup {path} has no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise BackupCorrupt(f"backup {path}: {MANIFEST} is unreadable: {str(e)[:300]}") from None


def _check_files(path: Path, manifest: BackupManifest) -> None:
    expected = {f.name: f for f in manifest.files}
    if any("/" in name or name in ("", ".", "..", MANIFEST) for name in expected):
        raise BackupCorrupt(f"backup {path}: {MANIFEST} lists an invalid file name")
    present = {p.name for p in _dump_files(path)}
    if missing := sorted(expected.keys() - present):
        raise BackupCorrupt(f"backup {path}: file {missing[0]} is missing" +
                            (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra := sorted(present - expected.keys()):
        raise BackupCorrupt(f"backup {path}: unexpected file {extra[0]} not in the manifest")
    for f in manifest.files:
        size = (path / f.name).stat().st_size
        if size != f.size:
            raise BackupCorrupt(f"backup {path}: file {f.name} is {size} bytes, the manifest says {f.size}")
    names = [f.name for f in manifest.files]
    for name, actual in zip(names, _hash_all([path / n for n in names]), strict=True):
        if actual != expected[name].sha256:
            raise BackupCorrupt(f"backup {path}: file {name} has sha256 {actual}, "
                                f"the manifest expects {expected[name].sha256}")


def _pg_restore_list(path: Path, *, pg_bin_dir: Path, timeout: float) -> None:
    try:
        result = subprocess.run([str(pg_bin_dir / "pg_restore"), "--list", str(path)], stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BackupError(f"pg_restore --list {path} did not finish within {timeout:g} s") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()[-500:]
        raise BackupCorrupt(f"backup {path}: pg_restore cannot read its table of contents: {detail}")


def verify_backup(path: Path, *, pg_bin_dir: Path = DEFAULT_PG_BIN, timeout: float = 600) -> BackupManifest:
    """The backup's manifest, after checking every file's size and sha256, that no file is missing
    or extra, and that pg_restore reads the table of contents. Raises BackupCorrupt.

    The manifest is returned as stored (verified_at is when take_backup verified it), with
    `path` set to where the backup was found.
    """
    if not path.is_dir():
        raise BackupCorrupt(f"backup {path} does not exist or is not a directory")
    manifest = _read_manifest(path)
    _check_files(path, manifest)
    _pg_restore_list(path, pg_bin_dir=pg_bin_dir, timeout=timeout)
    return manifest.model_copy(update={"path": str(path)})


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Taking a backup


class _Snapshot(BaseModel):
    id: str
    pg_snapshot: str
    schema_snapshot: SchemaSnapshot
    server_version: str


def _restore_point_name(backup_id: str, at: datetime) -> str:
    # A retried attempt gets its own name: recovery stops at the FIRST point of a given name,
    # which would lose the writes made between a crashed attempt and this one.
    stamp = at.strftime("%Y%m%dT%H%M%S")
    prefix = "rollback-"
    room = _RESTORE_POINT_MAX - len(prefix) - len(stamp) - 1
    name = backup_id if len(backup_id) <= room else backup_id[: room - 9] + "-" + hashlib.sha256(
        backup_id.encode()).hexdigest()[:8]
    return f"{prefix}{name}-{stamp}"


async def _create_restore_point(conn: asyncpg.Connection, name: str) -> tuple[str | None, str | None, str | None]:
    """(name, lsn, note). Only superusers (or roles granted EXECUTE) may; that is never required."""
    try:
        lsn = await conn.fetchval("SELECT pg_create_restore_point($1)::text", name, timeout=30)
    except asyncpg.InsufficientPrivilegeError:
        role = await conn.fetchval("SELECT current_user", timeout=30)
        return None, None, (f"permission denied: role {role} may not call pg_create_restore_point "
                            "(superuser or GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) needed)")
    except asyncpg.PostgresError as e:
        # e.g. wal_level=minimal, or a standby in recovery: the dump is still worth taking.
        return None, None, f"no restore point: {e.__class__.__name__}: {e}"
    return name, lsn, None


@contextlib.asynccontextmanager
async def _exported_snapshot(dsn: str) -> AsyncIterator[_Snapshot]:
    """An open REPEATABLE READ transaction whose snapshot pg_dump imports (--snapshot), with the
    schema read in that same snapshot. It stays open until pg_dump is done: its parallel
    workers import the snapshot when they connect, which may be late in the dump."""
    conn = await connect(dsn, timeout=30, application_name="rollback-backup")
    try:
        # The session idles in its transaction while pg_dump works; a server-wide timeout must not end it.
        await conn.execute("SET idle_in_transaction_session_timeout = 0", timeout=30)
        transaction = conn.transaction(isolation="repeatable_read", readonly=True)
        await transaction.start()
        try:
            snapshot_id = await conn.fetchval("SELECT pg_export_snapshot()", timeout=30)
            pg_snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text", timeout=30)
            schema = await snapshot(conn)
            version = await conn.fetchval("SELECT current_setting('server_version')", timeout=30)
            yield _Snapshot(id=snapshot_id, pg_snapshot=pg_snapshot, schema_snapshot=schema, server_version=version)
        finally:
            await transaction.rollback()
    finally:
        await conn.close(timeout=10)


async def _run_pg_dump(*, dsn: str, directory: Path, jobs: int, snapshot_id: str, pg_bin_dir: Path) -> None:
    argv = [str(pg_bin_dir / "pg_dump"), "--format=directory", f"--jobs={jobs}", f"--file={directory}",
            f"--snapshot={snapshot_id}", f"--lock-wait-timeout={LOCK_WAIT_SECONDS}s", "--no-password",
            f"--dbname={_without_password(dsn)}"]
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE, env=_pg_env(dsn))
    try:
        _, err = await process.communicate()
    finally:
        if process.returncode is None:  # cancelled or timed out: never leave pg_dump running
            process.kill()
            await process.wait()
    if process.returncode != 0:
        detail = _redact(err.decode(errors="replace").strip(), _password(dsn))[-1000:]
        raise BackupError(f"pg_dump of database {database_name(dsn)} failed (exit {process.returncode}): {detail}")


async def _bounded(what: str, work: Awaitable[T], *, dsn: str, timeout: float) -> T:
    """`work` within `timeout`; connection, database and disk failures become one BackupError line."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if deadline.expired():
            raise BackupError(f"{what} did not finish within {timeout:g} s") from None
        raise BackupError(f"{what} failed: timed out connecting to the database") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
        raise BackupError(f"{what} failed: {e.__class__.__name__}: {_redact(str(e), _password(dsn))}") from None


@contextlib.contextmanager
def _exclusive(root: Path, backup_id: str) -> Iterator[None]:
    """One attempt per backup id at a time (a retry may start while a stuck attempt still runs)."""
    with open(root / f".{backup_id}.lock", "a+") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"backup {backup_id} is being taken by another process right now") from None
        yield


def _existing(final: Path, *, backup_id: str, database: str, environment: str, pg_bin_dir: Path) -> BackupManifest:
    try:
        manifest = verify_backup(final, pg_bin_dir=pg_bin_dir)
    except BackupCorrupt as e:
        raise BackupCorrupt(f"{e}; delete {final} to take backup {backup_id} again") from None
    if (manifest.database, manifest.environment) != (database, environment):
        raise BackupError(f"backup {backup_id} already exists for database {manifest.database} in environment "
                          f"{manifest.environment}, not {database} in {environment}")
    return manifest


async def take_backup(*, dsn: str, root: Path, backup_id: str, environment: str, revision: str | None,
                      next_revision: str | None, jobs: int = 2, timeout: float = 3600,
                      progress: Progress | None = None, pg_bin_dir: Path = DEFAULT_PG_BIN) -> BackupManifest:
    """A verified pg_dump directory backup at root/backup_id. Idempotent: an existing valid backup
    of that id is returned as is; a crashed attempt's leftovers are removed and the dump redone."""
    _check_id(backup_id)
    if jobs < 1:
        raise BackupError(f"jobs must be at least 1, not {jobs}")
    database = database_name(dsn)
    root.mkdir(parents=True, exist_ok=True)
    final, partial = root / backup_id, _partial_dir(root, backup_id)
    with _exclusive(root, backup_id):
        if final.exists():
            _say(progress, f"backup {backup_id} exists; verifying it")
            manifest = await asyncio.to_thread(_existing, final, backup_id=backup_id, database=database,
                                               environment=environment, pg_bin_dir=pg_bin_dir)
            _say(progress, f"backup {backup_id} already taken and verified")
            return manifest
        if partial.exists():
            _say(progress, f"removing the leftovers of an interrupted attempt at {partial}")
            await asyncio.to_thread(shutil.rmtree, partial)
        try:
            work = _dump(dsn=dsn, partial=partial, final=final, backup_id=backup_id, environment=environment,
                         revision=revision, next_revision=next_revision, jobs=jobs, progress=progress,
                         pg_bin_dir=pg_bin_dir)
            manifest = await _bounded(f"backup {backup_id} of database {database}", work, dsn=dsn, timeout=timeout)
            os.rename(partial, final)
        except BaseException:
            # Failed, timed out or cancelled: leave nothing half-written (a retry would remove it anyway).
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _fsync_dir(root)
        _say(progress, f"backup {backup_id} complete: {len(manifest.files)} files, {manifest.total_bytes} bytes")
        return manifest


async def _dump(*, dsn: str, partial: Path, final: Path, backup_id: str, environment: str, revision: str | None,
                next_revision: str | None, jobs: int, progress: Progress | None, pg_bin_dir: Path) -> BackupManifest:
    created_at = _now()
    _say(progress, "creating a restore point")
    conn = await connect(dsn, timeout=30, application_name="rollback-backup")
    try:
        point, lsn, note = await _create_restore_point(conn, _restore_point_name(backup_id, created_at))
    finally:
        await conn.close(timeout=10)
    _say(progress, f"restore point {point} at {lsn}" if point else note or "no restore point")
    async with _exported_snapshot(dsn) as snap:
        _say(progress, f"dumping database {database_name(dsn)} with pg_dump --jobs={jobs}")
        await _run_pg_dump(dsn=dsn, directory=partial, jobs=jobs, snapshot_id=snap.id, pg_bin_dir=pg_bin_dir)
    _say(progress, "computing sha256 checksums")
    files = await asyncio.to_thread(_describe_files, partial)
    manifest = BackupManifest(
        id=backup_id, environment=environment, database=database_name(dsn), revision=revision,
        next_revision=next_revision, created_at=created_at, finished_at=_now(), server_version=snap.server_version,
        restore_point=point, restore_point_lsn=lsn, restore_point_note=note, jobs=jobs, files=files,
        total_bytes=sum(f.size for f in files), schema_snapshot=snap.schema_snapshot, pg_snapshot=snap.pg_snapshot,
        path=str(final))
    _write_atomically(partial / MANIFEST, manifest.model_dump_json(indent=2))
    _say(progress, "verifying the backup")
    await asyncio.to_thread(verify_backup, partial, pg_bin_dir=pg_bin_dir)
    manifest = manifest.model_copy(update={"verified_at": _now()})
    _write_atomically(partial / MANIFEST, manifest.model_dump_json(indent=2))
    return manifest


# ---------------------------------------------------------------------------------------------
# Catalog and retention


class _CatalogFile(BaseModel):
    backups: dict[str, BackupManifest] = Field(default_factory=dict)


class BackupCatalog:
    """The backups under `root` (the same root take_backup writes to), in root/.catalog.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._path = root / ".catalog.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_CatalogFile]:
        """Read-modify-write under an exclusive lock; readers see the old or the new file, never a torn one."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".catalog.lock", "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            catalog = self._load()
            yield catalog
            _write_atomically(self._path, catalog.model_dump_json(indent=2))

    def _load(self) -> _CatalogFile:
        try:
            return _CatalogFile.model_validate_json(self._path.read_text())
        except FileNotFoundError:
            return _CatalogFile()
        except ValueError as e:
            raise BackupError(f"backup catalog {self._path} is unreadable: {str(e)[:300]}") from None

    def record(self, manifest: BackupManifest) -> None:
        with self._locked() as catalog:
            catalog.backups[manifest.id] = manifest

    def get(self, backup_id: str) -> BackupManifest | None:
        return self._load().backups.get(backup_id)

    def list(self, environment: str | None = None) -> list[BackupManifest]:
        """Newest first."""
        found = [m for m in self._load().backups.values() if environment is None or m.environment == environment]
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    def remove(self, backup_id: str) -> bool:
        with self._locked() as catalog:
            return catalog.backups.pop(backup_id, None) is not None


def select_expired(manifests: Iterable[BackupManifest], *, now: datetime, retention_days: int, pinned: set[str],
                   keep_latest: int = 1) -> list[str]:
    """Ids of backups older than `retention_days` and not pinned, oldest first. The newest
    `keep_latest` backups of each environment are always kept, however old: an environment
    that has not deployed for a month must still have a backup to roll back to."""
    cutoff = now - timedelta(days=retention_days)
    newest: dict[str, list[BackupManifest]] = {}
    for m in sorted(manifests, key=lambda m: m.created_at, reverse=True):
        newest.setdefault(m.environment, []).append(m)
    kept = {m.id for group in newest.values() for m in group[:keep_latest]}
    expired = [m for group in newest.values() for m in group
               if m.created_at < cutoff and m.id not in pinned and m.id not in kept]
    return [m.id for m in sorted(expired, key=lambda m: m.created_at)]


def delete_backup(catalog: BackupCatalog, backup_id: str) -> bool:
    """Remove the backup's directory, then its catalog entry (so a crash in between is retried).
    True if there was anything to remove."""
    _check_id(backup_id)
    removed = False
    for directory in (catalog.root / backup_id, _partial_dir(catalog.root, backup_id)):
        if directory.exists():
            shutil.rmtree(directory)
            removed = True
    return catalog.remove(backup_id) or removed


# ---------------------------------------------------------------------------------------------
# Loading one table of a backup into a side table


_IDENT = re.compile(r'"((?:[^"]|"")*)"|([^\s.,()"]+)')


def _identifier(text: str, pos: int) -> tuple[str, int]:
    match = _IDENT.match(text, pos)
    if not match:
        raise ValueError(f"no identifier at column {pos}")
    quoted, plain = match.groups()
    return (quoted.replace('""', '"') if quoted is not None else plain), match.end()


def _parse_copy_header(line: str) -> tuple[str, str, list[str]]:
    """(schema, table, columns) of pg_dump's `COPY s.t (a, "B") FROM stdin;` line."""
    schema, pos = _identifier(line, len("COPY "))
    if line[pos:pos + 1] != ".":
        raise ValueError("no schema-qualified table name")
    table, pos = _identifier(line, pos + 1)
    columns: list[str] = []
    if line.startswith(" (", pos):
        pos += 2
        while True:
            name, pos = _identifier(line, pos)
            columns.append(name)
            if line.startswith(", ", pos):
                pos += 2
            elif line.startswith(")", pos):
                pos += 1
                break
            else:
                raise ValueError(f"unexpected text at column {pos}")
    if line[pos:].strip() != "FROM stdin;":
        raise ValueError("not a COPY FROM stdin statement")
    return schema, table, columns


class _Reader(Protocol):
    async def read(self, n: int) -> bytes: ...


class _CopyBlock:
    """pg_restore's output for one table: the preamble (SET client_encoding, COPY header),
    then the COPY text rows streamed as they come, up to the `\\.` line."""

    def __init__(self, stream: _Reader) -> None:
        self._stream = stream
        self._carry = b""
        self.encoding = "UTF8"
        self.header: tuple[str, str, list[str]] | None = None

    async def read_header(self) -> bool:
        """Consume the preamble; False when the output has no COPY block (the table has no data)."""
        buffer = b""
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                chunk = await self._stream.read(_PIPE_CHUNK)
                if not chunk:
                    return False
                buffer += chunk
                continue
            line, buffer = buffer[:newline].decode(errors="replace"), buffer[newline + 1:]
            if match := re.fullmatch(r"SET client_encoding = '([A-Za-z0-9_]+)';", line):
                self.encoding = match.group(1)
            elif line.startswith("COPY "):
                try:
                    self.header = _parse_copy_header(line)
                except ValueError as e:
                    raise BackupError(f"cannot parse pg_restore's COPY line {line[:200]!r}: {e}") from None
                self._carry = buffer
                return True

    async def rows(self) -> AsyncIterator[bytes]:
        """Whole lines only; the terminator may be split across chunks, so only complete lines
        (from a line start to a newline) are searched for it."""
        pending = self._carry
        while True:
            cut = pending.rfind(b"\n") + 1
            complete, pending = pending[:cut], pending[cut:]
            if complete.startswith(b"\\.\n"):
                return
            end = complete.find(b"\n\\.\n")
            if end >= 0:
                yield complete[:end + 1]
                return
            if complete:
                yield complete
            chunk = await self._stream.read(_PIPE_CHUNK)
            if not chunk:
                raise BackupCorrupt("pg_restore's COPY data ended without its terminating \\. line")
            pending += chunk


async def load_table_copy(*, backup_path: Path, dsn: str, table: TableShape, into_schema: str, into_table: str,
                          timeout: float = 3600, pg_bin_dir: Path = DEFAULT_PG_BIN) -> int:
    """Load `table`'s rows from the backup into a new UNLOGGED table into_schema.into_table
    (dropped and recreated: idempotent), streamed straight from pg_restore. Returns the row count.

    The side table has the backup's column types (from its manifest) for the columns pg_dump
    saved (generated columns are not saved, so not copied), and no constraints.
    """
    what = f"loading {table.qualified_name} from backup {backup_path.name} into {into_schema}.{into_table}"
    return await _bounded(what, _load(backup_path=backup_path, dsn=dsn, table=table, into_schema=into_schema,
                                      into_table=into_table, pg_bin_dir=pg_bin_dir), dsn=dsn, timeout=timeout)


async def _load(*, backup_path: Path, dsn: str, table: TableShape, into_schema: str, into_table: str,
                pg_bin_dir: Path) -> int:
    # A corrupt backup is refused before anything is created in the database.
    manifest = await asyncio.to_thread(verify_backup, backup_path, pg_bin_dir=pg_bin_dir)
    shape = manifest.schema_snapshot.tables.get(table.qualified_name)
    if shape is None:
        raise BackupError(f"backup {manifest.id} has no table {table.qualified_name}")
    return await _stream_into(backup_path=backup_path, dsn=dsn, shape=shape, into_schema=into_schema,
                              into_table=into_table, pg_bin_dir=pg_bin_dir)


async def _stream_into(*, backup_path: Path, dsn: str, shape: TableShape, into_schema: str, into_table: str,
                       pg_bin_dir: Path) -> int:
    async with open_table_copy(backup_path, shape, pg_bin_dir=pg_bin_dir) as copy:
        return await _copy(dsn=dsn, shape=shape, copy=copy, into_schema=into_schema, into_table=into_table)


class TableCopy:
    """One table's rows in a backup, as pg_restore prints them.

    `columns` are the columns pg_dump saved, in its COPY order (STORED generated columns are
    not saved: COPY into a table that has them must name the columns), and `encoding` is the
    dump's client_encoding (the database's own: a LATIN1 database's rows are LATIN1 bytes).
    Every reader of a backup's rows goes through this one parser.
    """

    def __init__(self, block: _CopyBlock) -> None:
        assert block.header is not None
        self._block = block
        self.columns = block.header[2]
        self.encoding = block.encoding

    def rows(self) -> AsyncIterator[bytes]:
        """COPY text, whole lines, in blocks of whatever size the pipe gave."""
        return self._block.rows()

    async def chunks(self, rows_per_chunk: int) -> AsyncIterator[bytes]:
        """COPY text, `rows_per_chunk` lines at a time (a COPY text row is one line: newlines in values are escaped)."""
        buffer = bytearray()
        async for block in self._block.rows():
            buffer += block
            while buffer.count(b"\n") >= rows_per_chunk:
                cut = -1
                for _ in range(rows_per_chunk):
                    cut = buffer.index(b"\n", cut + 1)
                yield bytes(buffer[:cut + 1])
                del buffer[:cut + 1]
        if buffer:
            yield bytes(buffer)


@contextlib.asynccontextmanager
async def open_table_copy(backup_path: Path, shape: TableShape, *,
                          pg_bin_dir: Path = DEFAULT_PG_BIN) -> AsyncIterator[TableCopy]:
    """pg_restore's COPY block of one table of a directory-format backup, checked on the way out:
    no data for the table (not in the dump), another table's data, or a failed pg_restore is a
    BackupError, never an empty restore."""
    argv = [str(pg_bin_dir / "pg_restore"), "--data-only", f"--schema={shape.schema_name}",
            f"--table={shape.name}", "--file=-", str(backup_path)]
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                   limit=_PIPE_CHUNK)
    assert process.stdout is not None and process.stderr is not None
    errors = asyncio.create_task(process.stderr.read())
    try:
        block = _CopyBlock(process.stdout)
        if not await block.read_header():
            await process.wait()
            raise BackupError(f"backup {backup_path} holds no data for table {shape.qualified_name}"
                              + _stderr_tail(await errors))
        schema, name, _ = block.header or ("", "", [])
        if (schema, name) != (shape.schema_name, shape.name):
            raise BackupError(f"pg_restore returned data for {schema}.{name}, not {shape.qualified_name}")
        yield TableCopy(block)
        await process.stdout.read()  # the dump's trailer; pg_restore exits once it is read
        if await process.wait() != 0:
            raise BackupError(f"pg_restore of {shape.qualified_name} from {backup_path} failed "
                              f"(exit {process.returncode})" + _stderr_tail(await errors))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        errors.cancel()


def _stderr_tail(err: bytes) -> str:
    text = err.decode(errors="replace").strip()
    return f": {text[-500:]}" if text else ""


async def _copy(*, dsn: str, shape: TableShape, copy: TableCopy, into_schema: str, into_table: str) -> int:
    types = {c.name: c.type for c in shape.columns}
    columns = copy.columns
    if unknown := [c for c in columns if c not in types]:
        raise BackupError(f"the backup's data for {shape.qualified_name} has column {unknown[0]} "
                          "that its manifest's schema does not list")
    definition = ", ".join(f"{ident(c)} {types[c]}" for c in columns)
    conn = await connect(dsn, timeout=30, application_name="rollback-load-copy")
    try:
        # One transaction: a failed load leaves no half-filled side table, and COPY FREEZE (rows
        # written already frozen, no hint-bit rewrite on first read) needs the table created in it.
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(into_schema)}", timeout=60)
            await conn.execute(f"DROP TABLE IF EXISTS {qualified(into_schema, into_table)}", timeout=60)
            await conn.execute(f"CREATE UNLOGGED TABLE {qualified(into_schema, into_table)} ({definition})",
                               timeout=60)
            status = await conn.copy_to_table(into_table, schema_name=into_schema, source=copy.rows(),
                                              columns=columns or None, format="text", encoding=copy.encoding,
                                              freeze=True)
    finally:
        await conn.close(timeout=10)
    return int(status.split()[-1])

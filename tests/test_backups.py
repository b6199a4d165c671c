"""Verified pg_dump backups against the machine's real PostgreSQL: taking, verifying, refusing
corrupt ones, loading a table back into a side table, the catalog and retention."""

from __future__ import annotations

import hashlib
import re
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from rollback.targets.database.backups import (
    BackupCatalog,
    BackupCorrupt,
    BackupError,
    BackupManifest,
    _CopyBlock,
    delete_backup,
    load_table_copy,
    select_expired,
    take_backup,
    verify_backup,
)
from rollback.targets.database.pg import ident, local_dsn, qualified
from rollback.targets.database.pgschema import SchemaSnapshot
from tests.postgres import database  # noqa: F401

ORDERS = """
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, total numeric(10,2));
INSERT INTO orders SELECT g, 'customer ' || g, g * 1.5 FROM generate_series(1, 500) g;
"""


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close()


async def _fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql, timeout=60)
    finally:
        await conn.close()


async def _backup(dsn: str, root: Path, backup_id: str = "bk-1", **options: object) -> BackupManifest:
    return await take_backup(dsn=dsn, root=root, backup_id=backup_id, environment="staging",
                             revision="0041_add_index", next_revision="0042_drop_legacy", **options)


def _data_file(manifest: BackupManifest, root: Path) -> Path:
    """The largest data file (orders' rows), not toc.dat."""
    biggest = max((f for f in manifest.files if f.name != "toc.dat"), key=lambda f: f.size)
    return root / manifest.id / biggest.name


async def test_take_backup_writes_a_verified_manifest_with_a_restore_point(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    stages: list[str] = []

    manifest = await _backup(dsn, tmp_path, progress=stages.append)

    backup_dir = tmp_path / "bk-1"
    assert manifest.path == str(backup_dir) and backup_dir.is_dir()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert (manifest.database, manifest.environment) == (database, "staging")
    assert (manifest.revision, manifest.next_revision) == ("0041_add_index", "0042_drop_legacy")
    assert manifest.created_at <= manifest.finished_at <= manifest.verified_at  # type: ignore[operator]
    assert manifest.created_at.tzinfo is not None and manifest.server_version.startswith("15")
    names = {f.name for f in manifest.files}
    assert "toc.dat" in names and len(names) >= 2
    assert {p.name for p in backup_dir.iterdir()} == names | {"manifest.json"}
    assert manifest.total_bytes == sum((backup_dir / n).stat().st_size for n in names)
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in manifest.files)
    orders = manifest.schema_snapshot.tables["public.orders"]
    assert [c.name for c in orders.columns] == ["id", "customer", "total"] and orders.primary_key == ["id"]
    # The superuser test server lets us create a restore point, and its LSN is real WAL.
    assert manifest.restore_point and "bk-1" in manifest.restore_point and manifest.restore_point_note is None
    # (the insert position: the restore point's record may not be written out yet)
    assert await _fetchval(dsn, f"SELECT '{manifest.restore_point_lsn}'::pg_lsn <= pg_current_wal_insert_lsn()") is True
    assert verify_backup(backup_dir) == manifest
    assert any("pg_dump" in s for s in stages) and any("verif" in s for s in stages)


async def test_taking_the_same_backup_again_returns_it_without_dumping(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    first = await _backup(dsn, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bk-1").iterdir()}
    await _execute(dsn, "INSERT INTO orders VALUES (9999, 'after the backup', 1)")

    again = await _backup(dsn, tmp_path)

    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bk-1").iterdir()} == mtimes


async def test_an_interrupted_attempt_is_cleaned_up_and_redone(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    leftover = tmp_path / ".bk-1.partial"
    leftover.mkdir()
    (leftover / "toc.dat").write_bytes(b"half a dump")

    manifest = await _backup(dsn, tmp_path)

    assert not leftover.exists()
    assert verify_backup(tmp_path / "bk-1").files == manifest.files


async def test_a_corrupt_backup_is_refused(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    manifest = await _backup(dsn, tmp_path)
    data = _data_file(manifest, tmp_path)
    expected = next(f.sha256 for f in manifest.files if f.name == data.name)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))

    with pytest.raises(BackupCorrupt) as corrupt:
        verify_backup(tmp_path / "bk-1")
    assert data.name in str(corrupt.value) and expected in str(corrupt.value)
    with pytest.raises(BackupCorrupt, match=re.escape(data.name)):
        await load_table_copy(backup_path=tmp_path / "bk-1", dsn=dsn,
                              table=manifest.schema_snapshot.tables["public.orders"],
                              into_schema="rollback_restore", into_table="orders")
    assert await _fetchval(dsn, "SELECT to_regclass('rollback_restore.orders') IS NULL") is True
    # Taking the same backup again does not paper over it either.
    with pytest.raises(BackupCorrupt, match=re.escape(data.name)):
        await _backup(dsn, tmp_path)

    data.unlink()
    with pytest.raises(BackupCorrupt, match=rf"{re.escape(data.name)} is missing"):
        verify_backup(tmp_path / "bk-1")


async def test_an_unreadable_table_of_contents_or_extra_file_is_refused(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    manifest = await _backup(dsn, tmp_path)
    (tmp_path / "bk-1" / "9999.dat.gz").write_bytes(b"stray")
    with pytest.raises(BackupCorrupt, match="unexpected file 9999.dat.gz"):
        verify_backup(tmp_path / "bk-1")
    (tmp_path / "bk-1" / "9999.dat.gz").unlink()

    # A toc.dat that matches a (rewritten) manifest but is not a dump: pg_restore must say so.
    toc = tmp_path / "bk-1" / "toc.dat"
    toc.write_bytes(b"not a table of contents")
    files = [f if f.name != "toc.dat" else f.model_copy(update={"size": toc.stat().st_size,
                                                               "sha256": hashlib.sha256(toc.read_bytes()).hexdigest()})
             for f in manifest.files]
    (tmp_path / "bk-1" / "manifest.json").write_text(manifest.model_copy(update={"files": files}).model_dump_json())
    with pytest.raises(BackupCorrupt, match="pg_restore cannot read"):
        verify_backup(tmp_path / "bk-1")


AWKWARD = r'''
CREATE SCHEMA "Sales Data";
CREATE TABLE "Sales Data"."Odd ""Name""" (
    id int PRIMARY KEY,
    "Label, with comma" text,
    payload bytea,
    doc jsonb,
    amount numeric(12,3),
    at timestamptz,
    tags text[],
    doubled int GENERATED ALWAYS AS (id * 2) STORED
);
INSERT INTO "Sales Data"."Odd ""Name""" (id, "Label, with comma", payload, doc, amount, at, tags) VALUES
  (1, NULL, NULL, NULL, NULL, NULL, NULL),
  (2, '', '\x'::bytea, '{}', 0, 'epoch', '{}'),
  (3, E'tab\there', '\x00ff5c0a0d09'::bytea, '{"k": "v\tw"}', -1.5, '2024-02-29 12:00+05', ARRAY['a,b', NULL, '"q"']),
  (4, E'line\nbreak\r\ncrlf', decode('5c2e0a', 'hex'), '[1, "\\."]', 123456789.123, 'infinity', ARRAY[E'x\ny']),
  (5, E'back\\slash \\. \\N', '\x5c4e'::bytea, '"\\u00e9"', 1e-3, '1999-12-31 23:59:59.999999+00', ARRAY['\\']),
  (6, E'\\.', NULL, '{"emoji": "🎉"}', NULL, NULL, ARRAY['日本語']),
  (7, 'unicode: ünïcødé ✓ 日本語 🎉', convert_to('ünï', 'UTF8'), 'null', 42, now(), NULL);
-- Enough rows that pg_restore's output spans many pipe reads, with lines split across them.
INSERT INTO "Sales Data"."Odd ""Name""" (id, "Label, with comma", payload, doc, amount, at, tags)
SELECT g, repeat(E'row\t' || g || E'\\\n', 1 + g % 37), decode(md5(g::text), 'hex'), jsonb_build_object('g', g),
       g / 7.0, timestamptz '2020-01-01' + g * interval '1 minute', ARRAY[g::text, NULL]
FROM generate_series(100, 8000) g;
'''
COLUMNS = '''id, "Label, with comma", payload, doc, amount, at, tags'''


async def test_load_table_copy_reproduces_awkward_rows_exactly(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, AWKWARD)
    await _execute(dsn, f'CREATE TABLE saved AS SELECT {COLUMNS} FROM "Sales Data"."Odd ""Name"""')
    manifest = await _backup(dsn, tmp_path)
    # The bad migration: rows destroyed after the backup. The copy must come from the backup.
    await _execute(dsn, 'DELETE FROM "Sales Data"."Odd ""Name""" WHERE id % 2 = 0')
    table = manifest.schema_snapshot.tables['Sales Data.Odd "Name"']

    for _ in range(2):  # idempotent: the second load replaces the first
        count = await load_table_copy(backup_path=tmp_path / "bk-1", dsn=dsn, table=table,
                                      into_schema="rollback restore", into_table='Odd "Name" copy')
        assert count == 7 + 7901

    side = qualified("rollback restore", 'Odd "Name" copy')
    assert await _fetchval(dsn, f"SELECT count(*) FROM {side}") == count
    for a, b in ((side, "saved"), ("saved", side)):
        assert await _fetchval(dsn, f"SELECT count(*) FROM (SELECT {COLUMNS} FROM {a} EXCEPT ALL "
                                    f"SELECT {COLUMNS} FROM {b}) d") == 0
    # Generated columns are not in a dump: the side table has only the columns that hold data.
    assert await _fetchval(dsn, "SELECT count(*) FROM information_schema.columns WHERE table_schema = "
                                "'rollback restore' AND table_name = 'Odd \"Name\" copy'") == 7
    assert await _fetchval(dsn, "SELECT relpersistence::text FROM pg_class WHERE relname = 'Odd \"Name\" copy'") == "u"


async def test_load_table_copy_of_an_empty_table_and_a_missing_one(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS + "CREATE TABLE empty (id int PRIMARY KEY, note text);")
    manifest = await _backup(dsn, tmp_path)
    empty = manifest.schema_snapshot.tables["public.empty"]
    assert await load_table_copy(backup_path=tmp_path / "bk-1", dsn=dsn, table=empty,
                                 into_schema="rollback_restore", into_table="empty") == 0
    missing = empty.model_copy(update={"name": "never_existed"})
    with pytest.raises(BackupError, match="has no table public.never_existed"):
        await load_table_copy(backup_path=tmp_path / "bk-1", dsn=dsn, table=missing,
                              into_schema="rollback_restore", into_table="x")


def _manifest(backup_id: str, environment: str, created_at: datetime) -> BackupManifest:
    return BackupManifest(id=backup_id, environment=environment, database="app", revision=None, next_revision=None,
                          created_at=created_at, finished_at=created_at, server_version="15.20", jobs=2, files=[],
                          total_bytes=0, schema_snapshot=SchemaSnapshot(), path=f"/backups/{backup_id}")


def test_catalog_records_lists_newest_first_and_survives_a_new_instance(tmp_path: Path) -> None:
    now = datetime(2025, 6, 1, tzinfo=timezone.utc)
    catalog = BackupCatalog(tmp_path)
    for i, env in enumerate(["prod", "staging", "prod"]):
        catalog.record(_manifest(f"b{i}", env, now + timedelta(hours=i)))
    catalog.record(_manifest("b0", "prod", now).model_copy(update={"revision": "r7"}))  # upsert, not a duplicate

    reopened = BackupCatalog(tmp_path)
    assert [m.id for m in reopened.list()] == ["b2", "b1", "b0"]
    assert [m.id for m in reopened.list("prod")] == ["b2", "b0"]
    assert reopened.get("b0").revision == "r7"  # type: ignore[union-attr]
    assert reopened.get("nope") is None
    assert reopened.remove("b1") is True and reopened.remove("b1") is False
    assert [m.id for m in BackupCatalog(tmp_path).list()] == ["b2", "b0"]


def test_select_expired_keeps_pinned_recent_and_each_environments_newest() -> None:
    now = datetime(2025, 6, 1, tzinfo=timezone.utc)
    manifests = [_manifest("old-1", "prod", now - timedelta(days=90)),
                 _manifest("old-2", "prod", now - timedelta(days=40)),
                 _manifest("pinned", "prod", now - timedelta(days=60)),
                 _manifest("recent", "prod", now - timedelta(days=29)),
                 _manifest("quiet-only", "dev", now - timedelta(days=200))]
    assert select_expired(manifests, now=now, retention_days=30, pinned={"pinned"}) == ["old-1", "old-2"]
    assert select_expired(manifests, now=now, retention_days=30, pinned=set(), keep_latest=0) == [
        "quiet-only", "old-1", "pinned", "old-2"]
    assert select_expired(manifests, now=now, retention_days=365, pinned=set()) == []


async def test_delete_backup_removes_directory_and_entry_idempotently(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    catalog = BackupCatalog(tmp_path)
    catalog.record(await _backup(dsn, tmp_path))
    catalog.record(await _backup(dsn, tmp_path, backup_id="bk-2"))

    assert delete_backup(catalog, "bk-1") is True
    assert not (tmp_path / "bk-1").exists() and catalog.get("bk-1") is None
    assert delete_backup(catalog, "bk-1") is False
    assert [m.id for m in catalog.list()] == ["bk-2"] and verify_backup(tmp_path / "bk-2")


async def test_an_owner_without_superuser_can_back_up_without_a_restore_point(database: str, tmp_path: Path) -> None:
    role = f"rb_owner_{uuid.uuid4().hex[:8]}"
    admin = local_dsn(database)
    await _execute(admin, f"CREATE ROLE {ident(role)} LOGIN NOSUPERUSER; "
                          f"ALTER DATABASE {ident(database)} OWNER TO {ident(role)}; "
                          f"GRANT CREATE ON SCHEMA public TO {ident(role)}")
    parts = urlsplit(admin)
    # A password in the DSN (trust auth ignores it) must never reach the manifest or a message.
    secret = "planted-s3cret-pw"
    dsn = urlunsplit(parts._replace(netloc=f"{role}:{secret}@{parts.hostname}:{parts.port or 5432}"))
    try:
        await _execute(dsn, ORDERS)
        manifest = await _backup(dsn, tmp_path)
        assert manifest.restore_point is None and manifest.restore_point_lsn is None
        assert "permission denied" in (manifest.restore_point_note or "") and role in manifest.restore_point_note
        assert "public.orders" in manifest.schema_snapshot.tables and verify_backup(tmp_path / "bk-1")
        assert secret not in (tmp_path / "bk-1" / "manifest.json").read_text()

        wrong = urlunsplit(parts._replace(netloc=f"{role}:{secret}@{parts.hostname}:{parts.port or 5432}",
                                          path="/no_such_database_here"))
        with pytest.raises(BackupError, match="no_such_database_here") as failed:
            await _backup(wrong, tmp_path, backup_id="bk-2")
        assert secret not in str(failed.value)
    finally:
        await _execute(admin, f"ALTER DATABASE {ident(database)} OWNER TO postgres; "
                              f"REASSIGN OWNED BY {ident(role)} TO postgres; DROP OWNED BY {ident(role)}")
        await _execute(local_dsn(), f"DROP ROLE {ident(role)}")


class _Pieces:
    """A byte stream that hands out `size` bytes per read, as a slow pipe does."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size = data, size

    async def read(self, n: int) -> bytes:
        piece, self._data = self._data[:min(n, self._size)], self._data[min(n, self._size):]
        return piece


async def test_copy_rows_are_reassembled_whatever_the_chunk_boundaries(database: str, tmp_path: Path) -> None:
    """pg_restore's real output fed in tiny pieces: rows split mid-line, the `\\.` terminator
    split across reads; the COPY block comes out exactly, without header or terminator."""
    dsn = local_dsn(database)
    await _execute(dsn, "CREATE TABLE t (id int, note text); INSERT INTO t VALUES (1, E'a\\\\.b'), (2, NULL), (3, '.');")
    await _backup(dsn, tmp_path)
    output = subprocess.run(["/usr/lib/postgresql/15/bin/pg_restore", "--data-only", "--table=t", "--file=-",
                             str(tmp_path / "bk-1")], capture_output=True, check=True, timeout=60).stdout
    lines = output.split(b"\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(b"COPY public.t "))
    end = lines.index(b"\\.", start)
    expected = b"".join(line + b"\n" for line in lines[start + 1:end])
    assert expected.count(b"\n") == 3

    for piece in (1, 2, 3, 5, 7, 64):
        block = _CopyBlock(_Pieces(output, piece))
        assert await block.read_header() and block.header == ("public", "t", ["id", "note"])
        assert b"".join([chunk async for chunk in block.rows()]) == expected

    block = _CopyBlock(_Pieces(output[:output.index(b"\\.\n")], 4))
    assert await block.read_header()
    with pytest.raises(BackupCorrupt, match="without its terminating"):
        [chunk async for chunk in block.rows()]


async def test_a_backup_that_runs_out_of_time_leaves_nothing_behind(database: str, tmp_path: Path) -> None:
    dsn = local_dsn(database)
    await _execute(dsn, ORDERS)
    with pytest.raises(BackupError, match="did not finish within 0.05 s"):
        await _backup(dsn, tmp_path, timeout=0.05)
    assert not (tmp_path / "bk-1").exists() and not (tmp_path / ".bk-1.partial").exists()
    # ... and the next attempt simply takes it.
    manifest = await _backup(dsn, tmp_path)
    assert verify_backup(tmp_path / "bk-1").files == manifest.files

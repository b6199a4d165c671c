"""How long does rolling back a column drop on a 7M-row table take, losing nothing, under load?

A pgbench database of scale 70 (7,000,000 rows in pgbench_accounts; every `filler` is
md5(aid), so a restored value can be checked) gets two migrations through the system:
0001 (baseline) and 0002, which drops `filler`. An application keeps running throughout:
4 connections reading accounts by key, 1 inserting new accounts (rows written after the
migration) and updating balances. Then RollbackWorkflow rolls the database back to 0001:
verified backup, integrity snapshot, revert (ADD COLUMN under lock_timeout), restore of
7M filler values from the pre-migration backup (by default the table is rebuilt from the
backup and swapped in; `--method merge` updates every row in place), integrity check.

Measured in one run: the rollback's wall time and its steps, the application's query
latency (p50/p99/max) before and during the rollback, and the checks: every original
filler restored, every row the application wrote after the migration present, every
balance it changed kept. Target: under 45 s (a naive batched-UPDATE merge measured ~92 s).

    .venv/bin/python bench/db_rollback.py [--method merge] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _harness import run_benchmark, in_process_worker, log, machine, temporal_server
from _pgbench import ROWS, SCALE, _pg_env, drop

import asyncpg

from rollback.client import RollbackOrchestrator
from rollback.models import MigrateRequest, RollbackRequest, RollbackTarget
from rollback.pg import ident, local_dsn
from rollback.settings import TemporalSettings

DATABASE = "rb_bench_dbrollback"
TARGET_SECONDS = 45
DSN_ENV = "BENCH_DB_ROLLBACK_DSN"


async def create_database() -> str:
    """pgbench tables, scale 70, with a distinct filler per row (md5 of aid) so restores are checkable."""
    await drop(DATABASE)
    admin = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {ident(DATABASE)}")
    finally:
        await admin.close()
    env = _pg_env()
    subprocess.run(["pgbench", "-i", "-I", "dt", "-s", str(SCALE), "-q", DATABASE], env=env, check=True, capture_output=True, timeout=300)
    conn = await asyncpg.connect(local_dsn(DATABASE), timeout=10)
    try:
        await conn.execute("INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT a, (a - 1) / 100000 + 1, 0, md5(a::text) "
                           "FROM generate_series(1, $1::int) a", ROWS, timeout=900)
        await conn.execute(f"INSERT INTO pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, {SCALE}) b")
    finally:
        await conn.close()
    subprocess.run(["pgbench", "-i", "-I", "vp", "-s", str(SCALE), "-q", DATABASE], env=env, check=True, capture_output=True, timeout=900)
    return local_dsn(DATABASE)


def write_config(base: Path, chunk_rows: int, method: str) -> Path:
    migrations = base / "migrations"
    migrations.mkdir()
    (migrations / "0001_baseline.up.sql").write_text("SELECT 1;")
    (migrations / "0001_baseline.down.sql").write_text("SELECT 1;")
    (migrations / "0002_drop_filler.up.sql").write_text("ALTER TABLE pgbench_accounts DROP COLUMN filler;")
    (migrations / "0002_drop_filler.down.sql").write_text("ALTER TABLE pgbench_accounts ADD COLUMN filler character(84);")
    path = base / "rollback.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(base / "state"), "rollback": {"notification_channels": ["log"], "health_check_timeout": 3600},
        "environments": {"bench": {"targets": {"database": {"dsn_env": DSN_ENV, "migrations": str(migrations),
                                                            "backup_dir": str(base / "backups"),
                                                            "restore_chunk_rows": chunk_rows,
                                                            # merge: never rebuild, update every row in place
                                                            "rebuild_min_rows": 1_000_000 if method == "rebuild" else None}}}},
    }))
    return path


class Application:
    """Readers by key, and a writer inserting new accounts and changing balances; every latency recorded."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.samples: list[tuple[float, float, str]] = []  # (time, seconds, kind)
        self.errors: list[tuple[float, str]] = []
        self.inserted: list[int] = []
        self.balances: dict[int, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _loop(self, kind: str, body) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    await body(conn)
                    self.samples.append((start, time.monotonic() - start, kind))
                except (asyncpg.PostgresError, asyncio.TimeoutError) as err:
                    self.errors.append((start, f"{kind}: {type(err).__name__}: {err}"))
                await asyncio.sleep(0.002 if kind == "read" else 0.02)
        finally:
            await conn.close()

    async def _read(self, conn: asyncpg.Connection) -> None:
        await conn.fetchrow("SELECT bid, abalance FROM pgbench_accounts WHERE aid = $1", random.randint(1, ROWS), timeout=30)

    async def _write(self, conn: asyncpg.Connection) -> None:
        aid = ROWS + len(self.inserted) + 1
        await conn.execute("INSERT INTO pgbench_accounts (aid, bid, abalance) VALUES ($1, 1, $2)", aid, aid % 1000, timeout=30)
        self.inserted.append(aid)
        changed, balance = random.randint(1, ROWS), random.randint(1, 10**6)
        await conn.execute("UPDATE pgbench_accounts SET abalance = $2 WHERE aid = $1", changed, balance, timeout=30)
        self.balances[changed] = balance

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop("read", self._read)) for _ in range(4)]
        self._tasks.append(asyncio.create_task(self._loop("write", self._write)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def latency(self, since: float, until: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("read", "write"):
            values = sorted(s for t, s, k in self.samples if k == kind and since <= t <= until)
            if values:
                out[kind] = {"queries": len(values), "p50_ms": round(1000 * statistics.median(values), 2),
                             "p99_ms": round(1000 * values[int(0.99 * (len(values) - 1))], 2), "max_ms": round(1000 * values[-1], 2)}
        out["errors"] = len([e for t, e in self.errors if since <= t <= until])
        return out


async def check(dsn: str, app: Application) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        wrong_filler = await conn.fetchval("SELECT count(*) FROM pgbench_accounts WHERE aid <= $1 AND "
                                           "filler IS DISTINCT FROM md5(aid::text)::character(84)", ROWS, timeout=600)
        present = await conn.fetchval("SELECT count(*) FROM pgbench_accounts WHERE aid = ANY($1::int[])", app.inserted)
        rows = await conn.fetch("SELECT aid, abalance FROM pgbench_accounts WHERE aid = ANY($1::int[])", list(app.balances))
        kept = sum(1 for r in rows if app.balances[r["aid"]] == r["abalance"])
        total = await conn.fetchval("SELECT count(*) FROM pgbench_accounts")
    finally:
        await conn.close()
    return {"original_rows_with_wrong_filler": wrong_filler, "rows_written_after_migration": len(app.inserted),
            "of_which_present": present, "balances_changed_by_app": len(app.balances), "of_which_kept": kept,
            "total_rows": total, "no_row_lost": wrong_filler == 0 and present == len(app.inserted) and kept == len(app.balances)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    log(f"creating {DATABASE}: pgbench scale {SCALE} with distinct fillers (about a minute)")
    dsn = await create_database()
    setup_seconds = round(time.monotonic() - t0, 1)
    os.environ[DSN_ENV] = dsn
    app = Application(dsn)
    with tempfile.TemporaryDirectory(prefix="rb-bench-db-") as tmp:
        config_path = write_config(Path(tmp), args.chunk_rows, args.method)
        async with temporal_server() as env, in_process_worker(env.client, config_path) as queue:
            orch = RollbackOrchestrator(client=env.client, settings=TemporalSettings(address="unused", namespace=env.client.namespace, task_queue=queue))
            await orch.migrate(MigrateRequest(environment="bench", to_revision="0001"), on_progress=log)
            app.start()
            migrate_started = time.monotonic()
            await orch.migrate(MigrateRequest(environment="bench", to_revision="0002"), on_progress=log)
            migrate_seconds = time.monotonic() - migrate_started
            log("0002 applied (filler dropped); the application keeps writing for 10 s")
            await asyncio.sleep(10)  # load, not synchronisation: rows written after the migration
            started_at = time.monotonic()
            started = await orch.start(RollbackRequest(environment="bench", targets=[RollbackTarget.DATABASE],
                                                       initiated_by="bench", reason="0002 dropped filler"))
            result = await orch.wait(started.execution_id)
            finished_at = time.monotonic()
            status = await orch.get_rollback_status(started.execution_id)
            await asyncio.sleep(3)
            await app.stop()
    log(f"rollback {result.state.value} in {finished_at - started_at:.1f} s; checking every row")
    checks = await check(dsn, app)
    if not args.keep:
        await drop(DATABASE)
    seconds = round(finished_at - started_at, 2)
    steps = {s.name: round((s.finished - s.started).total_seconds(), 2) for s in status.steps if s.started and s.finished}
    return {
        "benchmark": "db_rollback",
        "rows": ROWS,
        "restore_method": args.method,
        "restore_chunk_rows": args.chunk_rows,
        "rollback_state": result.state.value,
        "error": result.error,
        "rollback_seconds": seconds,
        "target_seconds": TARGET_SECONDS,
        "target_met": result.state.value == "succeeded" and seconds < TARGET_SECONDS and checks["no_row_lost"],
        "naive_batched_update_seconds_reported": 92,
        "phase_seconds": result.phase_seconds,
        "steps_seconds": steps,
        "checks": checks,
        "application_before": app.latency(started_at - 10, started_at),
        "application_during_rollback": app.latency(started_at, finished_at),
        "application_errors_sample": [e for _, e in app.errors[:5]],
        "migration_0002_with_backup_seconds": round(migrate_seconds, 2),
        "setup_seconds": setup_seconds,
        "integrity": status.reports.get("database_integrity", {}).get("summary"),
        "restore": status.reports.get("database_restore"),
        "machine": machine(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database afterwards")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="targets.database.restore_chunk_rows (default 50000)")
    parser.add_argument("--method", choices=["rebuild", "merge"], default="rebuild",
                        help="rebuild the table (the default for tables of 1M rows and more) or merge in place")
    run_benchmark(main, parser.parse_args(sys.argv[1:]),
                  lambda a: "db_rollback" + ("" if a.method == "rebuild" else ".merge")
                  + ("" if a.chunk_rows == 50_000 else f".chunk{a.chunk_rows}"))

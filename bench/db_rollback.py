"""Rolling back a destructive migration of a 7M-row table under pgbench TPC-B load: what is lost, how long, what the application feels.

A pgbench database of scale 70 (7,000,000 accounts, 700 tellers, 70 branches) built so that every
value can be checked afterwards: each account's `filler` is md5(aid) and its `abalance` a known
function of aid, all above the smallint range. Migrations through `DatabaseMigrationWorkflow`
(backup first, then the migration with its capture): 0001 (baseline) and 0002, which deletes 10%
of the accounts, drops `filler` and narrows `abalance` to smallint (clamping every value)
(`--scenario drop-column`: only drops `filler`, issue 4's scenario, for comparison). A pgbench
TPC-B script (multi-statement transactions: update an account, read it, update a teller and a
branch, insert history) runs on 4 connections throughout: before the migration, during it and during
the rollback. Then `RollbackWorkflow` rolls the database back to 0001.

Measured in one run:
- the rollback's wall time against a bare `pg_restore --data-only` of pgbench_accounts from the
  migration's backup into an empty copy of the table (same machine, same run). Target: <= 1.5x;
- the application's throughput during the rollback against before the migration (target: >= 70%;
  between the migration and the rollback it is broken, as a bad release is: the narrowed balances
  overflow), and its p50/p99/max transaction latency in each window;
- what is lost: 0 rows and values. Every account is back, every filler is md5(aid), every account
  the application never touched has its original balance, the integrity check (fingerprints
  before and after, in REPEATABLE READ) has no unexplained difference, and the TPC-B invariant
  holds for the tellers and branches (their balances are the history's deltas).

    .venv/bin/python bench/db_rollback.py [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _harness import in_process_worker, log, machine, run_benchmark, temporal_server
from _pgbench import ROWS, SCALE, _pg_env, drop

import asyncpg

from rollback.targets.database.backups import DEFAULT_PG_BIN, BackupCatalog
from rollback.client import RollbackOrchestrator
from rollback.dev.pgbench_load import PgbenchLoad
from rollback.models import MigrateRequest, RollbackRequest, RollbackTarget
from rollback.targets.database.pg import ident, local_dsn
from rollback.settings import TemporalSettings

DATABASE = "rb_bench_dbrollback"
SCRATCH = "rb_bench_dbrollback_restore"
DSN_ENV = "BENCH_DB_ROLLBACK_DSN"
TARGET_RATIO = 1.5
TARGET_THROUGHPUT = 0.7
BASELINE_SECONDS = 20
ORIGINAL_BALANCE = "(aid::bigint * 7919 % 1000000 + 40000)::int"  # never fits smallint: the migration clamps all
# (up, down) per scenario: the issue's, and issue 4's single column drop for comparison with its figures.
SCENARIOS = {
    "destructive": (
        "DELETE FROM pgbench_accounts WHERE aid % 10 = 0;\n"
        "ALTER TABLE pgbench_accounts DROP COLUMN filler;\n"
        "ALTER TABLE pgbench_accounts ALTER COLUMN abalance TYPE smallint USING greatest(-32768, least(32767, abalance));\n",
        "ALTER TABLE pgbench_accounts ALTER COLUMN abalance TYPE integer;\n"
        "ALTER TABLE pgbench_accounts ADD COLUMN filler character(84);\n"),
    "drop-column": ("ALTER TABLE pgbench_accounts DROP COLUMN filler;\n",
                    "ALTER TABLE pgbench_accounts ADD COLUMN filler character(84);\n"),
}
TPCB = f"""
\\set aid random(1, {ROWS})
\\set bid random(1, {SCALE})
\\set tid random(1, {10 * SCALE})
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


async def execute(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql, *args, timeout=3600)
    finally:
        await conn.close()


async def create_database() -> str:
    """pgbench tables, scale 70, with a checkable filler and balance per account."""
    await drop(DATABASE)
    await execute(local_dsn(), f"CREATE DATABASE {ident(DATABASE)}")
    env = _pg_env()
    subprocess.run(["pgbench", "-i", "-I", "dt", "-s", str(SCALE), "-q", DATABASE], env=env, check=True, capture_output=True,
                   timeout=300)
    dsn = local_dsn(DATABASE)
    await execute(dsn, f"INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT aid, (aid - 1) / 100000 + 1, "
                       f"{ORIGINAL_BALANCE}, md5(aid::text) FROM generate_series(1, $1::int) aid", ROWS)
    await execute(dsn, f"INSERT INTO pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, {SCALE}) b")
    await execute(dsn, f"INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT t, (t - 1) / 10 + 1, 0 "
                       f"FROM generate_series(1, {10 * SCALE}) t")
    subprocess.run(["pgbench", "-i", "-I", "vp", "-s", str(SCALE), "-q", DATABASE], env=env, check=True, capture_output=True,
                   timeout=900)
    return dsn


def write_config(base: Path, chunk_rows: int, scenario: str) -> Path:
    migrations = base / "migrations"
    migrations.mkdir()
    up, down = SCENARIOS[scenario]
    (migrations / "0001_baseline.up.sql").write_text("SELECT 1;")
    (migrations / "0001_baseline.down.sql").write_text("SELECT 1;")
    (migrations / "0002_bad_release.up.sql").write_text(up)
    (migrations / "0002_bad_release.down.sql").write_text(down)
    path = base / "rollback.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(base / "state"), "rollback": {"notification_channels": ["log"], "health_check_timeout": 3600},
        "environments": {"bench": {"targets": {"database": {"dsn_env": DSN_ENV, "migrations": str(migrations),
                                                            "backup_dir": str(base / "backups"),
                                                            "restore_chunk_rows": chunk_rows}}}},
    }))
    return path


async def bare_pg_restore(backup: Path) -> float:
    """Seconds of `pg_restore --data-only` of pgbench_accounts from the backup into an empty copy of the table."""
    await drop(SCRATCH)
    await execute(local_dsn(), f"CREATE DATABASE {ident(SCRATCH)}")
    env = _pg_env()
    pg_restore = str(DEFAULT_PG_BIN / "pg_restore")
    subprocess.run([pg_restore, "--schema-only", "--table=pgbench_accounts", "-d", SCRATCH, str(backup)], env=env,
                   check=True, capture_output=True, timeout=600)
    started = time.monotonic()
    subprocess.run([pg_restore, "--data-only", "--table=pgbench_accounts", "-d", SCRATCH, str(backup)], env=env,
                   check=True, capture_output=True, timeout=3600)
    seconds = time.monotonic() - started
    rows = await execute(local_dsn(SCRATCH), "SELECT count(*) FROM pgbench_accounts")
    await drop(SCRATCH)
    if rows != ROWS:
        raise RuntimeError(f"the bare pg_restore loaded {rows} rows, not {ROWS}")
    return seconds


async def checks(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        total = await conn.fetchval("SELECT count(*) FROM pgbench_accounts", timeout=600)
        wrong_filler = await conn.fetchval("SELECT count(*) FROM pgbench_accounts WHERE filler IS DISTINCT FROM "
                                           "md5(aid::text)::character(84)", timeout=600)
        touched = await conn.fetchval("SELECT count(DISTINCT aid) FROM pgbench_history", timeout=600)
        wrong_untouched = await conn.fetchval(
            f"SELECT count(*) FROM pgbench_accounts a WHERE abalance <> {ORIGINAL_BALANCE} "
            "AND NOT EXISTS (SELECT FROM pgbench_history h WHERE h.aid = a.aid)", timeout=600)
        deltas = await conn.fetchval("SELECT coalesce(sum(delta), 0) FROM pgbench_history")
        tellers = await conn.fetchval("SELECT sum(tbalance) FROM pgbench_tellers")
        branches = await conn.fetchval("SELECT sum(bbalance) FROM pgbench_branches")
    finally:
        await conn.close()
    return {"accounts": total, "accounts_expected": ROWS, "fillers_wrong": wrong_filler,
            "accounts_touched_by_the_application": touched, "untouched_accounts_with_a_wrong_balance": wrong_untouched,
            "tpcb_invariant": deltas == tellers == branches,
            "nothing_lost": total == ROWS and wrong_filler == 0 and wrong_untouched == 0 and deltas == tellers == branches}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    log(f"creating {DATABASE}: pgbench scale {SCALE} with checkable fillers and balances (a minute or two)")
    dsn = await create_database()
    setup_seconds = round(time.monotonic() - t0, 1)
    os.environ[DSN_ENV] = dsn
    with tempfile.TemporaryDirectory(prefix="rb-bench-db-") as tmp:
        config_path = write_config(Path(tmp), args.chunk_rows, args.scenario)
        async with temporal_server() as env, in_process_worker(env.client, config_path) as queue:
            orch = RollbackOrchestrator(client=env.client, settings=TemporalSettings(
                address="unused", namespace=env.client.namespace, task_queue=queue))
            await orch.migrate(MigrateRequest(environment="bench", to_revision="0001"), on_progress=log)
            with PgbenchLoad(dsn, TPCB, Path(tmp), clients=4) as load:
                log(f"TPC-B load for {BASELINE_SECONDS} s before the migration")
                baseline_started = time.monotonic()
                await asyncio.sleep(BASELINE_SECONDS)  # load, not synchronisation: the baseline window
                migrate_started = time.monotonic()
                await orch.migrate(MigrateRequest(environment="bench", to_revision="0002"), on_progress=log)
                migrate_seconds = time.monotonic() - migrate_started
                log(f"0002 applied in {migrate_seconds:.1f} s; {BASELINE_SECONDS} s of load before the rollback")
                await asyncio.sleep(BASELINE_SECONDS)  # the window "just before" the rollback
                started_at = time.monotonic()
                started = await orch.start(RollbackRequest(environment="bench", targets=[RollbackTarget.DATABASE],
                                                           initiated_by="bench", reason="0002 deleted, dropped and narrowed"))
                result = await orch.wait(started.execution_id)
                finished_at = time.monotonic()
                status = await orch.get_rollback_status(started.execution_id)
                load_result = load.stop()
            backup = BackupCatalog(Path(tmp) / "backups").list("bench")[0]
            log(f"rollback {result.state.value if result else 'not succeeded'} in {finished_at - started_at:.1f} s; "
                "timing a bare pg_restore of the table from the same backup")
            bare = await bare_pg_restore(Path(backup.path))
    log("checking every account")
    checked = await checks(dsn)
    if not args.keep:
        await drop(DATABASE)
    seconds = finished_at - started_at
    before = load_result.window(baseline_started, migrate_started)
    broken = load_result.window(migrate_started + migrate_seconds, started_at)
    during = load_result.window(started_at, finished_at)
    ratio = round(seconds / bare, 3)
    throughput = round(during["tps"] / before["tps"], 3) if during["tps"] and before["tps"] else None
    integrity = status.reports.get("database_integrity", {})
    unexplained = sum(t.get("unexplained", 0) for t in integrity.get("tables", {}).values())
    misses = [m for m, bad in (
        (f"rollback {status.state.value}: {status.error}", status.state.value != "succeeded"),
        (f"rollback/bare pg_restore ratio {ratio} > {TARGET_RATIO}", ratio > TARGET_RATIO),
        (f"throughput during the rollback {throughput} of before < {TARGET_THROUGHPUT}",
         throughput is None or throughput < TARGET_THROUGHPUT),
        ("something was lost (see checks)", not checked["nothing_lost"]),
        (f"integrity: {integrity.get('summary')}", not integrity.get("ok") or unexplained),
        (f"{during['failed']} application transactions failed during the rollback", bool(during["failed"]))) if bad]
    steps = {s.name: round((s.finished - s.started).total_seconds(), 2) for s in status.steps if s.started and s.finished}
    return {
        "benchmark": "db_rollback",
        "rows": ROWS,
        "scenario": args.scenario,
        "migration": SCENARIOS[args.scenario][0],
        "rollback_state": status.state.value,
        "error": status.error,
        "rollback_seconds": round(seconds, 2),
        "bare_pg_restore_seconds": round(bare, 2),
        "ratio_to_bare_pg_restore": ratio,
        "target_ratio": TARGET_RATIO,
        "application_before_migration": before,
        "application_between_migration_and_rollback": broken,
        "application_during_rollback": during,
        "application_errors_sample": load_result.errors[:3],
        "throughput_ratio": throughput,
        "target_throughput_ratio": TARGET_THROUGHPUT,
        "application_transactions": load_result.transactions,
        "application_failed_transactions": load_result.failed,
        "checks": checked,
        "integrity": integrity.get("summary"),
        "result": "target met" if not misses else "target missed",
        "misses": misses,
        "phase_seconds": result.phase_seconds if result else None,
        "steps_seconds": steps,
        "restore": status.reports.get("database_restore"),
        "migration_0002_with_backup_and_capture_seconds": round(migrate_seconds, 2),
        "setup_seconds": setup_seconds,
        "machine": machine(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database afterwards")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="targets.database.restore_chunk_rows (default 50000)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="destructive",
                        help="destructive (the default: delete 10%%, drop filler, narrow abalance) or drop-column")
    run_benchmark(main, parser.parse_args(sys.argv[1:]),
                  lambda a: "db_rollback" + ("" if a.scenario == "destructive" else f".{a.scenario}")
                  + ("" if a.chunk_rows == 50_000 else f".chunk{a.chunk_rows}"))

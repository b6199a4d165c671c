"""What does capturing a migration's destruction cost? A migration that updates 1M rows, with and without.

A pgbench database of scale 10 (1,000,000 rows in pgbench_accounts) is copied afresh for every
run (CREATE DATABASE ... TEMPLATE, so every run updates the same clean table). Each run does what
`rollback db migrate` does for one revision: a verified backup (`take_backup`), then the
migration `UPDATE pgbench_accounts SET abalance = abalance + 1, bid = bid` (every row), either

- `captured`: through `apply_up`, as `rollback db migrate` does: statement by statement in its
  transaction, the update's old and new rows copied by a statement trigger with transition tables;
- `plain`: the same SQL as one script in one transaction, recorded the same way, capturing nothing
  (how migrations were applied before captures existed).

The two alternate (plain, captured, plain, ...) `--runs` times each. Two ratios of the medians:
`ratio_migrate` (backup + migration, the time `rollback db migrate` takes: the target,
captured <= 1.5x plain) and `ratio_apply` (the migration's transaction alone, where the capture's
whole cost shows). The checks: the captured run archived exactly 1,000,000 old rows and
1,000,000 new rows, and both runs left the same table.

    .venv/bin/python bench/migration_capture.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import log, machine, run_benchmark
from _pgbench import _pg_env

import asyncpg

from rollback.targets.database.backups import take_backup
from rollback.targets.database.migrations import apply_up, load_migrations, record_applied
from rollback.targets.database.pg import ident, local_dsn

TEMPLATE = "rb_bench_capture_template"
SCALE = 10
ROWS = SCALE * 100_000
TARGET_RATIO = 1.5
MIGRATION = "UPDATE pgbench_accounts SET abalance = abalance + 1, bid = bid;"


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        await conn.execute(sql, timeout=900)
    finally:
        await conn.close()


async def ensure_template() -> None:
    conn = await asyncpg.connect(local_dsn(), timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEMPLATE)
    finally:
        await conn.close()
    if exists:
        return
    log(f"creating {TEMPLATE}: pgbench scale {SCALE}")
    await admin(f"CREATE DATABASE {ident(TEMPLATE)}")
    subprocess.run(["pgbench", "-i", "-s", str(SCALE), "-q", TEMPLATE], env=_pg_env(), check=True, capture_output=True,
                   timeout=600)
    conn = await asyncpg.connect(local_dsn(TEMPLATE), timeout=10)
    try:
        await conn.execute("VACUUM ANALYZE pgbench_accounts")
    finally:
        await conn.close()


async def one_run(mode: str, number: int, migrations, work: Path) -> dict[str, Any]:
    name = f"rb_bench_capture_{mode}_{number}"
    await admin(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
    await admin(f"CREATE DATABASE {ident(name)} TEMPLATE {ident(TEMPLATE)}")
    conn = await asyncpg.connect(local_dsn(name), timeout=10)
    try:
        baseline, migration = migrations
        await apply_up(conn, baseline, backup_id=None, lock_timeout_ms=2000, attempts=3)
        await conn.execute("CHECKPOINT")
        backup_started = time.monotonic()
        await take_backup(dsn=local_dsn(name), root=work / f"{mode}-{number}", backup_id="b", environment="bench",
                          revision="0001", next_revision="0002")
        backup_seconds = time.monotonic() - backup_started
        started = time.monotonic()
        if mode == "captured":
            applied = await apply_up(conn, migration, backup_id=None, lock_timeout_ms=2000, attempts=3)
            seconds = time.monotonic() - started
            assert applied.capture is not None
            archived = {o.kind: o.rows for o in applied.capture.objects}
        else:
            async with conn.transaction():
                await conn.execute(migration.up_sql, timeout=900)
                await record_applied(conn, migration, xid=await conn.fetchval("SELECT txid_current()"), backup_id=None,
                                     capture=None)
            seconds = time.monotonic() - started
            archived = {}
        fingerprint = await conn.fetchval("SELECT sum(hashtextextended(aid || ':' || bid || ':' || abalance, 0)) "
                                          "FROM pgbench_accounts")
    finally:
        await conn.close()
        await admin(f"DROP DATABASE IF EXISTS {ident(name)} WITH (FORCE)")
    log(f"{mode} run {number}: backup {backup_seconds:.2f} s, migration {seconds:.2f} s {archived or ''}")
    return {"mode": mode, "apply_seconds": round(seconds, 3), "migrate_seconds": round(backup_seconds + seconds, 3),
            "archived_rows": archived, "fingerprint": str(fingerprint)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    await ensure_template()
    with tempfile.TemporaryDirectory(prefix="rb-bench-capture-") as tmp:
        directory = Path(tmp) / "migrations"
        directory.mkdir()
        (directory / "0001_baseline.up.sql").write_text("SELECT 1;")
        (directory / "0002_touch_every_account.up.sql").write_text(MIGRATION)
        migrations = load_migrations(directory)
        runs = []
        for number in range(args.runs):
            for mode in ("plain", "captured"):
                runs.append(await one_run(mode, number, migrations, Path(tmp)))
    def median(mode: str, what: str) -> float:
        return statistics.median(r[what] for r in runs if r["mode"] == mode)

    ratio = round(median("captured", "migrate_seconds") / median("plain", "migrate_seconds"), 3)
    ratio_apply = round(median("captured", "apply_seconds") / median("plain", "apply_seconds"), 3)
    complete = all(r["archived_rows"] == {"rows": ROWS, "new": ROWS} for r in runs if r["mode"] == "captured")
    same_result = len({r["fingerprint"] for r in runs}) == 1
    misses = [m for m, bad in (
        (f"captured/plain migrate median ratio {ratio} > {TARGET_RATIO}", ratio > TARGET_RATIO),
        ("a captured run did not archive every old and after row", not complete),
        ("the runs left different tables", not same_result)) if bad]
    return {
        "benchmark": "migration_capture",
        "rows_updated": ROWS,
        "migration": MIGRATION,
        "median_seconds": {mode: {what: round(median(mode, what), 3) for what in ("migrate_seconds", "apply_seconds")}
                           for mode in ("plain", "captured")},
        "ratio_migrate": ratio,
        "ratio_apply": ratio_apply,
        "target_ratio": TARGET_RATIO,
        "every_row_captured": complete,
        "same_table_after": same_result,
        "result": "target met" if not misses else "target missed",
        "misses": misses,
        "runs": runs,
        "machine": machine(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode (default 3)")
    run_benchmark(main, parser.parse_args(sys.argv[1:]), "migration_capture")

"""What do verified backups cost over a plain pg_dump, and how fast does a table come back out?

On the scale-70 pgbench database (rb_bench_pgbench, 7,000,000 rows in pgbench_accounts,
read-only here), alternating in ONE run for --rounds rounds (3; who goes first alternates too):

  plain   `pg_dump -Fd -j 2 -f <dir>`, timed from start to exit;
  ours    `take_backup(jobs=2)`: restore point, exported snapshot + schema snapshot, the
          same pg_dump, sha256 of every file, manifest, verification (sizes, checksums,
          pg_restore --list) and the atomic rename.

Target: median(plain_time / our_time) >= 0.95 (the checksums and verification add at most
~5%). Then `load_table_copy` of pgbench_accounts from the last backup into an UNLOGGED side
table in a scratch database (created and dropped here), timed as rows/s.

Dump directories live under a temporary directory in /tmp (same disk as the tests) and are
removed at the end. JSON on stdout and in bench/results/backup_throughput.json; progress on stderr.

    .venv/bin/python bench/backup_throughput.py [--rounds 3] [--jobs 2] [--skip-load]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import emit, exit_now, keep_stdout_for_json, log, machine
from _pgbench import DATABASE, ROWS, ensure_pgbench

from rollback.targets.database.backups import DEFAULT_PG_BIN, load_table_copy, take_backup
from rollback.targets.database.pg import connect, local_dsn
from tests.postgres import create_database, drop_database

TARGET_RATIO = 0.95


def _pg_env(dsn: str) -> dict[str, str]:
    from urllib.parse import unquote, urlsplit

    env = dict(os.environ)
    if password := urlsplit(dsn).password:
        env["PGPASSWORD"] = unquote(password)
    return env


def plain_dump(dsn: str, directory: Path, jobs: int) -> float:
    from rollback.targets.database.backups import _without_password  # the same password-free argv as take_backup

    started = time.perf_counter()
    subprocess.run([str(DEFAULT_PG_BIN / "pg_dump"), "--format=directory", f"--jobs={jobs}", f"--file={directory}",
                    "--no-password", f"--dbname={_without_password(dsn)}"],
                   env=_pg_env(dsn), check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - started


def plain_round(dsn: str, directory: Path, jobs: int) -> tuple[float, int]:
    seconds = plain_dump(dsn, directory, jobs)
    size = sum(p.stat().st_size for p in directory.iterdir())
    shutil.rmtree(directory)
    return seconds, size


async def our_dump(dsn: str, root: Path, backup_id: str, jobs: int) -> tuple[float, int, float]:
    """(total seconds, bytes, seconds inside pg_dump): the rest is what take_backup adds,
    a figure the machine's noise does not blur the way the ratio of two runs is blurred."""
    marks: dict[str, float] = {}

    def progress(stage: str) -> None:
        if "pg_dump" in stage:
            marks["dump"] = time.perf_counter()
        elif "sha256" in stage:
            marks["dumped"] = time.perf_counter()

    started = time.perf_counter()
    manifest = await take_backup(dsn=dsn, root=root, backup_id=backup_id, environment="bench", revision=None,
                                 next_revision=None, jobs=jobs, progress=progress)
    return time.perf_counter() - started, manifest.total_bytes, marks["dumped"] - marks["dump"]


async def measure_load(dsn: str, backup: Path) -> dict[str, Any]:
    from rollback.targets.database.backups import verify_backup

    manifest = verify_backup(backup)
    table = manifest.schema_snapshot.tables["public.pgbench_accounts"]
    scratch = await create_database("rb_bench_backup_load")
    try:
        target = local_dsn(scratch)
        log(f"load_table_copy of pgbench_accounts into {scratch}")
        started = time.perf_counter()
        rows = await load_table_copy(backup_path=backup, dsn=target, table=table, into_schema="rollback_restore",
                                     into_table="pgbench_accounts")
        seconds = time.perf_counter() - started
        conn = await connect(target)
        try:
            counted = await conn.fetchval("SELECT count(*) FROM rollback_restore.pgbench_accounts", timeout=600)
        finally:
            await conn.close()
    finally:
        await drop_database(scratch)
    log(f"loaded {rows} rows in {seconds:.1f} s")
    return {"rows": rows, "rows_counted": counted, "seconds": round(seconds, 2),
            "rows_per_second": round(rows / seconds), "includes": "verify_backup (checksums) + stream + COPY"}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    keep_stdout_for_json()

    log("ensuring the scale-70 pgbench database")
    dsn = await ensure_pgbench()
    conn = await connect(dsn)
    try:
        server_version = await conn.fetchval("SELECT current_setting('server_version')", timeout=10)
        db_bytes = await conn.fetchval("SELECT pg_database_size(current_database())", timeout=10)
    finally:
        await conn.close()

    work = Path(tempfile.mkdtemp(prefix="rb_bench_backup_", dir="/tmp"))
    rounds: list[dict[str, Any]] = []
    load: dict[str, Any] | None = None
    try:
        for i in range(args.rounds):
            # Who goes first alternates, so a cache warmed by the previous dump favours neither.
            if i % 2 == 0:
                plain_seconds, plain_bytes = plain_round(dsn, work / f"plain-{i}", args.jobs)
                ours_seconds, ours_bytes, inside = await our_dump(dsn, work / "ours", f"round-{i}", args.jobs)
            else:
                ours_seconds, ours_bytes, inside = await our_dump(dsn, work / "ours", f"round-{i}", args.jobs)
                plain_seconds, plain_bytes = plain_round(dsn, work / f"plain-{i}", args.jobs)
            ratio = plain_seconds / ours_seconds
            log(f"round {i + 1} ({'plain' if i % 2 == 0 else 'ours'} first): plain {plain_seconds:.2f} s, take_backup {ours_seconds:.2f} s, ratio {ratio:.3f}")
            rounds.append({"plain_seconds": round(plain_seconds, 3), "plain_bytes": plain_bytes,
                           "plain_mb_per_s": round(db_bytes / plain_seconds / 1e6, 1),
                           "ours_seconds": round(ours_seconds, 3), "ours_bytes": ours_bytes,
                           "ours_mb_per_s": round(db_bytes / ours_seconds / 1e6, 1), "ratio": round(ratio, 4),
                           "ours_inside_pg_dump_seconds": round(inside, 3),
                           "ours_overhead_seconds": round(ours_seconds - inside, 3)})
            if i < args.rounds - 1:
                shutil.rmtree(work / "ours" / f"round-{i}")
        if not args.skip_load:
            load = await measure_load(dsn, work / "ours" / f"round-{args.rounds - 1}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median_ratio = statistics.median(r["ratio"] for r in rounds)
    met = median_ratio >= TARGET_RATIO
    emit("backup_throughput", {
        "benchmark": "backup_throughput",
        "database": {"name": DATABASE, "rows_pgbench_accounts": ROWS, "bytes": db_bytes,
                     "server_version": server_version},
        "jobs": args.jobs,
        "mb_per_s_means": "database size (pg_database_size) / wall time",
        "rounds": rounds,
        "median_ratio_plain_over_ours": round(median_ratio, 4),
        "median_overhead_fraction": round(statistics.median(r["ours_overhead_seconds"] / r["ours_seconds"]
                                                            for r in rounds), 4),
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "result": "target met" if met else "target missed",
        "load_table_copy": load,
        "machine": machine(),
    })


if __name__ == "__main__":
    asyncio.run(main())
    exit_now(0)

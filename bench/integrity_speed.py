"""How fast are integrity fingerprints on pgbench_accounts (7,000,000 rows, 4 columns)?

In one run, on the shared scale-70 pgbench database (read only; the only write is the
kept-rows table in rollback_archive, dropped after each repetition), 3 repetitions each:
  - `SELECT count(*)`: the floor, a parallel scan that hashes nothing;
  - take_snapshot(keep_rows=False): fingerprints only (rows/s);
  - take_snapshot(keep_rows=True): plus one narrow UNLOGGED row per source row (rows/s);
  - compare() against the kept-rows snapshot on unchanged data;
then, on a scratch copy of the same rows in a database of its own (rb_bench_integrity, dropped
at the end), take_snapshot(keep_rows=True) followed by 2,000 inserts and 2,000 updates of
random rows from another connection (what an application does during a rollback), then
compare(), which must name all 4,000 rows as concurrent writes; and "rewrite-all": the same after
a rollback transaction rewrote every one of the 7M rows with the same values (one UPDATE, then
VACUUM) before the 4,000 application writes, compared with that transaction's xid in
rollback_xids (all 4,000 concurrent, 0 unexplained).
Medians are reported with the ratios to count(*), which survive this shared machine's noise
better than absolute seconds. Target: 2,000,000 rows/s for take_snapshot(keep_rows=False).

    .venv/bin/python bench/integrity_speed.py [--repetitions 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _pgbench import ROWS, drop, ensure_pgbench  # noqa: E402

from rollback.targets.database.integrity import TableSpec, compare, drop_kept_rows, take_snapshot  # noqa: E402
from rollback.targets.database.pg import connect, ident, local_dsn  # noqa: E402

SCRATCH = "rb_bench_integrity"
CHANGES = 2_000  # inserts, and as many updates of random existing rows

TARGET_ROWS_PER_SECOND = 2_000_000
SPEC = TableSpec(table="public.pgbench_accounts", key=["aid"], columns=["aid", "bid", "abalance", "filler"])


def log(message: str) -> None:
    print(f"[integrity_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def _timed(coroutine) -> tuple[float, object]:
    started = time.perf_counter()
    result = await coroutine
    return time.perf_counter() - started, result


async def _scratch() -> str:
    """A database of our own with pgbench_accounts' shape and contents (pgbench -i writes exactly these rows)."""
    await drop(SCRATCH)
    admin = await connect(local_dsn())
    try:
        await admin.execute(f"CREATE DATABASE {ident(SCRATCH)}", timeout=60)
    finally:
        await admin.close()
    conn = await connect(local_dsn(SCRATCH))
    try:
        await conn.execute("CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, abalance int, filler char(84)) "
                           "WITH (fillfactor = 100)", timeout=60)
        await conn.execute("INSERT INTO pgbench_accounts SELECT aid, (aid - 1) / 100000 + 1, 0, '' "
                           "FROM generate_series(1, $1) aid", ROWS, timeout=900)
        await conn.execute("ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid)", timeout=900)
        await conn.execute("VACUUM ANALYZE pgbench_accounts", timeout=900)
    finally:
        await conn.close()
    return local_dsn(SCRATCH)


async def _application_writes(dsn: str, rows: int) -> None:
    """CHANGES inserts and CHANGES updates of distinct random rows, in small transactions like an application's."""
    app = await connect(dsn, application_name="bench-integrity-app")
    try:
        top = await app.fetchval("SELECT max(aid) FROM pgbench_accounts", timeout=60)
        new = list(range(top + 1, top + 1 + CHANGES))
        old = random.sample(range(1, rows + 1), CHANGES)
        for start in range(0, CHANGES, 100):
            async with app.transaction():
                await app.execute("INSERT INTO pgbench_accounts SELECT aid, 1, 0, 'new' FROM unnest($1::int[]) aid",
                                  new[start:start + 100], timeout=60)
                await app.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = ANY($1::int[])",
                                  old[start:start + 100], timeout=60)
    finally:
        await app.close()


async def _rewrite_all(conn) -> int:
    """A rollback transaction that rewrites every row with the same values; its xid."""
    async with conn.transaction():
        await conn.execute("UPDATE pgbench_accounts SET abalance = abalance", timeout=1800)
        xid = await conn.fetchval("SELECT pg_current_xact_id()::text::int8", timeout=60)
    await conn.execute("VACUUM pgbench_accounts", timeout=1800)  # let the next rewrite reuse the dead rows' space
    return xid


async def run_concurrent(repetitions: int) -> dict[str, dict[str, list[float]]]:
    """take_snapshot(keep_rows=True), [a rewrite of every row,] 4,000 application writes, compare():
    seconds of both, per repetition, for the scenarios "concurrent" and "rewrite_all"."""
    dsn = await _scratch()
    scenarios: dict[str, dict[str, list[float]]] = {}
    conn = await connect(dsn, application_name="bench-integrity")
    try:
        for scenario in ("concurrent", "rewrite_all"):
            times = scenarios[scenario] = {"snapshot_keep_rows": [], "compare": [], "total": []}
            for repetition in range(1, repetitions + 1):
                rows = await conn.fetchval("SELECT count(*) FROM pgbench_accounts", timeout=600)
                snapshot_seconds, kept = await _timed(take_snapshot(conn, [SPEC], label=f"bench-{scenario}",
                                                                    keep_rows=True))
                try:
                    rewriters = {await _rewrite_all(conn)} if scenario == "rewrite_all" else set()
                    await _application_writes(dsn, ROWS)
                    compare_seconds, report = await _timed(compare(conn, kept, [SPEC], rollback_xids=rewriters,
                                                                   expected_xids=rewriters))
                finally:
                    await drop_kept_rows(conn, kept)
                table = report.tables[SPEC.table]
                assert report.ok and (table.inserted, table.changed, table.concurrent, table.unexplained,
                                      table.rows_after) == (CHANGES, CHANGES, 2 * CHANGES, 0, rows + CHANGES), \
                    report.summary
                times["snapshot_keep_rows"].append(snapshot_seconds)
                times["compare"].append(compare_seconds)
                times["total"].append(snapshot_seconds + compare_seconds)
                log(f"{scenario} repetition {repetition}: snapshot {snapshot_seconds:.2f} s, "
                    f"compare {compare_seconds:.2f} s")
    finally:
        await conn.close()
        await drop(SCRATCH)
    return scenarios


async def run(repetitions: int) -> dict:
    dsn = await ensure_pgbench()
    conn = await connect(dsn, application_name="bench-integrity")
    try:
        version = await conn.fetchval("SHOW server_version")
        workers = await conn.fetchval("SHOW max_parallel_workers_per_gather")
        times: dict[str, list[float]] = {"count": [], "snapshot": [], "snapshot_keep_rows": [], "compare": []}
        for repetition in range(1, repetitions + 1):
            seconds, rows = await _timed(conn.fetchval("SELECT count(*) FROM pgbench_accounts", timeout=600))
            assert rows == ROWS, f"pgbench_accounts has {rows} rows, not {ROWS}"
            times["count"].append(seconds)
            seconds, light = await _timed(take_snapshot(conn, [SPEC], label="bench-light", keep_rows=False))
            times["snapshot"].append(seconds)
            snapshot_bytes = len(light.model_dump_json())  # it travels through Temporal as an activity result
            seconds, kept = await _timed(take_snapshot(conn, [SPEC], label="bench-kept", keep_rows=True))
            times["snapshot_keep_rows"].append(seconds)
            try:
                assert light.tables[SPEC.table].values == kept.tables[SPEC.table].values, "fingerprints disagree"
                seconds, report = await _timed(compare(conn, kept, [SPEC]))
                times["compare"].append(seconds)
                assert report.ok and not report.differences, report.summary
            finally:
                await drop_kept_rows(conn, kept)
            log(f"repetition {repetition}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    finally:
        await conn.close()
    scenarios = await run_concurrent(repetitions)
    concurrent, rewrite_all = scenarios["concurrent"], scenarios["rewrite_all"]
    median = {k: statistics.median(v) for k, v in times.items()}
    busy = {k: statistics.median(v) for k, v in concurrent.items()}
    rate = ROWS / median["snapshot"]
    return {
        "benchmark": "integrity_speed",
        "table": "pgbench_accounts", "rows": ROWS, "columns": len(SPEC.columns), "buckets": 1024,
        "repetitions": repetitions,
        "count_seconds": round(median["count"], 3),
        "snapshot_seconds": round(median["snapshot"], 3),
        "snapshot_rows_per_second": round(rate),
        "snapshot_keep_rows_seconds": round(median["snapshot_keep_rows"], 3),
        "snapshot_keep_rows_rows_per_second": round(ROWS / median["snapshot_keep_rows"]),
        "compare_unchanged_seconds": round(median["compare"], 3),
        "snapshot_json_bytes": snapshot_bytes,
        "concurrent_changes": 2 * CHANGES,
        "concurrent_snapshot_keep_rows_seconds": round(busy["snapshot_keep_rows"], 3),
        "concurrent_compare_seconds": round(busy["compare"], 3),
        "concurrent_total_seconds": round(busy["total"], 3),
        "concurrent_all_seconds": {k: [round(s, 3) for s in v] for k, v in concurrent.items()},
        "rewrite_all_compare_seconds": round(statistics.median(rewrite_all["compare"]), 3),
        "rewrite_all_all_seconds": {k: [round(s, 3) for s in v] for k, v in rewrite_all.items()},
        "snapshot_to_count_ratio": round(median["snapshot"] / median["count"], 2),
        "keep_rows_to_snapshot_ratio": round(median["snapshot_keep_rows"] / median["snapshot"], 2),
        "all_seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
        "target_rows_per_second": TARGET_ROWS_PER_SECOND,
        "target_met": rate >= TARGET_ROWS_PER_SECOND,
        "machine": {"cpu_count": os.cpu_count(), "postgresql": version,
                    "max_parallel_workers_per_gather": int(workers), "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.repetitions)), indent=2))


if __name__ == "__main__":
    main()

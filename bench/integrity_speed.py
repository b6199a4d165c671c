"""How fast are integrity fingerprints on pgbench_accounts (7,000,000 rows, 4 columns)?

In one run, on the shared scale-70 pgbench database (read only; the only write is the
kept-rows table in rollback_archive, dropped after each repetition), 3 repetitions each:
  - `SELECT count(*)`: the floor, a parallel scan that hashes nothing;
  - take_snapshot(keep_rows=False): fingerprints only (rows/s);
  - take_snapshot(keep_rows=True): plus one narrow UNLOGGED row per source row (rows/s);
  - compare() against the kept-rows snapshot on unchanged data.
Medians are reported with the ratios to count(*), which survive this shared machine's noise
better than absolute seconds. Target: 2,000,000 rows/s for take_snapshot(keep_rows=False).

    .venv/bin/python bench/integrity_speed.py [--repetitions 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _pgbench import ROWS, ensure_pgbench  # noqa: E402

from rollback.integrity import TableSpec, compare, drop_kept_rows, take_snapshot  # noqa: E402
from rollback.pg import connect  # noqa: E402

TARGET_ROWS_PER_SECOND = 2_000_000
SPEC = TableSpec(table="public.pgbench_accounts", key=["aid"], columns=["aid", "bid", "abalance", "filler"])


def log(message: str) -> None:
    print(f"[integrity_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def _timed(coroutine) -> tuple[float, object]:
    started = time.perf_counter()
    result = await coroutine
    return time.perf_counter() - started, result


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
    median = {k: statistics.median(v) for k, v in times.items()}
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

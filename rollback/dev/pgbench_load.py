"""A real `pgbench` running a script against a database in the background, for as long as a test or a
benchmark needs load: multi-statement transactions, row locks held across statements.

pgbench prints its summary only when its `-T` time is up (SIGINT ends it silently), and the caller
does not know how long its rollback will take: so the load is a loop of short pgbench runs
(`round_seconds` each, a few milliseconds apart) until `stop()`. Each round's transactions,
failures and per-transaction latencies (pgbench's own log, `-l`) are kept with the round's start
and end, so throughput and latency can be read for any window (before, during a rollback).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Round:
    started: float  # time.monotonic()
    finished: float
    transactions: int
    failed: int
    latencies_ms: list[float]


@dataclass
class LoadResult:
    transactions: int = 0
    failed: int = 0
    rounds: list[Round] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def window(self, since: float, until: float) -> dict[str, float | int | None]:
        """Throughput and latency of the rounds that lie within [since, until]."""
        inside = [r for r in self.rounds if r.started >= since and r.finished <= until]
        seconds = sum(r.finished - r.started for r in inside)
        latencies = sorted(x for r in inside for x in r.latencies_ms)
        return {"rounds": len(inside), "transactions": sum(r.transactions for r in inside),
                "tps": round(sum(r.transactions for r in inside) / seconds, 1) if seconds else None,
                "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
                "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
                "max_ms": round(latencies[-1], 2) if latencies else None,
                "failed": sum(r.failed for r in inside)}


class PgbenchLoad:
    """`with PgbenchLoad(dsn, script, work_dir) as load: ...; result = load.stop()`."""

    def __init__(self, dsn: str, script: str, work_dir: Path, *, clients: int = 4, round_seconds: int = 2) -> None:
        parts = urlsplit(dsn)
        script_path = work_dir / f"load-{id(self)}.sql"
        script_path.write_text(script)
        self.env = {**os.environ, "PGHOST": parts.hostname or "127.0.0.1", "PGPORT": str(parts.port or 5432),
                    "PGUSER": parts.username or "postgres", "PGDATABASE": parts.path.lstrip("/")}
        if parts.password:
            self.env["PGPASSWORD"] = parts.password
        self.round_seconds = round_seconds
        # --max-tries retries serialization failures and deadlocks, as an application would.
        self.argv = ["pgbench", "-n", "-c", str(clients), "-j", "2", "-T", str(round_seconds), "--max-tries", "10",
                     "-l", "-f", str(script_path)]
        self.result = LoadResult()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with tempfile.TemporaryDirectory(prefix="rb-pgbench-") as logs:
                started = time.monotonic()
                done = subprocess.run([*self.argv, "--log-prefix", f"{logs}/tx"], env=self.env, capture_output=True,
                                      text=True, timeout=self.round_seconds + 60, cwd=logs)
                finished = time.monotonic()
                latencies = [int(line.split()[2]) / 1000 for path in Path(logs).glob("tx*") for line in
                             path.read_text().splitlines() if len(line.split()) > 2 and line.split()[2].isdigit()]
            processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
            failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
            round_ = Round(started=started, finished=finished, transactions=int(processed.group(1)) if processed else 0,
                           failed=int(failed.group(1)) if failed else 0, latencies_ms=latencies)
            self.result.rounds.append(round_)
            self.result.transactions += round_.transactions
            self.result.failed += round_.failed
            if done.returncode != 0:
                self.result.errors.append(done.stderr.strip()[-500:])

    def __enter__(self) -> PgbenchLoad:
        self._thread.start()
        return self

    def stop(self) -> LoadResult:
        """Let the round in progress finish (at most round_seconds), then the totals."""
        self._stopping.set()
        self._thread.join(timeout=self.round_seconds + 90)
        return self.result

    def __exit__(self, *_: object) -> None:
        self.stop()

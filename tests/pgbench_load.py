"""A real `pgbench` running a script against a test database in the background, for as long as a
test needs load: multi-statement transactions, row locks held across statements.

pgbench prints its summary only when its `-T` time is up (SIGINT ends it silently), and a test
does not know how long its rollback will take: so the load is a loop of short pgbench runs
(`ROUND_SECONDS` each, a few milliseconds apart) until `stop()`, and the summaries are added up.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROUND_SECONDS = 2


@dataclass
class LoadResult:
    transactions: int = 0
    failed: int = 0
    rounds: int = 0
    errors: list[str] = field(default_factory=list)


class PgbenchLoad:
    """`with PgbenchLoad(dsn, script, tmp_path) as load: ...; result = load.stop()`."""

    def __init__(self, dsn: str, script: str, work_dir: Path, *, clients: int = 4) -> None:
        parts = urlsplit(dsn)
        script_path = work_dir / f"load-{id(self)}.sql"
        script_path.write_text(script)
        self.env = {**os.environ, "PGHOST": parts.hostname or "127.0.0.1", "PGPORT": str(parts.port or 5432),
                    "PGUSER": parts.username or "postgres", "PGDATABASE": parts.path.lstrip("/")}
        if parts.password:
            self.env["PGPASSWORD"] = parts.password
        # --max-tries retries serialization failures and deadlocks, as an application would.
        self.argv = ["pgbench", "-n", "-c", str(clients), "-j", "2", "-T", str(ROUND_SECONDS), "--max-tries", "10",
                     "-f", str(script_path)]
        self.result = LoadResult()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            done = subprocess.run(self.argv, env=self.env, capture_output=True, text=True, timeout=ROUND_SECONDS + 60)
            processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
            failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
            self.result.rounds += 1
            self.result.transactions += int(processed.group(1)) if processed else 0
            self.result.failed += int(failed.group(1)) if failed else 0
            if done.returncode != 0:
                self.result.errors.append(done.stderr.strip()[-500:])

    def __enter__(self) -> PgbenchLoad:
        self._thread.start()
        return self

    def stop(self) -> LoadResult:
        """Let the round in progress finish (at most ROUND_SECONDS), then the totals."""
        self._stopping.set()
        self._thread.join(timeout=ROUND_SECONDS + 90)
        return self.result

    def __exit__(self, *_: object) -> None:
        self.stop()

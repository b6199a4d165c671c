"""A private PostgreSQL cluster WITH WAL archiving, for point-in-time recovery tests.

The machine's shared server has archive_mode off and must stay as it is, so PITR tests initdb
their own cluster. initdb and postgres refuse root: as root (here and on CI) they run as the
`postgres` OS user, in a directory under /tmp that user can reach (pytest's tmp_path lives
under a root-only 0700 directory, so it cannot be used for the cluster).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rollback.ports import free_port
from rollback.targets.database.pitr import DEFAULT_PG_BIN


def _as_user(run_as: str | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    entry = pwd.getpwnam(run_as)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class ArchivingCluster:
    base_dir: Path
    data_dir: Path
    archive_dir: Path
    socket_dir: Path
    port: int
    run_as: str | None
    pg_bin_dir: Path = DEFAULT_PG_BIN

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *argv: str, timeout: float = 60) -> None:
        subprocess.run([str(self.pg_bin_dir / argv[0]), *argv[1:]], check=True, timeout=timeout,
                       capture_output=True, stdin=subprocess.DEVNULL, **_as_user(self.run_as))

    def workspace(self, name: str) -> Path:
        """A directory inside the cluster's tree that the postgres OS user can reach too."""
        path = self.base_dir / name
        path.mkdir()
        if self.run_as is not None:
            shutil.chown(path, self.run_as, self.run_as)
        return path

    def wait_archived(self, wal_file: str, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not (self.archive_dir / wal_file).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"WAL segment {wal_file} was not archived within {timeout} s")
            time.sleep(0.05)

    def start(self) -> None:
        self.run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                 "-l", str(self.base_dir / "server.log"), timeout=70)

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", timeout=70)


def start_archiving_cluster() -> ArchivingCluster:
    run_as = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="rb-pitr-"))
    cluster = ArchivingCluster(base_dir=base, data_dir=base / "data", archive_dir=base / "archive",
                               socket_dir=base / "sock", port=free_port(), run_as=run_as)
    cluster.archive_dir.mkdir()
    cluster.socket_dir.mkdir()
    if run_as is not None:
        for path in (base, cluster.archive_dir, cluster.socket_dir):
            shutil.chown(path, run_as, run_as)
    cluster.run("initdb", "-D", str(cluster.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                "--locale=C", "--no-sync", timeout=120)
    archive = str(cluster.archive_dir)
    with (cluster.data_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"""
port = {cluster.port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{cluster.socket_dir}'
wal_level = replica
archive_mode = on
archive_command = 'test ! -f {archive}/%f && cp %p {archive}/%f'
shared_buffers = 16MB
max_wal_senders = 4
fsync = off
""")
    with (cluster.data_dir / "pg_hba.conf").open("w") as hba:
        hba.write("local all all trust\nhost all all 127.0.0.1/32 trust\n"
                  "local replication all trust\nhost replication all 127.0.0.1/32 trust\n")
    cluster.start()
    return cluster


@pytest.fixture
def archiving_cluster() -> Iterator[ArchivingCluster]:
    cluster = start_archiving_cluster()
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(cluster.base_dir, ignore_errors=True)

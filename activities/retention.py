"""Retention: delete backups (and archive tables) past `backup_retention_days`, never a pinned one; and
frontend releases beyond each frontend's `keep_releases`, never the live, current or known-good one.

Pinned: the backups a rollback of the current or the known-good revision would need,
every backup of an environment where a rollback is running (it may reference any of
them), and those whose rollback archive is still inside the retention window.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.client import Client

from rollback.targets.database import integrity
from rollback.targets.database.backups import BackupCatalog, delete_backup, select_expired
from rollback.config import ConfigSource
from rollback.targets.database.config import DatabaseTarget
from rollback.targets.database.pg import MissingDsn, dsn_from_env, qualified
from rollback.payloads import APPLY_RETENTION, RetentionInput, RetentionReport
from rollback.targets.database.schema_rollback import ARCHIVE_SCHEMA
from rollback.targets.frontend.config import FrontendTarget
from rollback.targets.frontend.store import to_retire
from rollback.state import StateStore


class Retention:
    def __init__(self, config: ConfigSource, client: Client) -> None:
        self.config = config
        self.client = client

    async def _rollback_running(self, environment: str) -> bool:
        query = f"WorkflowType = 'RollbackWorkflow' AND ExecutionStatus = 'Running' AND RollbackEnvironment = '{environment}'"
        async for _ in self.client.list_workflows(query, limit=1):
            return True
        return False

    @activity.defn(name=APPLY_RETENTION)
    async def apply(self, inp: RetentionInput) -> RetentionReport:
        config = self.config.get()
        now = datetime.now(timezone.utc)
        days = config.rollback.backup_retention_days
        report = RetentionReport(retention_days=days)
        for name, env in config.environments.items():
            frontend = env.targets.of("frontend", FrontendTarget)
            target = env.targets.of("database", DatabaseTarget)
            has_backups = target is not None and target.backup_dir is not None
            if frontend is None and not has_backups:
                continue
            if await self._rollback_running(name):
                report.skipped[name] = "a rollback is running: every backup and frontend release of this environment is kept"
                continue
            if frontend is not None:
                report.releases_retired[name] = await asyncio.to_thread(self._retire_releases, config.state_dir, name, frontend,
                                                                        dry_run=inp.dry_run)
            if target is None or target.backup_dir is None:
                continue
            catalog = BackupCatalog(target.backup_dir)
            manifests = catalog.list(name)
            versions = StateStore(config.state_dir).versions(name, "database", seed=target.versions)
            pinned = _pins(manifests, versions.current, versions.known_good)
            archives = await self._archives(target, now - timedelta(days=days), drop=not inp.dry_run)
            pinned |= {m.id for m in manifests if m.next_revision in archives["recent_revisions"]}
            report.pinned[name] = sorted(pinned)
            report.archives_dropped += archives["dropped"]
            for backup_id in select_expired(manifests, now=now, retention_days=days, pinned=pinned):
                if not inp.dry_run:
                    delete_backup(catalog, backup_id)
                report.deleted.append(backup_id)
            activity.heartbeat(name)
        return report

    @staticmethod
    def _retire_releases(state_dir: Path, environment: str, target: FrontendTarget, *, dry_run: bool) -> list[str]:
        store = target.store.open()
        versions = StateStore(state_dir).versions(environment, "frontend", seed=target.versions)
        live = store.live()
        protect = {v for v in (versions.current, versions.known_good, live) if v}
        if dry_run:
            return to_retire(store.versions(), keep=target.keep_releases, protect=protect)
        return store.retire(keep=target.keep_releases, protect=protect)

    async def _archives(self, target: DatabaseTarget, cutoff: datetime, *, drop: bool) -> dict[str, Any]:
        """Drop archive tables of reverts older than the window; the revisions reverted within it."""
        try:
            dsn = dsn_from_env(target.dsn_env)
        except MissingDsn:
            return {"dropped": [], "recent_revisions": set()}
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            expired = await integrity.expire_stored(conn, cutoff, drop=drop)
            if not await conn.fetchval("SELECT to_regclass('rollback_meta.reverts') IS NOT NULL"):
                return {"dropped": expired, "recent_revisions": set()}
            # A revert's archives: what the added objects held, and the capture its restore read.
            rows = await conn.fetch("SELECT key, revision, done_at, coalesce(result->'archived', '[]') || "
                                    "coalesce(result->'capture'->'objects', '[]') AS archived FROM rollback_meta.reverts")
            dropped, recent = expired, set()
            for row in rows:
                if row["done_at"] >= cutoff:
                    recent.add(row["revision"])
                    continue
                for item in json.loads(row["archived"] or "[]"):
                    if drop:
                        await conn.execute(f"DROP TABLE IF EXISTS {qualified(ARCHIVE_SCHEMA, item['archive_table'])}")
                    dropped.append(item["archive_table"])
            if await conn.fetchval("SELECT to_regclass('rollback_meta.rebuilds') IS NOT NULL"):
                # Who wrote the rows of a rebuilt table: needed only by that rollback's integrity check.
                for authors in await conn.fetch("SELECT report->>'authors' FROM rollback_meta.rebuilds "
                                                "WHERE done_at < $1 AND report ? 'authors'", cutoff):
                    if drop and await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", authors[0]):
                        await conn.execute(f"DROP TABLE {authors[0]}")  # a name this tool built with qualified()
                    dropped.append(authors[0])
            return {"dropped": dropped, "recent_revisions": recent}
        finally:
            await conn.close()


def _pins(manifests: list, current: str | None, known_good: str | None) -> set[str]:
    """The newest backup taken before the current revision's migration, and the newest of the known-good revision."""
    pins: set[str] = set()
    for predicate in (lambda m: current is not None and m.next_revision == current,
                      lambda m: known_good is not None and m.revision == known_good):
        newest = next((m for m in manifests if predicate(m)), None)  # manifests are newest first
        if newest is not None:
            pins.add(newest.id)
    return pins

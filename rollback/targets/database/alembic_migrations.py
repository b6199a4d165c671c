"""Alembic projects as a migration source: each revision becomes a Migration of plain SQL.

The orchestrator applies and reverts a migration as one SQL script inside its own
transaction (lock_timeout, recorded transaction id), so each Alembic revision is turned
into the SQL Alembic's offline mode (`alembic upgrade a:b --sql`) emits for it, minus the
BEGIN/COMMIT around it. The alembic_version statements stay: after our migrate or
rollback, `alembic current` still tells the truth.

The SQL is generated in a child interpreter, not in-process: the project's env.py is
user code that normally calls logging.config.fileConfig (which disables every logger
already configured in the worker), prepends to sys.path and imports the application's
models; it also resolves `prepend_sys_path = .` against the working directory, as when
run by `alembic` from the project directory. A child is isolated and can be killed on timeout.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel

from rollback.targets.database.migration_model import Migration, MigrationError

# Runs in the child with only Alembic imported (importing `rollback` would pull in Temporal):
# argv = [ini, output.json]. Known problems are written as {"error": ...}; the parent turns
# everything into Migrations.
_CHILD_PROGRAM = r'''
import io, json, sys
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

ini, out = sys.argv[1], sys.argv[2]


def finish(result):
    with open(out, "w") as f:
        json.dump(result, f)
    sys.exit(0)


def offline_sql(cfg, run, span):
    buffer = io.StringIO()
    cfg.output_buffer = buffer
    run(cfg, span, sql=True)
    return buffer.getvalue()


cfg = Config(ini)
try:
    url = cfg.get_main_option("sqlalchemy.url") or ""
    if not url.startswith("postgresql"):
        # Offline mode never connects: it needs only the dialect.
        cfg.set_main_option("sqlalchemy.url", "postgresql://")
    script = ScriptDirectory.from_config(cfg)
    heads, bases = script.get_heads(), script.get_bases()
    revisions = list(reversed(list(script.walk_revisions("base", "heads"))))
except CommandError as err:
    finish({"error": f"{ini}: {err}"})
if not revisions:
    finish({"error": f"{ini}: the Alembic project has no revisions"})
if len(heads) > 1:
    finish({"error": f"{ini}: the Alembic project has {len(heads)} heads ({', '.join(sorted(heads))}); "
                     "the orchestrator needs one linear history"})
if len(bases) > 1:
    finish({"error": f"{ini}: the Alembic project has {len(bases)} base revisions ({', '.join(sorted(bases))}); "
                     "the orchestrator needs one linear history"})
for rev in revisions:
    if isinstance(rev.down_revision, (tuple, list)):
        finish({"error": f"{ini}: revision {rev.revision} merges {', '.join(rev.down_revision)}; "
                         "the orchestrator needs one linear history"})

result = []
for rev in revisions:
    previous = rev.down_revision or "base"
    try:
        up = offline_sql(cfg, command.upgrade, f"{previous}:{rev.revision}")
        down = offline_sql(cfg, command.downgrade, f"{rev.revision}:{previous}")
    except Exception as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        finish({"error": f"{ini}: revision {rev.revision} ({rev.doc!r}): offline SQL generation failed ({detail}); "
                         "the orchestrator runs what `alembic upgrade --sql` emits, so every revision must work "
                         "in offline mode (no reading data through op.get_bind())"})
    result.append({"revision": rev.revision, "down_revision": rev.down_revision, "message": rev.doc or "",
                   "up": up, "down": down})
finish({"revisions": result})
'''

_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*):[^@\s]*@")
_TRANSACTION_CONTROL = {"BEGIN;", "COMMIT;", "ROLLBACK;", "START TRANSACTION;"}


class _OfflineRevision(BaseModel):
    revision: str
    down_revision: str | None
    message: str
    up: str
    down: str


def load_alembic_migrations(ini: Path, *, timeout: float = 120) -> list[Migration]:
    """The Alembic project's revisions, oldest first, as Migrations of offline SQL."""
    if not ini.is_file():
        raise MigrationError(f"{ini}: alembic.ini not found")
    return [_migration(revision) for revision in _generate(ini.resolve(), timeout=timeout)]


def _generate(ini: Path, *, timeout: float) -> list[_OfflineRevision]:
    with tempfile.TemporaryDirectory(prefix="rollback-alembic-") as tmp:
        out = Path(tmp) / "offline.json"
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD_PROGRAM, str(ini), str(out)], cwd=ini.parent,
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MigrationError(f"{ini}: generating the offline SQL of its Alembic revisions took longer than "
                                 f"{timeout:g} s") from None
        if proc.returncode != 0 or not out.exists():
            raise MigrationError(f"{ini}: Alembic failed while loading the project (exit {proc.returncode}): "
                                 f"{_last_line(proc.stderr)}")
        result = json.loads(out.read_text())
    if "error" in result:
        raise MigrationError(_without_passwords(result["error"]))
    return [_OfflineRevision(**r) for r in result["revisions"]]


def _migration(rev: _OfflineRevision) -> Migration:
    up = _without_transaction_control(rev.up, revision=rev.revision, direction="upgrade")
    down = _without_transaction_control(rev.down, revision=rev.revision, direction="downgrade")
    if rev.down_revision is None:
        up = _version_table_if_not_exists(up)
    checksum = hashlib.sha256(up.encode() + b"\0" + down.encode()).hexdigest()
    return Migration(revision=rev.revision, name=_slug(rev.message), up_sql=up, down_sql=down, checksum=checksum)


def _without_transaction_control(sql: str, *, revision: str, direction: str) -> str:
    """Drop the BEGIN;/COMMIT; Alembic wraps the script in: the orchestrator runs it in its own transaction.

    Any other transaction control (an autocommit_block, an explicit COMMIT) would end the
    orchestrator's transaction half-way, losing atomicity and the recorded xid: refused.
    """
    lines = sql.strip().splitlines()
    if lines and lines[0].strip().upper() == "BEGIN;":
        lines = lines[1:]
    if lines and lines[-1].strip().upper() == "COMMIT;":
        lines = lines[:-1]
    if any(line.strip().upper() in _TRANSACTION_CONTROL for line in lines):
        raise MigrationError(f"Alembic revision {revision}: its {direction} commits part-way (an autocommit_block or "
                             "an explicit COMMIT); the orchestrator runs each migration in one transaction, so move "
                             "non-transactional statements (e.g. CREATE INDEX CONCURRENTLY) out of the migration")
    return "\n".join(lines).strip() + "\n"


def _version_table_if_not_exists(up: str) -> str:
    """Offline mode always creates alembic_version before the first revision; Alembic's downgrade to
    base empties the table but keeps it, so re-applying the first revision must not fail on it."""
    head, marker, rest = up.partition("-- Running upgrade")
    head = re.sub(r"^CREATE TABLE (?!IF NOT EXISTS )", "CREATE TABLE IF NOT EXISTS ", head, flags=re.MULTILINE)
    return head + marker + rest


def _slug(message: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "_", message.lower()).strip("_-")[:60].rstrip("_-")
    return slug or "revision"


def _without_passwords(text: str) -> str:
    return _PASSWORD_IN_URL.sub(r"\1:***@", text)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return _without_passwords(lines[-1].strip())[:500] if lines else "no error output"

"""The `rollback` command line: start, approve, reject, status, watch, list, cancel, dev ...

Every command prints one clear line on error (no traceback) and exits non-zero;
exit 0 only on success. Commands end with os._exit after flushing, because
temporalio can abort at interpreter exit (sdk-python issue 300).
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from importlib.metadata import entry_points
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from rollback.client import RollbackError, RollbackOrchestrator, deploy_gate, ensure_search_attributes
from rollback.config import CONFIGURABLE_TARGETS, AppConfig, ConfigError, load_config
from rollback.models import (
    LOCK_STEP, TERMINAL_STATES, MigrateRequest, Phase, RollbackRequest, RollbackStatus, RollbackTarget, RollbackTrigger,
)
from rollback.versions import version_problem
from rollback.settings import SEARCH_ATTRIBUTES, TemporalSettings, config_path, search_attribute_type
from rollback.live import live_version
from rollback.state import StateStore
from rollback.targets.frontend.config import FrontendTarget
from rollback.targets.frontend.store import ReleaseStore

_TARGETS_HELP = f"{', '.join(CONFIGURABLE_TARGETS)} or full (repeatable)"

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=f"Durable rollbacks of {', '.join(CONFIGURABLE_TARGETS)}, together or alone.")
monitor_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continuous health monitoring.")
app.add_typer(monitor_app, name="monitor")
db_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Database migrations and backups.")
app.add_typer(db_app, name="db")
release_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Frontend releases: write release.json, publish, list.")
app.add_typer(release_app, name="release")
# Piped output (logs, CI) gets room for whole step names instead of rich's 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


# Where the commands find Temporal: set once per run by the --address/--namespace options
# (see `connection`), else TEMPORAL_ADDRESS/TEMPORAL_NAMESPACE. A module global because a
# CLI run is one process and one command; every command reads it through _orchestrator().
_temporal: TemporalSettings | None = None


def _settings() -> TemporalSettings:
    return _temporal or TemporalSettings.from_env()


def _orchestrator() -> RollbackOrchestrator:
    return RollbackOrchestrator(settings=_settings())


@app.callback()
def connection(
    address: Optional[str] = typer.Option(None, "--address", metavar="HOST:PORT",
                                          help="Temporal service address; overrides TEMPORAL_ADDRESS (default 127.0.0.1:7233)"),
    namespace: Optional[str] = typer.Option(None, "--namespace", metavar="NAME",
                                            help="Temporal namespace; overrides TEMPORAL_NAMESPACE (default: default)"),
) -> None:
    global _temporal
    settings = TemporalSettings.from_env()
    _temporal = dataclasses.replace(settings, address=address or settings.address, namespace=namespace or settings.namespace)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    _exit(1)


def run(action: Callable[[], Coroutine[Any, Any, int | None]]) -> None:
    """Run an async command; turn every expected failure into one line and an exit code."""
    try:
        code = asyncio.run(action())
    except (RollbackError, ConfigError) as err:
        _fail(str(err))
    except ValidationError as err:
        first = err.errors()[0]
        _fail(f"{'.'.join(str(p) for p in first['loc']) or 'input'}: {first['msg']}")
    except RPCError as err:
        hint = ""
        if "search attribute" in err.message.lower():
            # A Temporal service the rollback search attributes were never registered on.
            where = _settings()
            hint = f"; register the rollback search attributes with `rollback setup` (namespace {where.namespace} on {where.address})"
        _fail(f"Temporal: {err.message}{hint}")
    except (ValueError, OSError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _exit(130)
    _exit(code or 0)


def _checked_targets(targets: list[str]) -> list[str]:
    """Refuse, before anything runs, a target this version cannot roll back, saying why."""
    for name in targets:
        if name not in (*CONFIGURABLE_TARGETS, RollbackTarget.FULL.value):
            raise ValueError(f"targets: unknown target {name!r}; use {', '.join(CONFIGURABLE_TARGETS)} or full")
    return targets


def checked_version(version: str, option: str = "--version") -> str:
    problem = version_problem(version)
    if problem is not None:
        raise ValueError(f"{option}: {problem}")
    return version


def _parse_versions(pairs: list[str]) -> dict[str, str] | None:
    versions: dict[str, str] = {}
    for pair in pairs:
        target, sep, version = pair.partition("=")
        if not sep or not target or not version:
            raise ValueError(f"--to-version expects TARGET=VERSION, got {pair!r}")
        versions[target] = version
    return versions or None


@app.command()
def start(
    environment: str = typer.Option(..., "--environment", "-e", help="environment name from rollback.yaml"),
    target: list[str] = typer.Option(..., "--target", "-t", help=_TARGETS_HELP),
    reason: str = typer.Option("", help="why; shown to approvers and in the record"),
    initiated_by: str = typer.Option(None, "--by", help="who starts it (default: your user name)"),
    to_version: list[str] = typer.Option([], "--to-version", help="TARGET=VERSION; default: last known-good"),
    require_approval: Optional[bool] = typer.Option(None, "--require-approval/--no-approval", help="default: the environment's policy"),
    dry_run: bool = typer.Option(False, "--dry-run", help="assess and coordinate only; change nothing"),
    wait: bool = typer.Option(False, "--wait", help="wait for the end and exit 0 only on success"),
    database_strategy: Optional[str] = typer.Option(None, "--database-strategy",
                                                    help="schema_rollback (default, keeps new rows) or pitr (last resort, loses later writes)"),
    restore_point: Optional[str] = typer.Option(None, "--restore-point", help="pitr: recover to this restore point"),
    target_time: Optional[str] = typer.Option(None, "--target-time", help="pitr: recover to this ISO 8601 time (with a timezone)"),
) -> None:
    """Start a rollback."""

    async def action() -> int:
        database = None
        if database_strategy or restore_point or target_time:
            database = {"strategy": database_strategy or "pitr", "restore_point": restore_point, "target_time": target_time}
        request = RollbackRequest.model_validate({
            "environment": environment, "targets": _checked_targets(target), "trigger": "manual", "reason": reason,
            "initiated_by": initiated_by or getpass.getuser(), "to_version": _parse_versions(to_version),
            "require_approval": require_approval, "dry_run": dry_run, "database": database,
        })
        orchestrator = _orchestrator()
        started = await orchestrator.start(request)
        print(started.execution_id, flush=True)
        if wait:
            return await _watch(orchestrator, started.execution_id, quiet=True)
        # Return once the plan is accepted, so a refused request (unknown environment,
        # no known-good version) fails here, with its reason, not silently later.
        current = await _poll_until(orchestrator, started.execution_id, _plan_accepted)
        if current.state in TERMINAL_STATES and current.state != Phase.SUCCEEDED:
            raise RollbackError(f"{started.execution_id} {current.state.value}: {current.error}")
        return 0

    run(action)


@app.command()
def approve(execution_id: str, by: str = typer.Option(None, "--by"), comment: str = typer.Option(None, "--comment")) -> None:
    """Approve a rollback that waits for approval."""
    run(lambda: _decide(execution_id, "approve", by, comment))


@app.command()
def reject(execution_id: str, by: str = typer.Option(None, "--by"), comment: str = typer.Option(None, "--comment")) -> None:
    """Reject a rollback that waits for approval."""
    run(lambda: _decide(execution_id, "reject", by, comment))


async def _decide(execution_id: str, decision: str, by: str | None, comment: str | None) -> int:
    orchestrator = _orchestrator()
    status = await orchestrator.get_rollback_status(execution_id)
    if status.approval.decision != "pending":
        raise RollbackError(f"{execution_id} is not waiting for approval (approval: {status.approval.decision}, state: {status.state.value})")
    signal = orchestrator.approve if decision == "approve" else orchestrator.reject
    await signal(execution_id, by=by or getpass.getuser(), comment=comment)
    print(f"{decision} sent to {execution_id}")
    return 0


@app.command()
def status(execution_id: str, as_json: bool = typer.Option(False, "--json", help="the raw status as JSON")) -> None:
    """Show a rollback's phase, plan, steps and approval."""

    async def action() -> int:
        current = await _orchestrator().get_rollback_status(execution_id)
        if as_json:
            print(current.model_dump_json(indent=2))
        else:
            out.print(render(current))
        return 0

    run(action)


@app.command()
def watch(execution_id: str) -> None:
    """Follow a rollback live until it ends; exit 0 only if it succeeded."""
    run(lambda: _watch(_orchestrator(), execution_id))


def _plan_accepted(current: RollbackStatus) -> bool:
    """Assessment passed and the environment's lock is ours (or it already ended)."""
    # Records of rollbacks started before steps had ids are known by the name alone.
    locked = any((s.id == LOCK_STEP.id or not s.id and s.name == LOCK_STEP.name) and s.state == "succeeded" for s in current.steps)
    return locked or current.state in TERMINAL_STATES


async def _poll_until(orchestrator: RollbackOrchestrator, execution_id: str,
                      accept: Callable[[RollbackStatus], bool], timeout: float = 120) -> RollbackStatus:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            current = await orchestrator.get_rollback_status(execution_id)
            if accept(current):
                return current
        except RPCError:
            pass  # the first workflow task may not have run yet
        if asyncio.get_running_loop().time() > deadline:
            raise RollbackError(f"{execution_id} did not get past assessment and the lock within {timeout:.0f}s; is a worker running?")
        await asyncio.sleep(0.2)


async def _watch(orchestrator: RollbackOrchestrator, execution_id: str, *, quiet: bool = False) -> int:
    from rich.live import Live

    async def poll() -> RollbackStatus:
        return await orchestrator.get_rollback_status(execution_id)

    def ended(status: RollbackStatus) -> bool:
        # The state turns terminal before the last notification is sent, finished_at after it: until
        # then the record is not final (and the end line, which needs finished_at, not printed).
        return status.state in TERMINAL_STATES and status.finished_at is not None

    current = await poll()
    if quiet or not sys.stdout.isatty():
        seen: set[str] = set()
        while True:
            for line in _events(current):
                if line not in seen:
                    seen.add(line)
                    print(line, flush=True)
            if ended(current):
                break
            await asyncio.sleep(0.5)
            current = await poll()
    else:
        with Live(render(current), console=out, refresh_per_second=4) as live:
            while not ended(current):
                await asyncio.sleep(0.5)
                current = await poll()
                live.update(render(current))
    return 0 if current.state == Phase.SUCCEEDED else 1


NEVER = datetime.max.replace(tzinfo=timezone.utc)


def _events(current: RollbackStatus) -> list[str]:
    """Stable one-line events in the order they happened (for logs, CI, the demo).

    Steps of one workflow task share a timestamp, so order by step start, and put
    each phase and the approval decision before the first step that came after it.
    """
    steps = sorted(enumerate(current.steps), key=lambda pair: (pair[1].started or NEVER, pair[0]))
    marks = sorted([(at, f"phase {phase}") for phase, at in current.phase_started.items()]
                   + ([(current.approval.decided_at, f"  approval: {current.approval.decision}"
                        + (f" by {current.approval.by}" if current.approval.by else ""))]
                      if current.approval.decided_at else []), key=lambda m: m[0])
    lines: list[str] = []
    for _, step in steps:
        if step.started is None:
            continue
        while marks and marks[0][0] <= step.started:
            lines.append(marks.pop(0)[1])
        lines.append(f"  [{step.target}] {step.name}: running")
        if step.finished:
            lines.append(f"  [{step.target}] {step.name}: {step.state}" + (f" ({step.detail})" if step.detail else ""))
    lines += [text for _, text in marks]
    if current.approval.decision == "pending" and current.approval.deadline:
        lines.append(f"  waiting for approval until {current.approval.deadline:%H:%M:%S} UTC")
    if current.finished_at:
        lines.append(current.state.value + (f": {current.error}" if current.error else ""))
    return lines


def render(current: RollbackStatus) -> Table:
    table = Table(title=f"{current.workflow_id}  [{current.state.value}]", show_lines=False, title_justify="left")
    table.add_column("target")
    table.add_column("step")
    table.add_column("state")
    table.add_column("tries", justify="right")
    table.add_column("secs", justify="right")
    table.add_column("detail", overflow="fold")
    for step in current.steps:
        secs = f"{(step.finished - step.started).total_seconds():.2f}" if step.started and step.finished else ""
        table.add_row(step.target, step.name, step.state, str(step.attempts), secs, step.detail[:160])
    caption = [f"environment {current.environment}, trigger {current.trigger}, by {current.initiated_by}"]
    if current.plan:
        caption += [f"{t.target.value}: {t.strategy} {t.from_version} -> {t.to_version}" for t in current.plan.targets]
        caption += [f"{target}: left alone ({why})" for target, why in current.plan.skipped.items()]
        if current.plan.compatibility:
            caption.append(f"compatibility: {current.plan.compatibility.summary()}")
    if current.approval.required:
        caption.append(f"approval: {current.approval.decision}" + (f" by {current.approval.by}" if current.approval.by else ""))
    if current.error:
        caption.append(f"error: {current.error}")
    table.caption = "\n".join(caption)
    table.caption_justify = "left"
    return table


def _gate_lines(environment: str | None) -> list[str]:
    """What the deployment gate holds for the environment(s) in the worker's config: the lock and the marks."""
    try:
        config = load_config(config_path())
    except ConfigError:
        return []  # no config here: the rollbacks are listed from Temporal alone
    store = StateStore(config.state_dir)
    lines: list[str] = []
    for name in [environment] if environment else sorted(config.environments):
        if name not in config.environments:
            continue
        state = store.read(name)
        if state.lock is not None and state.lock.expires_at > datetime.now(timezone.utc):
            lines.append(f"{name}: locked by {state.lock.holder}")
        for target, marks in sorted(state.bad_releases.items()):
            for version, mark in sorted(marks.items()):
                if mark.active:
                    lines.append(f"{name}: gate refuses {target} {version} (rolled back by {mark.rollback})")
    return lines


@app.command(name="list")
def list_(environment: str = typer.Option(None, "--environment", "-e"), running: bool = typer.Option(False, "--running"),
          limit: int = typer.Option(20, min=1, max=1000)) -> None:
    """List recent rollbacks (newest first)."""

    async def action() -> int:
        rows = await _orchestrator().list_rollbacks(environment=environment, running_only=running, limit=limit)
        table = Table("id", "environment", "status", "state", "trigger", "targets", "started")
        for r in rows:
            table.add_row(r.execution_id, r.environment, r.status, r.state, r.trigger, ",".join(r.targets),
                          f"{r.started:%Y-%m-%d %H:%M:%S}" if r.started else "")
        table.caption = "\n".join(_gate_lines(environment))
        table.caption_justify = "left"
        out.print(table)
        return 0

    run(action)


@app.command()
def cancel(execution_id: str) -> None:
    """Cancel a rollback; completed steps are compensated."""

    async def action() -> int:
        orchestrator = _orchestrator()
        handle = (await orchestrator.client()).get_workflow_handle(execution_id)
        described = await handle.describe()
        if described.status != WorkflowExecutionStatus.RUNNING:
            raise RollbackError(f"{execution_id} is not running ({described.status.name if described.status else '?'})")
        await orchestrator.cancel(execution_id)
        print(f"cancellation requested for {execution_id}; completed steps will be compensated")
        return 0

    run(action)


@app.command()
def unlock(environment: str = typer.Option(..., "--environment", "-e"),
           force: bool = typer.Option(False, "--force", help="required: you checked no rollback is running")) -> None:
    """Release an environment's deployment lock by hand (see docs/TROUBLESHOOTING.md)."""

    async def action() -> int:
        if not force:
            raise RollbackError("refusing without --force: check `rollback list --running` first")
        config = load_config(config_path())
        if environment not in config.environments:
            raise RollbackError(f"unknown environment {environment!r}")
        holder = StateStore(config.state_dir).force_release_lock(environment)
        print(f"lock of {environment} released (was held by {holder or 'nobody'})")
        return 0

    run(action)


def _config_with(environment: str, target: str) -> AppConfig:
    """The worker's config, refusing an environment or a target it does not configure."""
    config = load_config(config_path())
    if environment not in config.environments:
        raise RollbackError(f"unknown environment {environment!r}; configured: {', '.join(sorted(config.environments))}")
    configured = config.environment(environment).targets.configured()
    if target not in configured:
        raise RollbackError(f"target {target!r} is not configured for {environment} (configured: {', '.join(configured)})")
    return config


@app.command("record-deploy")
def record_deploy(environment: str = typer.Option(..., "--environment", "-e"), target: str = typer.Option(..., "--target", "-t"),
                  version: str = typer.Option(..., "--version")) -> None:
    """Record a release your pipeline deployed: it becomes current, the previous one known-good."""

    async def action() -> int:
        checked_version(version)
        config = _config_with(environment, target)
        slice_config = config.environment(environment).targets.get(target)
        seed = slice_config.versions if slice_config else None
        store = StateStore(config.state_dir)
        if (refusal := store.gate_refusal(environment, target, version)) is not None and "was rolled back by" in refusal:
            raise RollbackError(f"not recorded: {refusal}")
        if slice_config is not None:
            # The record must say what runs: a record that drifts from the live release sends the next rollback to
            # the wrong version, or refuses it with "nothing to roll back".
            try:
                live = await live_version(slice_config)
            except LookupError as err:
                raise RollbackError(f"not recorded: {target} of {environment!r}: {err}") from None
            if live is not None and live != version:
                raise RollbackError(f"not recorded: {target} of {environment!r} serves {live}, not {version}; "
                                    "record a deploy once it is live")
        entry = store.record_deploy(environment, target, version, seed=seed)
        print(f"{environment}/{target}: current {entry.current}, known-good {entry.known_good or 'none recorded yet'}")
        return 0

    run(action)


@app.command()
def gate(environment: str = typer.Option(..., "--environment", "-e"), target: str = typer.Option(..., "--target", "-t"),
         version: str = typer.Option(..., "--version")) -> None:
    """May a pipeline deploy VERSION of TARGET now? Exit 0 yes; 1 no, with the reason (a rollback running, the lock
    held, VERSION rolled back from); 2 on usage errors."""

    async def action() -> int:
        checked_version(version)
        config = _config_with(environment, target)
        refusal = await deploy_gate(_orchestrator(), StateStore(config.state_dir), environment, target, version)
        if refusal is not None:
            print(f"refused: {refusal}")
            return 1
        print(f"allowed: {environment}/{target} {version}")
        return 0

    run(action)


@app.command()
def promote(environment: str = typer.Option(..., "--environment", "-e"), target: str = typer.Option(..., "--target", "-t"),
            version: str = typer.Option(..., "--version"), initiated_by: str = typer.Option(None, "--by"),
            reason: str = typer.Option("", "--reason")) -> None:
    """The forward switch pipelines run: make VERSION live (blue-green: the standby serving it; rolling: every instance;
    frontend: the release), as a durable workflow with the rollback's steps, after the gate; recorded as a deploy.
    Waits for the end; exit 0 only on success."""

    async def action() -> int:
        checked_version(version)
        config = _config_with(environment, target)
        orchestrator = _orchestrator()
        if (refusal := await deploy_gate(orchestrator, StateStore(config.state_dir), environment, target, version)) is not None:
            raise RollbackError(f"refused by the deployment gate: {refusal}")
        request = RollbackRequest(environment=environment, targets=[RollbackTarget(target)], trigger=RollbackTrigger.MANUAL,
                                  initiated_by=initiated_by or getpass.getuser(), reason=reason or f"promote {target} {version}",
                                  to_version={RollbackTarget(target): version}, promote=True)
        started = await orchestrator.start(request)
        print(started.execution_id, flush=True)
        return await _watch(orchestrator, started.execution_id, quiet=True)

    run(action)


@release_app.command("allow")
def release_allow(environment: str = typer.Option(..., "--environment", "-e"), target: str = typer.Option(..., "--target", "-t"),
                  version: str = typer.Option(..., "--version"), by: str = typer.Option(..., "--by"),
                  reason: str = typer.Option(..., "--reason")) -> None:
    """Lift the deploy gate's mark on a release a rollback rolled back from (recorded: who, when, why)."""

    async def action() -> int:
        checked_version(version)
        if not by.strip() or not reason.strip():
            raise ValueError("--by and --reason must say who lifts the mark and why")
        config = _config_with(environment, target)
        mark = StateStore(config.state_dir).allow_release(environment, target, version, by=by, reason=reason)
        if mark is None:
            raise RollbackError(f"{target} {version} of {environment!r} is not marked: nothing to allow")
        print(f"allowed {environment}/{target} {version} (rolled back by {mark.rollback}); by {by}: {reason}")
        return 0

    run(action)


@app.command()
def setup() -> None:
    """Register the rollback search attributes in the namespace (idempotent; the worker also tries at start)."""

    async def action() -> int:
        settings = _settings()
        orchestrator = _orchestrator()
        added = await ensure_search_attributes(await orchestrator.client(), namespace=settings.namespace, address=settings.address)
        for key in added:
            print(f"registered {key.name} ({search_attribute_type(key)}) in namespace {settings.namespace} on {settings.address}")
        if not added:
            print(f"search attributes already registered in namespace {settings.namespace} on {settings.address}: "
                  + ", ".join(key.name for key in SEARCH_ATTRIBUTES))
        return 0

    run(action)


# -- the health monitor ----------------------------------------------------------

@monitor_app.command("start")
def monitor_start(environment: str = typer.Option(..., "--environment", "-e")) -> None:
    """Start continuous health monitoring of an environment (idempotent)."""

    async def action() -> int:
        started = await _orchestrator().start_monitor(environment)
        print(f"monitor-{environment} {'started' if started else 'already running'}")
        return 0

    run(action)


@monitor_app.command("stop")
def monitor_stop(environment: str = typer.Option(..., "--environment", "-e")) -> None:
    """Stop monitoring an environment (running rollbacks are not affected)."""

    async def action() -> int:
        await _orchestrator().stop_monitor(environment)
        print(f"monitor-{environment} stopping")
        return 0

    run(action)


@monitor_app.command("pause")
def monitor_pause(environment: str = typer.Option(..., "--environment", "-e"), reason: str = typer.Option("", "--reason"),
                  by: str = typer.Option(None, "--by")) -> None:
    """Keep evaluating but start no rollback (incidents are recorded and alerted)."""

    async def action() -> int:
        await _orchestrator().pause_monitor(environment, by=by or getpass.getuser(), reason=reason)
        print(f"monitor-{environment} paused")
        return 0

    run(action)


@monitor_app.command("resume")
def monitor_resume(environment: str = typer.Option(..., "--environment", "-e"), by: str = typer.Option(None, "--by")) -> None:
    """Let the monitor start rollbacks again."""

    async def action() -> int:
        await _orchestrator().resume_monitor(environment, by=by or getpass.getuser())
        print(f"monitor-{environment} resumed")
        return 0

    run(action)


@monitor_app.command("status")
def monitor_status(environment: str = typer.Option(..., "--environment", "-e"),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Each rule's state, last value and window fill, and recent incidents."""

    async def action() -> int:
        current = await _orchestrator().monitor_status(environment)
        if as_json:
            print(current.model_dump_json(indent=2))
            return 0
        table = Table("rule", "metric", "threshold", "window", "state", "last outcome", "value", "samples", "fill",
                      title=f"monitor-{environment}: {current.evaluations} evaluations every {current.interval_seconds:g}s"
                      + (f", PAUSED by {current.paused.by}" if current.paused else ""), title_justify="left")
        for view in current.rules:
            last = view.state.last
            table.add_row(view.rule.name, view.rule.metric_name, f"{view.rule.comparison} {view.rule.threshold:g}",
                          f"{view.rule.window.total_seconds():g}s", "FIRING" if view.state.firing else "ok",
                          last.outcome.value if last else "-", f"{last.value:g}" if last and last.value is not None else "-",
                          str(last.samples) if last else "-", f"{last.window_fill:.0%}" if last else "-")
        out.print(table)
        for incident in current.incidents[-5:]:
            print(f"{incident.at:%Y-%m-%d %H:%M:%S} {incident.outcome}: {incident.reason}"
                  + (f" -> {incident.rollback_id}" if incident.rollback_id else ""))
        return 0

    run(action)


# -- the database target -------------------------------------------------------

@db_app.command("migrate")
def db_migrate(environment: str = typer.Option(..., "--environment", "-e"),
               to: str = typer.Option(..., "--to", help="the revision to migrate to (e.g. 0003)"),
               initiated_by: str = typer.Option(None, "--by")) -> None:
    """Apply migrations up to a revision, each after a verified backup (DatabaseMigrationWorkflow)."""

    async def action() -> int:
        request = MigrateRequest(environment=environment, to_revision=to, initiated_by=initiated_by or getpass.getuser())
        result = await _orchestrator().migrate(request, on_progress=lambda line: print(line, flush=True))
        applied = ", ".join(result.applied) or "nothing to apply"
        print(f"{environment}: database at {result.revision} (applied: {applied}; backups: {', '.join(result.backups) or 'none'})")
        return 0

    run(action)


@db_app.command("backups")
def db_backups(environment: str = typer.Option(..., "--environment", "-e"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """List the environment's backups, newest first (from the catalog; no worker needed)."""
    from rollback.targets.database.backups import BackupCatalog
    from rollback.targets.database.config import DatabaseTarget

    async def action() -> int:
        env = load_config(config_path()).environments.get(environment)
        database = env.targets.of("database", DatabaseTarget) if env is not None else None
        if database is None or database.backup_dir is None:
            raise ConfigError(f"environment {environment!r} has no database target")
        manifests = BackupCatalog(database.backup_dir).list(environment)
        if as_json:
            print(json.dumps([m.model_dump(mode="json", exclude={"schema_snapshot"}) for m in manifests], indent=2))
            return 0
        table = Table("backup", "taken", "revision", "before", "size", "restore point", "verified")
        for m in manifests:
            table.add_row(m.id, f"{m.created_at:%Y-%m-%d %H:%M:%S}", m.revision or "-", m.next_revision or "-",
                          f"{m.total_bytes / 1e6:.1f} MB", m.restore_point or "-", "yes" if m.verified_at else "no")
        out.print(table)
        return 0

    run(action)


@db_app.command("schedule-retention")
def db_schedule_retention() -> None:
    """Create the daily Temporal Schedule running BackupRetentionWorkflow (no-op if it exists)."""

    async def action() -> int:
        print(await _orchestrator().ensure_retention_schedule())
        return 0

    run(action)


@release_app.command("manifest")
def release_manifest(directory: str = typer.Argument(..., help="the built release, a directory named after its version"),
                     build: str = typer.Option(..., "--build", help="build id or commit"),
                     api: list[str] = typer.Option([], "--api", help="a backend operation the build calls, `METHOD /path` (repeatable)"),
                     backend_min: Optional[str] = typer.Option(None, "--backend-min"),
                     backend_max: Optional[str] = typer.Option(None, "--backend-max")) -> None:
    """Write DIRECTORY/release.json: the sha256 of every file, the API the build calls, the backends it supports."""
    from pathlib import Path

    from rollback.targets.frontend.release import BackendRange, write_manifest

    async def action() -> int:
        path = Path(directory)
        checked_version(path.resolve().name, "DIRECTORY's name")
        if not path.is_dir():
            raise ValueError(f"{directory}: not a directory")
        supported = BackendRange(min=backend_min, max=backend_max) if backend_min or backend_max else None
        manifest = write_manifest(path, build=build, created=datetime.now(timezone.utc), api=api, backend=supported)
        print(f"{path / 'release.json'}: release {manifest.version}, build {manifest.build}, {len(manifest.files)} files")
        return 0

    run(action)


def _frontend_store(environment: str) -> ReleaseStore:
    env = load_config(config_path()).environments.get(environment)
    frontend = env.targets.of("frontend", FrontendTarget) if env is not None else None
    if frontend is None:
        raise ConfigError(f"environment {environment!r} has no frontend target")
    return frontend.store.open()


@release_app.command("publish")
def release_publish(directory: str = typer.Argument(..., help="the built release, with its release.json"),
                    environment: str = typer.Option(..., "--environment", "-e")) -> None:
    """Verify the release and add it to the environment's store (nothing goes live: a rollback or deploy switches)."""
    from pathlib import Path

    async def action() -> int:
        manifest = await asyncio.to_thread(_frontend_store(environment).publish, Path(directory))
        print(f"published {manifest.version} (build {manifest.build}, {len(manifest.files)} files) to {environment}")
        return 0

    run(action)


@release_app.command("list")
def release_list(environment: str = typer.Option(..., "--environment", "-e"), as_json: bool = typer.Option(False, "--json")) -> None:
    """The environment's retained frontend releases, oldest first, and which one is live."""

    async def action() -> int:
        store = _frontend_store(environment)
        live = await asyncio.to_thread(store.live)
        manifests = [await asyncio.to_thread(store.manifest, v) for v in await asyncio.to_thread(store.versions)]
        if as_json:
            print(json.dumps([{"version": m.version, "build": m.build, "created": m.created.isoformat(), "files": len(m.files),
                               "api": m.api, "live": m.version == live} for m in manifests], indent=2))
            return 0
        table = Table("release", "build", "built", "files", "api", "live")
        for m in manifests:
            table.add_row(m.version, m.build, f"{m.created:%Y-%m-%d %H:%M:%S}", str(len(m.files)), ", ".join(m.api) or "-",
                          "yes" if m.version == live else "")
        out.print(table)
        return 0

    run(action)


@release_app.command("nginx-conf")
def release_nginx_conf(environment: str = typer.Option(..., "--environment", "-e"),
                       listen: str = typer.Option("127.0.0.1:8087", "--listen", help="host:port the origin listens on"),
                       api_upstream: Optional[str] = typer.Option(None, "--api-upstream", help="host:port that /api/ is proxied to")) -> None:
    """Print the origin's nginx configuration for the environment's directory store (goes inside `http { }`)."""
    from rollback.targets.frontend.config import DirectoryStoreConfig
    from rollback.targets.frontend.origin import pinning_maps, server_block

    async def action() -> int:
        env = load_config(config_path()).environments.get(environment)
        frontend = env.targets.of("frontend", FrontendTarget) if env is not None else None
        if frontend is None or not isinstance(frontend.store, DirectoryStoreConfig):
            raise ConfigError(f"environment {environment!r} has no frontend target with a directory store")
        print(f"# generated by `rollback release nginx-conf -e {environment}`\n{pinning_maps()}\n"
              f"{server_block(root=frontend.store.root, listen=listen, api_upstream=api_upstream)}")
        return 0

    run(action)


@release_app.command("vcl")
def release_vcl(origin: str = typer.Option(..., "--origin", help="host:port of the nginx origin"),
                purger: list[str] = typer.Option(["127.0.0.1"], "--purger", help="an address allowed to BAN and PURGE (repeatable)")) -> None:
    """Print the Varnish VCL the frontend's `varnish` CDN tier expects (ACL-guarded BAN/PURGE, skew-aware cache key)."""
    from rollback.targets.frontend.varnish_vcl import render_vcl

    async def action() -> int:
        host, _, port = origin.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--origin: {origin!r} is not host:port")
        print(render_vcl(origin_host=host, origin_port=int(port), purgers=purger))
        return 0

    run(action)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", "--host", envvar="ROLLBACK_API_HOST"),
          port: int = typer.Option(8400, "--port", min=1, max=65535, envvar="ROLLBACK_API_PORT")) -> None:
    """Serve the inbound HTTP API (Alertmanager and pipeline triggers, /v1/rollbacks); secrets from ROLLBACK_API_*."""
    import uvicorn

    from rollback.api import ApiSettings, create_app, endpoint_summary

    async def action() -> int:
        try:
            settings = ApiSettings()
        except ValidationError as err:  # name the variable; the value is not echoed (it may be a secret)
            first = err.errors()[0]
            raise ValueError(f"ROLLBACK_API_{str(first['loc'][0]).upper()}: {first['msg']}") from None
        application = create_app(settings=settings, orchestrator=_orchestrator())  # a bad config or weak secret fails here
        print(f"rollback API on http://{host}:{port} (config {settings.config}): {endpoint_summary(settings)}",
              file=sys.stderr, flush=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="info", lifespan="off"))
        await server.serve()
        return 0 if server.started else 1

    run(action)


def _add_command_groups_of_other_packages() -> None:
    """Command groups registered under the `rollback.cli` entry point (the demo stack's `dev`): the
    product never imports the demo stack; the stack adds itself where it is installed."""
    for entry in entry_points(group="rollback.cli"):
        app.add_typer(entry.load(), name=entry.name)


def main() -> None:
    # Typer's standalone mode prints usage errors as one short block and exits 2;
    # commands themselves leave through _exit (see the module docstring).
    try:
        _add_command_groups_of_other_packages()
        app()
    except SystemExit as done:
        _exit(done.code if isinstance(done.code, int) else 1)
    except Exception as err:  # anything unexpected: one line, no traceback
        _fail(f"{type(err).__name__}: {err}")
    _exit(0)


if __name__ == "__main__":
    main()

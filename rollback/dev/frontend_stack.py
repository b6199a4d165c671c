"""A local frontend tier: a directory store of releases, nginx as its origin, and Varnish in front.

`FrontendStack` is the reusable part (the tests start one per test on free ports, `rollback dev`
starts the demo's at http://127.0.0.1:8088): `start` publishes the first release, `deploy` ships
another the way a pipeline would (build, publish, switch, purge Varnish, wait, record), and
`target_config` is the matching `targets.frontend` of rollback.yaml. nginx proxies `/api/` to the
backend's front door, so the page's chunk calls the demo backend on its own origin.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from rollback.dev import instances as inst
from rollback.dev.frontend_build import DEFAULT_CHECK_INTERVAL_MS, Fault, build_release
from rollback.dev.varnish import VarnishServer
from rollback.state import StateStore, TargetVersions
from rollback.targets.frontend.cdn import PurgeRequest
from rollback.targets.frontend.cdn.config import VarnishCdn
from rollback.targets.frontend.cdn.factory import provider_for
from rollback.targets.frontend.contract import purge_urls
from rollback.targets.frontend.origin import nginx_conf
from rollback.targets.frontend.store import DirectoryStore, entry_points

Log = Callable[[str], None]

READY_SECONDS = 15.0
SETTLE_SECONDS = 15.0
HTTP_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 15.0


class FrontendStackError(RuntimeError):
    pass


@dataclass(frozen=True)
class FrontendStack:
    base_dir: Path
    origin_port: int
    varnish_port: int
    varnish_admin_port: int
    api_upstream: str | None = None  # host:port of the backend's front door
    environment: str = "demo"
    check_interval_ms: int = DEFAULT_CHECK_INTERVAL_MS
    keep_releases: int = 5
    log: Log = field(default=print, compare=False, repr=False)

    # -- paths and addresses -----------------------------------------------------

    @property
    def home(self) -> Path:
        return self.base_dir.resolve() / "frontend"

    @property
    def store(self) -> DirectoryStore:
        return DirectoryStore(self.home / "site")

    @property
    def builds_dir(self) -> Path:
        return self.home / "builds"

    @property
    def nginx_dir(self) -> Path:
        return self.home / "nginx"

    @property
    def state_dir(self) -> Path:
        return self.base_dir.resolve() / "state"

    @property
    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.origin_port}"

    @property
    def varnish(self) -> VarnishServer:
        return VarnishServer(work_dir=self.home / "varnish", port=self.varnish_port, admin_port=self.varnish_admin_port,
                             origin_host="127.0.0.1", origin_port=self.origin_port)

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.varnish_port}"

    # -- lifecycle -----------------------------------------------------------------

    def start(self, initial_version: str = "v1") -> None:
        """Publish and switch to `initial_version` unless a release is live already (a restart keeps what was
        deployed), then start nginx and Varnish; idempotent."""
        store = self.store
        if store.live() is None:
            self.publish(initial_version)
            store.switch(initial_version)
        self._start_nginx()
        self.varnish.start()
        self._seed_state(store.live() or initial_version)
        if not inst.wait_until(lambda: self.serving() is not None, READY_SECONDS):
            raise FrontendStackError(f"{self.front_url}/version.json did not answer")
        self.log(f"frontend {store.live()} served by nginx on {self.origin_url} behind Varnish on {self.front_url}")

    def stop(self) -> None:
        errors: list[str] = []
        try:
            self.varnish.stop()
        except Exception as err:  # keep going: nginx must stop too
            errors.append(f"varnish: {err}")
        pid = self._nginx_pid()
        if pid is not None:
            inst.terminate(pid, sig=signal.SIGQUIT)
        if errors:
            raise FrontendStackError("; ".join(errors))

    def _seed_state(self, version: str) -> None:
        store = StateStore(self.state_dir)
        if store.read(self.environment).versions.get("frontend") is None:
            store.record_deploy(self.environment, "frontend", version, seed=TargetVersions(current=version, known_good=version))

    # -- nginx -----------------------------------------------------------------------

    @property
    def _conf_path(self) -> Path:
        return self.nginx_dir / "nginx.conf"

    def _nginx_args(self) -> list[str]:
        return [inst.nginx_binary(), "-p", f"{self.nginx_dir}/", "-c", str(self._conf_path), "-e", str(self.nginx_dir / "error.log")]

    def _nginx_pid(self) -> int | None:
        pid = inst.read_pid(self.nginx_dir / "nginx.pid")
        if pid is not None and inst.pid_alive(pid) and inst.cmdline_contains(pid, "nginx", str(self._conf_path)):
            return pid
        return None

    def _start_nginx(self) -> None:
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.nginx_dir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self._conf_path.write_text(nginx_conf(root=self.store.root, listen=f"127.0.0.1:{self.origin_port}",
                                              work_dir=self.nginx_dir, api_upstream=self.api_upstream))
        running = self._nginx_pid() is not None
        _run([*self._nginx_args(), *(["-s", "reload"] if running else [])], "nginx " + ("reload" if running else "start"))
        if not inst.wait_until(lambda: self._nginx_pid() is not None, READY_SECONDS):
            raise FrontendStackError(f"nginx did not start; error log: {inst.log_tail(self.nginx_dir / 'error.log')}")

    # -- releases --------------------------------------------------------------------

    def publish(self, version: str, fault: Fault = "none") -> str:
        """Build `version` (with `fault`) and add it to the store; returns its build id."""
        built = build_release(self.builds_dir, version, fault=fault, created=datetime.now(timezone.utc),
                              check_interval_ms=self.check_interval_ms)
        return self.store.publish(built).build

    def serving(self) -> dict[str, Any] | None:
        """What users get from `/version.json` through Varnish."""
        try:
            answer = httpx.get(f"{self.front_url}/version.json", timeout=HTTP_TIMEOUT_SECONDS)
            body = answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def deploy(self, version: str, fault: Fault = "none") -> str:
        """Ship `version` as a pipeline would: build, publish, switch, purge Varnish, wait until users get it,
        record it as current, retire old releases. Returns the build id."""
        store = self.store
        previous = store.live()
        build = self.publish(version, fault)
        store.switch(version)
        changed = set(entry_points(store.manifest(version)))
        if previous:
            changed |= set(entry_points(store.manifest(previous)))
        inst.run_async(lambda: self._purge(purge_urls(sorted(changed)), key=f"deploy:{version}:{build}"), timeout=60)
        streak = 0

        def settled() -> bool:
            nonlocal streak
            streak = streak + 1 if (self.serving() or {}).get("build") == build else 0
            return streak >= 3

        if not inst.wait_until(settled, SETTLE_SECONDS):
            raise FrontendStackError(f"{self.front_url} still serves {self.serving()}, expected build {build}")
        state = StateStore(self.state_dir)
        entry = state.record_deploy(self.environment, "frontend", version, seed=state.versions(self.environment, "frontend"))
        protect = {v for v in (entry.current, entry.known_good) if v}
        retired = store.retire(keep=self.keep_releases, protect=protect)
        self.log(f"deployed frontend {version} (build {build}, fault {fault}); known-good {entry.known_good}"
                 + (f"; retired {', '.join(retired)}" if retired else ""))
        return build

    async def _purge(self, paths: list[str], *, key: str) -> None:
        await provider_for(self.cdn_tier()).purge(PurgeRequest(paths=paths, key=key), progress=lambda _: None)

    # -- configuration -----------------------------------------------------------------

    def cdn_tier(self) -> VarnishCdn:
        return VarnishCdn(provider="varnish", url=self.front_url)

    def target_config(self, **overrides: Any) -> dict[str, Any]:
        """`targets.frontend` of rollback.yaml for this stack."""
        return {
            "store": {"kind": "directory", "root": str(self.store.root)},
            "front_url": self.front_url,
            "cdn": [self.cdn_tier().model_dump(mode="json")],
            "health": {"path": "/", "samples": 3, "max_latency_ms": 1000},
            "keep_releases": self.keep_releases,
            **overrides,
        }


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FrontendStackError(f"{what} failed: {err}") from err
    if done.returncode != 0:
        raise FrontendStackError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")


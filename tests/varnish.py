"""Test harness: the frontend tier for real. A DirectoryStore served by nginx (origin.py's nginx.conf) with a
Varnish in front (rollback/dev/varnish.py), on free loopback ports under the test's tmp_path, stopped
afterwards; and make_release, a trivial build to publish.

    from tests.varnish import frontend_stack_fixture, make_release  # noqa: F401 (the fixture is named frontend_stack)

    def test_x(frontend_stack, tmp_path):
        stack = frontend_stack
        stack.store.publish(make_release(tmp_path / "builds", "v1", created))
        stack.store.switch("v1")
        httpx.get(stack.varnish_url + "/")

or, for a stack of one's own (another Varnish ACL, two stacks in one test): `with frontend_stack(tmp_path) as stack:`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from rollback.dev.instances import cmdline_contains, log_tail, pid_alive, read_pid, terminate
from rollback.dev.varnish import VarnishServer
from rollback.ports import free_port
from rollback.targets.frontend.origin import nginx_conf
from rollback.targets.frontend.release import BackendRange, write_manifest
from rollback.targets.frontend.store import DirectoryStore

NGINX = "/usr/sbin/nginx"
VARNISHD = "/usr/sbin/varnishd"
READY_SECONDS = 15.0
T = TypeVar("T")


def _binary(path: str, package: str) -> str:
    found = shutil.which(Path(path).name) or (path if Path(path).exists() else None)
    if found is None:
        why = f"{path} is not installed (Debian package {package}; scripts/bootstrap.sh installs it)"
        if os.environ.get("CI"):  # CI installs every component: a missing one is a failure, never a quiet skip
            pytest.fail(why)
        pytest.skip(why)
    return found


def poll(check: Callable[[], T | None], *, timeout: float = 10.0, what: str = "condition") -> T:
    """Call `check` until it returns something other than None (or False); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


@dataclass
class NginxOrigin:
    """nginx serving the store at `root` on `port`, configured by origin.nginx_conf."""

    work_dir: Path
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.work_dir.resolve() / "nginx.conf"

    def _args(self) -> list[str]:
        d = self.work_dir.resolve()
        return [_binary(NGINX, "nginx-light"), "-p", f"{d}/", "-c", str(self.conf_path), "-e", str(d / "error.log")]

    def pid(self) -> int | None:
        pid = read_pid(self.work_dir.resolve() / "nginx.pid")
        return pid if pid is not None and pid_alive(pid) and cmdline_contains(pid, "nginx") else None

    def start(self) -> NginxOrigin:
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.work_dir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(nginx_conf(root=self.root, listen=f"127.0.0.1:{self.port}", work_dir=self.work_dir))
        done = subprocess.run(self._args(), capture_output=True, text=True, timeout=30)  # nginx daemonizes: returns at once
        if done.returncode != 0:
            raise RuntimeError(f"nginx did not start: {done.stderr.strip()} {log_tail(self.work_dir / 'error.log')}")

        def answers() -> bool:
            try:
                return httpx.get(self.url + "/version.json", timeout=1).headers.get("server", "").startswith("nginx")
            except httpx.HTTPError:
                return False

        poll(answers, timeout=READY_SECONDS, what=f"nginx on {self.url}")
        return self

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, sig=signal.SIGQUIT)  # graceful: finish the requests in flight


@dataclass
class FrontendStack:
    store: DirectoryStore
    origin_url: str
    varnish_url: str
    varnish: VarnishServer
    origin: NginxOrigin


@contextmanager
def frontend_stack(tmp_path: Path, *, purgers: list[str] | None = None) -> Iterator[FrontendStack]:
    """A store under tmp_path/frontend/store, nginx serving it, Varnish in front; both stopped at the end."""
    _binary(VARNISHD, "varnish")
    base = tmp_path / "frontend"
    store = DirectoryStore(base / "store")
    store.root.mkdir(parents=True, exist_ok=True)
    origin = NginxOrigin(work_dir=base / "nginx", root=store.root, port=free_port())
    varnish = VarnishServer(work_dir=base / "varnish", port=free_port(), admin_port=free_port(), origin_host="127.0.0.1",
                            origin_port=origin.port, purgers=purgers if purgers is not None else ["127.0.0.1"])
    try:
        origin.start()
        varnish.start()
        yield FrontendStack(store=store, origin_url=origin.url, varnish_url=varnish.url, varnish=varnish, origin=origin)
    finally:
        try:
            varnish.stop()
        finally:
            origin.stop()


@pytest.fixture(name="frontend_stack")
def frontend_stack_fixture(tmp_path: Path) -> Iterator[FrontendStack]:
    with frontend_stack(tmp_path) as stack:
        yield stack


def make_release(build_root: Path, version: str, created: datetime, *, api: list[str] | None = None,
                 backend: BackendRange | None = None) -> Path:
    """A built release `build_root/<version>/`, ready for store.publish: index.html and version.json naming the
    version, one hashed asset `assets/app.<sha>.js`, and release.json (build `build-<version>`)."""
    release = build_root / version
    (release / "assets").mkdir(parents=True, exist_ok=True)
    script = f'document.body.dataset.release = "{version}";\n'.encode()
    asset = f"app.{hashlib.sha256(script).hexdigest()[:12]}.js"
    (release / "assets" / asset).write_bytes(script)
    (release / "index.html").write_text(f'<!doctype html>\n<html><head><title>release {version}</title>'
                                        f'<script src="/assets/{asset}" defer></script></head>\n'
                                        f'<body><p>release {version}</p></body></html>\n')
    (release / "version.json").write_text(json.dumps({"version": version, "build": f"build-{version}"}))
    write_manifest(release, build=f"build-{version}", created=created, api=["GET /api/items"] if api is None else api, backend=backend)
    return release


def varnish_ttl(varnish: VarnishServer, url_path: str) -> float:
    """The TTL of the object Varnish last fetched for `url_path`, read from its shared memory log: the last TTL
    record of the fetch, the VCL's if it set one, else the one Varnish derived from the headers (RFC)."""
    done = subprocess.run(["varnishlog", "-d", "-n", str(varnish.instance_dir), "-g", "request", "-q", f'BereqURL eq "{url_path}"',
                           "-i", "TTL"], capture_output=True, text=True, timeout=30)
    ttls = [float(parts[3]) for parts in (line.split() for line in done.stdout.splitlines()) if parts[1:2] == ["TTL"] and parts[2] in ("RFC", "VCL")]
    assert ttls, f"varnishlog has no fetch of {url_path}: {done.stdout[-500:]} {done.stderr[-500:]}"
    return ttls[-1]


def asset_of(release: Path) -> str:
    """The URL path of the release's hashed asset."""
    (asset,) = sorted((release / "assets").iterdir())
    return f"/assets/{asset.name}"

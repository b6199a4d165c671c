"""A Varnish in front of the frontend's nginx origin, on loopback, under a directory of its own: what the
tests start per test and the demo stack keeps running (`rollback dev up`).

    server = VarnishServer(work_dir=d, port=8088, admin_port=6082, origin_host="127.0.0.1", origin_port=8089)
    server.start()      # idempotent: a varnishd already running from `work_dir` with this VCL is kept
    server.url          # http://127.0.0.1:8088
    server.stop()       # from this process or any other: the pid file under work_dir says which

varnishd runs in the foreground (-F) in its own session, so it outlives the process that started it,
with `-j none`: started by root, varnishd would otherwise switch to the user vcache, who cannot read a
private temporary directory (a test's tmp_path) where the VCL and its compiled form live. Every wait
is a poll with a deadline.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rollback.dev.instances import cmdline_contains, log_tail, pid_alive, read_pid, spawn_detached, terminate, wait_until
from rollback.targets.frontend.varnish_vcl import READY_PATH, render_vcl

VARNISHD = "/usr/sbin/varnishd"
# Compiling the VCL (varnishd runs cc) and starting the child takes about a second; a loaded machine, more.
READY_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 1.0
STORAGE = "malloc,64m"


# The varnishd processes this process started, by pid: held so that Popen does not warn, when collected, that a
# process meant to outlive it still runs; stop() reaps its own.
_started: dict[int, subprocess.Popen[bytes]] = {}


def _forget(pid: int) -> None:
    process = _started.pop(pid, None)
    if process is not None:
        process.poll()  # reaped already (pid_alive waits for it): this records that it ended


class VarnishError(RuntimeError):
    """varnishd did not start (or stop); the message has the tail of its log."""


def varnishd_binary() -> str:
    found = shutil.which("varnishd") or (VARNISHD if Path(VARNISHD).exists() else None)
    if found is None:
        raise VarnishError("varnishd not found (install the Debian package varnish; scripts/bootstrap.sh does)")
    return found


@dataclass
class VarnishServer:
    work_dir: Path
    port: int
    admin_port: int
    origin_host: str
    origin_port: int
    purgers: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    ready_seconds: float = READY_SECONDS

    # -- paths ---------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.work_dir.resolve()

    @property
    def instance_dir(self) -> Path:
        """varnishd's -n directory: its shared memory log and the compiled VCL."""
        return self.home / "varnish"

    @property
    def vcl_path(self) -> Path:
        return self.home / "default.vcl"

    @property
    def secret_path(self) -> Path:
        return self.home / "secret"

    @property
    def pid_path(self) -> Path:
        return self.home / "varnishd.pid"

    @property
    def log_path(self) -> Path:
        return self.home / "varnishd.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def vcl(self) -> str:
        return render_vcl(origin_host=self.origin_host, origin_port=self.origin_port, purgers=self.purgers)

    def command(self) -> list[str]:
        return [varnishd_binary(), "-F", "-j", "none", "-n", str(self.instance_dir), "-a", f"127.0.0.1:{self.port}",
                "-T", f"127.0.0.1:{self.admin_port}", "-S", str(self.secret_path), "-f", str(self.vcl_path), "-s", STORAGE]

    # -- lifecycle -------------------------------------------------------------

    def pid(self) -> int | None:
        """The varnishd started from this work_dir, if it still runs (a recycled pid is not ours)."""
        pid = read_pid(self.pid_path)
        if pid is None or not pid_alive(pid) or not cmdline_contains(pid, "varnishd", f"-n {self.instance_dir} "):
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def answers(self) -> bool:
        """Varnish itself answers HTTP on its port (its own ready path: never the origin, never cached)."""
        try:
            answer = httpx.get(self.url + READY_PATH, timeout=HTTP_TIMEOUT_SECONDS)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and "x-varnish" in answer.headers

    def start(self) -> VarnishServer:
        """Start varnishd, or keep the one already running from work_dir with the same VCL and command; returns
        once it answers HTTP. VarnishError with the log's tail if it exits or does not answer in time."""
        vcl = self.vcl()
        pid = self.pid()
        if pid is not None:
            same_vcl = self.vcl_path.exists() and self.vcl_path.read_text() == vcl
            if same_vcl and cmdline_contains(pid, f"127.0.0.1:{self.port}", f"127.0.0.1:{self.admin_port}"):
                self._wait_ready(pid)
                return self
            self.stop()  # another VCL (a moved origin) or ports: start afresh
        self.home.mkdir(parents=True, exist_ok=True)
        self.vcl_path.write_text(vcl)
        if not self.secret_path.exists():
            # The admin port's shared secret: only the owner reads it.
            fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as secret:
                secret.write(secrets.token_hex(32) + "\n")
        with self.log_path.open("a") as log:
            log.write(f"--- starting: {' '.join(self.command())}\n")
        # Only PATH (varnishd runs cc): the caller's environment may hold CDN tokens varnishd has no use for.
        process = spawn_detached(self.command(), self.log_path, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                 cwd=self.home)
        _started[process.pid] = process
        self.pid_path.write_text(f"{process.pid}\n")
        self._wait_ready(process.pid)
        return self

    def _wait_ready(self, pid: int) -> None:
        if wait_until(lambda: not pid_alive(pid) or self.answers(), self.ready_seconds) and pid_alive(pid):
            return
        if pid_alive(pid):
            terminate(pid, grace=STOP_GRACE_SECONDS)
            _forget(pid)
            raise VarnishError(f"varnishd on {self.url} did not answer within {self.ready_seconds:g}s: {log_tail(self.log_path, 15)}")
        _forget(pid)
        raise VarnishError(f"varnishd on {self.url} exited: {log_tail(self.log_path, 15)}")

    def stop(self) -> None:
        """Stop the varnishd of this work_dir (TERM, then KILL after a grace); nothing when none runs."""
        pid = self.pid()
        if pid is not None:
            terminate(pid, grace=STOP_GRACE_SECONDS)
            if pid_alive(pid):
                raise VarnishError(f"varnishd (pid {pid}) did not stop")
            _forget(pid)
        self.pid_path.unlink(missing_ok=True)

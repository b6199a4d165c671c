"""How does a frontend rollback behave through Varnish? Three questions, one run, one JSON document.

The stack is the one the tests use: a BackendStack (blue_green, v1) as the API upstream, a FrontendStack
(a directory store of releases, nginx as the origin, Varnish in front) on v1 with v2 deployed, a Temporal
dev server and an in-process worker on a fresh task queue. rollback.yaml has both targets, so every
frontend plan runs the frontend/backend compatibility check, as in production.

1. **Load** (`load`): wrk (`-t2 -c32 --latency`) against Varnish, with a generated Lua script that cycles
   through `/`, `/index.html`, `/version.json` and every hashed asset of v1 and v2 (from each release's
   `release.json`) and tallies responses by status class. First a baseline of the same length with no
   rollback, then the measured run: once every wrk thread has had 200 answers (a marker file its Lua
   writes; Varnish's own counters are flushed in lumps, too late to tell), frontend rollbacks run back to
   back through RollbackWorkflow: v2 -> v1 (the known-good release), then
   `to_version` v2, v1, ... (several switches under the same load), as long as the load window still
   covers another one. Figures: requests, req/s, non-2xx, socket errors (connect/read/write/timeout),
   latency p50/p99, the ratios against the baseline, and a few Varnish counters (`busy_sleep`: requests
   parked on the waiting list while a banned entry point was fetched again). **Target: 0 non-2xx, 0 socket
   errors.**
2. **Switch to Varnish serving the new build** (`switch`): a poller process (stdlib only, one keep-alive
   connection; a process so that neither the worker's event loop nor the GIL delays it) GETs
   `/version.json` through Varnish every `--poll-ms` (5 ms) for the whole run and prints when the build it
   sees changes, with when the poll before was answered (`poll_resolution_s`: how much earlier the new
   build may have been there). Per
   rollback: `switch_to_served_s`, from the start of the `frontend.switch_release` step (its `started`,
   the workflow's clock) to the first poll answered with the new build; beside it the same interval as
   the workflow sees it (switch_release started -> await_front_door finished), and the split at the
   moment the store's pointer was renamed (`switches.jsonl`). Measured for the rollbacks under load and
   for `--idle-rollbacks` more without load (alternating v1 <-> v2). **Target: median under 1 s** (for
   the rollbacks under load and for the idle ones). `flaps` counts answers of another build after the new
   one was seen, up to the next rollback's switch (a stale cache answering after the purge): should be 0.
3. **Assessment** (`assessment`): `Coordination.plan(request)` called directly, `--plan-runs` (20) times
   each for a frontend-only request and a frontend+backend one (the backend deployed to v2 first, so it
   has something to roll back to), with the activity objects built as worker.py builds them. The
   compatibility check reads the backend's OpenAPI document over HTTP each time; `compatibility_check_ms`
   times it alone (the planner's `_compatibility` on the plan's own target plans). Median and p95 in ms.
   **Target: p95 under 500 ms.** Exploratory, outside the target: `frontend_backend_interval_0`, the same
   plan with the backend's health samples back to back (`health.interval_ms: 0`), to show what of the
   plan is the samples' deliberate spacing. Also the whole rollback workflow (start -> result), median,
   from 1 and 2 (`workflow_s`).

How to read it: `result` says "target met" or "target missed" and `misses` says which; `valid` says whether
the run measured what it should (every rollback succeeded and its build was seen by the poller, the load
covered the rollbacks, every plan succeeded); `invalid` says why not. The process exits 0 only when the run
was valid (whether or not the targets were met), 1 otherwise. Ratios against the baseline taken in the same
run are what to compare between runs; absolute figures depend on this (shared, noisy) machine.

    .venv/bin/python bench/frontend_switch.py [--load-seconds 30] [--idle-rollbacks 5] [--plan-runs 20]

stdout carries only the JSON (also in bench/results/frontend_switch.json); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _harness import (backend_stack, decompose, emit, exit_now, in_process_worker, keep_stdout_for_json, log, machine,
                      temporal_server)
from switch_under_load import load_figures, nginx_problems, run_wrk

import httpx
from temporalio.client import Client, WorkflowFailureError

from activities.coordination import Coordination
from activities.health import HttpHealth
from activities.targets import Shared, build_targets
from rollback.client import RollbackOrchestrator, search_attributes_for
from rollback.config import ConfigSource
from rollback.dev.frontend_stack import FrontendStack
from rollback.dev.stack import BackendStack
from rollback.models import RollbackRequest, RollbackResult, RollbackTarget, RollbackTrigger
from rollback.ports import free_port
from rollback.settings import TemporalSettings
from rollback.state import StateStore
from rollback.targets.frontend.store import ASSETS

STATUS_LUA = Path(__file__).resolve().parent / "status_classes.lua"
ENTRY_PATHS = ["/", "/index.html", "/version.json"]
FRONTEND = RollbackTarget.FRONTEND
TARGET_SWITCH_SECONDS = 1.0
TARGET_PLAN_MS = 500.0
ROLLBACK_DEADLINE_SECONDS = 120.0
LOAD_SEEN_RESPONSES = 200  # each wrk thread has had this many answers: the load is on
LOAD_SEEN_DEADLINE_SECONDS = 15.0
FIRST_ROLLBACK_ESTIMATE_SECONDS = 6.0  # before one has been timed under load
SEEN_DEADLINE_SECONDS = 10.0  # after a rollback's result, how long its build may still take to show at the poller


# -- wrk -----------------------------------------------------------------------------------


def lua_script(path: Path, paths: list[str]) -> Path:
    """status_classes.lua with a `request()` that cycles through `paths` (each wrk thread its own cycle), and a
    marker file per thread (`<args[1]>.<thread>`) written at its LOAD_SEEN_RESPONSES-th response: the bench's
    signal that the load is on."""
    quoted = ", ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in paths)
    prelude = f"""-- generated by bench/frontend_switch.py: cycle through {len(paths)} paths, then status_classes.lua
local paths = {{ {quoted} }}
local next_path = 0

function request()
  next_path = next_path % #paths + 1
  return wrk.format("GET", paths[next_path])
end

"""
    suffix = f"""
-- bench/frontend_switch.py: each thread says when its load is on.
local counted_setup, counted_init, counted_response = setup, init, response
local thread_count = 0
local seen = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  counted_setup(thread)
end

function init(args)
  marker = args[1]
  counted_init(args)
end

function response(status, headers, body)
  counted_response(status, headers, body)
  seen = seen + 1
  if seen == {LOAD_SEEN_RESPONSES} and marker then
    local f = io.open(marker .. "." .. tostring(thread_id), "w")
    if f then f:write("on\\n") f:close() end
  end
end
"""
    path.write_text(prelude + STATUS_LUA.read_text() + suffix)
    return path


async def run_wrk_with(url: str, script: Path, seconds: int, *, threads: int, connections: int, marker: Path) -> dict[str, Any]:
    """wrk with the generated script (which touches `marker` once the load is on): its JSON line, when it started
    (epoch seconds) and its command line."""
    data = await run_wrk(url, seconds, threads=threads, connections=connections, script=script, script_args=(str(marker),))
    data["argv"] = f"-t{threads} -c{connections} -d{seconds}s --latency -s {script.name} {url}"
    return data


# -- Varnish and origin evidence ------------------------------------------------------------


VARNISH_COUNTERS = ("MAIN.client_req", "MAIN.cache_hit", "MAIN.cache_miss", "MAIN.backend_req", "MAIN.backend_fail",
                    "MAIN.fetch_failed", "MAIN.sess_drop", "MAIN.sess_fail", "MAIN.bans_added", "MAIN.busy_sleep")


def varnish_counters(frontend: FrontendStack) -> dict[str, int]:
    """A few of varnishstat's counters (empty when varnishstat cannot read them)."""
    argv = ["varnishstat", "-n", str(frontend.varnish.instance_dir), "-1", *(a for c in VARNISH_COUNTERS for a in ("-f", c))]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in VARNISH_COUNTERS and parts[1].isdigit():
            found[parts[0].removeprefix("MAIN.")] = int(parts[1])
    return found


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


async def wait_for_load(marker: Path, threads: int, wrk_task: asyncio.Task) -> float:
    """Poll for every wrk thread's marker (it has had LOAD_SEEN_RESPONSES answers): a deadline, not a fixed delay.
    Returns the seconds waited. (Varnish's own counters are flushed in lumps, a second or more late.)"""
    t0 = time.monotonic()
    deadline = t0 + LOAD_SEEN_DEADLINE_SECONDS
    markers = [marker.with_name(f"{marker.name}.{n}") for n in range(1, threads + 1)]
    while not all(m.exists() for m in markers):
        if wrk_task.done():
            wrk_task.result()  # raises wrk's failure
            raise RuntimeError("wrk ended before its load was on")
        if time.monotonic() > deadline:
            raise RuntimeError(f"wrk's threads had not had {LOAD_SEEN_RESPONSES} answers each within {LOAD_SEEN_DEADLINE_SECONDS}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


_ACCESS = re.compile(r'"[A-Z]+ (?P<path>\S+) [^"]*" (?P<status>\d{3}) ')


def origin_non_2xx(access_log: Path, keep: int = 10) -> dict[str, Any]:
    """What the origin answered outside 2xx (only Varnish's misses reach it), by status and path."""
    counts: dict[str, int] = {}
    total = 0
    try:
        with access_log.open(errors="replace") as lines:
            for line in lines:
                total += 1
                found = _ACCESS.search(line)
                if found and not found["status"].startswith("2"):
                    key = f"{found['status']} {found['path']}"
                    counts[key] = counts.get(key, 0) + 1
    except FileNotFoundError:
        pass
    return {"origin_requests": total, "non_2xx": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:keep])}


# -- the poller -----------------------------------------------------------------------------

# A process of its own (stdlib only), so neither the worker's event loop nor the GIL delays a poll: it GETs the
# URL over one keep-alive connection every `interval` seconds and prints a JSON line whenever the answer changes
# (with when the previous poll was answered: the change happened in between), and a summary once its stdin closes.
POLLER_SOURCE = r"""
import http.client, json, select, sys, time
host, port, path, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conn = None
def answer():
    global conn
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read()
        if reply.status != 200:
            return "HTTP %d" % reply.status, False
        data = json.loads(body)
        build = data.get("build") if isinstance(data, dict) else None
        return (build, True) if isinstance(build, str) else ("no build in the answer", False)
    except (OSError, http.client.HTTPException, ValueError) as err:
        if conn is not None:
            conn.close()
        conn = None
        return type(err).__name__, False
last, previous, polls, failures, gaps = None, None, 0, {}, []
next_at = time.monotonic()
while True:
    got, ok = answer()
    at = time.time()
    polls += 1
    if previous is not None:
        gaps.append(at - previous)
    if not ok:
        failures[got] = failures.get(got, 0) + 1
    if got != last:
        print(json.dumps({"at": at, "previous_poll": previous, "answer": got, "ok": ok}), flush=True)
        last = got
    previous = at
    next_at += interval
    delay = next_at - time.monotonic()
    if delay <= 0:
        delay, next_at = 0.0, time.monotonic()
    if select.select([sys.stdin], [], [], delay)[0]:  # readable only at EOF: the bench is done
        break
gaps.sort()
pick = lambda q: round(gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000, 2) if gaps else None
print(json.dumps({"summary": True, "polls": polls, "failures": failures,
                  "gap_ms": {"median": pick(0.5), "p99": pick(0.99), "max": round(gaps[-1] * 1000, 2) if gaps else None}}), flush=True)
"""
POLLER_READY_SECONDS = 10.0


class Poller:
    """The poller process and what it reported: `transitions` is [(epoch seconds answered, previous poll's epoch, answer)]."""

    def __init__(self, url: str, interval: float) -> None:
        parts = httpx.URL(url)
        self.url = url
        self.interval = interval
        self.argv = [sys.executable, "-c", POLLER_SOURCE, parts.host, str(parts.port), parts.raw_path.decode(), str(interval)]
        self.transitions: list[tuple[float, float | None, str]] = []
        self.summary: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if event.get("summary"):
                    self.summary = {k: v for k, v in event.items() if k != "summary"}
                else:
                    self.transitions.append((event["at"], event["previous_poll"], event["answer"]))

    def start(self) -> None:
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, name="poller-reader", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + POLLER_READY_SECONDS
        while not self.transitions:  # its first answer is its first transition
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError(f"the poller did not answer within {POLLER_READY_SECONDS}s (exit {self._proc.poll()})")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # its select() sees EOF and it prints its summary
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def first_seen(self, build: str, after: float) -> tuple[float, float | None] | None:
        """When the poller first got `build` after `after`, and when the poll before it was answered."""
        with self._lock:
            return next(((t, prev) for t, prev, b in self.transitions if t >= after and b == build), None)

    def flaps(self, build: str, seen: float, until: float) -> list[tuple[float, str]]:
        """Answers other than `build` after it was first seen at `seen`, up to `until`."""
        with self._lock:
            return [(t, b) for t, _, b in self.transitions if seen < t <= until and b != build]

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"url": self.url, "interval_ms": round(self.interval * 1000, 2), **self.summary,
                    "transitions": len(self.transitions)}


@contextlib.contextmanager
def polling(poller: Poller) -> Iterator[Poller]:
    try:
        poller.start()
        yield poller
    finally:
        poller.stop()


# -- stacks -----------------------------------------------------------------------------------


@contextlib.contextmanager
def frontend_stack(backend: BackendStack) -> Iterator[FrontendStack]:
    stack = FrontendStack(base_dir=backend.base_dir, origin_port=free_port(), varnish_port=free_port(),
                          varnish_admin_port=free_port(), api_upstream=f"127.0.0.1:{backend.nginx_port}",
                          log=lambda m: log(f"frontend: {m}"))
    try:
        stack.start("v1")
        yield stack
    finally:
        try:
            stack.stop()
        except Exception as err:  # noqa: BLE001 - report, the other cleanups still run
            log(f"frontend stop failed: {err}")


def epoch(at: datetime | None) -> float | None:
    return None if at is None else at.replace(tzinfo=at.tzinfo or timezone.utc).timestamp()


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def stats(values: list[float], digits: int = 3) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    ordered = sorted(values)
    return {"n": len(values), "median": round(statistics.median(ordered), digits), "p95": round(percentile(ordered, 95), digits),
            "min": round(ordered[0], digits), "max": round(ordered[-1], digits)}


# -- one rollback ---------------------------------------------------------------------------------


async def one_rollback(client: Client, orch: RollbackOrchestrator, task_queue: str, frontend: FrontendStack, poller: Poller,
                       *, to_version: str | None, label: str) -> dict[str, Any]:
    store = frontend.store
    live = store.live()
    to = to_version or StateStore(frontend.state_dir).versions("demo", "frontend").known_good or "?"
    build = store.manifest(to).build
    request = RollbackRequest(environment="demo", targets=[FRONTEND], trigger=RollbackTrigger.MANUAL, initiated_by="bench",
                              reason=f"bench: frontend switch {label}", to_version={FRONTEND: to_version} if to_version else None)
    workflow_id = f"rollback-demo-bench-frontend-{label}-{uuid.uuid4().hex[:6]}"
    started_epoch = time.time()
    t0 = time.perf_counter()
    handle = await client.start_workflow("RollbackWorkflow", request, id=workflow_id, task_queue=task_queue,
                                         result_type=RollbackResult, search_attributes=search_attributes_for(request))
    result: RollbackResult | None
    try:
        result = await asyncio.wait_for(handle.result(), timeout=ROLLBACK_DEADLINE_SECONDS)
    except WorkflowFailureError as err:
        log(f"{label}: rollback failed: {err.cause}")
        result = None
    wall = time.perf_counter() - t0
    ended_epoch = time.time()
    status = await orch.get_rollback_status(workflow_id)
    steps = {s.id: s for s in status.steps}
    switch, door = steps.get("frontend.switch_release"), steps.get("frontend.await_front_door")
    switch_started = epoch(switch.started) if switch else None
    door_finished = epoch(door.finished) if door else None
    moved = next((epoch(datetime.fromisoformat(s["at"])) for s in reversed(store.switches())
                  if s["to"] == to and s["from"] == live), None) if live != to else None
    found = None
    if switch_started is not None:
        # The poller's line may arrive a little after the result: wait for it with a deadline.
        deadline = time.monotonic() + SEEN_DEADLINE_SECONDS
        while (found := poller.first_seen(build, switch_started)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    seen, poll_before = found if found else (None, None)
    history = await handle.fetch_history()
    timeline = decompose(list(history.events))

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 4)

    out = {
        "label": label, "from": live, "to": to, "build": build, "workflow_id": workflow_id,
        "state": result.state.value if result else status.state.value,
        "error": None if result else status.error,
        "workflow_s": round(wall, 4),
        "switch_to_served_s": span(switch_started, seen),
        "workflow_switch_to_front_door_s": span(switch_started, door_finished),
        "switch_to_pointer_moved_s": span(switch_started, moved),
        "pointer_moved_to_served_s": span(moved, seen),
        # The new build became visible between the poll before and the one that saw it: the figures above are
        # upper bounds, by at most this much.
        "poll_resolution_s": span(poll_before, seen),
        "switch_started_at_s": span(started_epoch, switch_started),  # after the workflow was started
        "flaps": [],  # filled in by mark_flaps once the next rollback's switch time is known
        "activities": timeline["activities"],
        "steps": [{"id": s.id, "state": s.state,
                   "seconds": round((s.finished - s.started).total_seconds(), 3) if s.started and s.finished else None}
                  for s in status.steps],
        "_window": (started_epoch, ended_epoch), "_switch_started": switch_started, "_seen": seen,
    }
    log(f"{label}: {live} -> {to} {out['state']} in {wall:.2f}s; switch -> served {out['switch_to_served_s']}s "
        f"(workflow's view {out['workflow_switch_to_front_door_s']}s)")
    return out


def mark_flaps(rollbacks: list[dict[str, Any]], poller: Poller, end: float) -> None:
    """Each rollback's `flaps`: answers other than its build after the poller first saw it, up to the next
    rollback's switch (or the poller's end): [seconds after first seen, answer]."""
    for r, following in zip(rollbacks, [*rollbacks[1:], None], strict=True):
        until = following["_switch_started"] if following and following["_switch_started"] else end
        if r["_seen"] is not None:
            r["flaps"] = [[round(t - r["_seen"], 4), b] for t, b in poller.flaps(r["build"], r["_seen"], until)]


def other(version: str | None) -> str:
    return "v2" if version == "v1" else "v1"


# -- the parts ---------------------------------------------------------------------------------------


async def load_part(args: argparse.Namespace, client: Client, orch: RollbackOrchestrator, task_queue: str,
                    frontend: FrontendStack, poller: Poller, script: Path) -> dict[str, Any]:
    url = frontend.front_url
    shape = {"threads": args.threads, "connections": args.connections}
    baseline = None
    if args.baseline_seconds > 0:
        log(f"load: baseline {args.baseline_seconds}s, no rollback")
        before = varnish_counters(frontend)
        raw = await run_wrk_with(url, script, args.baseline_seconds, **shape, marker=script.with_name("baseline.on"))
        baseline = {**load_figures(raw), "varnish": counter_delta(before, varnish_counters(frontend))}

    log(f"load: {args.load_seconds}s with up to {args.load_rollbacks} rollbacks")
    before = varnish_counters(frontend)
    marker = script.with_name("load.on")
    wrk_task = asyncio.create_task(run_wrk_with(url, script, args.load_seconds, **shape, marker=marker))
    load_t0 = time.monotonic()
    rollbacks: list[dict[str, Any]] = []
    skipped = 0
    try:
        waited = await wait_for_load(marker, args.threads, wrk_task)
        log(f"load: on after {waited:.2f}s; rolling back")
        longest: float | None = None
        for index in range(args.load_rollbacks):
            remaining = args.load_seconds - (time.monotonic() - load_t0)
            if remaining < 1.5 * (longest or FIRST_ROLLBACK_ESTIMATE_SECONDS) + 1:
                skipped = args.load_rollbacks - index
                log(f"load: {remaining:.1f}s of load left, {skipped} rollbacks not started (raise --load-seconds)")
                break
            live = frontend.store.live()
            # The first is the real rollback (to the known-good release); then back and forth by to_version.
            r = await one_rollback(client, orch, task_queue, frontend, poller, to_version=None if index == 0 else other(live),
                                   label=f"load-{index}")
            rollbacks.append(r)
            longest = max(longest or 0.0, r["workflow_s"])
            if r["state"] != "succeeded":
                break
        raw = await wrk_task
    finally:
        if not wrk_task.done():
            wrk_task.cancel()
            with contextlib.suppress(BaseException):
                await wrk_task
    varnish = counter_delta(before, varnish_counters(frontend))
    figures = load_figures(raw)
    origin_epoch = raw["started_epoch"]
    covered = all(r["_window"][1] - origin_epoch <= figures["load_seconds"] for r in rollbacks)
    return {
        "requests": figures["requests"], "rps": figures["rps"], "non_2xx": figures["non_2xx"],
        "socket_errors": figures["socket_errors"], "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
        "rollbacks_under_load": len(rollbacks), "rollbacks_not_started": skipped,
        "load_covered_rollbacks": covered,
        "ratio_vs_baseline": None if not baseline else {
            "rps": round(figures["rps"] / baseline["rps"], 3) if baseline["rps"] else None,
            "p50": round(figures["p50_ms"] / baseline["p50_ms"], 3) if baseline["p50_ms"] else None,
            "p99": round(figures["p99_ms"] / baseline["p99_ms"], 3) if baseline["p99_ms"] else None,
        },
        "detail": {
            "wrk": raw["argv"],
            "paths": len(script_paths(frontend)),
            "load": {k: v for k, v in figures.items() if k not in ("requests", "rps", "non_2xx", "socket_errors", "p50_ms", "p99_ms")},
            "non_2xx_by_second": {str(int(k) - int(origin_epoch)): v
                                  for k, v in sorted(raw["bad_seconds"].items(), key=lambda kv: int(kv[0]))},
            "rollback_windows_s": [[round(r["_window"][0] - origin_epoch, 2), round(r["_window"][1] - origin_epoch, 2)]
                                   for r in rollbacks],
            "varnish": varnish,
            "baseline": baseline,
        },
        "_rollbacks": rollbacks,
    }


def preflight(frontend: FrontendStack, paths: list[str]) -> dict[str, int]:
    """Every path the load asks for, once through Varnish: the statuses that were not 200 (none expected)."""
    with httpx.Client(base_url=frontend.front_url, timeout=5) as http:
        answers = {path: http.get(path).status_code for path in paths}
    return {path: status for path, status in answers.items() if status != 200}


def script_paths(frontend: FrontendStack) -> list[str]:
    """The entry points, then every hashed asset of every release in the store (v1 and v2 here)."""
    store = frontend.store
    assets = sorted({f"/{p}" for v in store.versions() for p in store.manifest(v).files if p.startswith(f"{ASSETS}/")})
    return ENTRY_PATHS + assets


async def idle_part(args: argparse.Namespace, client: Client, orch: RollbackOrchestrator, task_queue: str,
                    frontend: FrontendStack, poller: Poller) -> list[dict[str, Any]]:
    runs = []
    for index in range(args.idle_rollbacks):
        r = await one_rollback(client, orch, task_queue, frontend, poller, to_version=other(frontend.store.live()),
                               label=f"idle-{index}")
        runs.append(r)
        if r["state"] != "succeeded":
            break
    return runs


async def assessment_part(args: argparse.Namespace, client: Client, config_path: Path, backend: BackendStack,
                          frontend: FrontendStack) -> dict[str, Any]:
    """Coordination.plan timed for each kind of request; beside it the compatibility check alone (the planner's
    `_compatibility` on the plan's own target plans), and, exploratory and outside the target, the
    frontend+backend plan with the backend's health samples taken back to back (`interval_ms: 0`)."""
    deployed = backend.deploy("v2")  # the backend then has a release to return to (v1)
    log(f"assessment: backend v2 deployed (live {deployed.live}); {args.plan_runs} plans each")
    no_interval = backend.write_config(config_path.with_name("rollback.interval0.yaml"), policy={"require_approval": False},
                                       health={"interval_ms": 0},
                                       extra={"environments": {"demo": {"targets": {"frontend": frontend.target_config()}}}})
    to = other(frontend.store.live())
    only_frontend = RollbackRequest(environment="demo", targets=[FRONTEND], initiated_by="bench", to_version={FRONTEND: to})
    both = RollbackRequest(environment="demo", targets=[FRONTEND, RollbackTarget.BACKEND], initiated_by="bench",
                           to_version={FRONTEND: to})
    variants = {"frontend": (config_path, only_frontend), "frontend_backend": (config_path, both),
                "frontend_backend_interval_0": (no_interval, both)}
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as http:
        for name, (path, request) in variants.items():
            # As worker.build_worker builds them.
            config = ConfigSource(path)
            targets = build_targets(Shared(config=config, health=HttpHealth(http)))
            coordination = Coordination(config, targets, client)
            env = config.get().environment("demo")
            configured = env.targets.configured()
            times: list[float] = []
            compatibility: list[float] = []
            failures: list[str] = []
            summary = None
            for _ in range(args.plan_runs):
                t0 = time.perf_counter()
                try:
                    plan = await coordination.plan(request)
                    t1 = time.perf_counter()
                    await coordination._compatibility(request, list(plan.targets), configured, couple=env.policy.couple_frontend)
                    t2 = time.perf_counter()
                except Exception as err:  # noqa: BLE001 - counted; the run is then invalid
                    failures.append(f"{type(err).__name__}: {err}"[:300])
                    continue
                times.append((t1 - t0) * 1000)
                compatibility.append((t2 - t1) * 1000)
                summary = {"targets": [f"{t.target.value} {t.from_version}->{t.to_version}" for t in plan.targets],
                           "compatibility": plan.compatibility.summary() if plan.compatibility else None,
                           "source": plan.compatibility.source if plan.compatibility else None}
            figures, check = stats(times, 1), stats(compatibility, 1)
            out[name] = {"median_ms": figures["median"], "p95_ms": figures["p95"], "runs": figures["n"],
                         "first_ms": round(times[0], 1) if times else None, "min_ms": figures["min"], "max_ms": figures["max"],
                         "compatibility_check_ms": {"median": check["median"], "p95": check["p95"]},
                         "in_target": name != "frontend_backend_interval_0",
                         "failures": failures[:3], "failed": len(failures), "plan": summary}
            log(f"assessment {name}: median {figures['median']} ms, p95 {figures['p95']} ms; compatibility check alone "
                f"median {check['median']} ms ({summary})")
    return out


def switch_figures(rollbacks: list[dict[str, Any]]) -> dict[str, Any]:
    def of(key: str) -> dict[str, Any]:
        return stats([r[key] for r in rollbacks if r.get(key) is not None], 4)

    return {
        "switch_to_served_s": of("switch_to_served_s"),
        "workflow_switch_to_front_door_s": of("workflow_switch_to_front_door_s"),
        "switch_to_pointer_moved_s": of("switch_to_pointer_moved_s"),
        "pointer_moved_to_served_s": of("pointer_moved_to_served_s"),
        "workflow_s": of("workflow_s"),
        "poll_resolution_s": of("poll_resolution_s"),
        "flaps": sum(len(r["flaps"]) for r in rollbacks),
        "per_rollback": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rollbacks],
    }


# -- the run ------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"benchmark": "frontend_switch"}
    invalid: list[str] = []
    load = None
    idle: list[dict[str, Any]] = []
    assessment: dict[str, Any] = {}
    poller_figures: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rollback-bench-frontend-") as tmp:
            base = Path(tmp)
            async with temporal_server() as env:
                client = env.client
                with backend_stack(base / "stack", "blue_green", ["blue", "green"]) as backend, frontend_stack(backend) as frontend:
                    frontend.deploy("v2")
                    config_path = base / "rollback.yaml"
                    backend.write_config(config_path, policy={"require_approval": False},
                                         extra={"environments": {"demo": {"targets": {"frontend": frontend.target_config()}}}})
                    paths = script_paths(frontend)
                    if bad := preflight(frontend, paths):
                        raise RuntimeError(f"paths of the load that do not answer 200 before any rollback: {bad}")
                    script = lua_script(base / "paths.lua", paths)
                    async with in_process_worker(client, config_path) as task_queue:
                        orch = RollbackOrchestrator(client=client, environment="demo",
                                                    settings=TemporalSettings("unused", client.namespace, task_queue))
                        poller = Poller(frontend.front_url + "/version.json", args.poll_ms / 1000)
                        try:
                            with polling(poller):
                                load = await load_part(args, client, orch, task_queue, frontend, poller, script)
                                log(f"idle: {args.idle_rollbacks} rollbacks without load")
                                idle = await idle_part(args, client, orch, task_queue, frontend, poller)
                                poller_end = time.time()
                        finally:
                            poller_figures = poller.figures()  # with the summary it printed as it stopped
                        mark_flaps([*(load["_rollbacks"] if load else []), *idle], poller, poller_end)
                        assessment = await assessment_part(args, client, config_path, backend, frontend)
                    origin = {**origin_non_2xx(frontend.nginx_dir / "access.log"),
                              "error_log": nginx_problems(frontend.nginx_dir / "error.log")}
    except Exception as err:  # noqa: BLE001 - reported as an invalid run, with what was measured so far
        log(f"failed: {type(err).__name__}: {err}")
        invalid.append(f"{type(err).__name__}: {err}"[:500])

    loaded = load["_rollbacks"] if load else []
    every = loaded + idle
    for r in every:
        if r["state"] != "succeeded":
            invalid.append(f"{r['label']}: rollback {r['state']}: {r['error']}")
        elif r["switch_to_served_s"] is None:
            invalid.append(f"{r['label']}: the poller never saw build {r['build']}")
    if load is not None:
        if not load["load_covered_rollbacks"]:
            invalid.append("a rollback outlasted the load; raise --load-seconds")
        if load["rollbacks_under_load"] < 1:
            invalid.append("no rollback ran under load; raise --load-seconds")
    if len(every) < 5:
        invalid.append(f"{len(every)} rollbacks measured, fewer than 5")
    for name, part in assessment.items():
        if part["failed"]:
            invalid.append(f"assessment {name}: {part['failed']} plans failed: {part['failures'][0]}")

    switch = {"under_load": switch_figures(loaded), "idle": switch_figures(idle)}
    load_median = switch["under_load"]["switch_to_served_s"]["median"]
    idle_median = switch["idle"]["switch_to_served_s"]["median"]
    switch["ratio_under_load_vs_idle"] = round(load_median / idle_median, 3) if load_median and idle_median else None
    workflow = {"under_load": switch["under_load"]["workflow_s"], "idle": switch["idle"]["workflow_s"]}

    targets = {
        "load": {"target": "0 non-2xx and 0 socket errors through Varnish during the rollbacks",
                 "met": bool(load) and load["non_2xx"] == 0 and load["socket_errors"] == 0},
        "switch": {"target": f"median switch_release start -> Varnish serves the new build < {TARGET_SWITCH_SECONDS:g} s "
                             "(under load, and idle when --idle-rollbacks > 0)",
                   "met": all(m is not None and m < TARGET_SWITCH_SECONDS
                              for m in (load_median, *([idle_median] if args.idle_rollbacks else [])))},
        "assessment": {"target": f"Coordination.plan p95 < {TARGET_PLAN_MS:g} ms (frontend and frontend+backend requests)",
                       "met": bool(assessment) and all(p["p95_ms"] is not None and p["p95_ms"] < TARGET_PLAN_MS
                                                       for p in assessment.values() if p["in_target"])},
    }
    misses = []
    if load and not targets["load"]["met"]:
        misses.append(f"load: {load['non_2xx']} non-2xx, {load['socket_errors']} socket errors "
                      f"{ {k: v for k, v in load['detail']['load']['socket_error_kinds'].items() if v} }")
    if not targets["switch"]["met"]:
        misses.append(f"switch: median {load_median} s under load, {idle_median} s idle")
    if not targets["assessment"]["met"]:
        misses.append("assessment: " + ", ".join(f"{n} p95 {p['p95_ms']} ms" for n, p in assessment.items() if p["in_target"]))
    if load is not None:
        load = {k: v for k, v in load.items() if not k.startswith("_")}
    report.update({
        "result": "target met" if all(t["met"] for t in targets.values()) else "target missed",
        "misses": misses,
        "valid": not invalid,
        "invalid": invalid,
        "targets": targets,
        "load": load,
        "switch": switch,
        "assessment": assessment,
        "workflow_s": workflow,
        "poller": poller_figures,
        "origin": origin,
        "settings": {k: v for k, v in vars(args).items()},
        "machine": machine(),
    })
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load-seconds", type=int, default=30, help="the measured wrk run, rollbacks inside it")
    parser.add_argument("--baseline-seconds", type=int, default=None, help="default: --load-seconds; 0 skips the baseline")
    parser.add_argument("--load-rollbacks", type=int, default=10, help="at most this many back to back under load (as many as the load window covers)")
    parser.add_argument("--idle-rollbacks", type=int, default=5, help="then this many without load")
    parser.add_argument("--plan-runs", type=int, default=20, help="Coordination.plan calls per request kind")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="the /version.json poller's period")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if args.baseline_seconds is None:
        args.baseline_seconds = args.load_seconds
    if args.load_seconds < 5 or args.poll_ms <= 0 or args.plan_runs < 1:
        parser.error("--load-seconds >= 5, --poll-ms > 0, --plan-runs >= 1")
    return args


if __name__ == "__main__":
    keep_stdout_for_json()
    try:
        result = asyncio.run(main(parse_args(sys.argv[1:])))
    except KeyboardInterrupt:
        exit_now(130)
    emit("frontend_switch", result)
    exit_now(0 if result["valid"] else 1)

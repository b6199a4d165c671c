"""Does a rollback drop requests? wrk loads the front door while a real rollback runs.

For each strategy (blue_green: blue+green; rolling: 3 instances, max_unavailable 1):
a BackendStack on free loopback ports, a broken v2 deployed (`fault="errors"`: /health
and /api answer 500, /version stays 200, so the load targets /version and any non-2xx
is the rollback's doing), an in-process worker, then

  1. a baseline: the same wrk load for a few seconds with nothing happening
     (the ratio against it is what to compare; absolute figures depend on the machine);
  2. the measured run: wrk for a fixed duration, the rollback started ~1 s in,
     timed from start to result. The duration must cover the whole rollback;
     `load_covered_rollback` says whether it did.

Target: 0 non-2xx and 0 socket errors at >= 500 requests/s. The script exits 0 either
way and says "target met" or "target missed" in the JSON (stdout and
bench/results/switch_under_load.json).

    .venv/bin/python bench/switch_under_load.py [--strategies blue_green,rolling]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _harness import (run_benchmark, backend_stack, decompose, in_process_worker, log, machine,
                      temporal_server)

from rollback.client import RollbackOrchestrator
from rollback.models import RollbackTarget
from rollback.settings import TemporalSettings

LUA = Path(__file__).resolve().parent / "status_classes.lua"
WRK = "/usr/bin/wrk"
TARGET_RPS = 500
START_DELAY_SECONDS = 1.0
ROLLBACK_DEADLINE_SECONDS = 180.0
STRATEGIES = {
    "blue_green": ["blue", "green"],
    "rolling": ["app-1", "app-2", "app-3"],
}


def wrk_binary() -> str:
    import shutil

    found = WRK if Path(WRK).exists() else shutil.which("wrk")
    if found is None:
        raise SystemExit("bench: wrk is not installed (Debian package wrk; `make bootstrap` installs it)")
    return found


async def run_wrk(url: str, seconds: int, *, threads: int, connections: int, script: Path = LUA,
                  script_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run wrk with a script that prints a `WRK_JSON {...}` line (default: the status-class one); that JSON
    plus when it started (epoch seconds). `script_args` go to the script (after `--`)."""
    argv = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url,
            *(["--", *script_args] if script_args else [])]
    started = time.time()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = stdout.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {stderr.decode(errors='replace')[-500:]} {text[-500:]}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    data["started_epoch"] = started
    return data


def load_figures(w: dict[str, Any]) -> dict[str, Any]:
    classes = w["classes"]
    errors = w["errors"]
    # errors.status is wrk's count of status > 399; the classes say the same more precisely.
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    seconds = w["duration_us"] / 1e6
    return {
        "requests": w["requests"],
        "non_2xx": sum(v for k, v in classes.items() if k != "2xx"),
        "socket_errors": socket_errors,
        "rps": round(w["requests"] / seconds, 1) if seconds else 0.0,
        "p99_ms": round(w["latency_us"]["p99"] / 1000, 2),
        "status_classes": {k: v for k, v in sorted(classes.items()) if v},
        "socket_error_kinds": {k: v for k, v in errors.items() if k != "status"},
        "p50_ms": round(w["latency_us"]["p50"] / 1000, 2),
        "max_ms": round(w["latency_us"]["max"] / 1000, 2),
        "load_seconds": round(seconds, 2),
    }


def nginx_problems(path: Path, keep: int = 8) -> dict[str, Any]:
    """nginx's own account of trouble (upstream errors, worker shutdowns): counts by level
    plus the last lines, so a miss can be explained without re-running."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {"counts": {}, "last": []}
    counts: dict[str, int] = {}
    problems = []
    for line in lines:
        level = line.split("[", 1)[1].split("]", 1)[0] if "[" in line else "?"
        counts[level] = counts.get(level, 0) + 1
        if level in ("error", "crit", "alert", "emerg", "warn"):
            problems.append(line[:300])
    return {"counts": counts, "last": problems[-keep:]}


def nginx_reloads(steps: list[Any]) -> int:
    """Reloads the rollback's steps report: each one restarts nginx's workers, and every
    keep-alive connection idle at that instant is closed under its client."""
    total = 0
    for step in steps:
        found = re.search(r"(\d+) nginx reloads", step.detail or "")
        total += int(found.group(1)) if found else ("reloaded nginx" in (step.detail or ""))
    return total


def offset(at: datetime | None, origin_epoch: float) -> float | None:
    return None if at is None else round(at.replace(tzinfo=at.tzinfo or timezone.utc).timestamp() - origin_epoch, 2)


async def scenario(client, strategy: str, base: Path, *, seconds: int, baseline_seconds: int,
                   threads: int, connections: int, front_door_keepalive: int) -> dict[str, Any]:
    with backend_stack(base / strategy, strategy, STRATEGIES[strategy], client_keepalive_seconds=front_door_keepalive) as stack:
        deployed = stack.deploy("v2", "errors")
        log(f"{strategy}: broken v2 deployed, live {deployed.live}, front door serves {stack.serving()}")
        config_path = base / strategy / "rollback.yaml"
        stack.write_config(config_path, policy={"require_approval": False})
        url = stack.front_url + "/version"
        async with in_process_worker(client, config_path) as task_queue:
            orch = RollbackOrchestrator(client=client, environment="demo",
                                        settings=TemporalSettings("unused", client.namespace, task_queue))
            baseline = None
            if baseline_seconds > 0:
                log(f"{strategy}: baseline load {baseline_seconds}s (no rollback)")
                baseline = load_figures(await run_wrk(url, baseline_seconds, threads=threads, connections=connections))

            log(f"{strategy}: load {seconds}s, rollback starts after {START_DELAY_SECONDS}s")
            wrk_task = asyncio.create_task(run_wrk(url, seconds, threads=threads, connections=connections))
            load_t0 = time.monotonic()
            try:
                await asyncio.sleep(START_DELAY_SECONDS)
                t0 = time.monotonic()
                started = await orch.initiate_rollback(targets=[RollbackTarget.BACKEND], initiated_by="bench",
                                                       reason=f"bench: switch under load ({strategy})")
                result = await asyncio.wait_for(orch.wait(started.execution_id), timeout=ROLLBACK_DEADLINE_SECONDS)
                t1 = time.monotonic()
                load = await wrk_task
            finally:
                if not wrk_task.done():
                    wrk_task.cancel()
                    with contextlib.suppress(BaseException):
                        await wrk_task
            try:
                status = await orch.get_rollback_status(started.execution_id)
                steps, status_error, final_state = status.steps, status.error, status.state.value
            except Exception as err:  # noqa: BLE001 - the load figures still stand
                log(f"{strategy}: status query failed: {err}")
                steps, status_error, final_state = [], f"status query failed: {err}", "unknown"
            history = await client.get_workflow_handle(started.execution_id).fetch_history()
        nginx_log = nginx_problems(stack.nginx_dir / "error.log")

    origin = load["started_epoch"]
    figures = load_figures(load)
    rollback_seconds = round(t1 - t0, 3)
    finished_offset = t1 - load_t0
    reloads = nginx_reloads(steps)
    timeline = decompose(list(history.events))
    out: dict[str, Any] = {
        "requests": figures["requests"],
        "non_2xx": figures["non_2xx"],
        "socket_errors": figures["socket_errors"],
        "rps": figures["rps"],
        "p99_ms": figures["p99_ms"],
        "rollback_seconds": rollback_seconds,
        "rollback_state": result.state.value if result else final_state,
        "load_covered_rollback": finished_offset <= figures["load_seconds"],
        "detail": {
            "execution_id": started.execution_id,
            "instances": STRATEGIES[strategy],
            "wrk": f"-t{threads} -c{connections} -d{seconds}s {url}",
            "load": {k: v for k, v in figures.items() if k not in ("requests", "non_2xx", "socket_errors", "rps", "p99_ms")},
            "rollback_window_s": [round(t0 - load_t0, 2), round(finished_offset, 2)],
            "non_2xx_by_second": {str(int(k) - int(origin)): v for k, v in sorted(load["bad_seconds"].items(), key=lambda kv: int(kv[0]))},
            "nginx_reloads": reloads,
            "socket_errors_per_reload": round(figures["socket_errors"] / reloads, 2) if reloads else None,
            # Same decomposition as orchestration_overhead.py, for this rollback under load.
            "activity_seconds": round(timeline["activity_s"], 3),
            "orchestration_overhead_ms": round((rollback_seconds - timeline["activity_s"]) * 1000, 1),
            "activities": timeline["activities"],
            "workflow_tasks": timeline["workflow_tasks"],
            "orchestration_breakdown_ms": {
                "workflow_task_schedule_to_start": round(timeline["workflow_task_queue_s"] * 1000, 1),
                "workflow_task_start_to_complete": round(timeline["workflow_task_run_s"] * 1000, 1),
                "activity_schedule_to_start": round(timeline["activity_queue_s"] * 1000, 1),
                "client_and_rest": round((rollback_seconds - timeline["activity_s"] - timeline["workflow_task_queue_s"]
                                          - timeline["workflow_task_run_s"] - timeline["activity_queue_s"]) * 1000, 1),
            },
            "steps": [{"name": s.name, "state": s.state, "at_s": offset(s.started, origin),
                       "seconds": round((s.finished - s.started).total_seconds(), 3) if s.started and s.finished else None,
                       "detail": s.detail[:160]}
                      for s in sorted(steps, key=lambda s: (s.started is None, s.started))],
            "phase_seconds": result.phase_seconds if result else None,
            "nginx_error_log": nginx_log,
            "error": status_error,
            "baseline": baseline,
            "ratio_vs_baseline": None if not baseline else {
                "rps": round(figures["rps"] / baseline["rps"], 3) if baseline["rps"] else None,
                "p99": round(figures["p99_ms"] / baseline["p99_ms"], 3) if baseline["p99_ms"] else None,
            },
        },
    }
    return out


def verdict(strategies: dict[str, dict[str, Any]]) -> tuple[bool, list[str]]:
    misses = []
    for name, r in strategies.items():
        if r.get("error"):
            misses.append(f"{name}: did not run ({r['error']})")
            continue
        if r["non_2xx"]:
            misses.append(f"{name}: {r['non_2xx']} non-2xx responses")
        if r["socket_errors"]:
            kinds = {k: v for k, v in r["detail"]["load"]["socket_error_kinds"].items() if v}
            misses.append(f"{name}: {r['socket_errors']} socket errors {kinds} across {r['detail']['nginx_reloads']} "
                          "nginx reloads (see bench/README.md: reloads close idle keep-alive connections)")
        if r["rps"] < TARGET_RPS:
            misses.append(f"{name}: {r['rps']} requests/s < {TARGET_RPS}")
        if r["rollback_state"] != "succeeded":
            misses.append(f"{name}: rollback ended {r['rollback_state']}")
        if not r["load_covered_rollback"]:
            misses.append(f"{name}: the rollback outlasted the load ({r['rollback_seconds']}s); raise its duration")
    return not misses, misses


async def main(args: argparse.Namespace) -> dict[str, Any]:
    durations = {"blue_green": args.blue_green_seconds, "rolling": args.rolling_seconds}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rollback-bench-") as tmp:
        async with temporal_server() as env:
            for strategy in args.strategies:
                try:
                    results[strategy] = await scenario(env.client, strategy, Path(tmp), seconds=durations[strategy],
                                                       baseline_seconds=args.baseline_seconds,
                                                       threads=args.threads, connections=args.connections,
                                                       front_door_keepalive=args.client_keepalive)
                except Exception as err:  # noqa: BLE001 - report it and carry on with the next strategy
                    log(f"{strategy}: failed: {type(err).__name__}: {err}")
                    results[strategy] = {"error": f"{type(err).__name__}: {err}"}
    met, misses = verdict(results)
    return {
        "benchmark": "switch_under_load",
        "client_keepalive_seconds": args.client_keepalive,
        "target": f"0 non-2xx at >= {TARGET_RPS} rps",
        "result": "target met" if met else "target missed",
        "misses": misses,
        "strategies": results,
        "machine": machine(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="blue_green,rolling",
                        type=lambda s: [x for x in s.split(",") if x], help="comma-separated: blue_green,rolling")
    parser.add_argument("--blue-green-seconds", type=int, default=15)
    parser.add_argument("--rolling-seconds", type=int, default=25)
    parser.add_argument("--baseline-seconds", type=int, default=5, help="0 skips the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--client-keepalive", type=int, default=0, metavar="SECONDS",
                        help="front door keepalive_timeout; 0 (the shipped default) means no idle client "
                             "connection for a reload to close; try 75 to see what keep-alive costs")
    args = parser.parse_args(argv)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    return args


if __name__ == "__main__":
    # A keep-alive experiment never overwrites the figures of the shipped configuration.
    run_benchmark(main, parse_args(sys.argv[1:]), lambda a: "switch_under_load" + (
        f".client_keepalive_{a.client_keepalive}" if a.client_keepalive else ""))

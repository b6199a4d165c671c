"""How fast does the monitor detect a bad release and restore traffic, and does it ever fire on noise?

A blue-green BackendStack (nginx + demo app, free loopback ports), an in-process worker
and `monitor-demo` (HealthMonitorWorkflow) probing the front door's /api/items with
the DEFAULT rules (api_error_rate > 0.05 severity high; response_time_p95 > 2000 ms
severity medium) under compressed windows and interval (see MONITORING below and
bench/README.md for why these values). Each scenario starts from a healthy steady
state: every rule's last outcome OK, none firing, and the whole widest window filled
with healthy samples. Then:

  errors   `stack.deploy("v2", "errors")`: /api answers 500. From the deploy call
           returning, seconds to (i) the monitor's incident with outcome "started"
           (its `at`, and when a status poll first saw it), (ii) the rollback
           workflow's start, (iii) traffic restored (the front door's /version
           answers v1 three times in a row; the first of them). Target: restored
           within 30 s.
  latency  `stack.deploy("v2", "latency")`: /api answers after 2.5 s. The same
           figures. Target: restored within 90 s.
  noisy    `stack.deploy("v2", "noisy")` (1% errors, every 40th request 2.5 s) for
           --noisy-seconds (600 = the issue's 10 minutes): rollbacks started, rules
           fired, single-evaluation breaches. Target: 0 rollbacks.

errors and latency run --runs times each (3). Exits 0 either way; JSON on stdout and
in bench/results/detection.json (or detection.noisy_<S>s.json for a shortened noisy run).

    .venv/bin/python bench/detection.py [--runs 3] [--noisy-seconds 600] [--scenarios errors,latency,noisy]
    .venv/bin/python bench/detection.py --noise-model-only [--interval 15 --error-window 300 --latency-window 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from _harness import run_benchmark, backend_stack, in_process_worker, log, machine, summarize, temporal_server

from rollback.client import RollbackOrchestrator
from rollback.monitoring import Collection, MetricSpec, MonitorStatus, ProbeSample, Rule, RuleState, Transition, Windows, evaluate, step
from rollback.settings import TemporalSettings

TARGETS_S = {"errors": 30.0, "latency": 90.0}
FAULTS = {"errors": "errors", "latency": "latency", "noisy": "noisy"}
SCENARIO_RULE = {"errors": "api_error_rate", "latency": "response_time_p95"}
RESTORED_STREAK = 3           # /version answers v1 this many times in a row
VERSION_POLL_S = 0.1
STATUS_POLL_S = 0.25
# Bounds: a run that does not detect within these is recorded as a miss, never waited on forever.
DETECT_DEADLINE_S = {"errors": 150.0, "latency": 300.0}
ROLLBACK_DEADLINE_S = 180.0
STEADY_EXTRA_S = 180.0        # beyond the widest window, to reach a steady state


def monitoring_block(front_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The default rules, compressed. Nothing else changed except what the comments say."""
    return {
        "interval_seconds": args.interval,
        # 0, not the default 15 min: runs follow each other within minutes, and in the noisy
        # run a false fire must start a rollback (counted), not be hidden by a cooldown.
        "cooldown_minutes": 0,
        # timeout 3 s, not the default 2 s: a 2.5 s answer must count as slow, not as an error;
        # with 2 s the latency fault would be caught (sooner) by api_error_rate instead.
        "probes": [{"name": "api", "url": f"{front_url}/api/items", "requests": 5, "timeout_seconds": args.probe_timeout}],
        "rules": [
            {"name": "api_error_rate", "threshold": 0.05, "window_seconds": args.error_window, "severity": "high"},
            # medium rolls back WITH approval by default; nobody approves in a benchmark.
            {"name": "response_time_p95", "threshold": 2000, "window_seconds": args.latency_window, "severity": "medium",
             "action": "rollback"},
        ],
    }


def epoch(at: datetime | None) -> float | None:
    return None if at is None else at.replace(tzinfo=at.tzinfo or timezone.utc).timestamp()


def rel(at: float | None, origin: float) -> float | None:
    return None if at is None else round(at - origin, 2)


class Watch:
    """Polls the monitor's status; keeps every evaluation's outcomes (one poll per evaluation or better)."""

    def __init__(self, orch: RollbackOrchestrator) -> None:
        self.orch = orch
        self.last: MonitorStatus | None = None
        self.evaluations: dict[int, dict[str, Any]] = {}  # evaluation count -> {at, rules: {name: (outcome, value, samples)}}
        self.first_seen: dict[str, float] = {}            # incident key -> wall time a poll first saw it
        self.poll_errors = 0

    async def poll(self) -> MonitorStatus | None:
        try:
            status = await self.orch.monitor_status("demo")
        except Exception as err:  # noqa: BLE001 - a missed poll is not a result; count it
            self.poll_errors += 1
            log(f"status poll failed: {type(err).__name__}: {err}")
            return None
        now = time.time()
        self.last = status
        if status.evaluations not in self.evaluations:
            self.evaluations[status.evaluations] = {
                "at": epoch(status.last_evaluated_at),
                "rules": {v.rule.name: (v.state.last.outcome.value if v.state.last else None,
                                        v.state.last.value if v.state.last else None,
                                        v.state.last.samples if v.state.last else 0,
                                        v.state.firing) for v in status.rules},
            }
        for incident in status.incidents:
            self.first_seen.setdefault(incident.key, now)
        return status

    async def until(self, accept, *, deadline_s: float, every: float = STATUS_POLL_S, what: str) -> MonitorStatus:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            status = await self.poll()
            if status is not None and accept(status):
                return status
            await asyncio.sleep(every)
        raise TimeoutError(f"no {what} within {deadline_s:.0f}s")


def steady(status: MonitorStatus, healthy_since: dict[str, float]) -> bool:
    """Every rule OK and not firing, and each rule's window holds only samples taken since that rule last saw trouble."""
    if not status.rules or status.last_evaluated_at is None:
        return False
    if any(v.state.firing or v.state.last is None or v.state.last.outcome.value != "ok" for v in status.rules):
        return False
    last = epoch(status.last_evaluated_at)
    return all(last >= healthy_since[v.rule.name] + v.rule.window.total_seconds() for v in status.rules)


async def version_streak(front_url: str, want: str, *, deadline_s: float) -> tuple[float | None, int]:
    """Poll /version until `want` answers RESTORED_STREAK times in a row; (time of the first of them, polls)."""
    first_of_streak: float | None = None
    streak = polls = 0
    end = time.monotonic() + deadline_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < end:
            at = time.time()
            polls += 1
            try:
                response = await http.get(f"{front_url}/version", timeout=1.0)
                version = response.json().get("version") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                version = None
            if version == want:
                if streak == 0:
                    first_of_streak = at
                streak += 1
                if streak >= RESTORED_STREAK:
                    return first_of_streak, polls
            else:
                streak = 0
            await asyncio.sleep(VERSION_POLL_S)
    return None, polls


async def wait_steady(watch: Watch, healthy_since: dict[str, float], widest: float) -> float:
    t = time.monotonic()
    await watch.until(lambda s: steady(s, healthy_since), deadline_s=widest + STEADY_EXTRA_S, every=1.0,
                      what="healthy steady state")
    return round(time.monotonic() - t, 1)


def troubled(watch: Watch, since: float) -> set[str]:
    """Rules that had any outcome other than OK in an evaluation at or after `since`."""
    return {name for e in watch.evaluations.values() if e["at"] and e["at"] >= since
            for name, (outcome, *_rest) in e["rules"].items() if outcome != "ok"}


async def hard_fault_run(client, stack, orch: RollbackOrchestrator, watch: Watch, scenario: str, index: int,
                         widest: float, healthy_since: dict[str, float]) -> dict[str, Any]:
    """One errors/latency run; updates healthy_since for the rules it troubled."""
    waited = await wait_steady(watch, healthy_since, widest)
    before = {i.key for i in (watch.last.incidents if watch.last else [])}
    log(f"{scenario} run {index}: steady after {waited}s; deploying v2 with fault {FAULTS[scenario]!r}")
    deploy_started = time.time()
    await asyncio.to_thread(stack.deploy, "v2", FAULTS[scenario])  # blocking; the worker runs in this loop
    t0 = time.time()
    restored_task = asyncio.create_task(version_streak(stack.front_url, "v1", deadline_s=DETECT_DEADLINE_S[scenario] + ROLLBACK_DEADLINE_S))
    out: dict[str, Any] = {"run": index, "steady_wait_s": waited, "deploy_call_s": round(t0 - deploy_started, 2)}
    try:
        def started(s: MonitorStatus) -> bool:
            return any(i.key not in before and i.outcome == "started" for i in s.incidents)

        status = await watch.until(started, deadline_s=DETECT_DEADLINE_S[scenario], what="rollback started by the monitor")
        incident = next(i for i in status.incidents if i.key not in before and i.outcome == "started")
        described = await client.get_workflow_handle(incident.rollback_id).describe()
        result = await asyncio.wait_for(orch.wait(incident.rollback_id), timeout=ROLLBACK_DEADLINE_S)
        restored_at, polls = await restored_task
        closed = await client.get_workflow_handle(incident.rollback_id).describe()
        rollback = await orch.get_rollback_status(incident.rollback_id)
        # The breaches that led to it, from the evaluations the polls saw after the deploy.
        breaches = sorted(e["at"] for e in watch.evaluations.values()
                          if e["at"] and e["at"] >= t0 and e["rules"].get(incident.source, (None,))[0] == "breach")
        other = [i for i in status.incidents if i.key not in before and i.key != incident.key]
        out.update({
            "incident_at_s": rel(epoch(incident.at), t0),
            "incident_seen_s": rel(watch.first_seen.get(incident.key), t0),
            "rollback_started_s": rel(epoch(described.start_time), t0),
            "restored_s": rel(restored_at, t0),
            "rollback_closed_s": rel(epoch(closed.close_time), t0),
            "rollback_state": result.state.value if result else "failed (see its status)",
            "rule": incident.source,
            "first_breach_s": rel(breaches[0], t0) if breaches else None,
            "reason": incident.reason,
            "rollback_id": incident.rollback_id,
            "version_polls": polls,
            # Where the rollback's own time went (seconds after the deploy returned; each step's duration).
            "rollback_steps": [{"name": st.name, "at_s": rel(epoch(st.started), t0),
                                "seconds": round((st.finished - st.started).total_seconds(), 2) if st.started and st.finished else None}
                               for st in sorted(rollback.steps, key=lambda st: (st.started is None, st.started))],
            "other_incidents": [{"source": i.source, "outcome": i.outcome} for i in other],
        })
        healthy = restored_at or time.time()
        # The rollback's own end (the state store records the restore) is when the fault is truly gone.
    except Exception as err:  # noqa: BLE001 - record the miss; the next run still gets its chance
        log(f"{scenario} run {index}: {type(err).__name__}: {err}")
        out["error"] = f"{type(err).__name__}: {err}"
        healthy = time.time()
        if not restored_task.done():
            restored_task.cancel()
            with contextlib.suppress(BaseException):
                await restored_task
        if stack.serving() != "v1":
            raise RuntimeError(f"{scenario} run {index} left the front door on {stack.serving()!r}; cannot go on") from err
    for name in troubled(watch, t0) | {SCENARIO_RULE[scenario]}:
        healthy_since[name] = max(healthy_since[name], healthy)
    log(f"{scenario} run {index}: incident +{out.get('incident_at_s')}s, rollback start +{out.get('rollback_started_s')}s, "
        f"restored +{out.get('restored_s')}s ({out.get('rule')})")
    return out


def summarize_hard(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    target = TARGETS_S[scenario]
    ok = [r for r in runs if "error" not in r and r.get("restored_s") is not None]
    figures = {key: summarize([r[key] for r in ok if r.get(key) is not None])
               for key in ("first_breach_s", "incident_at_s", "incident_seen_s", "rollback_started_s", "restored_s",
                           "rollback_closed_s")}
    misses = [f"run {r['run']}: {r.get('error', 'traffic not restored')}" for r in runs if r not in ok]
    misses += [f"run {r['run']}: restored after {r['restored_s']}s > {target:g}s" for r in ok if r["restored_s"] > target]
    misses += [f"run {r['run']}: rollback ended {r['rollback_state']}" for r in ok if r["rollback_state"] != "succeeded"]
    return {
        "fault": FAULTS[scenario],
        "target": f"traffic restored within {target:g}s of the deploy returning, every run",
        "verdict": "met" if runs and not misses else "missed",
        "misses": misses,
        "runs_done": len(runs),
        "restored_s": figures["restored_s"],
        "figures_s": figures,
        "rules_fired": sorted({r["rule"] for r in ok}),
        "runs": runs,
    }


async def noisy_run(client, stack, watch: Watch, seconds: int, widest: float, healthy_since: dict[str, float]) -> dict[str, Any]:
    waited = await wait_steady(watch, healthy_since, widest)
    before = {i.key for i in (watch.last.incidents if watch.last else [])}
    rollbacks_before = await count_rollbacks(client)
    evaluations_before = watch.last.evaluations if watch.last else 0
    log(f"noisy: steady after {waited}s; deploying v2 with fault 'noisy' for {seconds}s")
    await asyncio.to_thread(stack.deploy, "v2", "noisy")
    t0 = time.time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await watch.poll()
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
    status = await watch.poll() or watch.last
    t1 = time.time()
    rollbacks = await count_rollbacks(client) - rollbacks_before
    serving = await asyncio.to_thread(stack.serving)
    new = [i for i in (status.incidents if status else []) if i.key not in before]
    per_rule: dict[str, dict[str, Any]] = {}
    seen = [e for n, e in sorted(watch.evaluations.items()) if n > evaluations_before and e["at"] and t0 <= e["at"] <= t1]
    for e in seen:
        for name, (outcome, value, samples, _firing) in e["rules"].items():
            r = per_rule.setdefault(name, {"outcomes": {}, "max_value": None, "min_samples": None})
            r["outcomes"][outcome] = r["outcomes"].get(outcome, 0) + 1
            if value is not None:
                r["max_value"] = value if r["max_value"] is None else max(r["max_value"], value)
            r["min_samples"] = samples if r["min_samples"] is None else min(r["min_samples"], samples)
    evaluations = (status.evaluations - evaluations_before) if status else 0
    started = [i for i in new if i.outcome == "started"]
    misses = []
    if started or rollbacks:
        misses.append(f"{max(len(started), rollbacks)} rollback(s) started on a healthy noisy service")
    if serving != "v2":
        misses.append(f"front door serves {serving!r} at the end, not v2")
    expected = seconds / status.interval_seconds if status else 0
    if evaluations < 0.8 * expected:
        misses.append(f"only {evaluations} evaluations in {seconds}s")
    return {
        "fault": "noisy",
        "target": "0 rollbacks started over the run (the issue: 10 minutes)",
        "verdict": "met" if not misses else "missed",
        "misses": misses,
        "seconds": seconds,
        "steady_wait_s": waited,
        "evaluations": evaluations,
        "evaluations_seen_by_polls": len(seen),
        "rollbacks_started": len(started),
        "rollback_workflows_started": rollbacks,
        "rules_fired": sorted({i.source for i in new}),
        "incidents": [{"source": i.source, "outcome": i.outcome, "reason": i.reason} for i in new],
        "per_rule": per_rule,
        "front_door_at_end": serving,
        "poll_errors": watch.poll_errors,
    }


async def count_rollbacks(client) -> int:
    found = 0
    async for _ in client.list_workflows("WorkflowType = 'RollbackWorkflow'", limit=1000):
        found += 1
    return found


# -- what the deterministic demo noise cannot show -------------------------------------


def noise_model(args: argparse.Namespace, runs: int, seed: int = 7) -> dict[str, Any]:
    """The product's own rule engine (evaluate + step) fed RANDOM noise at the demo's rates
    (each request independently: 1% error, 2.5% slow at 2500 ms), `runs` simulated
    noisy runs of --noisy-seconds each. The demo's noise is a counter (every 100th / 40th
    request), which can never put 2 errors in 100 requests: this says what real,
    random noise of the same rates would do with the same windows."""
    rng = random.Random(seed)
    block = monitoring_block("http://127.0.0.1:1", args)
    rules = [Rule.model_validate(r) for r in block["rules"]]
    specs = {"api_error_rate": MetricSpec(name="api_error_rate", source="probe", probe="api", stat="error_ratio"),
             "response_time_p95": MetricSpec(name="response_time_p95", source="probe", probe="api", stat="latency_p95_ms")}
    keep = max(r.window for r in rules)
    evaluations = int(args.noisy_seconds // args.interval)
    fired_runs = {r.name: 0 for r in rules}
    any_fired = 0
    breaches = {r.name: 0 for r in rules}
    started = time.perf_counter()
    for _ in range(runs):
        windows = Windows()
        states = {r.name: RuleState() for r in rules}
        now = datetime(2026, 1, 1, tzinfo=timezone.utc)
        fired_here = set()
        # Warm-up: fill the widest window first, as the benchmark does; then count.
        warm = int(keep.total_seconds() // args.interval) + 1
        for n in range(warm + evaluations):
            samples = []
            for _ in range(5):
                if rng.random() < 0.01:
                    samples.append(ProbeSample(ok=False, latency_ms=3.0))
                else:
                    samples.append(ProbeSample(ok=True, latency_ms=2500.0 if rng.random() < 0.025 else 3.0))
            windows.add(now, Collection(probes={"api": samples}), keep)
            for rule in rules:
                result = evaluate(rule, specs[rule.name], windows, now)
                if step(rule, states[rule.name], result, now, error_limit=4) == Transition.FIRED and n >= warm:
                    fired_here.add(rule.name)
                if n >= warm and result.outcome.value == "breach":
                    breaches[rule.name] += 1
            now += timedelta(seconds=args.interval)
        for name in fired_here:
            fired_runs[name] += 1
        any_fired += bool(fired_here)
    return {
        "what": "the product's rule engine on simulated RANDOM noise at the demo's rates (1% errors, 2.5% of requests "
                "2500 ms), same rules, windows and interval; not a measurement of the running system",
        "simulated_runs": runs,
        "seconds_per_run": args.noisy_seconds,
        "runs_with_a_false_fire": any_fired,
        "false_fire_probability_per_run": round(any_fired / runs, 4) if runs else None,
        "runs_fired_by_rule": fired_runs,
        "breach_share_by_rule": {k: round(v / (runs * evaluations), 5) if runs else None for k, v in breaches.items()},
        "compute_seconds": round(time.perf_counter() - started, 1),
    }


# -- main ----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    block_preview = monitoring_block("http://front-door", args)
    widest = float(max(args.error_window, args.latency_window))
    scenarios: dict[str, Any] = {}
    setup_error = None
    with tempfile.TemporaryDirectory(prefix="rollback-bench-") as tmp:
        base = Path(tmp)
        try:
            async with temporal_server() as env:
                with backend_stack(base / "stack", "blue_green", ["blue", "green"]) as stack:
                    config_path = base / "rollback.yaml"
                    stack.write_config(config_path, policy={"require_approval": False},
                                       extra={"environments": {"demo": {"monitoring": monitoring_block(stack.front_url, args)}}})
                    async with in_process_worker(env.client, config_path) as task_queue:
                        orch = RollbackOrchestrator(client=env.client, environment="demo",
                                                    settings=TemporalSettings("unused", env.client.namespace, task_queue))
                        await orch.start_monitor("demo")
                        watch = Watch(orch)
                        started_at = time.time()
                        healthy_since = {"api_error_rate": started_at, "response_time_p95": started_at}
                        try:
                            for scenario in ("errors", "latency"):
                                if scenario not in args.scenarios:
                                    continue
                                runs = []
                                for index in range(args.runs):
                                    runs.append(await hard_fault_run(env.client, stack, orch, watch, scenario, index,
                                                                     widest, healthy_since))
                                scenarios[scenario] = summarize_hard(scenario, runs)
                            if "noisy" in args.scenarios:
                                scenarios["noisy"] = await noisy_run(env.client, stack, watch, args.noisy_seconds, widest,
                                                                     healthy_since)
                        finally:
                            with contextlib.suppress(Exception):
                                await env.client.get_workflow_handle("monitor-demo").terminate(reason="bench done")
        except Exception as err:  # noqa: BLE001 - report what ran, and why the rest did not
            log(f"failed: {type(err).__name__}: {err}")
            setup_error = f"{type(err).__name__}: {err}"
    if "noisy" in scenarios and args.simulate:
        log(f"noise model: {args.simulate} simulated runs of {args.noisy_seconds}s")
        scenarios["noisy"]["random_noise_model"] = noise_model(args, args.simulate)
    misses = [f"{name}: {m}" for name, s in scenarios.items() for m in s["misses"]]
    misses += [f"{name}: did not run" for name in args.scenarios if name not in scenarios]
    if setup_error:
        misses.append(setup_error)
    return {
        "benchmark": "detection",
        "target": "restored within 30 s (100% errors) and 90 s (p95 > 2 s); 0 false rollbacks over 10 noisy minutes",
        "result": "target met" if not misses else "target missed",
        "misses": misses,
        "noisy_seconds": args.noisy_seconds,
        "full_noisy_run": args.noisy_seconds >= 600,
        "monitor": {
            **{k: v for k, v in block_preview.items() if k != "probes"},
            "probe": {k: v for k, v in block_preview["probes"][0].items() if k != "url"} | {"url": "<front door>/api/items"},
            "for_evaluations": 2,
            "compressed_from": {"interval_seconds": 15, "api_error_rate.window_minutes": 5,
                                "response_time_p95.window_minutes": 10, "response_time_p95.action": "rollback_with_approval",
                                "cooldown_minutes": 15, "probe.timeout_seconds": 2},
            "steady_state": "before each run: every rule OK and not firing, and each rule's whole window filled "
                            "with samples taken after that rule last saw anything but OK (after a restore: from the "
                            "first v1 answer on)",
        },
        "scenarios": scenarios,
        "machine": machine(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the errors and latency scenarios (1-20)")
    parser.add_argument("--noisy-seconds", type=int, default=600, help="length of the noisy run (600 = 10 minutes)")
    parser.add_argument("--scenarios", default="errors,latency,noisy", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--interval", type=float, default=5.0, help="monitor interval_seconds (default rules: 15)")
    parser.add_argument("--error-window", type=float, default=180.0, help="api_error_rate window_seconds (default rule: 300)")
    parser.add_argument("--latency-window", type=float, default=600.0, help="response_time_p95 window_seconds (default rule: 600)")
    parser.add_argument("--probe-timeout", type=float, default=3.0, help="probe timeout_seconds (default 2; see the docstring)")
    parser.add_argument("--simulate", type=int, default=1000, help="simulated random-noise runs for the noise model (0 skips)")
    parser.add_argument("--noise-model-only", action="store_true",
                        help="print only the random-noise model for the given interval and windows (seconds; starts nothing)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in FAULTS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(FAULTS)}")
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be 1..20")
    if not 10 <= args.noisy_seconds <= 7200:
        parser.error("--noisy-seconds must be 10..7200")
    return args


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.noise_model_only:
        print(json.dumps({"interval_seconds": arguments.interval, "error_window_seconds": arguments.error_window,
                          "latency_window_seconds": arguments.latency_window,
                          **noise_model(arguments, arguments.simulate or 1000)}, indent=2))
        sys.exit(0)
    run_benchmark(main, arguments, lambda a: "detection" if a.noisy_seconds >= 600 or "noisy" not in a.scenarios
                  else f"detection.noisy_{a.noisy_seconds}s")

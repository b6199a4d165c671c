"""`make demo`: a broken release rolled back by a durable workflow, end to end.

dev up -> deploy broken v2 -> manual rollback that needs approval -> approve with the
`temporal` CLI -> watch -> timeline -> the gate refusing v2 again -> the monitor's automatic rollback of a broken v3 ->
a frontend rollback of broken JavaScript (through Varnish) -> a full rollback of all three
tiers: a broken backend v4, a frontend v3 calling an API no backend has, and a destructive
migration (with the integrity report) -> dev down. Exits 0 only if every rollback succeeded,
v1 serves on both tiers, and no row was lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def sh(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    print("$ " + " ".join(args if len(" ".join(args)) < 200 else args[:6] + ("...",)), flush=True)
    done = subprocess.run(args, cwd=ROOT, text=True, capture_output=capture, timeout=600)
    if check and done.returncode != 0:
        raise SystemExit(f"demo: command failed ({done.returncode}): {' '.join(args)}\n{done.stderr or ''}")
    return done


def fresh_start(rollback: str) -> None:
    """Every run starts from nothing: what an earlier run left (a failed one leaves a broken release
    recorded as known-good, the database at 0003) would make this one fail for reasons of its own."""
    import asyncio

    import asyncpg

    from rollback.dev.stack import DevStack
    from rollback.targets.database.pg import ident, local_dsn

    subprocess.run([rollback, "dev", "down"], cwd=ROOT, capture_output=True, timeout=120)  # nothing running is fine
    stack = DevStack()
    shutil.rmtree(stack.base_dir, ignore_errors=True)

    async def drop() -> None:
        conn = await asyncpg.connect(local_dsn(), timeout=10)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {ident(stack.database_name)} WITH (FORCE)")
        finally:
            await conn.close()

    asyncio.run(drop())


def frontend_version() -> dict:
    """What users get from the frontend, through Varnish."""
    port = os.environ.get("FRONTEND_PORT", "8088")
    return httpx.get(f"http://127.0.0.1:{port}/version.json", timeout=5).json()


def start_and_watch(rollback: str, target: str, reason: str) -> tuple[subprocess.CompletedProcess, dict]:
    """An SRE's rollback of `target`, followed to its end: the watch and the final status."""
    started = sh(rollback, "start", "--environment", "demo", "--target", target, "--by", "demo-sre", "--reason", reason, capture=True)
    workflow_id = started.stdout.strip()
    print(f"started {workflow_id}")
    return sh(rollback, "watch", workflow_id, check=False), status(rollback, workflow_id)


def frontend_rollback(rollback: str) -> bool:
    """A frontend release with broken JavaScript, rolled back: the pointer switch, Varnish purged, checked."""
    good = frontend_version()
    print(f"frontend through Varnish: {good}")
    sh(rollback, "dev", "deploy", "--target", "frontend", "--version", "v2", "--fault", "broken-js")
    print(f"after the deploy: {frontend_version()}")
    watched, final = start_and_watch(rollback, "frontend", "v2's JavaScript throws in every browser")
    for step in final["steps"]:
        if step["target"] == "frontend":
            print(f"  {step['name']}: {step['detail']}")
    print(f"  compatibility: {(final['plan'] or {}).get('compatibility')}")
    now = frontend_version()
    print(f"frontend through Varnish: {now}")
    return watched.returncode == 0 and final["state"] == "succeeded" and now == good


def front(path: str) -> tuple[int, str]:
    port = os.environ.get("ROLLBACK_DEV_NGINX_PORT", "8080")
    response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    return response.status_code, response.text.strip()


def status(rollback: str, workflow_id: str) -> dict:
    done = sh(rollback, "status", workflow_id, "--json", capture=True)
    return json.loads(done.stdout)


def monitor(rollback: str) -> dict:
    return json.loads(subprocess.run([rollback, "monitor", "status", "-e", "demo", "--json"], cwd=ROOT, text=True,
                                     capture_output=True, timeout=60, check=True).stdout)


def automatic(rollback: str) -> bool:
    """Deploy a broken release, let the monitor notice and roll back; print detection and recovery times."""
    # Start from a clean slate: every rule judged OK on a window without the v2 errors.
    deadline = time.monotonic() + 90
    while not all(r["state"]["last"] and r["state"]["last"]["outcome"] == "ok" and not r["state"]["firing"]
                  and r["state"]["oks"] >= 2 for r in monitor(rollback)["rules"]):
        if time.monotonic() > deadline:
            print("the monitor never saw the restored service as healthy")
            return False
        time.sleep(1)
    print("the monitor sees a healthy service; every rule is OK")
    known = {i["key"] for i in monitor(rollback)["incidents"]}
    sh(rollback, "dev", "deploy", "--target", "backend", "--version", "v3", "--fault", "errors")
    deployed = time.monotonic()
    deadline = deployed + 120
    incident = None
    while incident is None:
        if time.monotonic() > deadline:
            print("the monitor did not start a rollback within 120 s")
            return False
        time.sleep(0.5)
        incident = next((i for i in monitor(rollback)["incidents"] if i["key"] not in known and i["outcome"] == "started"), None)
    detected = time.monotonic()
    print(f"monitor: {incident['reason']}")
    print(f"rollback started automatically: {incident['rollback_id']}")
    watched = sh(rollback, "watch", incident["rollback_id"], check=False)
    while json.loads(front("/version")[1]).get("version") != "v1" and time.monotonic() < deadline:
        time.sleep(0.2)
    restored = time.monotonic()
    print(f"\n  time to detect  (deploy -> rollback started) {detected - deployed:6.1f} s")
    print(f"  time to recover (deploy -> v1 serves again)   {restored - deployed:6.1f} s")
    return watched.returncode == 0 and json.loads(front("/version")[1]).get("version") == "v1"


async def shop_figures() -> dict:
    """What the demo database holds: the data a destructive migration destroys, and the writer's rows."""
    import asyncpg

    from rollback.targets.database.pg import local_dsn

    conn = await asyncpg.connect(local_dsn(os.environ.get("ROLLBACK_DEV_DATABASE", "rollback_demo")), timeout=10)
    try:
        columns = {r[0] for r in await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")}
        emails = await conn.fetchval("SELECT count(*) FROM customers WHERE email IS NOT NULL") if "email" in columns else 0
        return {"orders": await conn.fetchval("SELECT count(*) FROM orders"), "max_order": await conn.fetchval("SELECT max(id) FROM orders"),
                "customers_with_email": emails, "cents": await conn.fetchval("SELECT count(*) FROM orders WHERE amount <> round(amount)"),
                "revision": await conn.fetchval("SELECT max(revision) FROM rollback_meta.migrations")}
    finally:
        await conn.close()


def figures() -> dict:
    import asyncio

    return asyncio.run(shop_figures())


def full_rollback(rollback: str) -> bool:
    """A broken backend and a destructive migration together, rolled back as one operation."""
    before = figures()
    print(f"database at {before['revision']}: {before['orders']} orders ({before['cents']} with cents), "
          f"{before['customers_with_email']} customers with an e-mail address")
    sh(rollback, "dev", "deploy", "--target", "backend", "--version", "v4", "--fault", "errors")
    sh(rollback, "dev", "deploy", "--target", "frontend", "--version", "v3", "--fault", "missing-api")
    sh(rollback, "dev", "deploy", "--target", "database", "--version", "0003")
    migrated = figures()
    print(f"after 0003: e-mail column gone ({migrated['customers_with_email']} e-mails), "
          f"{migrated['cents']} orders with cents left; the writer keeps inserting orders")
    deadline = time.monotonic() + 30
    while figures()["max_order"] < migrated["max_order"] + 50 and time.monotonic() < deadline:
        time.sleep(0.5)
    watched, final = start_and_watch(rollback, "full", "v4 fails and 0003 destroyed e-mails and prices")
    after = figures()
    say("Targets in reverse deployment order: frontend, backend, database")
    for target in (final["plan"] or {}).get("targets", []):
        print(f"  {target['target']}: {target['strategy']} {target['from_version']} -> {target['to_version']}")
    print(f"  compatibility: {((final['plan'] or {}).get('compatibility') or {}).get('compatible')}, "
          f"frontend {frontend_version()['version']} with backend {json.loads(front('/version')[1]).get('version')}")
    say("Database integrity report")
    for step in final["steps"]:
        if step["target"] == "database":
            print(f"  {step['name']}: {step['detail']}")
    print(f"  integrity: {final['reports'].get('database_integrity', {}).get('summary')}")
    written_after = after["orders"] - before["orders"]
    print(f"  orders: {before['orders']} before the migration, {after['orders']} now "
          f"({written_after} written since, none lost); e-mails: {after['customers_with_email']} "
          f"(before: {before['customers_with_email']}); orders with cents: {after['cents']} (before: {before['cents']})")
    return (watched.returncode == 0 and final["state"] == "succeeded" and after["revision"] == before["revision"]
            and after["customers_with_email"] == before["customers_with_email"] and after["cents"] >= before["cents"]
            and after["max_order"] > migrated["max_order"] and json.loads(front("/version")[1]).get("version") == "v1"
            and frontend_version()["version"] == "v1")


def main() -> int:
    rollback = str(BIN / "rollback")
    temporal = str(BIN / "temporal")
    address = f"127.0.0.1:{os.environ.get('ROLLBACK_DEV_TEMPORAL_PORT', '7233')}"
    os.environ["TEMPORAL_ADDRESS"] = address
    ok = False
    try:
        say("Starting the local stack: Temporal dev server, nginx, blue and green backends, the frontend behind Varnish, a worker")
        fresh_start(rollback)
        sh(rollback, "dev", "up")
        print("Temporal UI: http://127.0.0.1:%s" % os.environ.get("ROLLBACK_DEV_UI_PORT", "8233"))
        print("front door /version:", front("/version"))

        say("The monitor (started by dev up) is paused for the manual part, so it does not act first")
        sh(rollback, "monitor", "pause", "-e", "demo", "--by", "demo", "--reason", "manual rollback demo")

        say("A pipeline deploys a broken v2 (every API call fails)")
        sh(rollback, "dev", "deploy", "--target", "backend", "--version", "v2", "--fault", "errors")
        print("front door /version:", front("/version"), " /health:", front("/health")[0])

        say("An SRE starts a manual rollback that needs approval")
        started = sh(rollback, "start", "--environment", "demo", "--target", "backend", "--require-approval",
                     "--by", "demo-sre", "--reason", "500s on every request after v2", capture=True)
        workflow_id = started.stdout.strip()
        print(f"started {workflow_id}")

        deadline = time.monotonic() + 60
        while status(rollback, workflow_id)["approval"]["decision"] != "pending":
            if time.monotonic() > deadline:
                raise SystemExit("demo: the rollback never asked for approval")
            time.sleep(0.5)
        plan = status(rollback, workflow_id)["plan"]["targets"][0]
        print(f"plan: backend {plan['strategy']} {plan['from_version']} -> {plan['to_version']}, steps: {plan['steps']}")

        say("It waits for approval. A person approves it with the temporal CLI:")
        approval = json.dumps({"by": "demo-approver", "comment": "approved during the demo"})
        print(f"temporal workflow signal --address {address} --workflow-id {workflow_id} --name approve --input '{approval}'")
        sh(temporal, "workflow", "signal", "--address", address, "--workflow-id", workflow_id, "--name", "approve",
           "--input", approval, capture=True)

        say("Watching it, phase by phase")
        watched = sh(rollback, "watch", workflow_id, check=False)

        final = status(rollback, workflow_id)
        say("Timeline")
        marks = sorted(final["phase_started"].items(), key=lambda kv: kv[1])
        end = final["finished_at"]
        from datetime import datetime
        times = [datetime.fromisoformat(t) for _, t in marks] + [datetime.fromisoformat(end)]
        for (phase, _), start, stop in zip(marks, times, times[1:], strict=False):
            print(f"  {phase:<13} {(stop - start).total_seconds():7.2f} s")
        print(f"  {'total':<13} {(times[-1] - times[0]).total_seconds():7.2f} s   -> {final['state']}")

        version = front("/version")
        print("front door /version:", version)
        manual_ok = watched.returncode == 0 and final["state"] == "succeeded" and json.loads(version[1]).get("version") == "v1"

        say("The deployment gate: the next automatic deploy of v2 is refused, naming the rollback")
        from rollback.dev.stack import DevStack

        os.environ["ROLLBACK_CONFIG"] = str(DevStack().config_path)  # what a pipeline's runner would point at
        gate = sh(rollback, "gate", "-e", "demo", "-t", "backend", "--version", "v2", check=False, capture=True)
        print(gate.stdout.strip(), f"(exit {gate.returncode})")
        redeploy = sh(rollback, "dev", "deploy", "--target", "backend", "--version", "v2", check=False, capture=True)
        print(redeploy.stderr.strip(), f"(exit {redeploy.returncode})")
        manual_ok = (manual_ok and gate.returncode == 1 and "was rolled back by" in gate.stdout and redeploy.returncode == 1
                     and json.loads(front("/version")[1]).get("version") == "v1")

        say("The automatic path: the monitor resumes, a pipeline deploys a broken v3")
        sh(rollback, "monitor", "resume", "-e", "demo", "--by", "demo")
        auto_ok = automatic(rollback)

        say("A frontend rollback: a pipeline publishes frontend v2, whose JavaScript throws")
        sh(rollback, "monitor", "pause", "-e", "demo", "--by", "demo", "--reason", "frontend and full rollback demo")
        frontend_ok = frontend_rollback(rollback)

        say("A full rollback of three tiers: broken backend v4, frontend v3 calling an API no backend has, "
            "and a destructive database migration (0003)")
        full_ok = full_rollback(rollback)
        ok = manual_ok and auto_ok and frontend_ok and full_ok
    finally:
        say("Stopping the local stack")
        sh(rollback, "dev", "down", check=False)
    print("\nDEMO " + ("PASSED: v1 serves again and the workflow succeeded" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

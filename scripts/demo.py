"""`make demo`: a broken release rolled back by a durable workflow, end to end.

dev up -> deploy broken v2 -> manual rollback that needs approval -> approve with the
`temporal` CLI -> watch -> timeline -> dev down. Exits 0 only if the front door serves
v1 again and the workflow succeeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def sh(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    print("$ " + " ".join(args if len(" ".join(args)) < 200 else args[:6] + ("...",)), flush=True)
    done = subprocess.run(args, cwd=ROOT, text=True, capture_output=capture, timeout=600)
    if check and done.returncode != 0:
        raise SystemExit(f"demo: command failed ({done.returncode}): {' '.join(args)}\n{done.stderr or ''}")
    return done


def front(path: str) -> tuple[int, str]:
    port = os.environ.get("ROLLBACK_DEV_NGINX_PORT", "8080")
    response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    return response.status_code, response.text.strip()


def status(rollback: str, workflow_id: str) -> dict:
    done = sh(rollback, "status", workflow_id, "--json", capture=True)
    return json.loads(done.stdout)


def main() -> int:
    rollback = str(BIN / "rollback")
    temporal = str(BIN / "temporal")
    address = f"127.0.0.1:{os.environ.get('ROLLBACK_DEV_TEMPORAL_PORT', '7233')}"
    os.environ["TEMPORAL_ADDRESS"] = address
    ok = False
    try:
        say("Starting the local stack: Temporal dev server, nginx, blue and green backends, a worker")
        sh(rollback, "dev", "up")
        print("Temporal UI: http://127.0.0.1:%s" % os.environ.get("ROLLBACK_DEV_UI_PORT", "8233"))
        print("front door /version:", front("/version"))

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
        for (phase, _), start, stop in zip(marks, times, times[1:]):
            print(f"  {phase:<13} {(stop - start).total_seconds():7.2f} s")
        print(f"  {'total':<13} {(times[-1] - times[0]).total_seconds():7.2f} s   -> {final['state']}")

        version = front("/version")
        print("front door /version:", version)
        ok = watched.returncode == 0 and final["state"] == "succeeded" and json.loads(version[1]).get("version") == "v1"
    finally:
        say("Stopping the local stack")
        sh(rollback, "dev", "down", check=False)
    print("\nDEMO " + ("PASSED: v1 serves again and the workflow succeeded" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Idempotency keys of a workflow's effects (records, notifications, database steps).

Workflow ids are part of the contract (`rollback-<environment>-<UTC second>`) and are reused
once a run has ended, so a key made of the id alone would let a second run started in the same
second find the first run's effects and skip its own. Keys add the run's first execution id:
new for every start, the same across a reset or a retry of that run.
"""

from __future__ import annotations

from temporalio import workflow


def effect_key(*parts: str) -> str:
    info = workflow.info()
    # Runs that started before keys were per run keep theirs, so a replay finds its own effects.
    run = f"{info.workflow_id}:{info.first_execution_run_id}" if workflow.patched("effect-keys-per-run") else info.workflow_id
    return ":".join([run, *parts])

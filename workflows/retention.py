"""BackupRetentionWorkflow: run daily by the Temporal Schedule `backup-retention`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from rollback.payloads import APPLY_RETENTION, RetentionInput, RetentionReport

from workflows.saga import retry_policy


@workflow.defn(name="BackupRetentionWorkflow")
class BackupRetentionWorkflow:
    @workflow.run
    async def run(self, raw: Any = None) -> RetentionReport:
        inp = RetentionInput.model_validate(raw or {})
        return await workflow.execute_activity(
            APPLY_RETENTION, inp, result_type=RetentionReport, start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=5), retry_policy=retry_policy(5))

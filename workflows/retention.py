"""BackupRetentionWorkflow: run daily by the Temporal Schedule `backup-retention`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from rollback.payloads import RetentionInput



@workflow.defn(name="BackupRetentionWorkflow")
class BackupRetentionWorkflow:
    @workflow.run
    async def run(self, raw: Any = None) -> dict[str, Any]:
        inp = RetentionInput.model_validate(raw or {})
        return await workflow.execute_activity(
            "retention.apply", inp, result_type=dict, start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=5), maximum_attempts=5))

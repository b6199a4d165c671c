"""Each target's steps in a rollback, behind one protocol.

A flow declares the steps a plan of its target has (`steps`: the plan display and the status
records come from these), runs them in the execution phase (registering the undo of each before
it runs) and checks the result end to end in the validation phase. rollback.targets.registry
names the module of each target's flow; each module defines FLOW.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, runtime_checkable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from rollback.models import Step, TargetPlan

from workflows.saga import Saga


@dataclass(frozen=True)
class TargetRun:
    """What a flow works with: one target's part of the plan, in one rollback."""

    saga: Saga
    environment: str
    plan: TargetPlan
    attempts: int
    health_deadline: timedelta | None = None  # the longest a health validation may take, all retries included


@runtime_checkable
class TargetFlow(Protocol):
    def steps(self, plan: TargetPlan) -> list[Step]:
        """The steps this plan will run, in order (the undo steps are declared when registered)."""
        ...

    async def execute(self, run: TargetRun) -> None:
        ...

    async def validate(self, run: TargetRun) -> None:
        ...

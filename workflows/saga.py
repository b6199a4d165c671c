"""What every workflow step shares: activity options by step kind, THE retry policy, the step
runner that keeps a rollback's status records, and the undo stack of its saga.

Deterministic, like every workflow module: time from workflow.now(), no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from enum import Enum
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from rollback.models import RollbackStatus, Step, StepRecord

T = TypeVar("T")

# Errors that retrying cannot fix; activities also mark them non-retryable themselves.
NON_RETRYABLE = ["InvalidRequest", "AssessmentRefused", "EnvironmentLocked", "UnhealthyAfterDeploy", "IntegrityViolation",
                 "BackupCorrupt", "RevertFailed", "MigrationFailed", "CredentialsMissing"]
HEARTBEAT = timedelta(seconds=10)


class StepKind(str, Enum):
    QUICK = "quick"  # bookkeeping: plans, the lock, version records, notifications
    LONG = "long"  # nginx switches, instance batches, health samples: minutes, heartbeating
    DATA = "data"  # database backups, restores, recoveries: hours on big tables, heartbeating


# How long one attempt may take. A dead worker is still noticed within HEARTBEAT for the long kinds.
START_TO_CLOSE: dict[StepKind, timedelta] = {
    StepKind.QUICK: timedelta(minutes=2),
    StepKind.LONG: timedelta(minutes=10),
    StepKind.DATA: timedelta(hours=4),
}


def retry_policy(attempts: int) -> RetryPolicy:
    """The one retry policy: exponential from 1 s to 20 s, `attempts` in all, never on NON_RETRYABLE."""
    return RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                       maximum_interval=timedelta(seconds=20), maximum_attempts=attempts,
                       non_retryable_error_types=NON_RETRYABLE)


def call(activity: str, arg: BaseModel, result_type: type[T] | None, *, attempts: int, kind: StepKind = StepKind.QUICK,
         deadline: timedelta | None = None) -> Awaitable[T]:
    """Run an activity by its contract's name constant with the options of its kind."""
    return workflow.execute_activity(
        activity, arg, result_type=result_type, schedule_to_close_timeout=deadline,
        start_to_close_timeout=START_TO_CLOSE[kind], heartbeat_timeout=None if kind == StepKind.QUICK else HEARTBEAT,
        retry_policy=retry_policy(attempts),
        # On cancellation, wait until a running step has really stopped before
        # compensating, or the undo could race the step it undoes.
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    )


def describe_failure(err: BaseException) -> str:
    """The innermost message of a Temporal failure chain: what actually went wrong."""
    while isinstance(err, FailureError) and err.cause is not None:
        err = err.cause
    return str(err) or type(err).__name__


def failure_type(err: BaseException) -> str | None:
    """The type of the innermost ApplicationError of a failure chain (what the activity raised)."""
    found = None
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, ApplicationError):
            found = current.type
        current = current.cause if isinstance(current, FailureError) else None
    return found


def _cancel_requested() -> bool:
    """True once the workflow was asked to cancel, even if the step it interrupted finished.

    A step awaited with WAIT_CANCELLATION_COMPLETED may complete instead of
    stopping; asyncio then hands back its result and the cancellation would be lost.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def step_detail(result: object) -> str:
    """What a step's result says about it (every contract result renders its own)."""
    render = getattr(result, "step_detail", None)
    return render()[:2000] if callable(render) else ""  # a record lives in the status, the memo and every query


class Saga:
    """The step records of a rollback's status, and the undo stack of what its steps did."""

    def __init__(self, status: RollbackStatus) -> None:
        self.status = status
        self._undo: list[tuple[Step, Callable[[], Awaitable[Any]]]] = []
        self.halted: str | None = None  # why compensation stopped short (see compensate)

    def declare(self, steps: Iterable[Step]) -> None:
        """Show the planned steps as pending, before any of them runs."""
        self.status.steps += [StepRecord(id=s.id, name=s.name, target=s.target) for s in steps]

    async def run(self, step: Step, action: Callable[[], Awaitable[T]], *, planned: bool = True) -> T:
        """Run one step, keeping its record current; a planned step fills the record it declared."""
        record = next((r for r in self.status.steps if r.id == step.id and r.state == "pending"), None) if planned else None
        if record is None:
            record = StepRecord(id=step.id, name=step.name, target=step.target)
            self.status.steps.append(record)
        record.state, record.started, record.attempts = "running", workflow.now(), record.attempts + 1
        try:
            result = await action()
        except (ActivityError, ApplicationError, asyncio.CancelledError) as err:
            record.state, record.finished = "failed", workflow.now()
            record.detail = "cancelled" if isinstance(err, asyncio.CancelledError) else describe_failure(err)
            raise
        record.state, record.finished = ("succeeded" if planned else "compensated"), workflow.now()
        record.attempts = getattr(result, "attempt", record.attempts)
        record.detail = step_detail(result)
        if planned and _cancel_requested():
            raise asyncio.CancelledError("cancel requested while this step ran to completion")
        return result

    def undo_with(self, step: Step, action: Callable[[], Awaitable[Any]]) -> None:
        """Register how to undo what a step is about to do. Registered before the step runs: a step
        that fails half-way (or commits and then loses its answer) must be undone too."""
        self._undo.append((step, action))

    @property
    def has_undo(self) -> bool:
        return bool(self._undo)

    def forget_undo(self) -> None:
        """Every step is done: nothing is undone if something later (a notification) fails."""
        self._undo.clear()

    async def compensate(self, page: Callable[[str], Awaitable[None]]) -> bool:
        """Undo completed steps in reverse order. True if every undo step succeeded.

        A database revert that destroyed something (a dropped column's values restored since, a
        table re-created and refilled) is never undone by re-applying its migration: that step
        refuses (RevertIrreversible) and compensation stops there, leaving every earlier step as
        it is too, since an older backend or frontend put back against the reverted schema would
        be worse than the tiers as the rollback left them. The status says so, and `page` is called.
        """
        ok = True
        while self._undo:
            step, undo = self._undo.pop()
            try:
                await self.run(step, undo, planned=False)
            except (ActivityError, ApplicationError) as err:
                if failure_type(err) == "RevertIrreversible":
                    self.status.steps[-1].state = "skipped"  # the record run() just appended for this undo
                    self.halted = (f"not compensated: {describe_failure(err)}; the earlier steps are left as they are "
                                   f"({len(self._undo)} undo step(s) not run). Page the on-call.")
                    self._undo.clear()
                    await page(self.halted)
                    return False
                ok = False  # keep undoing the rest; the step record says what failed
        return ok

"""The backend's steps: a blue-green switch or a rolling reversal behind nginx, then its checks."""

from __future__ import annotations

from functools import partial

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from rollback.models import HealthReport, Step, TargetPlan
    from rollback.targets.backend import contract as backend
    from rollback.targets.backend.contract import BatchInput, BatchResult, BlueGreenParams, RollingParams, SwitchInput, SwitchResult, ValidateInput

from workflows.flows import TargetRun
from workflows.saga import StepKind, call

TARGET = "backend"


def verify_standby(colour: str) -> Step:
    return Step(id="backend.verify_standby", name=f"verify standby {colour}", target=TARGET)


def switch_traffic(colour: str) -> Step:
    return Step(id="backend.switch_traffic", name=f"switch traffic to {colour}", target=TARGET)


def switch_back(colour: str) -> Step:
    return Step(id="backend.switch_back", name=f"switch traffic back to {colour}", target=TARGET)


def roll_batch(number: int, batches: list[list[str]]) -> Step:
    return Step(id=f"backend.batch.{number}", name=f"roll batch {number}/{len(batches)}: {', '.join(batches[number - 1])}",
                target=TARGET)


def revert_batch(number: int, batches: list[list[str]]) -> Step:
    return Step(id=f"backend.revert_batch.{number}",
                name=f"revert batch {number}/{len(batches)}: {', '.join(batches[number - 1])}", target=TARGET)


VALIDATE = Step(id="backend.validate", name="validate backend", target=TARGET)
SMOKE = Step(id="backend.smoke", name="smoke and performance check: backend", target=TARGET)


async def healthy(run: TargetRun, activity: str, arg: SwitchInput | ValidateInput) -> HealthReport:
    """A health check that must pass: an unhealthy report fails the step (and the rollback)."""
    report = await call(activity, arg, HealthReport, attempts=run.attempts, kind=StepKind.LONG, deadline=run.health_deadline)
    if not report.healthy:
        raise ApplicationError(f"{report.url}: {report.successes}/{report.samples} healthy samples "
                               f"(need {report.required_ratio:.0%}): {report.detail}", type="Unhealthy", non_retryable=True)
    return report


class BackendFlow:
    def steps(self, plan: TargetPlan) -> list[Step]:
        params = plan.params
        if isinstance(params, BlueGreenParams):
            moves = [verify_standby(params.colour), switch_traffic(params.colour)]
        else:
            assert isinstance(params, RollingParams)
            moves = [roll_batch(n, params.batches) for n in range(1, len(params.batches) + 1)]
        return [*moves, VALIDATE, SMOKE]

    async def execute(self, run: TargetRun) -> None:
        params = run.plan.params
        if isinstance(params, BlueGreenParams):
            await self._switch(run, params)
        else:
            assert isinstance(params, RollingParams)
            await self._roll(run, params)
        await run.saga.run(VALIDATE, partial(healthy, run, backend.VALIDATE,
                                             ValidateInput(environment=run.environment, expect_version=run.plan.to_version)))

    async def _switch(self, run: TargetRun, params: BlueGreenParams) -> None:
        to, back = run.plan.to_version, run.plan.from_version or run.plan.to_version
        switch = SwitchInput(environment=run.environment, colour=params.colour, expect_version=to)
        await run.saga.run(verify_standby(params.colour), partial(healthy, run, backend.CHECK_STANDBY, switch))
        if params.previous_colour:
            # Registered before the switch: a switch that reloaded nginx but then
            # failed to settle must be undone too (switching back is declarative).
            undo = SwitchInput(environment=run.environment, colour=params.previous_colour, expect_version=back)
            run.saga.undo_with(switch_back(params.previous_colour), partial(
                call, backend.SWITCH_TRAFFIC, undo, SwitchResult, attempts=run.attempts, kind=StepKind.LONG))
        await run.saga.run(switch_traffic(params.colour), partial(
            call, backend.SWITCH_TRAFFIC, switch, SwitchResult, attempts=run.attempts, kind=StepKind.LONG))

    async def _roll(self, run: TargetRun, params: RollingParams) -> None:
        to, back = run.plan.to_version, run.plan.from_version or run.plan.to_version
        for number, batch in enumerate(params.batches, 1):
            # Register the undo first: a batch that fails half-way must be reverted too.
            undo = BatchInput(environment=run.environment, instances=batch, version=back, require_healthy=False)
            run.saga.undo_with(revert_batch(number, params.batches), partial(
                call, backend.ROLL_BATCH, undo, BatchResult, attempts=run.attempts, kind=StepKind.LONG))
            forward = BatchInput(environment=run.environment, instances=batch, version=to)
            await run.saga.run(roll_batch(number, params.batches), partial(
                call, backend.ROLL_BATCH, forward, BatchResult, attempts=run.attempts, kind=StepKind.LONG))

    async def validate(self, run: TargetRun) -> None:
        # Execution already checked health after each step; this is the end-to-end
        # view: every smoke path through the front door, with a p95 latency bound.
        await run.saga.run(SMOKE, partial(healthy, run, backend.SMOKE,
                                          ValidateInput(environment=run.environment, expect_version=run.plan.to_version)))


FLOW = BackendFlow()

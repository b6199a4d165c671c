"""The frontend's steps: verify the release, switch the store's pointer, purge each CDN tier, wait for the
front door to serve the build; then check the release end to end through the front door.

The undo is registered before the switch: a switch that moved the pointer but whose purge or front-door
wait then failed must be switched back too (switching is declarative, so undoing an unmoved pointer
changes nothing). The undo is the same sequence towards the release that was live.
"""

from __future__ import annotations

from functools import partial

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from rollback.models import HealthReport, Step, TargetPlan
    from rollback.targets.frontend import contract as frontend
    from rollback.targets.frontend.cdn import PurgeResult
    from rollback.targets.frontend.contract import (
        FrontDoorInput, FrontDoorResult, PurgeInput, ReleaseInput, ReleaseSwitchParams, SwitchResult, VerifyResult,
    )

from workflows.flows import TargetRun
from workflows.keys import effect_key
from workflows.saga import StepKind, call

TARGET = "frontend"


def verify_release(version: str) -> Step:
    return Step(id="frontend.verify_release", name=f"verify release {version}", target=TARGET)


def switch_release(version: str) -> Step:
    return Step(id="frontend.switch_release", name=f"switch frontend to {version}", target=TARGET)


def purge(tier: int, provider: str) -> Step:
    return Step(id=f"frontend.purge.{tier}", name=f"purge {provider}", target=TARGET)


def await_front_door(build: str) -> Step:
    return Step(id="frontend.await_front_door", name=f"front door serves build {build}", target=TARGET)


def switch_back(version: str) -> Step:
    return Step(id="frontend.switch_back", name=f"switch frontend back to {version}", target=TARGET)


VALIDATE = Step(id="frontend.validate", name="validate frontend through the front door", target=TARGET)


class FrontendFlow:
    def steps(self, plan: TargetPlan) -> list[Step]:
        params = plan.params
        assert isinstance(params, ReleaseSwitchParams)
        return [verify_release(plan.to_version), switch_release(plan.to_version),
                *(purge(i, p) for i, p in enumerate(params.tiers)), await_front_door(params.build), VALIDATE]

    async def execute(self, run: TargetRun) -> None:
        params = run.plan.params
        assert isinstance(params, ReleaseSwitchParams)
        to = run.plan.to_version
        release = ReleaseInput(environment=run.environment, version=to)
        await run.saga.run(verify_release(to), partial(call, frontend.VERIFY_RELEASE, release, VerifyResult,
                                                       attempts=run.attempts, kind=StepKind.LONG))
        back = run.plan.from_version
        if back and params.previous_build:
            run.saga.undo_with(switch_back(back), partial(self._move, run, back, params.previous_build, params, undo=True))
        await self._move(run, to, params.build, params)

    async def _move(self, run: TargetRun, version: str, build: str, params: ReleaseSwitchParams, *, undo: bool = False) -> None:
        """Switch to `version`, purge every tier, wait for the front door; as tracked steps forward, as one undo back."""
        attempts = run.attempts
        release = ReleaseInput(environment=run.environment, version=version)
        key = effect_key("frontend", "back" if undo else "forward")

        async def step(record: Step, action: partial) -> object:
            # Forward, each is a step of its own in the status; the undo is already one compensation record.
            return await (action() if undo else run.saga.run(record, action))

        await step(switch_release(version), partial(call, frontend.SWITCH_RELEASE, release, SwitchResult, attempts=attempts,
                                                    kind=StepKind.LONG))
        for tier, provider in enumerate(params.tiers):
            purge_input = PurgeInput(environment=run.environment, tier=tier, paths=params.purge_paths, key=f"{key}:purge.{tier}")
            await step(purge(tier, provider), partial(call, frontend.PURGE_CDN, purge_input, PurgeResult,
                                                                 attempts=attempts, kind=StepKind.LONG))
        door = FrontDoorInput(environment=run.environment, version=version, build=build)
        await step(await_front_door(build), partial(call, frontend.AWAIT_FRONT_DOOR, door, FrontDoorResult, attempts=attempts,
                                                    kind=StepKind.LONG))

    async def validate(self, run: TargetRun) -> None:
        release = ReleaseInput(environment=run.environment, version=run.plan.to_version)
        report = await run.saga.run(VALIDATE, partial(call, frontend.VALIDATE, release, HealthReport, attempts=run.attempts,
                                                      kind=StepKind.LONG, deadline=run.health_deadline))
        if not report.healthy:
            raise ApplicationError(f"frontend through {report.url}: {report.detail}", type="Unhealthy", non_retryable=True)


FLOW = FrontendFlow()

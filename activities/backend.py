"""Backend rollback on nginx: blue-green switch and rolling reversal.

Every activity here is declarative ("make colour X live", "make these instances
run version V"), so running one twice leaves the same end state and performs the
external effect (an nginx reload, an instance restart) only when the state differs.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.health import HttpCheckInput, HttpHealth
from activities.heartbeat import heartbeating
from rollback.config import ConfigSource
from rollback.live import answered_version
from rollback.targets.backend.config import BackendTarget, Instance
from rollback.payloads import NOTHING_TO_ROLL_BACK
from rollback.models import HealthReport, RollbackRequest, RollbackTarget, TargetPlan
from rollback.versions import version_problem
from rollback.targets.backend.contract import (
    CHECK_STANDBY, ROLL_BATCH, SMOKE, SWITCH_TRAFFIC, VALIDATE, BatchInput, BatchResult, BlueGreenParams, RollingParams, SwitchInput,
    SwitchResult, ValidateInput,
)
from rollback.targets.backend.nginx import NginxRouter, RouterError, UpstreamServer
from rollback.state import TargetVersions

if TYPE_CHECKING:
    from activities.targets import Shared

COMMAND_TIMEOUT_SECONDS = 120
FRONT_DOOR_DEADLINE_SECONDS = 30


def _refuse(message: str, kind: str = "AssessmentRefused") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


def router_of(target: BackendTarget) -> NginxRouter:
    r = target.router
    return NginxRouter(
        upstream_file=r.upstream_file, upstream_name=r.upstream_name,
        reload_command=tuple(r.reload_command), test_command=tuple(r.test_command),
    )


def _checked_version(version: str) -> str:
    """The last line of defence before a deploy hook: a version that got past every door
    (an old workflow's input, a hand-edited record) is refused, never passed on."""
    problem = version_problem(version)
    if problem is not None:
        raise ApplicationError(f"version: {problem}", type="InvalidVersion", non_retryable=True)
    return version


def _attempt() -> int:
    return activity.info().attempt if activity.in_activity() else 1


class BackendRollback:
    def __init__(self, config: ConfigSource, health: HttpHealth) -> None:
        self.config = config
        self.health = health

    def target(self, environment: str) -> BackendTarget:
        backend = self.config.get().environment(environment).targets.of("backend", BackendTarget)
        if backend is None:
            raise _refuse(f"environment {environment!r} has no backend target configured", "InvalidRequest")
        return backend

    # -- assessment (called from the coordination planner) -------------------

    async def assess(self, request: RollbackRequest, versions: TargetVersions, to_version: str | None) -> TargetPlan:
        environment = request.environment
        target = self.target(environment)
        from_version = versions.current
        to = to_version or versions.known_good
        if not to:
            raise _refuse(f"backend of {environment!r}: no known-good version recorded; pass to_version")
        if to == from_version:
            raise _refuse(f"backend of {environment!r} already runs {to}: nothing to roll back", NOTHING_TO_ROLL_BACK)
        smoke = target.smoke
        checks = [f"{target.health.path} x{target.health.samples} >= {target.health.success_ratio:.0%} under {target.health.max_latency_ms} ms",
                  f"front door {target.router.front_url} answers {to}",
                  f"smoke: {', '.join(smoke.paths or [target.health.path])} x{smoke.samples} >= {smoke.success_ratio:.0%}, p95 <= {smoke.max_p95_ms} ms"]
        if target.strategy == "blue_green":
            return await self._assess_blue_green(environment, target, from_version, to, checks)
        front = await self._check(target, target.router.front_url, None)
        return await self._assess_rolling(environment, target, from_version, to, {"front_door": front.model_dump(mode="json")}, checks)

    async def _assess_blue_green(self, environment: str, target: BackendTarget, from_version: str | None, to: str,
                                 checks: list[str]) -> TargetPlan:
        live = self._live_colour(target)
        if live is None:
            raise _refuse(f"backend of {environment!r}: no colour is live in {target.router.upstream_file}; "
                          "fix the router before rolling back (nothing to return to on failure)")
        colours = [c for c in target.colours if c != live]
        # The front door and every standby colour sampled at once: each check paces its own samples.
        front_report, *reports = await asyncio.gather(
            self._check(target, target.router.front_url, None), *(self._check(target, f"http://{target.colours[c].address}", to) for c in colours))
        standby: dict[str, HealthReport] = dict(zip(colours, reports, strict=True))
        evidence = {"front_door": front_report.model_dump(mode="json"), "standby": {c: r.model_dump(mode="json") for c, r in standby.items()}}
        ready = [c for c, r in standby.items() if r.healthy]
        if not ready:
            seen = ", ".join(f"{c}: {r.detail or 'unhealthy'}" for c, r in standby.items())
            raise _refuse(f"backend of {environment!r}: no standby colour serves {to} healthily ({seen})")
        colour = ready[0]
        return TargetPlan(
            target=RollbackTarget.BACKEND, strategy="blue_green", from_version=from_version, to_version=to,
            checks=checks, params=BlueGreenParams(colour=colour, previous_colour=live), evidence=evidence,
        )

    async def _assess_rolling(self, environment: str, target: BackendTarget, from_version: str | None, to: str,
                              evidence: dict, checks: list[str]) -> TargetPlan:
        if target.releases_command:
            output = await _run(target.releases_command, {})
            try:
                available = json.loads(output)
            except ValueError:
                raise _refuse(f"releases_command printed no JSON list: {output[:200]!r}", "InvalidConfig") from None
            if to not in available:
                raise _refuse(f"backend of {environment!r}: release {to} does not exist (available: {', '.join(available)})")
        names = [i.name for i in target.instances]
        batches = [names[i:i + target.max_unavailable] for i in range(0, len(names), target.max_unavailable)]
        return TargetPlan(
            target=RollbackTarget.BACKEND, strategy="rolling", from_version=from_version, to_version=to,
            checks=checks, params=RollingParams(batches=batches), evidence=evidence,
        )

    def _live_colour(self, target: BackendTarget) -> str | None:
        live = {s.address for s in router_of(target).current() if not s.down}
        return next((c for c, i in target.colours.items() if i.address in live), None)

    async def _check(self, target: BackendTarget, base_url: str, version: str | None) -> HealthReport:
        return await self.health.validate(HttpCheckInput(
            base_url=base_url, check=target.health, version_path=target.version_path, expect_version=version))

    async def api_document(self, environment: str, version: str, plan: TargetPlan | None) -> tuple[dict, str]:
        """The OpenAPI document of `version`, and where it came from: the standby colour the plan switches
        to, the front door when the backend stays, a running rolling instance, or openapi_documents."""
        target = self.target(environment)
        sources: list[str] = []
        if plan is not None and isinstance(plan.params, BlueGreenParams):
            sources.append(f"http://{self._colour(target, plan.params.colour).address}")
        elif plan is None:
            sources.append(target.router.front_url)
        else:
            for instance in target.instances:
                if await self._version_at(target, f"http://{instance.address}") == version:
                    sources.append(f"http://{instance.address}")
                    break
        for base in sources:
            url = base.rstrip("/") + target.openapi_path
            try:
                answer = await self.health.get(url, target.health.timeout_seconds)
                document = answer.json() if answer.status_code == 200 else None
            except Exception:  # noqa: BLE001 - try the next source; the refusal below names them all
                document = None
            if isinstance(document, dict):
                return document, url
        if target.openapi_documents is not None:
            path = target.openapi_documents / f"{_checked_version(version)}.json"
            try:
                return json.loads(path.read_text()), str(path)
            except (OSError, ValueError) as err:
                raise _refuse(f"backend {version}: no OpenAPI document at {path} ({err})") from None
        tried = ", ".join(s.rstrip("/") + target.openapi_path for s in sources) or "no running instance of it"
        raise _refuse(f"backend {version}: cannot read its OpenAPI document ({tried}); serve {target.openapi_path} "
                      "or set openapi_documents in the backend's config")

    async def live_version(self, environment: str) -> str | None:
        """What the front door answers now."""
        target = self.target(environment)
        return await self._version_at(target, target.router.front_url)

    async def _version_at(self, target: BackendTarget, base_url: str) -> str | None:
        try:
            return await answered_version(self.health, base_url.rstrip("/") + target.version_path, target.health.timeout_seconds)
        except LookupError:
            return None  # no answer is no version

    # -- blue-green -----------------------------------------------------------

    @activity.defn(name=CHECK_STANDBY)
    async def check_standby(self, inp: SwitchInput) -> HealthReport:
        """Health of the colour we are about to send traffic to, checked directly (not through nginx)."""
        target = self.target(inp.environment)
        async with heartbeating(f"check {inp.colour}"):
            return await self._check(target, f"http://{self._colour(target, inp.colour).address}", inp.expect_version)

    def _colour(self, target: BackendTarget, colour: str) -> Instance:
        instance = target.colours.get(colour)
        if instance is None:
            raise _refuse(f"unknown colour {colour!r}; configured: {', '.join(target.colours)}", "InvalidRequest")
        return instance

    @activity.defn(name=SWITCH_TRAFFIC)
    async def switch_traffic(self, inp: SwitchInput) -> SwitchResult:
        """Make `colour` the only live one; success once the front door answers its version.

        The workflow runs check_standby right before; compensation switches back
        without it, since the colour it returns to may be the broken release.
        """
        target = self.target(inp.environment)
        self._colour(target, inp.colour)  # unknown colour: a clear, non-retryable error
        # Declarative: every colour stays listed, only the chosen one is live.
        servers = [UpstreamServer(i.address, down=name != inp.colour) for name, i in target.colours.items()]
        async with heartbeating(f"switch to {inp.colour}"):
            reloaded = await _apply(router_of(target), servers)
            versions = await self._await_front_door(target, inp.expect_version)
        return SwitchResult(colour=inp.colour, reloaded=reloaded, front_door_versions=versions, attempt=_attempt())

    async def _await_front_door(self, target: BackendTarget, version: str) -> dict[str, int]:
        """Success only once requests through the front door are answered by `version`.

        nginx reloads gracefully: old workers finish their requests on the old
        upstream, so a few answers may still come from it. Wait for a clean run.
        """
        url = target.router.front_url.rstrip("/") + target.version_path
        deadline = time.monotonic() + FRONT_DOOR_DEADLINE_SECONDS
        seen: dict[str, int] = {}
        streak = 0
        while time.monotonic() < deadline:
            try:
                answer = await self.health.get(url, target.health.timeout_seconds)
                got = answer.json().get("version") if answer.status_code == 200 else f"HTTP {answer.status_code}"
            except (ValueError, Exception) as err:  # noqa: BLE001 - any failure is "not yet"
                got = type(err).__name__
            seen[str(got)] = seen.get(str(got), 0) + 1
            streak = streak + 1 if got == version else 0
            if streak >= target.health.samples:
                return seen
            await asyncio.sleep(0.05)
        raise ApplicationError(f"front door {url} did not settle on {version} within {FRONT_DOOR_DEADLINE_SECONDS}s: saw {seen}",
                               type="FrontDoorMismatch")

    # -- rolling -------------------------------------------------------------

    @activity.defn(name=ROLL_BATCH)
    async def roll_batch(self, inp: BatchInput) -> BatchResult:
        """Drain the batch, switch its instances to `version`, health-check, put them back."""
        target = self.target(inp.environment)
        _checked_version(inp.version)  # before anything is drained
        by_name = {i.name: i for i in target.instances}
        unknown = [n for n in inp.instances if n not in by_name]
        if unknown:
            raise _refuse(f"unknown instances {unknown}; configured: {', '.join(by_name)}", "InvalidRequest")
        router = router_of(target)
        batch = {by_name[n].address for n in inp.instances}
        reloads = 0
        restarted: list[str] = []

        def upstream(drained: set[str]) -> list[UpstreamServer]:
            return [UpstreamServer(i.address, down=i.address in drained) for i in target.instances]

        async with heartbeating(f"batch {', '.join(inp.instances)} -> {inp.version}"):
            if await self._batch_done(target, inp, router):
                return BatchResult(instances=inp.instances, restarted=[], reloads=0, attempt=_attempt())
            reloads += await _apply(router, upstream(batch))
            for name in inp.instances:
                output = await _run(target.deploy_command, {"instance": name, "version": inp.version})
                if "unchanged" not in output:
                    restarted.append(name)
                if inp.require_healthy:
                    report = await self._check(target, f"http://{by_name[name].address}", inp.version)
                    if not report.healthy:
                        # Leave the batch drained: compensation decides what it serves next.
                        raise ApplicationError(f"instance {name} unhealthy on {inp.version}: {report.detail}",
                                               type="UnhealthyAfterDeploy", non_retryable=True)
            reloads += await _apply(router, upstream(set()))
        return BatchResult(instances=inp.instances, restarted=restarted, reloads=reloads, attempt=_attempt())

    async def _batch_done(self, target: BackendTarget, inp: BatchInput, router: NginxRouter) -> bool:
        """True when the batch already serves `version` and takes traffic: a re-run changes nothing."""
        addresses = {i.address for i in target.instances if i.name in inp.instances}
        if any(s.down for s in router.current() if s.address in addresses):
            return False
        for address in addresses:
            if (await self.health.sample(HttpCheckInput(base_url=f"http://{address}", check=target.health,
                                                         version_path=target.version_path,
                                                         expect_version=inp.version))).version != inp.version:
                return False
        return True

    # -- validation ----------------------------------------------------------

    @activity.defn(name=VALIDATE)
    async def validate(self, inp: ValidateInput) -> HealthReport:
        target = self.target(inp.environment)
        async with heartbeating("front door health"):
            return await self._check(target, target.router.front_url, inp.expect_version)

    @activity.defn(name=SMOKE)
    async def smoke(self, inp: ValidateInput) -> HealthReport:
        """End-to-end smoke and performance check through the front door, one report for all paths."""
        target = self.target(inp.environment)
        smoke = target.smoke
        reports: list[HealthReport] = []
        async with heartbeating("smoke checks"):
            for path in smoke.paths or [target.health.path]:
                check = target.health.model_copy(update={
                    "path": path, "samples": smoke.samples, "success_ratio": smoke.success_ratio,
                    "expected_body": None, "interval_ms": 0, "max_latency_ms": max(target.health.max_latency_ms, smoke.max_p95_ms)})
                reports.append(await self.health.validate(HttpCheckInput(base_url=target.router.front_url, check=check)))
        problems = [f"{r.url}: {r.successes}/{r.samples} ok ({r.detail})" for r in reports if not r.healthy]
        problems += [f"{r.url}: p95 {r.p95_latency_ms} ms > {smoke.max_p95_ms} ms" for r in reports
                     if r.p95_latency_ms is not None and r.p95_latency_ms > smoke.max_p95_ms]
        samples = sum(r.samples for r in reports)
        successes = sum(r.successes for r in reports)
        return HealthReport(
            url=", ".join(r.url for r in reports), healthy=not problems, samples=samples, successes=successes,
            success_ratio=round(successes / samples, 4), required_ratio=smoke.success_ratio,
            p95_latency_ms=max((r.p95_latency_ms or 0) for r in reports), detail="; ".join(problems)[:500],
        )


def build(shared: Shared) -> BackendRollback:
    return BackendRollback(shared.config, shared.health)


async def _apply(router: NginxRouter, servers: list[UpstreamServer]) -> bool:
    try:
        return await asyncio.to_thread(router.apply, servers)
    except RouterError as err:
        raise ApplicationError(str(err), type="RouterError") from err


async def _run(command: list[str], values: dict[str, str]) -> str:
    """Run a configured deployment hook with its {instance}/{version} fields filled; stdout on success.

    An argv list, never a shell: a value stays one argument, whatever it contains.
    """
    if "version" in values:
        _checked_version(values["version"])
    argv = [part.format(**values) for part in command]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    finished = asyncio.ensure_future(proc.communicate())
    deadline = time.monotonic() + COMMAND_TIMEOUT_SECONDS
    try:
        while not finished.done():
            if time.monotonic() > deadline:
                raise ApplicationError(f"{argv[0]} did not finish within {COMMAND_TIMEOUT_SECONDS}s", type="DeployHookTimeout")
            await asyncio.wait({finished}, timeout=1)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise
    stdout, stderr = finished.result()
    if proc.returncode != 0:
        message = stderr.decode(errors="replace").strip()[-500:]
        # Exit 3 is the hook's way to say "no such release": retrying cannot help.
        raise ApplicationError(f"{argv[0]} exited {proc.returncode}: {message}", type="DeployHookFailed",
                               non_retryable=proc.returncode == 3)
    return stdout.decode(errors="replace")

"""Frontend rollback: verify a retained release, switch the store's pointer to it, purge each CDN tier,
and wait until the front door serves the build.

Every activity is declarative: "make release V live" does nothing when it already is; a purge is
keyed by the workflow and step, so a retried one never creates a second CloudFront invalidation;
waiting for the front door only reads. The store's methods are synchronous (a filesystem, boto3):
they run in a thread while the heartbeat keeps going.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.health import HttpCheckInput, HttpHealth
from activities.heartbeat import heartbeating
from rollback.config import ConfigSource
from rollback.payloads import NOTHING_TO_ROLL_BACK
from rollback.models import HealthReport, RollbackRequest, RollbackTarget, TargetPlan
from rollback.state import TargetVersions
from rollback.targets.frontend.cdn import CdnError, PurgeRequest, PurgeResult
from rollback.targets.frontend.cdn.factory import provider_for
from rollback.targets.frontend.config import FrontendTarget
from rollback.targets.frontend.contract import (
    AWAIT_FRONT_DOOR, PURGE_CDN, SWITCH_RELEASE, VALIDATE, VERIFY_RELEASE, FrontDoorInput, FrontDoorResult, PurgeInput, ReleaseInput,
    ReleaseSwitchParams, SwitchResult, VerifyResult, purge_urls,
)
from rollback.targets.frontend.release import ReleaseError, ReleaseManifest
from rollback.targets.frontend.store import ReleaseStore, entry_points

if TYPE_CHECKING:
    from activities.targets import Shared


def _refuse(message: str, kind: str = "AssessmentRefused") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


T = TypeVar("T")


def _attempt() -> int:
    return activity.info().attempt if activity.in_activity() else 1


class FrontendRollback:
    def __init__(self, config: ConfigSource, health: HttpHealth) -> None:
        self.config = config
        self.health = health

    def target(self, environment: str) -> FrontendTarget:
        frontend = self.config.get().environment(environment).targets.of("frontend", FrontendTarget)
        if frontend is None:
            raise _refuse(f"environment {environment!r} has no frontend target configured", "InvalidRequest")
        return frontend

    def store(self, environment: str) -> ReleaseStore:
        return self.target(environment).store.open()

    async def _in_thread(self, call: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(call)
        except ReleaseError as err:
            raise _refuse(str(err), "ReleaseRefused") from None

    # -- assessment (called from the coordination planner) -------------------

    async def live(self, environment: str) -> str | None:
        return await self._in_thread(self.store(environment).live)

    async def manifest(self, environment: str, version: str) -> ReleaseManifest:
        store = self.store(environment)
        return await self._in_thread(lambda: store.manifest(version))

    async def retained(self, environment: str) -> list[str]:
        """The releases a rollback may return to, oldest first."""
        return await self._in_thread(self.store(environment).versions)

    async def assess(self, request: RollbackRequest, versions: TargetVersions, to_version: str | None) -> TargetPlan:
        environment = request.environment
        target = self.target(environment)
        store = target.store.open()
        live = await self._in_thread(store.live)
        to = to_version or versions.known_good
        if not to:
            raise _refuse(f"frontend of {environment!r}: no known-good release recorded; pass to_version")
        if to == live:
            raise _refuse(f"frontend of {environment!r} already serves {to}: nothing to roll back", NOTHING_TO_ROLL_BACK)
        retained = await self._in_thread(store.versions)
        if to not in retained:
            raise _refuse(f"frontend of {environment!r}: release {to} is not in the store "
                          f"(retained: {', '.join(retained) or 'none'})")
        manifest = await self._in_thread(lambda: store.verify(to))  # a corrupt release is refused before anything moves
        previous = await asyncio.to_thread(self._readable_manifest, store, live)
        changed = set(entry_points(manifest)) | (set(entry_points(previous)) if previous else set())
        front = await self._front_door_answer(target)
        # What an undo waits for: the live release's build; from the front door when its manifest is unreadable.
        previous_build = previous.build if previous else (str(front["build"]) if live and front.get("build") else None)
        return TargetPlan(
            target=RollbackTarget.FRONTEND, strategy="release_switch", from_version=live or versions.current, to_version=to,
            checks=[f"release {to} matches its release.json ({len(manifest.files)} files)",
                    f"{target.front_url}{target.version_path} answers build {manifest.build} {target.switch_samples}x in a row",
                    f"{target.health.path} and up to {target.check_assets} release files through the front door"],
            params=ReleaseSwitchParams(build=manifest.build, previous_build=previous_build,
                                       purge_paths=purge_urls(sorted(changed)), tiers=[c.provider for c in target.cdn]),
            evidence={"front_door": front, "release": {"build": manifest.build, "files": len(manifest.files), "api": manifest.api},
                      **({"recorded_current": versions.current} if versions.current not in (None, live) else {})},
        )

    @staticmethod
    def _readable_manifest(store: ReleaseStore, version: str | None) -> ReleaseManifest | None:
        """The live release's manifest, None when there is none or it is broken: rolling back from a broken
        release must never depend on that release being intact."""
        try:
            return store.manifest(version) if version else None
        except ReleaseError:
            return None

    async def _front_door_answer(self, target: FrontendTarget) -> dict[str, object]:
        url = target.front_url.rstrip("/") + target.version_path
        try:
            answer = await self.health.get(url, target.health.timeout_seconds)
            body = answer.json() if answer.status_code == 200 else None
            # Only the two fields it is for: the body is the live release's, and could be anything.
            seen = {k: str(body[k])[:200] for k in ("version", "build") if k in body} if isinstance(body, dict) else {}
            return {"url": url, "status": answer.status_code, **seen}
        except Exception as err:  # noqa: BLE001 - evidence, not a decision: a broken front door is why we roll back
            return {"url": url, "error": type(err).__name__}

    # -- execution -------------------------------------------------------------

    @activity.defn(name=VERIFY_RELEASE)
    async def verify_release(self, inp: ReleaseInput) -> VerifyResult:
        """Every file of the release against release.json, right before it goes live."""
        store = self.store(inp.environment)
        async with heartbeating(f"verify {inp.version}"):
            manifest = await self._in_thread(lambda: store.verify(inp.version))
        return VerifyResult(version=inp.version, build=manifest.build, files=len(manifest.files))

    @activity.defn(name=SWITCH_RELEASE)
    async def switch_release(self, inp: ReleaseInput) -> SwitchResult:
        """Make the release live (the store's atomic pointer switch); nothing happens when it already is."""
        store = self.store(inp.environment)
        async with heartbeating(f"switch to {inp.version}"):
            previous = await self._in_thread(store.live)
            switched = await self._in_thread(lambda: store.switch(inp.version))
        return SwitchResult(version=inp.version, previous=previous, switched=switched, attempt=_attempt())

    @activity.defn(name=PURGE_CDN)
    async def purge_cdn(self, inp: PurgeInput) -> PurgeResult:
        tiers = self.target(inp.environment).cdn
        if inp.tier >= len(tiers):
            raise _refuse(f"CDN tier {inp.tier} is not configured (the config has {len(tiers)})", "InvalidRequest")
        try:
            provider = provider_for(tiers[inp.tier])
            # A beat every second whatever the provider is doing (a slow API call, a long lookup), and its own
            # progress reports besides.
            async with heartbeating(f"purge {provider.name}"):
                return await provider.purge(PurgeRequest(paths=inp.paths, key=inp.key), progress=_heartbeat)
        except CdnError as err:
            raise ApplicationError(str(err), type="CdnPurgeFailed", non_retryable=not err.retryable,
                                   next_retry_delay=_seconds(err.retry_after)) from None

    @activity.defn(name=AWAIT_FRONT_DOOR)
    async def await_front_door(self, inp: FrontDoorInput) -> FrontDoorResult:
        """Done once the front door (the CDN users reach) answers the build `switch_samples` times in a row."""
        target = self.target(inp.environment)
        url = target.front_url.rstrip("/") + target.version_path
        deadline = time.monotonic() + target.switch_timeout_seconds
        seen: dict[str, int] = {}
        streak = 0
        async with heartbeating(f"front door -> {inp.build}"):
            while time.monotonic() < deadline:
                got = await self._build_at(url, target.health.timeout_seconds)
                seen[got] = seen.get(got, 0) + 1
                streak = streak + 1 if got == inp.build else 0
                if streak >= target.switch_samples:
                    return FrontDoorResult(url=url, answers=seen, streak=streak, attempt=_attempt())
                await asyncio.sleep(0.02)
        raise ApplicationError(f"{url} did not settle on build {inp.build} of {inp.version} within "
                               f"{target.switch_timeout_seconds:g}s: saw {seen}", type="FrontDoorMismatch")

    async def _build_at(self, url: str, timeout: float) -> str:
        try:
            answer = await self.health.get(url, timeout)
            if answer.status_code != 200:
                return f"HTTP {answer.status_code}"
            body = answer.json()
            return str(body.get("build")) if isinstance(body, dict) else "not an object"
        except Exception as err:  # noqa: BLE001 - any failure is "not yet"
            return type(err).__name__

    # -- validation ----------------------------------------------------------

    @activity.defn(name=VALIDATE)
    async def validate(self, inp: ReleaseInput) -> HealthReport:
        """The front door's health path, then the release's own files through the front door, byte for byte."""
        target = self.target(inp.environment)
        store = target.store.open()
        async with heartbeating("frontend through the front door"):
            report = await self.health.validate(HttpCheckInput(base_url=target.front_url, check=target.health))
            manifest = await self._in_thread(lambda: store.manifest(inp.version))
            problems = [report.detail] if not report.healthy else []
            checked = 0
            # Entry points first: with many assets, index.html must still be among the files compared.
            for path in [*entry_points(manifest), *sorted(set(manifest.files) - set(entry_points(manifest)))][:target.check_assets]:
                digest = manifest.files[path]
                checked += 1
                url = f"{target.front_url.rstrip('/')}/{path}"
                try:
                    answer = await self.health.get(url, target.health.timeout_seconds)
                    if answer.status_code != 200:
                        problems.append(f"{path}: HTTP {answer.status_code}")
                    elif hashlib.sha256(answer.content).hexdigest() != digest:
                        problems.append(f"{path}: the front door serves other bytes than release {inp.version}")
                except Exception as err:  # noqa: BLE001 - reported, not raised: the report decides
                    problems.append(f"{path}: {type(err).__name__}")
        return report.model_copy(update={
            "healthy": not problems, "samples": report.samples + checked, "successes": report.successes + checked - len(problems),
            "detail": "; ".join(problems)[:500]})


def _heartbeat(detail: str) -> None:
    if activity.in_activity():
        activity.heartbeat(detail)


def _seconds(value: float | None) -> timedelta | None:
    return timedelta(seconds=value) if value else None


def build(shared: Shared) -> FrontendRollback:
    return FrontendRollback(shared.config, shared.health)

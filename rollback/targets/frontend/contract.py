"""What RollbackWorkflow and the frontend activities exchange: inputs, results, plan parameters, and the
compatibility report the planner puts in the plan.

Pure pydantic: workflows import it. Activities are called by the name constants below, which
`activities/frontend.py` registers under.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rollback.versions import Version

VERIFY_RELEASE = "frontend.verify_release"
SWITCH_RELEASE = "frontend.switch_release"
PURGE_CDN = "frontend.purge_cdn"
AWAIT_FRONT_DOOR = "frontend.await_front_door"
VALIDATE = "frontend.validate"


class ReleaseSwitchParams(BaseModel):
    """What the assessment decided: which build goes live, and what the CDN tiers must forget."""

    strategy: Literal["release_switch"] = "release_switch"
    build: str = Field(description="the build the front door must serve once switched")
    previous_build: str | None = Field(default=None, description="the build live now: what an undo waits for")
    purge_paths: list[str] = Field(description="URL paths of the entry points either release has (hashed assets never change)")
    tiers: list[str] = Field(default_factory=list, description="the CDN providers purged after the switch, in order")


class ReleaseInput(BaseModel):
    environment: str
    version: Version


class VerifyResult(BaseModel):
    version: str
    build: str
    files: int

    def step_detail(self) -> str:
        return f"{self.version} (build {self.build}): {self.files} files match release.json"


class SwitchResult(BaseModel):
    version: str
    previous: str | None
    switched: bool
    attempt: int

    def step_detail(self) -> str:
        return f"{self.previous} -> {self.version}" if self.switched else f"{self.version} already live"


class PurgeInput(BaseModel):
    environment: str
    tier: int = Field(ge=0, description="index in the target's `cdn` list")
    paths: list[str]
    key: str = Field(description="idempotency key: workflow id and step")


class FrontDoorInput(BaseModel):
    environment: str
    version: Version
    build: str


class FrontDoorResult(BaseModel):
    url: str
    answers: dict[str, int] = Field(description="what the front door answered while settling, by build")
    streak: int
    attempt: int = 1

    def step_detail(self) -> str:
        return f"{self.url}: {self.streak} answers in a row; saw {self.answers}"


class CompatibilityReport(BaseModel):
    """Can the frontend that the rollback leaves live talk to the backend it leaves live?"""

    frontend_version: str
    backend_version: str
    compatible: bool
    missing: list[str] = Field(default_factory=list, description="operations the frontend calls that the backend lacks")
    problems: list[str] = Field(default_factory=list, description="everything else: required parameters, the version range")
    source: str = Field(default="", description="where the backend's OpenAPI document came from")
    coupled: bool = Field(default=False, description="the frontend was added to the rollback to stay compatible")

    def summary(self) -> str:
        pair = f"frontend {self.frontend_version} with backend {self.backend_version}"
        if self.compatible:
            return f"{pair}: compatible" + (" (frontend coupled into the rollback)" if self.coupled else "")
        return f"{pair}: incompatible: " + "; ".join([*(f"missing {m}" for m in self.missing), *self.problems])


def purge_urls(entry_points: list[str]) -> list[str]:
    """The URL paths the front door serves an entry point under (index.html is also `/`)."""
    urls = {"/" + path for path in entry_points}
    urls |= {"/" + path.removesuffix("index.html") for path in entry_points if path.endswith("index.html")}
    return sorted(urls)

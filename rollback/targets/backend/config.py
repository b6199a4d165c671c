"""rollback.yaml's `targets.backend`: nginx in front of blue-green colours or rolling instances."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rollback.config_parts import HealthCheck, Strict, TargetConfig


class SmokeCheck(Strict):
    """End-to-end and performance check through the front door, run in the validation phase."""

    paths: list[str] = Field(default_factory=list, description="GET paths that must answer the health check's expected status; default: the health path")
    samples: int = Field(default=20, ge=1, le=10000, description="requests per path")
    success_ratio: float = Field(default=1.0, gt=0, le=1)
    max_p95_ms: int = Field(default=1000, ge=1, description="performance check: p95 latency per path")


class Router(Strict):
    upstream_file: Path
    upstream_name: str = "backend"
    reload_command: list[str]
    test_command: list[str] = Field(default_factory=list)
    front_url: str

    @field_validator("reload_command")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name a command")
        return value


class Instance(Strict):
    name: str = Field(default="", description="for rolling instances; colours are named by their key")
    address: str = Field(pattern=r"^[^\s:/]+:\d{1,5}$", description="host:port nginx proxies to")


class BackendTarget(TargetConfig):
    strategy: Literal["blue_green", "rolling"]
    router: Router
    health: HealthCheck = Field(default_factory=HealthCheck)
    smoke: SmokeCheck = Field(default_factory=SmokeCheck)
    version_path: str = "/version"
    openapi_path: str = Field(default="/openapi.json", description="the API a release serves, for the frontend compatibility check")
    openapi_documents: Path | None = Field(
        default=None, description="directory of <version>.json OpenAPI documents, for releases no instance runs yet (rolling)")
    # blue_green
    colours: dict[str, Instance] = Field(default_factory=dict)
    # rolling
    instances: list[Instance] = Field(default_factory=list)
    max_unavailable: int = Field(default=1, ge=1)
    deploy_command: list[str] = Field(default_factory=list, description="sets {instance} to release {version} and restarts it")
    releases_command: list[str] = Field(default_factory=list, description="prints the JSON list of available releases")

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], *, base: Path, state_dir: Path) -> None:
        raw["router"]["upstream_file"] = base / raw["router"]["upstream_file"]
        if raw.get("openapi_documents") is not None:
            raw["openapi_documents"] = base / raw["openapi_documents"]

    @field_validator("deploy_command", "releases_command")
    @classmethod
    def _known_fields(cls, command: list[str], info: ValidationInfo) -> list[str]:
        # deploy_command gets {instance} and {version}; releases_command nothing. Anything
        # else would fail at run time, in the middle of a rollback.
        allowed = {None, "instance", "version"} if info.field_name == "deploy_command" else {None}
        for part in command:
            for _, field, _, _ in string.Formatter().parse(part):
                if field not in allowed:
                    raise ValueError(f"unexpected field {{{field}}} in {part!r}"
                                     + ("; use {instance} and {version}" if info.field_name == "deploy_command" else ""))
        return command

    @model_validator(mode="after")
    def _strategy_fields(self) -> "BackendTarget":
        if self.strategy == "blue_green" and len(self.colours) < 2:
            raise ValueError("blue_green needs at least two entries under 'colours'")
        if self.strategy == "rolling":
            if not self.instances:
                raise ValueError("rolling needs 'instances'")
            if not self.deploy_command:
                raise ValueError("rolling needs 'deploy_command'")
            names = [i.name for i in self.instances]
            if not all(names):
                raise ValueError("every rolling instance needs a 'name'")
            if len(set(names)) != len(names):
                raise ValueError("instance names must be unique")
        return self


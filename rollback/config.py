"""rollback.yaml: environments, their targets, policies, and the RollbackConfig knobs.

Loading validates everything up front; an error names the file, the field path and
what is wrong, in one line, so a typo never surfaces half-way through a rollback.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rollback.state import TargetVersions


ENVIRONMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RollbackConfig(_Strict):
    """Global knobs (the contract's fields, plus a few of ours)."""

    max_rollback_attempts: int = Field(default=3, ge=1, le=20)
    health_check_timeout: int = Field(default=300, ge=1, description="seconds a health validation may take")
    backup_retention_days: int = Field(default=30, ge=1)
    notification_channels: list[str] = Field(default_factory=lambda: ["slack", "email"])
    auto_rollback_enabled: bool = True
    cross_repo_coordination: bool = True
    lock_ttl_seconds: int = Field(default=3600, ge=10, description="lease of the deployment lock; renewed while a rollback runs")


class Policy(_Strict):
    require_approval: bool = False
    approval_timeout_seconds: int = Field(default=1800, ge=1)
    on_approval_timeout: Literal["reject", "proceed"] = "reject"
    on_failure: Literal["compensate", "halt"] = "compensate"


class HealthCheck(_Strict):
    path: str = "/health"
    expected_status: int = 200
    expected_body: str | None = Field(default=None, description="substring the body must contain")
    samples: int = Field(default=5, ge=1, le=1000)
    success_ratio: float = Field(default=1.0, gt=0, le=1)
    max_latency_ms: int = Field(default=1000, ge=1)
    timeout_seconds: float = Field(default=2.0, gt=0)
    interval_ms: int = Field(default=100, ge=0)


class SmokeCheck(_Strict):
    """End-to-end and performance check through the front door, run in the validation phase."""

    paths: list[str] = Field(default_factory=list, description="GET paths that must answer the health check's expected status; default: the health path")
    samples: int = Field(default=20, ge=1, le=10000, description="requests per path")
    success_ratio: float = Field(default=1.0, gt=0, le=1)
    max_p95_ms: int = Field(default=1000, ge=1, description="performance check: p95 latency per path")


class Router(_Strict):
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


class Instance(_Strict):
    name: str = Field(default="", description="for rolling instances; colours are named by their key")
    address: str = Field(pattern=r"^[^\s:/]+:\d{1,5}$", description="host:port nginx proxies to")


class BackendTarget(_Strict):
    strategy: Literal["blue_green", "rolling"]
    router: Router
    versions: TargetVersions = Field(default_factory=TargetVersions, description="seed; the state store wins once written")
    health: HealthCheck = Field(default_factory=HealthCheck)
    smoke: SmokeCheck = Field(default_factory=SmokeCheck)
    version_path: str = "/version"
    # blue_green
    colours: dict[str, Instance] = Field(default_factory=dict)
    # rolling
    instances: list[Instance] = Field(default_factory=list)
    max_unavailable: int = Field(default=1, ge=1)
    deploy_command: list[str] = Field(default_factory=list, description="sets {instance} to release {version} and restarts it")
    releases_command: list[str] = Field(default_factory=list, description="prints the JSON list of available releases")

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


class Targets(_Strict):
    backend: BackendTarget | None = None

    def configured(self) -> list[str]:
        return [name for name in ("frontend", "backend", "database") if getattr(self, name, None) is not None]


class Environment(_Strict):
    policy: Policy = Field(default_factory=Policy)
    targets: Targets


class AppConfig(_Strict):
    state_dir: Path
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    environments: dict[str, Environment]

    @field_validator("environments")
    @classmethod
    def _environment_names(cls, environments: dict[str, Environment]) -> dict[str, Environment]:
        # The same rule as RollbackRequest.environment, or no request could ever name it.
        for name in environments:
            if not ENVIRONMENT_NAME.match(name) or len(name) > 63:
                raise ValueError(f"environment name {name!r} must match {ENVIRONMENT_NAME.pattern}, at most 63 characters")
        return environments

    def environment(self, name: str) -> Environment:
        return self.environments[name]


class ConfigError(ValueError):
    """A configuration file is missing or invalid; the message says where and why."""


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_config(path: Path) -> AppConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (set ROLLBACK_CONFIG to your rollback.yaml)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = AppConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{path}: {_location(first['loc'])}: {first['msg']}") from None
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(config: AppConfig, base: Path) -> AppConfig:
    """Relative paths are relative to the config file, not to wherever the worker started."""
    raw = config.model_dump()
    raw["state_dir"] = base / config.state_dir
    for env in raw["environments"].values():
        backend = env["targets"].get("backend")
        if backend:
            backend["router"]["upstream_file"] = base / backend["router"]["upstream_file"]
    return AppConfig.model_validate(raw)


class ConfigSource:
    """The config file as the worker sees it: re-read when the file changes.

    Activities ask for the config on every call, so an operator's edit (a new
    instance, a changed policy) applies to the next activity without a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._config: AppConfig | None = None

    def get(self) -> AppConfig:
        stat = self.path.stat() if self.path.exists() else None
        stamp = (stat.st_mtime, stat.st_size) if stat else None
        if self._config is None or stamp != self._stamp:
            self._config = load_config(self.path)
            self._stamp = stamp
        return self._config

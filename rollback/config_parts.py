"""The building blocks of rollback.yaml that every part uses: the targets' config models
(rollback/targets/<target>/config.py) and the rest of rollback/config.py.

Pure pydantic: the registry imports the targets' config models, and workflows import the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rollback.state import TargetVersions
from rollback.versions import Version

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # the NAME of an environment variable (a secret's), never its value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheck(Strict):
    path: str = "/health"
    expected_status: int = 200
    expected_body: str | None = Field(default=None, description="substring the body must contain")
    samples: int = Field(default=5, ge=1, le=1000)
    success_ratio: float = Field(default=1.0, gt=0, le=1)
    max_latency_ms: int = Field(default=1000, ge=1)
    timeout_seconds: float = Field(default=2.0, gt=0)
    interval_ms: int = Field(default=100, ge=0)


class VersionSeed(TargetVersions):
    """A target's `versions` seed: its versions follow the same rule as a request's
    `to_version`, since the known-good one becomes a deploy hook's {version}."""

    # Not frozen: the state store copies the seed and updates the copy.
    model_config = ConfigDict(extra="forbid")

    current: Version | None = None
    known_good: Version | None = None


class TargetConfig(Strict):
    """What every target's config model has: the seed of its version record."""

    versions: VersionSeed = Field(default_factory=VersionSeed, description="seed; the state store wins once written")

    @classmethod
    def resolve_paths(cls, raw: dict[str, Any], *, base: Path, state_dir: Path) -> None:
        """Make the relative paths of this target's part of rollback.yaml (`raw`, as dumped) relative to
        the config file's directory `base`, and fill the defaults that live under the state directory."""

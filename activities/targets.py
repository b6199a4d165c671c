"""The activities side of the target slices: one protocol, built from the registry.

Each module the registry names (activities/<target>.py) defines `build(shared)`, returning its
activities object: the planner asks it to assess its part of a rollback, the worker registers
the methods it declares with @activity.defn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Protocol

from activities.health import HttpHealth
from rollback.config import ConfigSource
from rollback.models import RollbackRequest, TargetPlan
from rollback.state import TargetVersions
from rollback.targets.registry import TARGETS


@dataclass(frozen=True)
class Shared:
    """What the worker gives every target's activities."""

    config: ConfigSource
    health: HttpHealth


class TargetActivities(Protocol):
    async def assess(self, request: RollbackRequest, versions: TargetVersions, to_version: str | None) -> TargetPlan:
        """This target's part of the plan, from fresh evidence; refuses (AssessmentRefused) what cannot be done."""
        ...



def defined_activities(holder: object) -> list[Callable[..., Any]]:
    """The bound methods of `holder` declared with @activity.defn: what the worker registers for it."""
    return [method for name in dir(type(holder)) if not name.startswith("_")
            and hasattr(method := getattr(holder, name), "__temporal_activity_definition")]


def build_targets(shared: Shared) -> dict[str, TargetActivities]:
    return {t.name: import_module(t.activities).build(shared) for t in TARGETS}

"""The one place that names the targets and where each one's slice lives.

Adding a target: its own files (rollback/targets/<name>/, workflows/flows/<name>.py,
activities/<name>.py) and one line in TARGETS. The workflow, the planner, the worker and
rollback.yaml's `targets` find it from here.

The flow and the activities are named by module, not imported: workflows import this module,
and an activity module holds clients (asyncpg, httpx) that must never reach a workflow. Each flow
module defines `FLOW` (workflows.flows.TargetFlow) and each activities module `build` (its
activities, given the worker's shared clients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Union

from pydantic import BaseModel, Field

from rollback.config_parts import TargetConfig
from rollback.targets.backend.config import BackendTarget
from rollback.targets.backend.contract import BlueGreenParams, RollingParams
from rollback.targets.database.config import DatabaseTarget
from rollback.targets.database.contract import PitrParams, SchemaRollbackParams
from rollback.targets.frontend.config import FrontendTarget
from rollback.targets.frontend.contract import ReleaseSwitchParams


@dataclass(frozen=True)
class TargetSlice:
    name: str  # as in requests and rollback.yaml (a RollbackTarget value)
    flow: str  # module of its workflow steps; defines FLOW
    activities: str  # module of its activities; defines build()
    params: tuple[type[BaseModel], ...]  # its plan parameters, one model per strategy
    config: type[TargetConfig]  # its part of rollback.yaml: environments.<env>.targets.<name>


# The order here means nothing: rollback.models.EXECUTION_ORDER decides it (frontend, backend, database).
TARGETS: tuple[TargetSlice, ...] = (
    TargetSlice("backend", "workflows.flows.backend", "activities.backend", (BlueGreenParams, RollingParams), BackendTarget),
    TargetSlice("database", "workflows.flows.database", "activities.database", (SchemaRollbackParams, PitrParams), DatabaseTarget),
    TargetSlice("frontend", "workflows.flows.frontend", "activities.frontend", (ReleaseSwitchParams,), FrontendTarget),
)

BY_NAME: dict[str, TargetSlice] = {t.name: t for t in TARGETS}

if TYPE_CHECKING:
    TargetParams = BaseModel
else:
    # A plan's parameters, told apart by their `strategy` (a discriminated union of every target's).
    TargetParams = Annotated[Union[tuple(p for t in TARGETS for p in t.params)], Field(discriminator="strategy")]

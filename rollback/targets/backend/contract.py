"""What RollbackWorkflow and the backend activities exchange: inputs, results, plan parameters.

Pure pydantic: workflows import it. Activities are called by the name constants below, which
`activities/backend.py` registers under.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rollback.versions import Version

CHECK_STANDBY = "backend.check_standby"
SWITCH_TRAFFIC = "backend.switch_traffic"
ROLL_BATCH = "backend.roll_batch"
VALIDATE = "backend.validate"
SMOKE = "backend.smoke"


class BlueGreenParams(BaseModel):
    """What the assessment decided for a blue-green switch."""

    strategy: Literal["blue_green"] = "blue_green"
    colour: str = Field(description="the standby colour that serves the version to return to")
    previous_colour: str | None = Field(default=None, description="the colour live now: what an undo switches back to")


class RollingParams(BaseModel):
    """What the assessment decided for a rolling reversal."""

    strategy: Literal["rolling"] = "rolling"
    batches: list[list[str]] = Field(min_length=1, description="instance names, max_unavailable per batch")


class SwitchInput(BaseModel):
    environment: str
    colour: str
    expect_version: Version


class SwitchResult(BaseModel):
    colour: str
    reloaded: bool
    front_door_versions: dict[str, int]
    attempt: int

    def step_detail(self) -> str:
        return f"{'reloaded nginx' if self.reloaded else 'already live'}; front door {self.front_door_versions}"


class BatchInput(BaseModel):
    environment: str
    instances: list[str] = Field(min_length=1)
    version: Version
    require_healthy: bool = True


class BatchResult(BaseModel):
    instances: list[str]
    restarted: list[str]
    reloads: int
    attempt: int

    def step_detail(self) -> str:
        return f"restarted {self.restarted or 'none (already on version)'}; {self.reloads} nginx reloads"


class ValidateInput(BaseModel):
    environment: str
    expect_version: str

"""Inputs and results of activities: what workflows send to and get back from them.

Kept apart from the activity implementations so workflow modules can import them
without pulling in httpx, asyncpg or subprocess code.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field



class LockInput(BaseModel):
    environment: str
    holder: str


class RecordInput(BaseModel):
    environment: str
    target: str
    version: str
    key: str = Field(description="idempotency key: workflow id + step")


class SwitchInput(BaseModel):
    environment: str
    colour: str
    expect_version: str


class SwitchResult(BaseModel):
    colour: str
    reloaded: bool
    front_door_versions: dict[str, int]
    attempt: int


class BatchInput(BaseModel):
    environment: str
    instances: list[str] = Field(min_length=1)
    version: str
    require_healthy: bool = True


class BatchResult(BaseModel):
    instances: list[str]
    restarted: list[str]
    reloads: int
    attempt: int


class ValidateInput(BaseModel):
    environment: str
    expect_version: str


class Notification(BaseModel):
    environment: str
    event: str
    key: str = Field(description="idempotency key: workflow id + event")
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)


class NotifyResult(BaseModel):
    delivered: list[str]
    skipped: dict[str, str]

"""Recorded histories replayed against today's workflow code: a change that would break a workflow
already running in production (a command added, removed or reordered without `workflow.patched`)
fails here, not in a stuck production rollback.

The histories (tests/histories/*.json) were recorded by the integration tests that call
`keep_history`, with ROLLBACK_RECORD_HISTORIES=1:

    ROLLBACK_RECORD_HISTORIES=1 .venv/bin/python -m pytest -q -k "<the tests that call keep_history>"
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.helpers import HISTORIES
from worker import WORKFLOWS

# What the recordings cover: each workflow type the worker runs at least once, and the paths whose
# commands differ most (two backend strategies, a database rollback, a monitor's continue-as-new).
EXPECTED = {"rollback_blue_green", "rollback_rolling", "rollback_database", "migration", "monitor_continue_as_new"}


def _recorded() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def test_the_recordings_cover_each_workflow_and_path():
    assert {path.stem for path in _recorded()} >= EXPECTED


@pytest.mark.parametrize("path", _recorded(), ids=lambda path: path.stem)
async def test_a_recorded_history_replays_on_todays_workflow_code(path: Path):
    recorded = json.loads(path.read_text())
    history = WorkflowHistory.from_json(recorded["workflow_id"], recorded["history"])
    result = await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter).replay_workflow(
        history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure!r}"

"""Recorded histories replayed against today's workflow code: a change that would break a workflow
already running in production (a command added, removed or reordered without `workflow.patched`)
fails here, not in a stuck production rollback.

The histories (tests/histories/*.json) were recorded by the integration tests that call
`keep_history`, with ROLLBACK_RECORD_HISTORIES=1:

    ROLLBACK_RECORD_HISTORIES=1 .venv/bin/python -m pytest -q -k "<the tests that call keep_history>"

The `*_before_*` ones were recorded with the workflow code of the commit before each
`workflow.patched` gate (tests/histories/record_before_gates.py, stand-in activities), so the
unpatched branch a workflow started before the gate takes is replayed too:
- effect-keys-per-run (696b796): rollback_rolling_before_effect_keys, rollback_pitr_before_effect_keys;
- backup-id-per-run (83cf576): migration_before_backup_id;
- resume-starts-fresh (7db2b4c): monitor_pause_resume_before_resume_fresh.
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
EXPECTED = {"rollback_blue_green", "rollback_rolling", "rollback_database", "migration", "monitor_continue_as_new",
            # ... and each patched gate's unpatched branch
            "rollback_rolling_before_effect_keys", "rollback_pitr_before_effect_keys", "migration_before_backup_id",
            "monitor_pause_resume_before_resume_fresh"}


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

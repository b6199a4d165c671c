"""`rollback watch` and `start --wait` print every event once and end with the end state, even when a
poll lands between the state turning terminal and the final record (the last notification between)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rollback.cli import _watch
from rollback.models import Phase, RollbackStatus, StepRecord

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)


def status(state: Phase, *, finished: bool, record_done: bool) -> RollbackStatus:
    record = StepRecord(id="backend.record", name="record backend v1 as current and known-good", target="backend",
                        state="succeeded" if record_done else "running", started=T0 + timedelta(seconds=5),
                        finished=T0 + timedelta(seconds=6) if record_done else None)
    return RollbackStatus(workflow_id="rollback-demo-x", environment="demo", targets=["backend"], trigger="manual",
                          initiated_by="tester", reason="", phase=state, state=state, steps=[record],
                          phase_started={"validation": T0}, started_at=T0, finished_at=T0 + timedelta(seconds=7) if finished else None)


class Polls:
    def __init__(self, *answers: RollbackStatus) -> None:
        self.answers = list(answers)

    async def get_rollback_status(self, execution_id: str) -> RollbackStatus:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


async def test_the_end_line_comes_last_even_when_a_poll_sees_the_state_before_the_final_record(capsys):
    polls = Polls(status(Phase.VALIDATION, finished=False, record_done=False),
                  status(Phase.SUCCEEDED, finished=False, record_done=True),  # the end notification is being sent
                  status(Phase.SUCCEEDED, finished=True, record_done=True))
    assert await _watch(polls, "rollback-demo-x", quiet=True) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["phase validation", "  [backend] record backend v1 as current and known-good: running",
                     "  [backend] record backend v1 as current and known-good: succeeded", "succeeded"]

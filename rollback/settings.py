"""Connection settings shared by the worker, the CLI, the Python API and the dev stack.

Read from the environment once, at call time, so tests can point each process
elsewhere with plain environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from temporalio.common import SearchAttributeKey

SA_ENVIRONMENT = SearchAttributeKey.for_keyword("RollbackEnvironment")
SA_PHASE = SearchAttributeKey.for_keyword("RollbackPhase")
SA_STATE = SearchAttributeKey.for_keyword("RollbackState")
SA_TRIGGER = SearchAttributeKey.for_keyword("RollbackTrigger")
SA_TARGETS = SearchAttributeKey.for_keyword_list("RollbackTargets")

SEARCH_ATTRIBUTES = (SA_ENVIRONMENT, SA_PHASE, SA_STATE, SA_TRIGGER, SA_TARGETS)


@dataclass(frozen=True)
class TemporalSettings:
    address: str
    namespace: str
    task_queue: str

    @classmethod
    def from_env(cls) -> "TemporalSettings":
        return cls(
            address=os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233"),
            namespace=os.environ.get("TEMPORAL_NAMESPACE", "default"),
            task_queue=os.environ.get("ROLLBACK_TASK_QUEUE", "rollback"),
        )


def config_path() -> Path:
    return Path(os.environ.get("ROLLBACK_CONFIG", "rollback.yaml"))


def search_attribute_type(key: SearchAttributeKey) -> str:
    """The type's name as the server and its CLIs spell it (`Keyword`, `KeywordList`)."""
    return "KeywordList" if key is SA_TARGETS else "Keyword"


def search_attribute_args() -> list[str]:
    """`temporal server start-dev` flags that register our search attributes."""
    args: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{key.name}={search_attribute_type(key)}"]
    return args

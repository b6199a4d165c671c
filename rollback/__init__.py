"""Automated, durable rollbacks of database, backend and frontend on Temporal."""

from rollback.client import RollbackError, RollbackOrchestrator, StartedRollback
from rollback.config import RollbackConfig
from rollback.models import RollbackRequest, RollbackResult, RollbackStatus, RollbackTarget, RollbackTrigger

__all__ = [
    "RollbackConfig", "RollbackError", "RollbackOrchestrator", "RollbackRequest", "RollbackResult",
    "RollbackStatus", "RollbackTarget", "RollbackTrigger", "StartedRollback",
]

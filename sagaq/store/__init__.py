"""Persistence: models, migrations and the named operations of :class:`Store`."""

from sagaq.store.operations import Store
from sagaq.store.records import (
    ApprovalRecord,
    Claim,
    ClaimStatus,
    Dispatch,
    EventRecord,
    NewRun,
    NotificationRecord,
    Outcome,
    ResourceRecord,
    SagaRecord,
    StepRunRecord,
    Stranded,
)

__all__ = [
    "ApprovalRecord",
    "Claim",
    "ClaimStatus",
    "Dispatch",
    "EventRecord",
    "NewRun",
    "NotificationRecord",
    "Outcome",
    "ResourceRecord",
    "SagaRecord",
    "StepRunRecord",
    "Store",
    "Stranded",
]

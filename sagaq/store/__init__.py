"""Persistence: the named operations of :class:`Store`, one module per concern.

Each operation is a function over a :class:`~sagaq.store.db.Database` in the module of its
concern; :class:`Store` only names them, so that the engine, the reconciler and the operator
commands call ``store.claim(...)``. The store knows tables and records: not the gate, the
notifiers or the engine (an import contract checks it).
"""

from sagaq.store import (
    approvals,
    claims,
    liveness,
    notices,
    policies,
    resources,
    results,
    sagas,
    sweeps,
    views,
)
from sagaq.store.db import Database
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


class Store(Database):
    """Named operations over the sagaq tables."""

    # sagas: start one; an operator's retry or resolve
    create_saga = sagas.create_saga
    retry = sagas.retry
    resolve = sagas.resolve
    # claims: run a step under a lease; take over a lapsed one
    claim = claims.claim
    round_of = claims.round_of
    expire = claims.expire
    extend_lease = claims.extend_lease
    # results: what an attempt did, and what follows
    succeed = results.succeed
    fail = results.fail
    # approvals
    find_approval = approvals.find_approval
    decide = approvals.decide
    expire_approvals = approvals.expire_approvals
    approvals = approvals.approvals  # last: from here on the name is the operation
    # notices and resources
    notification = notices.notification
    notifications = notices.notifications
    begin_delivery = notices.begin_delivery
    end_delivery = notices.end_delivery
    register_resource = resources.register_resource
    begin_release = resources.begin_release
    end_release = resources.end_release
    resources = resources.resources  # last, as above
    # the reconciler's sweeps, and liveness
    wake_due = sweeps.wake_due
    republish_overdue = sweeps.republish_overdue
    expired_leases = sweeps.expired_leases
    stalled_rollbacks = sweeps.stalled_rollbacks
    orphans = sweeps.orphans
    stranded = liveness.stranded
    repair = liveness.repair
    # the policy each worker loaded
    record_policy = policies.record_policy
    current_policy = policies.current_policy
    # reads
    get_saga = views.get_saga
    get_saga_or_raise = views.get_saga_or_raise
    find_sagas = views.find_sagas
    list_sagas = views.list_sagas
    step_runs = views.step_runs
    events = views.events
    count_outbox = views.count_outbox
    uncompensated = views.uncompensated


__all__ = [
    "ApprovalRecord",
    "Claim",
    "ClaimStatus",
    "Database",
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

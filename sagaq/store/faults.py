"""Crash points: every commit the store makes goes through one place, and can be interrupted.

A random SIGKILL almost never lands between two commits of one operation, so the tests do not
wait for luck: each write names itself (:class:`Write`), and the store calls its ``fault`` hook
at three points around the commit (:class:`Phase`):

- ``before``: the statements ran, the commit has not happened (raising here rolls back);
- ``after``: committed, but nothing published yet;
- ``published``: the messages that the commit implies have been handed to the broker.

In production the hook does nothing. A test (or ``python -m bench chaos --db-errors``) installs
one that raises a :class:`BaseException` (a stand-in for SIGKILL) or a database error at a named
point, then checks that recovery leaves no saga without a way forward.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class Write(str, Enum):
    """Every commit the store makes, one member per operation."""

    ENQUEUE = "enqueue"
    CLAIM = "claim"
    EXPIRE = "expire"
    HEARTBEAT = "heartbeat"
    SUCCEED = "succeed"
    FAIL = "fail"
    RETRY = "retry"
    RESOLVE = "resolve"
    DECIDE = "decide"
    BEGIN_DELIVERY = "begin_delivery"
    END_DELIVERY = "end_delivery"
    RESOURCE = "resource"
    BEGIN_RELEASE = "begin_release"
    END_RELEASE = "end_release"
    WAKE = "wake"
    REPUBLISH = "republish"
    LEASES = "leases"
    STALLED = "stalled"
    ORPHANS = "orphans"
    REPAIR = "repair"
    POLICY = "policy"  # a worker records the policy it loaded, at start-up


class Phase(str, Enum):
    BEFORE = "before"  # the transaction's statements ran; the commit has not happened
    AFTER = "after"  # committed; its messages not yet published
    PUBLISHED = "published"  # committed and published


FaultHook = Callable[[Write, Phase], None]
"""Called at every crash point; raises to simulate a crash or a failed commit there."""


def no_faults(write: Write, phase: Phase) -> None:
    """The production hook: nothing happens."""

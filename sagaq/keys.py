"""Idempotency keys: structural, stable across retries, never derived from model output."""

from __future__ import annotations

import hashlib

from sagaq.machine import Direction

MIN_PREFIX = 4  # the shortest id prefix `sagaq show`, `approve` and `deny` accept


def idempotency_key(saga_id: str, step: str, direction: Direction | str = Direction.FORWARD) -> str:
    """``sha256(saga_id:step:action)`` forward, ``sha256(saga_id:step:action:compensate)`` back.

    The action is the step's name: renaming the Python function behind a step does not change
    the key, so a retry after a deploy still lands once.
    """
    parts = [saga_id, step, step]
    if Direction(direction) is Direction.COMPENSATE:
        parts.append("compensate")
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def release_key(saga_id: str, kind: str, external_id: str) -> str:
    """The key for releasing one orphaned resource: the same on every retry."""
    return hashlib.sha256(f"{saga_id}:resource:{kind}:{external_id}:release".encode()).hexdigest()



def approval_id(saga_id: str, step: str, direction: str, rule_id: str, fingerprint: str) -> str:
    """One request per (saga, step, direction, rule as it reads now): asking twice finds it."""
    raw = f"{saga_id}:{step}:{direction}:{rule_id}:{fingerprint}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]

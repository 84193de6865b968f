"""The policy each worker loaded: recorded, so that a dispatching process can compare."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from sagaq.store.db import Database
from sagaq.store.faults import Write
from sagaq.store.models import POLICY_FINGERPRINTS
from sagaq.store.records import PolicyFingerprint

T = POLICY_FINGERPRINTS



def record_policy(db: Database, fingerprint: str, *, policy: str, env: str, source: str,
                  worker: str) -> None:
    """A worker loaded this policy under this env (again): it is now the current one."""
    now = db.clock()
    with db.write(Write.POLICY) as conn:
        stmt = insert(T).values(
            fingerprint=fingerprint, policy=policy, env=env[:200], source=source,
            worker=worker[:255], first_loaded_at=now, loaded_at=now,
        )
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[T.c.fingerprint],
            set_={"worker": stmt.excluded.worker, "loaded_at": stmt.excluded.loaded_at},
        ))


def current_policy(db: Database) -> PolicyFingerprint | None:
    """The policy the most recently started worker loaded; None before any worker."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(T).order_by(T.c.loaded_at.desc()).limit(1)
        ).first()
    return PolicyFingerprint(**dict(row._mapping)) if row is not None else None

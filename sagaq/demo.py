"""``sagaq demo``: the examples of ``tasks/`` on an embedded default, no server at all.

A SQLite file in a temporary directory, Celery's in-process broker, a real Celery worker
in a thread, and the same engine, store and tasks as production (never eager mode). Pages
go to the log notifier.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagaq.commands import Story, story
from sagaq.machine import SagaState
from sagaq.notify.log import LogNotifier
from sagaq.runtime import Runtime
from sagaq.settings import Settings
from sagaq.store.database import upgrade

SETTLED = {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN, SagaState.RESOLVED}


@dataclass(frozen=True)
class Scenario:
    title: str
    saga: str
    input: dict[str, Any]
    expect: SagaState


SCENARIOS = (
    Scenario(
        "provisioning that completes",
        "provision_agent",
        {"agent": "agent-42", "roles": ["reader", "tool:search"]},
        SagaState.COMPLETED,
    ),
    Scenario(
        "an order whose invoice API times out twice, then answers (rung 0)",
        "order_flow",
        {
            "customer": "ada@example.com",
            "amount": 120,
            "simulate": {"flaky": {"create_invoice": 2}},
        },
        SagaState.COMPLETED,
    ),
    Scenario(
        "a model step: the small model answers prose, is re-prompted, the large one succeeds",
        "ticket_triage",
        {"ticket": "I was charged twice", "weak_tiers": ["small"]},
        SagaState.COMPLETED,
    ),
    Scenario(
        "provisioning that fails at its last step and is undone in reverse order",
        "provision_agent",
        {"agent": "agent-43", "simulate": {"fail": "inject_credentials"}},
        SagaState.COMPENSATED,
    ),
    Scenario(
        "after the pivot (card charged) the licence service keeps failing: page, no undo",
        "subscription",
        {
            "plan": "team",
            "amount": 49,
            "email": "lin@example.com",
            "simulate": {"always_flaky": "provision_license"},
        },
        SagaState.NEEDS_HUMAN,
    ),
    Scenario(
        "provisioning whose undo of the roles keeps failing: page a human",
        "provision_agent",
        {
            "agent": "agent-44",
            "simulate": {"fail": "inject_credentials", "fail_compensation": "assign_roles"},
        },
        SagaState.NEEDS_HUMAN,
    ),
)


def demo_settings(workdir: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{workdir / 'sagaq-demo.sqlite3'}",
        broker_url="memory://localhost/",
        imports=("tasks.provisioning", "tasks.orders", "tasks.triage", "tasks.subscription"),
        queue="sagaq-demo",
        retries=2,
        retryable_retries=3,
        reprompts=1,
        compensation_retries=2,
        retry_base=0.05,
        retry_cap=0.2,
    )


def run(*, workdir: Path | None = None, timeout: float = 60.0) -> list[tuple[Scenario, Story]]:
    """Run every scenario to a settled state; returns each with its story."""
    from sagaq.worker import embedded_worker

    with tempfile.TemporaryDirectory(prefix="sagaq-demo-") as tmp:
        settings = demo_settings(workdir or Path(tmp))
        upgrade(settings.database_url)
        runtime = Runtime(settings, notifiers=[LogNotifier()])
        try:
            with embedded_worker(runtime.app, concurrency=2):
                ids = [runtime.engine.enqueue(s.saga, s.input) for s in SCENARIOS]
                _wait(runtime, ids, timeout)
            return [(s, story(runtime.store, i)) for s, i in zip(SCENARIOS, ids, strict=True)]
        finally:
            runtime.close()


def _wait(runtime: Runtime, ids: list[str], timeout: float) -> None:
    """Until every saga has settled and every page has been delivered (or given up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        settled = all(runtime.store.get_saga_or_raise(i).state in SETTLED for i in ids)
        delivered = all(
            n.status in ("sent", "failed") for i in ids for n in runtime.store.notifications(i)
        )
        if settled and delivered:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the demo sagas did not settle within {timeout:g}s")

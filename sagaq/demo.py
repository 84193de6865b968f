"""``sagaq demo``: the examples of ``tasks/`` on an embedded default, no server at all.

A SQLite file in a temporary directory, Celery's in-process broker, a real Celery worker
in a thread, and the same engine, store and tasks as production (never eager mode).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagaq.commands import Story, story
from sagaq.machine import SagaState
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
        "an order whose invoice API times out once, then succeeds",
        "order_flow",
        {
            "customer": "ada@example.com",
            "amount": 120,
            "simulate": {"flaky": {"create_invoice": 1}},
        },
        SagaState.COMPLETED,
    ),
    Scenario(
        "provisioning that fails at its last step and is undone in reverse order",
        "provision_agent",
        {"agent": "agent-43", "simulate": {"fail": "inject_credentials"}},
        SagaState.COMPENSATED,
    ),
    Scenario(
        "provisioning whose undo of the roles keeps failing: a human is needed",
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
        imports=("tasks.provisioning", "tasks.orders"),
        queue="sagaq-demo",
        retries=2,
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
        runtime = Runtime(settings)
        try:
            with embedded_worker(runtime.app, concurrency=2):
                ids = [runtime.engine.enqueue(s.saga, s.input) for s in SCENARIOS]
                _wait(runtime, ids, timeout)
            return [(s, story(runtime.store, i)) for s, i in zip(SCENARIOS, ids, strict=True)]
        finally:
            runtime.close()


def _wait(runtime: Runtime, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(runtime.store.get_saga_or_raise(i).state in SETTLED for i in ids):
            return
        time.sleep(0.02)
    raise TimeoutError(f"the demo sagas did not settle within {timeout:g}s")

"""``sagaq demo``: the examples of ``tasks/`` on an embedded default, no server to install.

The wheel ships ``tasks/`` as ``sagaq.examples`` (never as a top-level ``tasks``, Celery's
conventional module name), so the demo runs beside a user's own ``tasks.py``.

The embedded PostgreSQL (:mod:`sagaq.embedded`; or the database the caller names), Celery's
in-process broker, a real Celery worker in a thread, and the same engine, store and tasks as
production (never eager mode). Pages go to the log notifier. The sagas stay in the database
after the demo: ``sagaq show ID`` finds them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from sagaq.commands import Story, story
from sagaq.machine import SagaState
from sagaq.notify.log import LogNotifier
from sagaq.runtime import Runtime
from sagaq.secrets import new_key
from sagaq.settings import Settings
from sagaq.store.database import upgrade

SETTLED = {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN, SagaState.RESOLVED}


@dataclass(frozen=True)
class Scenario:
    title: str
    saga: str
    input: dict[str, Any]
    expect: SagaState
    approve: bool | None = None  # the scripted approver's answer, if the policy asks one


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
        "offboarding: deleting the workspace needs a human, who approves after a pause",
        "offboard_agent",
        {"agent": "agent-45"},
        SagaState.COMPLETED,
        approve=True,
    ),
    Scenario(
        "offboarding: the human denies the delete, so the saga rolls back",
        "offboard_agent",
        {"agent": "agent-46"},
        SagaState.COMPENSATED,
        approve=False,
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


def demo_settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url="memory://localhost/",
        # The examples ship inside sagaq: a user's own tasks.py must not shadow them.
        imports=tuple(f"sagaq.examples.{m}" for m in (
            "provisioning", "orders", "triage", "subscription", "offboarding")),
        env="production",
        # A throwaway key: nothing reads the demo's sealed tokens after it (`sagaq show`
        # prints a sealed value as redacted, without opening it).
        secret_key=new_key(),
        policy_file=str(files("sagaq.examples").joinpath("policy.yaml")),
        queue="sagaq-demo",
        retries=2,
        retryable_retries=3,
        reprompts=1,
        compensation_retries=2,
        retry_base=0.05,
        retry_cap=0.2,
    )


def run(database_url: str, *, timeout: float = 60.0) -> list[tuple[Scenario, Story]]:
    """Run every scenario to a settled state on the database (migrated to head first);
    returns each with its story. Other sagas in the database are left alone."""
    from sagaq.worker import embedded_worker

    settings = demo_settings(database_url)
    upgrade(settings.database_url)
    runtime = Runtime(settings, notifiers=[LogNotifier()])
    try:
        with embedded_worker(runtime.app, concurrency=2):
            ids = [runtime.engine.enqueue(s.saga, s.input) for s in SCENARIOS]
            _approver(runtime, dict(zip(ids, SCENARIOS, strict=True)), timeout)
            _wait(runtime, ids, timeout)
        return [(s, story(runtime.store, i)) for s, i in zip(SCENARIOS, ids, strict=True)]
    finally:
        runtime.close()


def _approver(runtime: Runtime, plan: dict[str, Scenario], timeout: float) -> None:
    """A scripted human: answers each approval request after a pause, as planned."""
    from sagaq.commands import decide

    waiting = {i for i, s in plan.items() if s.approve is not None}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for request in runtime.store.approvals(status="pending"):
            if request.saga_id in waiting:
                time.sleep(0.3)  # the human reads the request
                yes = bool(plan[request.saga_id].approve)
                decide(runtime, request.id, approve=yes, by="demo-approver",
                       note="looks right" if yes else "not this one: the agent is still in use")
                waiting.discard(request.saga_id)
        time.sleep(0.05)


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

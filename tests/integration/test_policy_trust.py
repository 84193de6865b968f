"""Who may dispatch, and under which policy (issue 13, items 5 and 8).

Every process that dispatches must gate with the workers' policy: workers record the policy
they loaded, and a CLI process without it (or under another env) is refused before it writes
anything. Approval ids are matched literally, with the same minimum prefix as ``show``; the
names sagaq records for itself cannot be borrowed; who requested a step is recorded.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sagaq import Runtime, SagaState, Settings, commands
from sagaq.errors import ConfigurationError, InputError, UnknownSagaError
from sagaq.notify import LogNotifier
from sagaq.worker import embedded_worker
from tests.acceptance.test_cli import cli, env_for
from tests.integration.test_policy_gate import ASK_S3, FAIL_S4, pending, wait_state

DENY_UNDO_S2 = """
version: v1
rules:
  - id: keep-s2-in-place
    when: {saga: quad, step: s2, direction: compensate}
    decision: deny
"""


@pytest.fixture
def own_settings(settings: Settings, make_database, redis_prefix: str) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return settings.with_(
        database_url=make_database(f"trust_{tag}"),
        env="production",
        queue=f"{settings.queue}-trust-{tag}",
        redis_prefix=f"{redis_prefix}trust-{tag}:",
    )


@pytest.fixture
def runtimes(own_settings: Settings, tmp_path) -> Iterator[Callable[..., Runtime]]:
    made: list[Runtime] = []

    def make(policy_text: str | None, **overrides: Any) -> Runtime:
        changes: dict[str, Any] = dict(overrides)
        if policy_text is not None:
            path = tmp_path / f"policy-{len(made)}.yaml"
            path.write_text(textwrap.dedent(policy_text))
            changes["policy_file"] = str(path)
        rt = Runtime(own_settings.with_(**changes), notifiers=[LogNotifier()])
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def worker(rt: Runtime) -> Any:
    return embedded_worker(rt.app, concurrency=2, hostname="trust@test")


# -- item 5: the same policy in every process that dispatches ---------------------------------


def test_a_worker_records_the_policy_it_loaded(runtimes) -> None:
    rt = runtimes(DENY_UNDO_S2, env=" Production ")
    assert rt.store.current_policy() is None
    with worker(rt):
        pass
    current = rt.store.current_policy()
    assert current is not None
    assert (current.policy, current.env) == (rt.policy.label, "production")
    assert current.fingerprint == rt.policy_fingerprint == f"{rt.policy.label} env=production"
    assert current.worker == "trust@test" and current.source == rt.settings.policy_file


def test_a_retry_from_a_process_without_the_policy_is_refused_and_writes_nothing(
    runtimes,
) -> None:
    rt = runtimes(DENY_UNDO_S2)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", FAIL_S4)
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
    before = (len(rt.store.events(saga_id)), len(rt.store.step_runs(saga_id)))

    bare = runtimes(None)  # a shell without SAGAQ_POLICY_FILE
    with pytest.raises(ConfigurationError, match="SAGAQ_POLICY_FILE and SAGAQ_ENV") as caught:
        commands.retry(bare, saga_id, by="alice")
    assert rt.policy.label in caught.value.message and "nothing was done" in caught.value.message
    other_env = runtimes(DENY_UNDO_S2, env="staging")  # the same file, another env
    with pytest.raises(ConfigurationError, match="env=production"):
        commands.retry(other_env, saga_id, by="alice")
    assert (len(rt.store.events(saga_id)), len(rt.store.step_runs(saga_id))) == before
    assert rt.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN

    # the same policy, the env written another way: gated, denied again, pages again
    same = runtimes(DENY_UNDO_S2, env="PRODUCTION ")
    with worker(rt):
        commands.retry(same, saga_id, by="alice")
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
    verdicts = [e for e in rt.store.events(saga_id) if e.kind == "policy.verdict"
                and e.step == "s2" and e.data["direction"] == "compensate"]
    assert [v.data["decision"] for v in verdicts] == ["deny", "deny"]


def test_the_cli_refuses_in_one_line(runtimes, own_settings) -> None:
    rt = runtimes(ASK_S3)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
    request = pending(rt, saga_id)
    for args in (("approve", request.id, "--by", "alice"), ("enqueue", "quad"),
                 ("reconcile", "--once")):
        done = cli(*args, env=env_for(own_settings))
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert "SAGAQ_POLICY_FILE" in line and "Traceback" not in done.stderr
    assert pending(rt, saga_id).status == "pending"
    assert len(rt.store.list_sagas(limit=10)) == 1


# -- item 8: approvals matched literally, names sagaq keeps for itself ------------------------


def test_an_approval_is_found_by_a_literal_prefix_of_four_or_more(runtimes) -> None:
    rt = runtimes(ASK_S3)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(rt, saga_id)
        for ref in ("______", "____", "%", "%%%%%%", request.id[:3], request.id[:2] + "__"):
            with pytest.raises(UnknownSagaError, match="no approval request"):
                commands.decide(rt, ref, approve=True, by="mallory")
        with pytest.raises(UnknownSagaError):  # the same literal match for saga ids
            commands.story(rt.store, "________")
        assert pending(rt, saga_id).id == request.id

        for by in ("reconciler", " Sagaq ", "SAGAQ", "x" * 201, "  "):
            with pytest.raises(InputError, match="--by"):
                commands.decide(rt, request.id, approve=False, by=by)
        assert pending(rt, saga_id).id == request.id  # nothing decided

        decided = commands.decide(rt, request.id[:4], approve=True, by="x" * 200)
        assert decided.status == "approved" and decided.decided_by == "x" * 200
        wait_state(rt, saga_id, SagaState.COMPLETED)
    # who requested it: the worker whose completion of s2 dispatched s3
    (s2,) = [r for r in rt.store.step_runs(saga_id) if r.step == "s2"]
    assert decided.requested_by is not None and decided.requested_by == s2.worker


def test_a_reserved_or_overlong_by_is_one_clean_line(runtimes, own_settings) -> None:
    rt = runtimes(ASK_S3)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
    request = pending(rt, saga_id)
    env = {**env_for(own_settings), "SAGAQ_POLICY_FILE": rt.settings.policy_file,
           "SAGAQ_ENV": "production"}
    for by, needle in (("reconciler", "reserved"), ("y" * 300, "at most 200")):
        done = cli("approve", "______", "--by", by, env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert needle in line, line
    assert pending(rt, saga_id).id == request.id


# -- item 9: every notification its own id, in the signed webhook body -----------------------


def test_notices_of_one_incident_each_have_their_own_id_in_the_signed_body(runtimes) -> None:
    from sagaq.notify.delivery import build_notice
    from sagaq.notify.http import encode_json
    from sagaq.notify.webhook import notice_to_dict, sign, verify_signature

    rt = runtimes(ASK_S3)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        commands.decide(rt, pending(rt, saga_id).id, approve=False, by="bob")
        wait_state(rt, saga_id, SagaState.COMPENSATED)
    notes = [n for n in rt.store.notifications(saga_id) if n.channel == "log"]
    assert len(notes) == 2  # "approval needed", then "rolling back"
    notices = [build_notice(rt.store, n) for n in notes]
    # the same incident and action: the old advice (dedup_key + action) would drop one
    assert len({(x.dedup_key, x.action) for x in notices}) == 1
    ids = [x.id for x in notices]
    assert len(set(ids)) == 2 and all(i.startswith(f"sagaq/{saga_id}/") for i in ids)
    assert build_notice(rt.store, notes[0]).id == ids[0]  # stable: a retry carries it again
    body = encode_json(notice_to_dict(notices[0]))
    assert json.loads(body)["id"] == ids[0]
    forged = body.replace(ids[0].encode(), ids[1].encode())
    assert not verify_signature("whsec-x", forged, sign("whsec-x", body))

"""Secrets through the engine: encoded leaks redacted, a key rotated away pages at once,
a step's own ``{"$secret": ...}`` survives. Real worker, real Postgres, real Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sagaq import SagaState
from sagaq.secrets import SecretBox, new_key


def everything(runtime: Any, saga_id: str) -> str:
    """Every place a sink (Slack, PagerDuty, webhook, show) reads the saga's text from."""
    return json.dumps([
        [r.error for r in runtime.store.step_runs(saga_id)],
        [(e.message, e.data) for e in runtime.store.events(saga_id)],
        [(n.subject, n.note, n.last_error) for n in runtime.store.notifications(saga_id)],
        runtime.store.get_saga_or_raise(saga_id).error,
    ], default=str)


@pytest.mark.parametrize("form", ["url", "basic"])
def test_a_secret_quoted_url_encoded_or_in_basic_auth_is_stored_redacted(
    runtime, worker, wait_settled, form
):
    saga_id = runtime.engine.enqueue("leaky_secret", {"form": form})
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]
    (failed,) = [r for r in runtime.store.step_runs(saga_id) if r.step == "use_token"]
    assert failed.error is not None and "401 Unauthorized" in failed.error and "***" in failed.error
    stored = everything(runtime, saga_id)
    assert "s3cr3t" not in stored  # neither the clear value nor any encoding of it
    assert "c3ZjOnRvay" not in stored  # base64 of "svc:tok..."


class _Rotated(SecretBox):
    """Seals under the old key, opens with a new one only: the key changed mid-saga."""

    def __init__(self, old: SecretBox, new: SecretBox) -> None:
        self._old, self._new = old, new

    def seal(self, value: Any) -> Any:
        return self._old.seal(value)

    def open(self, value: Any) -> Any:
        return self._new.open(value)


def test_a_key_changed_mid_saga_pages_at_once_naming_the_variable(
    runtime, worker, wait_settled
):
    box = runtime.engine.box
    runtime.engine.box = _Rotated(box, SecretBox(new_key()))
    try:
        started = time.monotonic()
        saga_id = runtime.engine.enqueue("leaky_secret", {})
        # a page, not a lapsed lease (20 s + 2 s here) read as a crash
        assert wait_settled(saga_id, timeout=10) == [SagaState.NEEDS_HUMAN]
        assert time.monotonic() - started < 10
    finally:
        runtime.engine.box = box
    saga = runtime.store.get_saga_or_raise(saga_id)
    assert saga.error is not None and "SAGAQ_SECRET_KEY" in saga.error, saga.error
    (run,) = [r for r in runtime.store.step_runs(saga_id) if r.step == "use_token"]
    assert run.error_type == "SecretsUnreadable" and "NEW,OLD" in (run.error or "")
    assert "killed" not in everything(runtime, saga_id)
    assert [n for n in runtime.store.notifications(saga_id) if n.kind == "page"]


def test_a_result_that_looks_like_a_sealed_value_comes_back_unchanged(
    runtime, worker, wait_settled
):
    saga_id = runtime.engine.enqueue("marked_result", {})
    assert wait_settled(saga_id) == [SagaState.COMPLETED], everything(runtime, saga_id)

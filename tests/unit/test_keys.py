"""Idempotency keys: structural, stable, different per direction, saga and step."""

from __future__ import annotations

import hashlib
import re

import pytest

from sagaq.keys import idempotency_key, release_key
from sagaq.machine import Direction

SAGA_ID = "0b5e4c1e-2f4a-4d3e-9a51-6f3f1b0c2d7e"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("saga_id", "step"),
    [(SAGA_ID, "create_identity"), ("s-1", "charge"), ("x", "a")],
)
def test_forward_key_is_sha256_of_saga_step_step(saga_id: str, step: str) -> None:
    expected = sha(f"{saga_id}:{step}:{step}")
    assert idempotency_key(saga_id, step) == expected
    assert idempotency_key(saga_id, step, Direction.FORWARD) == expected
    assert idempotency_key(saga_id, step, "forward") == expected


@pytest.mark.parametrize(
    ("saga_id", "step"),
    [(SAGA_ID, "create_identity"), ("s-1", "charge"), ("x", "a")],
)
def test_compensate_key_is_sha256_of_saga_step_step_compensate(saga_id: str, step: str) -> None:
    expected = sha(f"{saga_id}:{step}:{step}:compensate")
    assert idempotency_key(saga_id, step, Direction.COMPENSATE) == expected
    assert idempotency_key(saga_id, step, "compensate") == expected


def test_known_values() -> None:
    # Pinned: changing the derivation would re-run effects of in-flight sagas after a deploy.
    assert idempotency_key("s-1", "charge") == (
        "06d32919bc117a7385f92aef3cb17262301d140066b94a6691cc993294804902"
    )
    assert idempotency_key("s-1", "charge", Direction.COMPENSATE) == (
        "9b68a63fe0ea93e2e6a528d52107ffd931e57d191173baea9d1644b40c413b04"
    )


def test_forward_differs_from_compensate() -> None:
    assert idempotency_key(SAGA_ID, "a") != idempotency_key(SAGA_ID, "a", Direction.COMPENSATE)


def test_differs_across_saga_ids_and_steps() -> None:
    keys = {
        idempotency_key(saga_id, step, direction)
        for saga_id in (SAGA_ID, "s-1", "s-2")
        for step in ("a", "b", "charge")
        for direction in Direction
    }
    assert len(keys) == 3 * 3 * 2


def test_stable() -> None:
    assert idempotency_key(SAGA_ID, "a") == idempotency_key(SAGA_ID, "a")
    assert idempotency_key(SAGA_ID, "a", "compensate") == idempotency_key(
        SAGA_ID, "a", Direction.COMPENSATE
    )


@pytest.mark.parametrize("direction", list(Direction))
def test_is_64_lowercase_hex(direction: Direction) -> None:
    key = idempotency_key(SAGA_ID, "create_identity", direction)
    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_unknown_direction_is_rejected() -> None:
    with pytest.raises(ValueError, match="'sideways' is not a valid Direction"):
        idempotency_key(SAGA_ID, "a", "sideways")


def test_release_key_is_the_documented_hash_and_differs_per_resource() -> None:
    expected = hashlib.sha256(b"s-1:resource:vm:i-42:release").hexdigest()
    assert release_key("s-1", "vm", "i-42") == expected
    assert release_key("s-1", "vm", "i-43") != expected
    assert release_key("s-1", "ip", "i-42") != expected

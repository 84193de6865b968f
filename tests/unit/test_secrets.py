"""Secrets: sealed at rest, whole again for the steps, redacted everywhere else."""

from __future__ import annotations

import json

import pytest

from sagaq import ConfigurationError, Secret
from sagaq.secrets import MARK, REDACTED, SecretBox, masked, new_key, redact, revealed

KEY = new_key()


def test_a_secret_never_prints_its_value() -> None:
    s = Secret("hunter2-token")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.reveal() == "hunter2-token"
    assert s == Secret("hunter2-token") and s != Secret("other") and s != "hunter2-token"
    with pytest.raises(TypeError):
        Secret(42)  # type: ignore[arg-type]


def test_seal_then_open_gives_the_same_values_back() -> None:
    box = SecretBox(KEY)
    value = {"id": "cred-1", "token": Secret("tok-abc123"), "list": [Secret("x-1234"), 3]}
    sealed = box.seal(value)
    text = json.dumps(sealed)
    assert "tok-abc123" not in text and "x-1234" not in text
    assert set(sealed["token"]) == {MARK} and sealed["id"] == "cred-1"
    assert box.open(json.loads(text)) == value


def test_another_key_cannot_open_it() -> None:
    from cryptography.fernet import InvalidToken

    sealed = SecretBox(KEY).seal({"t": Secret("tok-abc123")})
    with pytest.raises(InvalidToken):
        SecretBox(new_key()).open(sealed)


def test_a_secret_without_a_key_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match=r"SAGAQ_SECRET_KEY is not set.*keygen"):
        SecretBox(None).seal({"t": Secret("tok-abc123")})
    # and values without secrets need no key
    assert SecretBox(None).seal({"a": [1, "b"]}) == {"a": [1, "b"]}


def test_a_malformed_key_is_named() -> None:
    with pytest.raises(ConfigurationError, match="SAGAQ_SECRET_KEY is not a Fernet key"):
        SecretBox("not-a-key")


def test_redaction_of_messages_and_of_what_is_shown() -> None:
    values = revealed({"a": Secret("tok-abc123"), "b": [Secret("pw-9876")], "c": "plain"})
    assert sorted(values) == ["pw-9876", "tok-abc123"]
    message = "401 for Bearer tok-abc123 (password pw-9876)"
    assert redact(message, values) == f"401 for Bearer {REDACTED} (password {REDACTED})"
    assert redact("id 12", ["12"]) == "id 12"  # too short to be a secret worth hiding
    sealed = SecretBox(KEY).seal({"token": Secret("tok-abc123"), "n": 1})
    assert masked(sealed) == {"token": REDACTED, "n": 1}


def test_revealed_finds_secrets_inside_read_only_mappings() -> None:
    from types import MappingProxyType

    results = MappingProxyType(
        {"issue": {"token": Secret("tok-123456")}, "n": [Secret("pw-98765")]}
    )
    assert sorted(revealed([results, None])) == ["pw-98765", "tok-123456"]

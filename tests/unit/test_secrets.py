"""Secrets: sealed at rest, whole again for the steps, redacted everywhere else."""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from sagaq import ConfigurationError, Secret
from sagaq.secrets import (
    LITERAL,
    MARK,
    REDACTED,
    SecretBox,
    SecretsUnreadable,
    masked,
    new_key,
    redact,
    revealed,
)

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
    with pytest.raises(SecretsUnreadable):  # named, not a raw InvalidToken
        SecretBox(new_key()).open(sealed)
    assert not issubclass(SecretsUnreadable, InvalidToken)


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
    sealed = SecretBox(KEY).seal({"token": Secret("tok-abc123"), "n": 1})
    assert masked(sealed) == {"token": REDACTED, "n": 1}


def test_revealed_finds_secrets_inside_read_only_mappings() -> None:
    from types import MappingProxyType

    results = MappingProxyType(
        {"issue": {"token": Secret("tok-123456")}, "n": [Secret("pw-98765")]}
    )
    assert sorted(revealed([results, None])) == ["pw-98765", "tok-123456"]


# -- issue 13, item 2: the usual encodings of a secret are redacted too ---------------------

PW = "Zx9/k+Q=s3cr3t&pw"


def b64(raw: str, alphabet: str = "std", pad: bool = True) -> str:
    enc = (base64.b64encode if alphabet == "std" else base64.urlsafe_b64encode)(raw.encode())
    text = enc.decode()
    return text if pad else text.rstrip("=")


@pytest.mark.parametrize(
    "shown",
    [
        PW,
        quote(PW, safe=""),
        quote(PW),  # keeps "/"
        quote_plus(PW),
        re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(PW, safe="")),  # %2f
        json.dumps(PW)[1:-1].replace("/", "\\/"),  # as a JSON body escapes it
        b64(PW),
        b64(PW, pad=False),
        b64(PW, "url"),
        b64(PW, "url", pad=False),
        b64(f"svc:{PW}"),  # HTTP Basic, any user name
        b64(f"svc-account:{PW}"),
        b64(f"ab:{PW}", "url", pad=False),
        b64(f'{{"user": "x", "token": "{PW}", "n": 12345}}'),  # inside a longer payload
    ],
)
def test_every_usual_encoding_of_a_secret_is_redacted(shown: str) -> None:
    message = f"HTTP 401 for token={shown} (Authorization: Basic {shown}) retrying"
    out = redact(message, [PW])
    assert shown not in out and REDACTED in out, out
    assert out.startswith("HTTP 401 for token=") and out.endswith(" retrying")


def test_the_issue_reproductions() -> None:
    out = redact("GET /x?token=Zx9%2Fk%2BQ%3Ds3cr3t%26pw failed", [PW])
    assert out == f"GET /x?token={REDACTED} failed"
    basic = b64(f"svc:{PW}")
    assert redact(f"sent Authorization: Basic {basic}", [PW]) == (
        f"sent Authorization: Basic {REDACTED}"
    )


def test_short_secrets_are_redacted_anyway() -> None:
    # Chosen: a secret shorter than 4 characters is still redacted, in every form (over-
    # redacting an error message costs a few characters; leaking a CVV costs more).
    assert redact("card declined: cvv 123", ["123"]) == f"card declined: cvv {REDACTED}"
    assert redact(f"Basic {b64('u:123')}", ["123"]) == f"Basic {REDACTED}"
    assert redact("pin 7", ["7"]) == f"pin {REDACTED}"
    assert redact("nothing to hide", [""]) == "nothing to hide"  # an empty secret hides nothing
    assert redact("nothing to hide", []) == "nothing to hide"


def test_overlapping_secrets_leave_no_part_of_either() -> None:
    assert redact("key abcdefgh end", ["abcd", "abcdefgh"]) == f"key {REDACTED} end"
    assert redact("key abcdefgh end", ["abcdefgh", "abcd"]) == f"key {REDACTED} end"
    # one secret overlapping the start of another: the union of both is hidden
    assert redact("x abcdefgh y", ["bcdefgh", "abcd"]) == f"x {REDACTED} y"
    assert redact("abcd and abcd", ["abcd"]) == f"{REDACTED} and {REDACTED}"
    assert redact("aaaa", ["aaa"]) == REDACTED  # overlapping occurrences of one secret


def test_text_that_merely_looks_encoded_is_left_alone() -> None:
    text = "step failed: HTTP 503 from https://api.example/v1/orders/ord_1234 (Retry-After 2)"
    assert redact(text, [PW, "hunter22"]) == text
    assert redact(f"Basic {b64('svc:other-password')}", [PW]) == (
        f"Basic {b64('svc:other-password')}"
    )


# -- issue 13, item 3: key rotation, unopenable values, the marker ---------------------------


def test_rotation_the_newest_key_seals_every_key_opens() -> None:
    old, new = new_key(), new_key()
    sealed_old = SecretBox(old).seal({"t": Secret("tok-old-1")})
    rotated = SecretBox(f"{new}, {old}")  # newest first; spaces are tolerated
    assert rotated.open(sealed_old) == {"t": Secret("tok-old-1")}
    sealed_new = rotated.seal({"t": Secret("tok-new-1")})
    assert SecretBox(new).open(sealed_new) == {"t": Secret("tok-new-1")}
    with pytest.raises(SecretsUnreadable):
        SecretBox(old).open(sealed_new)  # sealed with the newest key


def test_a_malformed_key_in_a_list_is_named_by_position() -> None:
    with pytest.raises(ConfigurationError, match=r"SAGAQ_SECRET_KEY: key 2 of 2 is not a Fernet"):
        SecretBox(f"{new_key()},nope")
    with pytest.raises(ConfigurationError, match=r"SAGAQ_SECRET_KEY: key 1 of 2 is empty"):
        SecretBox(f",{new_key()}")


def test_a_value_no_key_opens_is_a_clear_error_naming_the_variable() -> None:
    sealed = SecretBox(new_key()).seal({"t": Secret("tok-abc123")})
    with pytest.raises(SecretsUnreadable) as caught:
        SecretBox(new_key()).open(sealed)
    assert isinstance(caught.value, ConfigurationError)
    message = caught.value.message
    assert "SAGAQ_SECRET_KEY" in message and "old key" in message and "keygen" not in message
    with pytest.raises(SecretsUnreadable, match="SAGAQ_SECRET_KEY is not set"):
        SecretBox(None).open(sealed)
    with pytest.raises(SecretsUnreadable, match="SAGAQ_SECRET_KEY"):
        SecretBox(new_key()).open({MARK: "not-a-token"})


@pytest.mark.parametrize(
    "value",
    [
        {MARK: "looks like a sealed value"},
        {"nested": [{MARK: "x"}], "n": 1},
        {LITERAL: {MARK: "x"}},
        {LITERAL: "y"},
        {MARK: 42},
        [{MARK: "x"}, {"a": {MARK: "z"}}],
    ],
)
def test_a_result_that_holds_the_marker_comes_back_as_it_was(value: Any) -> None:
    for key in (KEY, None):
        box = SecretBox(key)
        assert box.open(json.loads(json.dumps(box.seal(value)))) == value
    sealed = SecretBox(KEY).seal({"mine": {MARK: "x"}, "real": Secret("tok-abc123")})
    opened = SecretBox(KEY).open(sealed)
    assert opened == {"mine": {MARK: "x"}, "real": Secret("tok-abc123")}
    assert masked(sealed) == {"mine": {MARK: "x"}, "real": REDACTED}


# -- exact messages and edges (the mutation score of sagaq/secrets.py) ------------------------


def test_the_messages_say_exactly_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"^a Secret holds text$"):
        Secret(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as caught:
        SecretBox("nope")
    assert caught.value.message == (
        "SAGAQ_SECRET_KEY is not a Fernet key (32 url-safe base64-encoded bytes); make one "
        "with `sagaq keygen`"
    )
    with pytest.raises(ConfigurationError) as caught:
        SecretBox(None).seal(Secret("tok-abc123"))
    assert caught.value.message == (
        "a step returned a Secret but SAGAQ_SECRET_KEY is not set; make one with "
        "`sagaq keygen`"
    )
    sealed = SecretBox(KEY).seal(Secret("tok-abc123"))
    with pytest.raises(SecretsUnreadable) as caught:
        SecretBox(None).open(sealed)
    assert caught.value.message == (
        "a stored secret cannot be read: SAGAQ_SECRET_KEY is not set in this process"
    )
    with pytest.raises(SecretsUnreadable) as caught:
        SecretBox(new_key()).open(sealed)
    assert caught.value.message == (
        "a stored secret opens with no key in SAGAQ_SECRET_KEY: was the key changed "
        "while sagas were in flight? Put the old key back after the new one "
        "(SAGAQ_SECRET_KEY=NEW,OLD) and retry the saga"
    )


def test_equal_secrets_hash_alike_and_different_ones_apart() -> None:
    assert hash(Secret("tok-1")) == hash(Secret("tok-1"))
    assert hash(Secret("tok-1")) != hash(Secret("tok-2"))
    assert len({Secret("tok-1"), Secret("tok-1"), Secret("tok-2")}) == 2


def test_a_space_may_be_a_plus_and_only_a_space() -> None:
    assert redact(f"q={quote_plus('open sesame')}", ["open sesame"]) == f"q={REDACTED}"
    assert redact("x+y and x y", ["xzy"]) == "x+y and x y"  # + stands for a space only
    assert redact("p%C3%A9-pw", ["pé-pw"]) == REDACTED  # a character of several bytes


def embedded(payload: str) -> str:
    """base64 inside a longer run of base64 characters, not on a 4-character boundary, so
    that decoding the run as one token does not reveal it (a path, a blob)."""
    return f"GET /v1/x{b64(payload)}/y failed"


@pytest.mark.parametrize("lead", ["", "a", "ab"])  # the 3 alignments of the secret
@pytest.mark.parametrize("tail", ["", "--more-bytes"])
def test_base64_found_in_any_alignment_with_anything_after_it(lead: str, tail: str) -> None:
    for secret in (PW, "abcdef"):
        encoded = b64(lead + secret + tail)
        out = redact(embedded(lead + secret + tail), [secret])
        left = [encoded[i : i + 5] for i in range(len(encoded) - 4) if encoded[i : i + 5] in out]
        assert not left and REDACTED in out, (secret, out)


def test_a_core_of_exactly_four_characters_counts() -> None:
    assert "MTIz" not in redact(embedded("123--tail"), ["123"])


def test_tokens_that_do_not_decode_are_left_alone() -> None:
    assert redact("abcde fghij", ["XX"]) == "abcde fghij"  # 5 characters: not base64
    assert redact(f"Basic {b64('u:123')}==", ["123"]) == f"Basic {REDACTED}"  # over-padded


def test_adjacent_occurrences_are_one_redaction() -> None:
    assert redact("abcdabcd", ["abcd"]) == REDACTED
    assert redact("abcd-abcd", ["abcd"]) == f"{REDACTED}-{REDACTED}"


def test_masked_goes_into_lists() -> None:
    sealed = SecretBox(KEY).seal([Secret("tok-abc123"), 1, {"a": Secret("tok-xyz987")}])
    assert masked(sealed) == [REDACTED, 1, {"a": REDACTED}]

"""Generic webhook: the whole notice as JSON, signed with HMAC-SHA256 over the exact body bytes.

How a receiver verifies a delivery::

    expected = "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, request.headers["X-Sagaq-Signature"])

``raw_body`` must be the bytes as received, before any JSON parsing or re-encoding
(:func:`verify_signature` does exactly this).

**What to dedupe on.** Delivery is at-least-once (the outbox retries), so a receiver must treat
notices as idempotent by their ``id``: every notification has its own, the same on every retry
of its delivery, and it is in the signed body. Do not dedupe on ``dedup_key`` + ``action``:
``dedup_key`` names the *incident*, which several notices share (the "rolling back" notice and
an "approval needed" request, two successive approval requests), and deduping on it drops
them. Group by ``dedup_key`` instead, to thread the notices of one incident together.

There is deliberately no timestamp in the signed material: a replayed body can only repeat a
notice already seen (same ``id``). Receivers that want freshness can check ``created_at`` in
the body, which is covered by the signature.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import httpx

from sagaq.notify.base import Kind, Notice
from sagaq.notify.http import DEFAULT_TIMEOUT, encode_json, iso_utc, post_bytes, safe_origin

SIGNATURE_HEADER = "X-Sagaq-Signature"
SIGNATURE_PREFIX = "sha256="


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Sagaq-Signature`` value for ``body``: ``sha256=`` + hex HMAC-SHA256."""
    return SIGNATURE_PREFIX + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """True iff ``header`` is the signature of exactly ``body`` under ``secret`` (constant time)."""
    if not isinstance(header, str) or not header.startswith(SIGNATURE_PREFIX):
        return False
    expected = sign(secret, body).encode("ascii")
    try:
        given = header.strip().lower().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected, given)


def notice_to_dict(notice: Notice) -> dict[str, Any]:
    """The notice as plain JSON values: the webhook body, and a stable shape for receivers."""
    return {
        "id": notice.id,  # what a receiver dedupes on (see the module's docstring)
        "saga_id": notice.saga_id,
        "saga_name": notice.saga_name,
        "kind": notice.kind.value,
        "action": notice.action.value,
        "dedup_key": notice.dedup_key,
        "summary": notice.summary,
        "severity": notice.severity,
        "created_at": iso_utc(notice.created_at),
        "state": notice.state,
        "details": dict(notice.details),
        "commands": list(notice.commands),
        "note": notice.note,
    }


class WebhookNotifier:
    """POSTs every notice (pages and notifies) to one URL, signed with a shared secret."""

    name: str = "webhook"
    kinds: frozenset[Kind] = frozenset({Kind.PAGE, Kind.NOTIFY})

    def __init__(
        self,
        url: str,
        secret: str | bytes,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = url
        self._secret = secret
        self.timeout = timeout
        self.client = client

    def __repr__(self) -> str:  # never the secret, never the full URL (it may carry a token)
        return f"WebhookNotifier(url={safe_origin(self.url)!r}, secret=***)"

    def send(self, notice: Notice) -> None:
        body = encode_json(notice_to_dict(notice))
        secret = self._secret
        post_bytes(
            self.url,
            body,
            headers={SIGNATURE_HEADER: sign(secret, body)},
            timeout=self.timeout,
            client=self.client,
            channel=self.name,
            secrets=(secret,) if isinstance(secret, str) else (),
        )

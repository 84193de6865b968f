"""PagerDuty Events API v2: level-4 pages open an incident; ``sagaq resolve`` closes it.

One incident, one alert: every trigger and the resolve carry the notice's ``dedup_key`` and go
through the same routing key, which is how PagerDuty correlates them. PagerDuty answers 202
when it accepted the event, 400 for an invalid one (not retried), 429 and 5xx when it should be
retried later; :mod:`sagaq.notify.http` maps those. The routing key is a credential: it is in
the request body only, never in an error, a log line or ``repr``.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import httpx

from sagaq.notify.base import (
    FAILED_COMPENSATION,
    FAILED_STEP,
    LINKS,
    TIMELINE,
    UNCOMPENSATED,
    Action,
    DeliveryError,
    Kind,
    Notice,
    failure_in,
)
from sagaq.notify.http import (
    DEFAULT_TIMEOUT,
    encode_json,
    iso_utc,
    notice_links,
    post_bytes,
    safe_origin,
)

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
SEVERITIES = frozenset({"critical", "error", "warning", "info"})
DEDUP_KEY_MAX = 255  # PagerDuty's limit
SUMMARY_MAX = 1024  # PagerDuty's limit
BODY_MAX = 500_000  # bytes; PagerDuty refuses events over 512 KB, keep a margin
_HASH_LEN = 64  # sha256 hex
_PREFIX_LEN = DEDUP_KEY_MAX - _HASH_LEN - 1


def pagerduty_dedup_key(key: str) -> str:
    """``key`` itself when it fits in 255 characters, else a deterministic 255-character form.

    A long key becomes its first 190 characters, ``~``, and the SHA-256 hex of the whole key:
    still readable, still unique per incident, and identical for the trigger and the resolve.
    (Refusing would be worse: a page that can never be delivered.) An empty key is refused,
    because PagerDuty would then open a new incident on every redelivery.
    """
    if not key:
        raise DeliveryError("pagerduty: notice has an empty dedup_key", retryable=False)
    if len(key) <= DEDUP_KEY_MAX:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{key[:_PREFIX_LEN]}~{digest}"


def _severity(notice: Notice) -> str:
    severity = notice.severity.lower().strip()
    if severity in SEVERITIES:
        return severity
    return "critical" if notice.kind is Kind.PAGE else "warning"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _small(event: object) -> object:
    """A timeline event with every value clipped, keeping its shape."""
    if isinstance(event, dict):
        return {str(k): v if v is None else _clip(str(v), 500) for k, v in event.items()}
    return _clip(str(event), 500)


def _custom_details(notice: Notice, *, compact: bool = False) -> dict[str, Any]:
    """``details`` plus what a responder needs to act; fixed keys win over same-named details."""
    if compact:  # the full details would exceed PagerDuty's size limit: keep what matters
        details: dict[str, Any] = {"truncated": True}
        for key in (FAILED_COMPENSATION, FAILED_STEP):
            failure = failure_in(notice.details, key)
            if failure is not None:
                details[key] = {
                    "step": _clip(failure.step, 200),
                    "error": _clip(failure.error or "", 2000),
                    "attempt": failure.attempt,
                }
        uncompensated = notice.details.get(UNCOMPENSATED)
        if isinstance(uncompensated, list | tuple):
            details[UNCOMPENSATED] = [_clip(str(s), 200) for s in uncompensated[:50]]
        events = notice.details.get(TIMELINE) or []
        if isinstance(events, list | tuple):
            details[TIMELINE] = [_small(e) for e in list(events)[-10:]]
    else:
        details = {k: v for k, v in notice.details.items() if k != LINKS}
    details.update(
        saga_id=notice.saga_id,
        saga_name=notice.saga_name,
        state=notice.state,
        commands=list(notice.commands),
    )
    return details


def trigger_event(
    notice: Notice, routing_key: str, *, source: str, link_template: str | None = None
) -> dict[str, Any]:
    """The Events API v2 ``trigger`` body for a page."""
    if failure_in(notice.details, FAILED_COMPENSATION):
        event_class = "compensation_failed"
    elif failure_in(notice.details, FAILED_STEP):
        event_class = "step_failed_after_pivot"
    else:
        event_class = "needs_human"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": pagerduty_dedup_key(notice.dedup_key),
        "payload": {
            "summary": _clip(" ".join(notice.summary.split()) or notice.saga_id, SUMMARY_MAX),
            "source": source,
            "severity": _severity(notice),
            "timestamp": iso_utc(notice.created_at),
            "component": "sagaq",
            "group": notice.saga_name,
            "class": event_class,
            "custom_details": _custom_details(notice),
        },
        "links": notice_links(notice, link_template),
    }


def resolve_event(notice: Notice, routing_key: str) -> dict[str, Any]:
    """The Events API v2 ``resolve`` body: same routing key and dedup key as the trigger."""
    return {
        "routing_key": routing_key,
        "event_action": "resolve",
        "dedup_key": pagerduty_dedup_key(notice.dedup_key),
    }


class PagerDutyNotifier:
    """Sends pages (only pages: a notify must not wake anyone) to a PagerDuty service."""

    name: str = "pagerduty"
    kinds: frozenset[Kind] = frozenset({Kind.PAGE})

    def __init__(
        self,
        routing_key: str,
        url: str = EVENTS_URL,
        source: str | None = None,
        *,
        link_template: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        self._routing_key = routing_key
        self.url = url
        self.source = source or socket.gethostname() or "sagaq"
        self.link_template = link_template
        self.timeout = timeout
        self.client = client

    def __repr__(self) -> str:
        return (
            f"PagerDutyNotifier(url={safe_origin(self.url)!r}, source={self.source!r}, "
            "routing_key=***)"
        )

    def event(self, notice: Notice) -> dict[str, Any]:
        """The body this notifier would send for ``notice``."""
        if notice.action is Action.RESOLVE:
            return resolve_event(notice, self._routing_key)
        return trigger_event(
            notice, self._routing_key, source=self.source, link_template=self.link_template
        )

    def send(self, notice: Notice) -> None:
        if notice.kind not in self.kinds:  # routing is the caller's job; never page on a notify
            return
        event = self.event(notice)
        body = encode_json(event)
        if len(body) > BODY_MAX and "payload" in event:
            event["payload"]["custom_details"] = _custom_details(notice, compact=True)
            body = encode_json(event)
        post_bytes(
            self.url,
            body,
            timeout=self.timeout,
            client=self.client,
            channel=self.name,
            secrets=(self._routing_key,),
        )

"""What a notification says, and the interface every notifier implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sagaq.errors import SagaqError
from sagaq.kinds import Action as Action  # below the store, which writes them
from sagaq.kinds import Kind as Kind


@dataclass(frozen=True)
class Notice:
    """One notification, built from the store when it is delivered. Nothing secret in it."""

    saga_id: str
    saga_name: str
    kind: Kind
    action: Action
    dedup_key: str  # stable per incident, <= 255 characters
    summary: str  # one line
    severity: str  # "critical" for pages, "warning" / "info" otherwise
    created_at: datetime
    state: str  # the saga's state when the notice was built
    details: dict[str, Any] = field(default_factory=dict)
    commands: tuple[str, ...] = ()  # the exact commands to act on it
    note: str | None = None  # e.g. the operator's note on resolve
    # This notification's own id, the same on every retry of its delivery: what a receiver
    # dedupes on. (``dedup_key`` names the incident, which several notices share.)
    id: str = ""


# Well-known ``Notice.details`` keys: notifiers render these specially; any other key is passed
# through as is (PagerDuty custom_details, webhook body) and must be JSON-safe and not secret.
FAILED_COMPENSATION = "failed_compensation"  # {"step", "error", "attempt"} (or a step name)
FAILED_STEP = "failed_step"  # same shape: a forward step that failed after the pivot
UNCOMPENSATED = "uncompensated"  # list[str]: steps still not compensated
TIMELINE = "timeline"  # list of {"at", "event", "step", "detail"} (or str), oldest first
LINKS = "links"  # list of {"href": http(s) URL, "text": str} for the responder


@dataclass(frozen=True)
class Failure:
    """A failed step or compensation as read from ``details`` (either accepted shape)."""

    step: str
    error: str | None = None
    attempt: int | None = None


def failure_in(details: dict[str, Any], key: str) -> Failure | None:
    """The :class:`Failure` under ``key``, from a dict or a bare step name; None if absent."""
    value = details.get(key)
    if isinstance(value, str) and value:
        return Failure(value)
    if isinstance(value, dict) and value.get("step"):
        error, attempt = value.get("error"), value.get("attempt")
        return Failure(
            str(value["step"]),
            str(error) if error else None,
            attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        )
    return None


class DeliveryError(SagaqError):
    """A notifier could not deliver; ``retryable`` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class Notifier(Protocol):
    """Sends notices somewhere. ``send`` raises :class:`DeliveryError` when it cannot."""

    name: str  # the channel name stored with each notification ("pagerduty", "slack", ...)
    kinds: frozenset[Kind]  # which notices it takes: PagerDuty takes pages only

    def send(self, notice: Notice) -> None: ...

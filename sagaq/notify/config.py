"""Notifiers from ``SAGAQ_*`` environment variables, checked at start-up.

A pager that is misconfigured is found out at 3 a.m., when it is needed; so every value is
checked here, when a process starts, and a bad one raises :class:`ConfigurationError` naming
the variable and what is wrong with it, never its value (URLs and keys here are credentials).

=============================== ======================================================
``SAGAQ_WEBHOOK_URL``           generic webhook endpoint (http/https); needs the secret
``SAGAQ_WEBHOOK_SECRET``        HMAC-SHA256 key, at least 16 characters; needs the URL
``SAGAQ_SLACK_WEBHOOK_URL``     Slack incoming webhook URL
``SAGAQ_PAGERDUTY_ROUTING_KEY`` Events API v2 integration key: 32 letters and digits
``SAGAQ_PAGERDUTY_URL``         optional, default ``https://events.pagerduty.com/v2/enqueue``
``SAGAQ_PAGERDUTY_SOURCE``      optional, default this host's name
``SAGAQ_SAGA_URL_TEMPLATE``     optional link for responders, e.g.
                                ``https://ops.example.com/sagas/{saga_id}`` (also ``{saga_name}``)
=============================== ======================================================

The log notifier is always configured. Empty values count as unset. This module does no I/O.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from sagaq.errors import ConfigurationError
from sagaq.notify.base import Notifier
from sagaq.notify.log import LogNotifier
from sagaq.notify.pagerduty import EVENTS_URL, PagerDutyNotifier
from sagaq.notify.slack import SlackNotifier
from sagaq.notify.webhook import WebhookNotifier

WEBHOOK_URL = "SAGAQ_WEBHOOK_URL"
WEBHOOK_SECRET = "SAGAQ_WEBHOOK_SECRET"
SLACK_WEBHOOK_URL = "SAGAQ_SLACK_WEBHOOK_URL"
PAGERDUTY_ROUTING_KEY = "SAGAQ_PAGERDUTY_ROUTING_KEY"
PAGERDUTY_URL = "SAGAQ_PAGERDUTY_URL"
PAGERDUTY_SOURCE = "SAGAQ_PAGERDUTY_SOURCE"
SAGA_URL_TEMPLATE = "SAGAQ_SAGA_URL_TEMPLATE"

SECRET_MIN = 16
_ROUTING_KEY = re.compile(r"[A-Za-z0-9]{32}")
_TEMPLATE_FIELDS = frozenset({"saga_id", "saga_name"})


def _get(env: Mapping[str, str], var: str) -> str | None:
    value = env.get(var)
    return value if value is not None and value.strip() != "" else None


def check_url(var: str, value: str) -> str:
    """``value`` stripped if it is an http(s) URL with a host; the error names ``var`` only."""
    url = value.strip()
    if any(c.isspace() for c in url):
        raise ConfigurationError(f"{var} must be a URL without spaces")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        raise ConfigurationError(f"{var} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        scheme = f"{parts.scheme!r}" if parts.scheme else "none"
        raise ConfigurationError(f"{var} must be an http:// or https:// URL (scheme is {scheme})")
    if not host:
        raise ConfigurationError(f"{var} must be an http(s) URL with a host")
    return url


def check_link_template(var: str, value: str) -> str:
    """A saga URL template: only ``{saga_id}`` / ``{saga_name}`` fields, an http(s) URL."""
    template = value.strip()
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        raise ConfigurationError(f"{var} has unbalanced braces") from None
    unknown = fields - _TEMPLATE_FIELDS
    if unknown:
        raise ConfigurationError(
            f"{var} may only use {{saga_id}} and {{saga_name}}, not {sorted(unknown)}"
        )
    try:
        sample = template.format(saga_id="id", saga_name="name")
    except (ValueError, IndexError, KeyError, AttributeError):
        raise ConfigurationError(f"{var} is not a valid template") from None
    check_url(var, sample)
    return template


def load_notifiers(env: Mapping[str, str] | None = None) -> list[Notifier]:
    """The configured notifiers: always a :class:`LogNotifier`, then webhook, Slack, PagerDuty."""
    env = os.environ if env is None else env
    link = _get(env, SAGA_URL_TEMPLATE)
    link_template = check_link_template(SAGA_URL_TEMPLATE, link) if link else None
    notifiers: list[Notifier] = [LogNotifier()]

    url, secret = _get(env, WEBHOOK_URL), _get(env, WEBHOOK_SECRET)
    if url and not secret:
        raise ConfigurationError(f"{WEBHOOK_SECRET} is required when {WEBHOOK_URL} is set")
    if secret and not url:
        raise ConfigurationError(f"{WEBHOOK_URL} is required when {WEBHOOK_SECRET} is set")
    if url and secret:
        url = check_url(WEBHOOK_URL, url)
        if len(secret) < SECRET_MIN:
            raise ConfigurationError(f"{WEBHOOK_SECRET} must be at least {SECRET_MIN} characters")
        notifiers.append(WebhookNotifier(url, secret))

    slack = _get(env, SLACK_WEBHOOK_URL)
    if slack:
        notifiers.append(
            SlackNotifier(check_url(SLACK_WEBHOOK_URL, slack), link_template=link_template)
        )

    key = _get(env, PAGERDUTY_ROUTING_KEY)
    pd_url, source = _get(env, PAGERDUTY_URL), _get(env, PAGERDUTY_SOURCE)
    if key is None:
        orphan = PAGERDUTY_URL if pd_url else PAGERDUTY_SOURCE if source else None
        if orphan:
            raise ConfigurationError(f"{orphan} is set but {PAGERDUTY_ROUTING_KEY} is not")
    else:
        key = key.strip()
        if not _ROUTING_KEY.fullmatch(key):
            raise ConfigurationError(
                f"{PAGERDUTY_ROUTING_KEY} must be a PagerDuty Events API v2 integration key: "
                f"exactly 32 letters and digits (got {len(key)} characters)"
            )
        notifiers.append(
            PagerDutyNotifier(
                key,
                url=check_url(PAGERDUTY_URL, pd_url) if pd_url else EVENTS_URL,
                source=source.strip() if source else None,
                link_template=link_template,
            )
        )
    return notifiers


def notifiers_by_name(notifiers: Iterable[Notifier]) -> dict[str, Notifier]:
    """Index by channel name (stored with each delivery); two with one name is a config error."""
    by_name: dict[str, Notifier] = {}
    for notifier in notifiers:
        if notifier.name in by_name:
            raise ConfigurationError(f"two notifiers are named {notifier.name!r}")
        by_name[notifier.name] = notifier
    return by_name

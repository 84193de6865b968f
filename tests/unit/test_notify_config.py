"""Notifier configuration: a bad variable fails at start-up, named, without its secret value.

Also the log notifier, the one channel that is always configured.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from sagaq.errors import ConfigurationError
from sagaq.notify.base import Action, Kind, Notice
from sagaq.notify.config import load_notifiers, notifiers_by_name
from sagaq.notify.log import LogNotifier
from sagaq.notify.pagerduty import EVENTS_URL, PagerDutyNotifier
from sagaq.notify.slack import SlackNotifier
from sagaq.notify.webhook import WebhookNotifier

SECRET = "s3cr3t-webhook-key-0123"  # >= 16 characters
ROUTING_KEY = "R0ut1ngK3yR0ut1ngK3yR0ut1ngK3y42"  # 32 alphanumerics
SLACK = "https://hooks.slack.com/services/T000/B000/XXXXsecretXXXX"
SLACK_TOKEN = "XXXXsecretXXXX"


def test_routing_key_fixture_is_well_formed() -> None:
    assert len(ROUTING_KEY) == 32 and ROUTING_KEY.isalnum()


@pytest.mark.parametrize(
    ("env", "named", "hidden"),
    [
        pytest.param(
            {"SAGAQ_WEBHOOK_URL": "https://h.example/hook"},
            "SAGAQ_WEBHOOK_SECRET",
            None,
            id="webhook-url-without-secret",
        ),
        pytest.param(
            {"SAGAQ_WEBHOOK_SECRET": SECRET},
            "SAGAQ_WEBHOOK_URL",
            SECRET,
            id="webhook-secret-without-url",
        ),
        pytest.param(
            {
                "SAGAQ_WEBHOOK_URL": "https://h.example/hook",
                "SAGAQ_WEBHOOK_SECRET": "tooShort-15chrs",
            },
            "SAGAQ_WEBHOOK_SECRET",
            "tooShort-15chrs",
            id="webhook-secret-too-short",
        ),
        pytest.param(
            {"SAGAQ_WEBHOOK_URL": "ftp://h.example/x?token=tok3n", "SAGAQ_WEBHOOK_SECRET": SECRET},
            "SAGAQ_WEBHOOK_URL",
            "tok3n",
            id="webhook-url-not-http",
        ),
        pytest.param(
            {"SAGAQ_WEBHOOK_URL": "h.example/hook/tok3n", "SAGAQ_WEBHOOK_SECRET": SECRET},
            "SAGAQ_WEBHOOK_URL",
            "tok3n",
            id="webhook-url-without-scheme",
        ),
        pytest.param(
            {"SAGAQ_WEBHOOK_URL": "https:///hook/tok3n", "SAGAQ_WEBHOOK_SECRET": SECRET},
            "SAGAQ_WEBHOOK_URL",
            "tok3n",
            id="webhook-url-without-host",
        ),
        pytest.param(
            {"SAGAQ_SLACK_WEBHOOK_URL": SLACK.replace("https", "slack")},
            "SAGAQ_SLACK_WEBHOOK_URL",
            SLACK_TOKEN,
            id="slack-url-bad-scheme",
        ),
        pytest.param(
            {"SAGAQ_SLACK_WEBHOOK_URL": "https://hooks.slack.com:99999/" + SLACK_TOKEN},
            "SAGAQ_SLACK_WEBHOOK_URL",
            SLACK_TOKEN,
            id="slack-url-bad-port",
        ),
        pytest.param(
            {"SAGAQ_SLACK_WEBHOOK_URL": "https://hooks.slack .com/" + SLACK_TOKEN},
            "SAGAQ_SLACK_WEBHOOK_URL",
            SLACK_TOKEN,
            id="slack-url-with-space",
        ),
        pytest.param(
            {"SAGAQ_PAGERDUTY_ROUTING_KEY": ROUTING_KEY[:31]},
            "SAGAQ_PAGERDUTY_ROUTING_KEY",
            ROUTING_KEY[:31],
            id="routing-key-31-chars",
        ),
        pytest.param(
            {"SAGAQ_PAGERDUTY_ROUTING_KEY": ROUTING_KEY + "X"},
            "SAGAQ_PAGERDUTY_ROUTING_KEY",
            ROUTING_KEY,
            id="routing-key-33-chars",
        ),
        pytest.param(
            {"SAGAQ_PAGERDUTY_ROUTING_KEY": ROUTING_KEY[:31] + "-"},
            "SAGAQ_PAGERDUTY_ROUTING_KEY",
            ROUTING_KEY[:31],
            id="routing-key-not-alnum",
        ),
        pytest.param(
            {
                "SAGAQ_PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
                "SAGAQ_PAGERDUTY_URL": "events.pagerduty.com/v2/enqueue",
            },
            "SAGAQ_PAGERDUTY_URL",
            ROUTING_KEY,
            id="pagerduty-url-without-scheme",
        ),
        pytest.param(
            {"SAGAQ_PAGERDUTY_URL": "https://events.pagerduty.com/v2/enqueue"},
            "SAGAQ_PAGERDUTY_ROUTING_KEY",
            None,
            id="pagerduty-url-without-key",
        ),
        pytest.param(
            {"SAGAQ_PAGERDUTY_SOURCE": "host-1"},
            "SAGAQ_PAGERDUTY_ROUTING_KEY",
            None,
            id="pagerduty-source-without-key",
        ),
        pytest.param(
            {"SAGAQ_SAGA_URL_TEMPLATE": "https://ops.example/{saga}"},
            "SAGAQ_SAGA_URL_TEMPLATE",
            None,
            id="link-template-unknown-field",
        ),
        pytest.param(
            {"SAGAQ_SAGA_URL_TEMPLATE": "https://ops.example/{saga_id"},
            "SAGAQ_SAGA_URL_TEMPLATE",
            None,
            id="link-template-unbalanced",
        ),
        pytest.param(
            {"SAGAQ_SAGA_URL_TEMPLATE": "ops.example/{saga_id}"},
            "SAGAQ_SAGA_URL_TEMPLATE",
            None,
            id="link-template-not-a-url",
        ),
    ],
)
def test_malformed_configuration_names_the_variable_not_the_secret(
    env: dict[str, str], named: str, hidden: str | None
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_notifiers(env)
    message = str(caught.value)
    assert named in message
    if hidden is not None:
        assert hidden not in message
    for value in env.values():  # no configured value is ever echoed back
        assert value not in message


def test_the_log_notifier_alone_when_nothing_is_configured() -> None:
    notifiers = load_notifiers({})
    assert [type(n) for n in notifiers] == [LogNotifier]
    assert notifiers[0].kinds == frozenset({Kind.PAGE, Kind.NOTIFY})


def test_empty_values_count_as_unset() -> None:
    env = {"SAGAQ_WEBHOOK_URL": "", "SAGAQ_WEBHOOK_SECRET": " ", "SAGAQ_PAGERDUTY_URL": ""}
    assert [type(n) for n in load_notifiers(env)] == [LogNotifier]


def test_unrelated_variables_are_ignored() -> None:
    env = {"SAGAQ_NOTIFY_SOMETHING": "x", "SAGAQ_RETRIES": "3", "PATH": "/bin"}
    assert [type(n) for n in load_notifiers(env)] == [LogNotifier]


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAQ_SLACK_WEBHOOK_URL", SLACK)
    assert SlackNotifier in [type(n) for n in load_notifiers()]


def test_every_notifier_configured() -> None:
    env = {
        "SAGAQ_WEBHOOK_URL": "http://127.0.0.1:8080/hook",
        "SAGAQ_WEBHOOK_SECRET": SECRET,
        "SAGAQ_SLACK_WEBHOOK_URL": f" {SLACK} ",
        "SAGAQ_PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SAGAQ_SAGA_URL_TEMPLATE": "https://ops.example/sagas/{saga_id}?n={saga_name}",
    }
    notifiers = load_notifiers(env)
    assert [type(n) for n in notifiers] == [
        LogNotifier,
        WebhookNotifier,
        SlackNotifier,
        PagerDutyNotifier,
    ]
    by_name = notifiers_by_name(notifiers)
    assert list(by_name) == ["log", "webhook", "slack", "pagerduty"]
    webhook, slack, pagerduty = by_name["webhook"], by_name["slack"], by_name["pagerduty"]
    assert isinstance(webhook, WebhookNotifier) and webhook.url == "http://127.0.0.1:8080/hook"
    assert isinstance(slack, SlackNotifier)
    assert slack.link_template == "https://ops.example/sagas/{saga_id}?n={saga_name}"
    assert isinstance(pagerduty, PagerDutyNotifier)
    assert pagerduty.url == EVENTS_URL
    assert pagerduty.source  # defaults to this host's name
    assert pagerduty.kinds == frozenset({Kind.PAGE})
    for notifier in notifiers:  # repr is what ends up in logs: no credential in it
        for secret in (SECRET, ROUTING_KEY, SLACK_TOKEN, "/services/"):
            assert secret not in repr(notifier)


def test_pagerduty_url_and_source_overrides() -> None:
    env = {
        "SAGAQ_PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SAGAQ_PAGERDUTY_URL": "http://127.0.0.1:9/v2/enqueue",
        "SAGAQ_PAGERDUTY_SOURCE": "worker-7.eu",
    }
    (log, pagerduty) = load_notifiers(env)
    assert isinstance(log, LogNotifier)
    assert isinstance(pagerduty, PagerDutyNotifier)
    assert (pagerduty.url, pagerduty.source) == ("http://127.0.0.1:9/v2/enqueue", "worker-7.eu")
    assert pagerduty.link_template is None


def test_duplicate_names_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'log'"):
        notifiers_by_name([LogNotifier(), LogNotifier()])


# The log notifier is the one channel that is always configured; it must say enough to act on.


def _notice(kind: Kind, action: Action) -> Notice:
    return Notice(
        saga_id="s-1",
        saga_name="orders",
        kind=kind,
        action=action,
        dedup_key="sagaq:s-1:incident:1",
        summary="compensation of refund failed:\nHTTP 500",
        severity="critical" if kind is Kind.PAGE else "warning",
        created_at=datetime(2024, 5, 1, tzinfo=UTC),
        state="needs_human",
        commands=("sagaq show s-1", "sagaq retry s-1"),
        note="done by hand" if action is Action.RESOLVE else None,
    )


@pytest.mark.parametrize(
    ("kind", "action", "level"),
    [
        (Kind.PAGE, Action.TRIGGER, logging.ERROR),
        (Kind.NOTIFY, Action.TRIGGER, logging.WARNING),
        (Kind.PAGE, Action.RESOLVE, logging.INFO),
    ],
)
def test_log_notifier_writes_one_actionable_line(
    caplog: pytest.LogCaptureFixture, kind: Kind, action: Action, level: int
) -> None:
    with caplog.at_level(logging.DEBUG, logger="sagaq.notify"):
        LogNotifier().send(_notice(kind, action))
    (record,) = caplog.records
    assert (record.name, record.levelno) == ("sagaq.notify", level)
    line = record.getMessage()
    assert "\n" not in line
    assert "compensation of refund failed: HTTP 500" in line
    assert "sagaq:s-1:incident:1" in line
    assert "sagaq show s-1 | sagaq retry s-1" in line
    assert ("done by hand" in line) is (action is Action.RESOLVE)


def test_log_notifier_never_raises() -> None:
    class Broken(logging.Logger):
        def log(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("disk full")

    LogNotifier(Broken("broken")).send(_notice(Kind.PAGE, Action.TRIGGER))

"""Notifications: level-4 pages and non-paging notices, delivered through the outbox."""

from sagaq.notify.base import Action, DeliveryError, Kind, Notice, Notifier
from sagaq.notify.config import load_notifiers, notifiers_by_name
from sagaq.notify.log import LogNotifier
from sagaq.notify.pagerduty import PagerDutyNotifier
from sagaq.notify.slack import SlackNotifier
from sagaq.notify.webhook import WebhookNotifier, verify_signature

__all__ = [
    "Action",
    "DeliveryError",
    "Kind",
    "LogNotifier",
    "Notice",
    "Notifier",
    "PagerDutyNotifier",
    "SlackNotifier",
    "WebhookNotifier",
    "load_notifiers",
    "notifiers_by_name",
    "verify_signature",
]

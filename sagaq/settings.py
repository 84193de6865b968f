"""Settings, read from ``SAGAQ_*`` environment variables; a bad value names its variable."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from sagaq.errors import ConfigurationError
from sagaq.ladder import Bounds

# The library's default (Settings(), `celery -A sagaq`). The `sagaq` command instead uses the
# embedded PostgreSQL (sagaq.embedded) when no URL is set. PostgreSQL only: preflight refuses
# any other backend, SQLite included.
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/sagaq"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
MAX_APPROVAL_DEADLINE = 366 * 86400.0  # beyond a year a deadline is a typo, and near 10^11 s
# it overflows a datetime when the request is parked, after the previous step's effect
_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)[^@/]*(@)", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to run sagas. Build with :meth:`from_env` or directly."""

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    imports: tuple[str, ...] = ()  # modules that define sagas; imported by workers
    queue: str = "sagaq"
    redis_prefix: str = ""  # kombu global_keyprefix: a private key space on a shared Redis
    visibility_timeout: float = 3600.0  # Redis redelivers unacked messages after this
    consumer_timeout: float = 1800.0  # RabbitMQ's consumer_timeout (its default: 30 min)
    step_timeout: float = 300.0  # default time a step may run; its lease is a bit longer
    lease_margin: float = 30.0
    retries: int = 3  # ladder rung 0: retries of the same input
    retryable_retries: int = 10  # rung 0 for retryable steps: after the pivot the budget is larger
    reprompts: int = 2  # rung 1: re-runs with the earlier errors in context
    per_tier: int = 1  # rung 2: attempts on each further model tier
    refreshes: int = 2  # environmental failures answered by the saga's refresh hook
    compensation_retries: int = 3  # a compensation's own short ladder, then a page
    retry_base: float = 1.0  # seconds; backoff doubles per attempt
    retry_cap: float = 30.0
    countdown_max: float = 30.0  # longer delays wait in Postgres (wake_at), not in Redis
    reconcile_interval: float = 5.0  # seconds between reconciler sweeps (Celery beat)
    reconcile_batch: int = 500  # rows per sweep
    republish_after: float = 30.0  # an outbox row this overdue is published again
    rollback_deadline: float = 3600.0  # a rollback without progress this long pages
    max_deliveries: int = 3  # a step whose worker died this often is parked, not re-run
    env: str = "development"  # the policy fact `env`
    policy_file: str = ""  # a YAML policy; empty: every dispatch is allowed
    approval_deadline: float = 86400.0  # an approval request not decided by then is denied
    secret_key: str = ""  # Fernet key sealing Secrets in results and checkpoints (keygen)
    pool_size: int = 2  # per process: connections ~ concurrency * (pool + overflow)
    max_overflow: int = 2

    def __repr__(self) -> str:
        """Every field, but never a password or the secret key (settings end up in logs)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("database_url", "broker_url"):
            shown[name] = _PASSWORD.sub(r"\1***\2", shown[name])
        if self.secret_key:
            shown["secret_key"] = "***"
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    __str__ = __repr__

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = "SAGAQ_" + f.name.upper()
            if var in env and env[var] != "":
                values[f.name] = _parse(var, env[var], f.type)
        values.update(overrides)
        return cls(**values).validated()

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).validated()

    def validated(self) -> Settings:
        check_database_url(normalize_database_url(self.database_url))
        seconds = ("visibility_timeout", "consumer_timeout", "step_timeout", "lease_margin",
                   "retry_base", "retry_cap", "countdown_max", "reconcile_interval",
                   "republish_after", "rollback_deadline", "approval_deadline")
        for name in seconds:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"SAGAQ_{name.upper()} must be a finite number >= 0")
        if self.approval_deadline > MAX_APPROVAL_DEADLINE:
            raise ConfigurationError(
                f"SAGAQ_APPROVAL_DEADLINE must be at most {MAX_APPROVAL_DEADLINE:.0f} seconds "
                "(366 days)"
            )
        if self.step_timeout <= 0:
            raise ConfigurationError("SAGAQ_STEP_TIMEOUT must be > 0 seconds")
        if self.step_timeout + self.lease_margin >= self.visibility_timeout:
            raise ConfigurationError(
                "SAGAQ_STEP_TIMEOUT + SAGAQ_LEASE_MARGIN must stay below "
                f"SAGAQ_VISIBILITY_TIMEOUT ({self.step_timeout:g} + {self.lease_margin:g} >= "
                f"{self.visibility_timeout:g}), or Redis redelivers running steps"
            )
        if self.countdown_max >= self.visibility_timeout:
            raise ConfigurationError(
                "SAGAQ_COUNTDOWN_MAX must stay below SAGAQ_VISIBILITY_TIMEOUT: a countdown "
                "message waits unacknowledged, and Redis would redeliver it"
            )
        if self.retry_base <= 0 or self.retry_cap < self.retry_base:
            raise ConfigurationError("SAGAQ_RETRY_BASE must be > 0 and <= SAGAQ_RETRY_CAP")
        if self.retry_cap >= self.visibility_timeout:
            raise ConfigurationError(
                "SAGAQ_RETRY_CAP must stay below SAGAQ_VISIBILITY_TIMEOUT "
                f"({self.retry_cap:g} >= {self.visibility_timeout:g}): a backoff is never "
                "longer than the broker keeps an unacknowledged message"
            )
        counts = ("retries", "retryable_retries", "reprompts", "per_tier", "refreshes",
                  "compensation_retries", "pool_size", "reconcile_batch", "max_deliveries")
        for name in counts:
            if getattr(self, name) < 0:
                raise ConfigurationError(f"SAGAQ_{name.upper()} must be >= 0")
        return self


    def bounds(self, *, retryable: bool = False) -> Bounds:
        """The global ladder budgets (a saga's and a step's own bounds sit on top)."""
        return Bounds(
            retries=self.retryable_retries if retryable else self.retries,
            reprompts=self.reprompts,
            per_tier=self.per_tier,
            refreshes=self.refreshes,
            compensation_retries=self.compensation_retries,
            base=self.retry_base,
            cap=self.retry_cap,
        )


def _parse(var: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("tuple"):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigurationError(f"{var}={raw!r} is not a valid {kind}") from None
    return raw


def normalize_database_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use psycopg 3 for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"


def check_database_url(url: str) -> None:
    """A URL sqlalchemy can parse, for a backend sagaq runs on; never echoes a password."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigurationError(
            f"SAGAQ_DATABASE_URL (or --database-url) is not a URL; expected {URL_FORM}"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        raise ConfigurationError(
            "SAGAQ_DATABASE_URL (or --database-url) is a SQLite URL; sagaq needs PostgreSQL: "
            f"expected {URL_FORM}. To try sagaq without a server, leave it unset: the sagaq "
            "command then starts an embedded PostgreSQL (pip install 'sagaq[embedded]')"
        )
    if backend not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"SAGAQ_DATABASE_URL (or --database-url) is a {backend!r} URL; sagaq runs on "
            f"PostgreSQL: expected {URL_FORM}"
        )

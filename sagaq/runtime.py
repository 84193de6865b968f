"""Wiring: settings → store, engine, Celery app. One default runtime per process."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sagaq import definition, policy
from sagaq.context import ReleaseContext
from sagaq.definition import Registry, Saga, sagas
from sagaq.engine import Engine, describe
from sagaq.errors import ConfigurationError
from sagaq.gate import Gate
from sagaq.keys import release_key
from sagaq.ladder import backoff
from sagaq.notify.base import Kind, Notifier
from sagaq.notify.config import load_notifiers, notifiers_by_name
from sagaq.notify.delivery import deliver
from sagaq.policy import ALLOW_ALL
from sagaq.reconciler import Sweep, sweep
from sagaq.settings import Settings
from sagaq.store import Store
from sagaq.store.database import create_engine
from sagaq.store.faults import Write
from sagaq.worker import CeleryPublisher, create_app

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

log = logging.getLogger("sagaq.policy")
NO_POLICY = "none (no rules: every dispatch allowed)"


class Runtime:
    """Everything one process needs to enqueue and run sagas."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry = sagas,
        notifiers: Sequence[Notifier] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        import_modules(settings.imports)
        # A malformed notifier configuration fails here, at start-up, naming the variable.
        self.notifiers = notifiers_by_name(load_notifiers() if notifiers is None else notifiers)
        channels = {
            kind: tuple(name for name, n in self.notifiers.items() if kind in n.kinds)
            for kind in Kind
        }
        # So does a malformed policy file, naming the file, the rule and the field.
        self.policy = policy.load(settings.policy_file) if settings.policy_file else ALLOW_ALL
        self.gate = Gate(self.policy, registry, settings.env)
        self.store = Store(
            create_engine(
                settings.database_url,
                pool_size=settings.pool_size,
                max_overflow=settings.max_overflow,
            ),
            channels=channels,
            gate=self.gate,
            approval_deadline=settings.approval_deadline,
        )
        self._app: Celery | None = None
        self._lock = threading.Lock()
        self.engine = Engine(
            self.store,
            settings,
            publish=CeleryPublisher(lambda: self.app, settings.queue),
            registry=registry,
        )

    @property
    def policy_fingerprint(self) -> str:
        """What gates this process's dispatches: the policy's label and (with rules) the env."""
        if not self.policy.rules:
            return NO_POLICY
        return f"{self.policy.label} env={self._env}"

    @property
    def _env(self) -> str:  # the env fact as the policy compares it; none without rules
        return self.settings.env.strip().lower() if self.policy.rules else ""

    def record_policy(self, worker: str) -> None:
        """A worker starts: record the policy it gates with (``check_policy`` compares)."""
        try:
            self.store.record_policy(self.policy_fingerprint, policy=self.policy.label,
                                     env=self._env, source=self.policy.source, worker=worker)
        except Exception as exc:  # the database may be down (or unmigrated) at start-up:
            # one line, no traceback; the start-up checks say what is wrong, once
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("could not record the policy this worker loaded: %s", reason)

    def check_policy(self) -> None:
        """Refuse to dispatch ungated, or under another env, than the workers.

        A process without the workers' policy would dispatch what they would deny (a CLI
        ``retry`` from a shell without ``SAGAQ_POLICY_FILE``); the same file under another
        ``SAGAQ_ENV`` would too. Another version of the policy only warns: approvals are
        re-checked against the rule as it reads now.
        """
        current = self.store.current_policy()
        mine = self.policy_fingerprint
        if current is None or current.fingerprint == mine:
            return
        theirs = f"policy {current.fingerprint} (from {current.source}, loaded by worker " \
                 f"{current.worker})"
        if not self.policy.rules or (current.env and current.env != self._env):
            raise ConfigurationError(
                f"the workers gate with {theirs} but this process has {mine}: set "
                "SAGAQ_POLICY_FILE and SAGAQ_ENV as the workers have them; nothing was done"
            )
        log.warning("this process gates with policy %s, the workers with %s: dispatches "
                    "from here follow this process's policy", mine, theirs)

    @property
    def app(self) -> Celery:
        """The Celery app, with a task for every step of every known saga."""
        with self._lock:
            if self._app is None:
                self._app = create_app(self)
            return self._app

    def deliver(self, notification_id: int) -> str:
        """Send one notification (the ``sagaq.notify`` task); publishes a retry if needed."""
        word, dispatches = deliver(self.store, self.notifiers, notification_id,
                                   countdown_max=self.settings.countdown_max)
        self.engine.publish_now(dispatches, Write.END_DELIVERY)
        return word

    def reconcile(self) -> Sweep:
        """One reconciler pass (the ``sagaq.reconcile`` beat task, ``sagaq reconcile``)."""
        result = sweep(self.store, self.settings)
        self.engine.publish_now(result.dispatches, Write.REPUBLISH)
        return result

    def release(self, resource_id: int) -> str:
        """Release one orphaned resource (the ``sagaq.release`` task); pages if it cannot."""
        res = self.store.begin_release(resource_id)
        if res is None:
            return "dropped (released or in hand)"
        saga = self.store.get_saga_or_raise(res.saga_id)
        try:
            releaser = self.registry.get(saga.name).releasers[res.kind]
            releaser(ReleaseContext(saga.id, saga.name, res.step, res.kind, res.external_id,
                                    release_key(saga.id, res.kind, res.external_id),
                                    res.attempts))
        except Exception as exc:
            error = describe(exc)
            if res.attempts <= self.settings.compensation_retries and not isinstance(
                exc, KeyError
            ):
                delay = backoff(res.attempts, self.settings.retry_base, self.settings.retry_cap)
                self.engine.publish_now(
                    self.store.end_release(res, released=False, error=error, retry_in=delay,
                                           durable=delay > self.settings.countdown_max),
                    Write.END_RELEASE,
                )
                return "retry"
            if isinstance(exc, KeyError):
                error = f"no @{saga.name}.releaser({res.kind!r}) is defined"
            self.engine.publish_now(self.store.end_release(res, released=False, error=error),
                                    Write.END_RELEASE)
            return "failed (paged)"
        self.store.end_release(res, released=True)
        return "released"

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
        self.store.dispose()


def import_modules(modules: tuple[str, ...] | list[str]) -> None:
    """Import the modules that define sagas; a missing one names SAGAQ_IMPORTS."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(
                f"SAGAQ_IMPORTS names {name!r}, which cannot be imported: {exc}"
            ) from exc


_default: Runtime | None = None
_default_lock = threading.Lock()


def configure(settings: Settings | None = None) -> Runtime:
    """Make a runtime from ``settings`` (default: the environment) the process default."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = Runtime(settings or Settings.from_env())
        return _default


def default_runtime() -> Runtime:
    """The process default runtime, built from ``SAGAQ_*`` variables on first use."""
    with _default_lock:
        runtime = _default
    return runtime if runtime is not None else configure()


def _enqueue(
    saga: Saga,
    input: Mapping[str, Any] | None,
    *,
    key: str | None,
    session: Session | None,
) -> str:
    return default_runtime().engine.enqueue(saga, input, key=key, session=session)


# Saga.enqueue reaches the default runtime through this hook: definition sits below us.
definition.use_enqueue(_enqueue)

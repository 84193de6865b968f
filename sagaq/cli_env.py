"""What every ``sagaq`` command shares: settings from the environment and the global options,
the database (the configured one, else the embedded PostgreSQL), and one-line errors."""

from __future__ import annotations

import functools
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from sagaq.errors import SagaqError
from sagaq.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
# Piped or redirected, rich would assume 80 columns: the timelines read better at 120.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120)


def friendly(fn: F) -> F:
    """Turn sagaq's errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SagaqError as exc:
            raise click.ClickException(exc.message) from None

    return wrapper  # type: ignore[return-value]


class Env:
    """Settings from the environment, with the global options on top."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self.overrides = {k: v for k, v in overrides.items() if v}
        self._embedded: str | None = None

    def configured_url(self) -> str | None:
        """--database-url, else SAGAQ_DATABASE_URL; None when neither is set."""
        return self.overrides.get("database_url") or os.environ.get("SAGAQ_DATABASE_URL") or None

    def database_url(self, *, reset: bool = False) -> str:
        """The configured database, else the embedded PostgreSQL (started on first use)."""
        configured = self.configured_url()
        if configured:
            return configured
        if self._embedded is None or reset:
            from sagaq import embedded

            self._embedded = embedded.database_url(reset=reset)
        return self._embedded

    def say_where(self, role: str) -> None:
        """A long-running process on the embedded server says so: a deploy that forgot
        SAGAQ_DATABASE_URL (with the extra installed) must not look like production."""
        if not self.configured_url():
            from sagaq import embedded

            click.echo(f"sagaq {role}: no SAGAQ_DATABASE_URL: on the embedded PostgreSQL in "
                       f"{embedded.data_dir()} (for trying sagaq, not for production)", err=True)

    def settings(self) -> Settings:
        return Settings.from_env(**{**self.overrides, "database_url": self.database_url()})

    def runtime(self) -> Any:
        """The runtime, on a database that answers and has sagaq's current schema."""
        from sagaq.preflight import check_schema
        from sagaq.runtime import configure
        from sagaq.store.database import check

        runtime = configure(self.settings())
        check(runtime.store.engine)
        check_schema(runtime.store.engine)
        return runtime

    def store(self) -> Any:
        from sagaq.preflight import check_schema
        from sagaq.store import Store
        from sagaq.store.database import check, create_engine

        engine = create_engine(self.settings().database_url)
        check(engine)
        check_schema(engine)
        return Store(engine)


pass_env = click.make_pass_decorator(Env)


def operator() -> str:
    return os.environ.get("SAGAQ_OPERATOR") or getpass.getuser()

"""Settings from SAGAQ_* variables; bad values name their variable; URLs are normalised."""

from __future__ import annotations

from typing import Any

import pytest

from sagaq.errors import ConfigurationError
from sagaq.settings import (
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    Settings,
    normalize_database_url,
)
from sagaq.store.database import safe_url


def test_defaults_from_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.database_url, s.broker_url) == (DEFAULT_DATABASE_URL, DEFAULT_BROKER_URL)
    assert (s.imports, s.queue, s.retries, s.visibility_timeout) == ((), "sagaq", 3, 3600.0)


@pytest.mark.parametrize(
    ("var", "raw", "field", "expected"),
    [
        ("SAGAQ_RETRIES", "5", "retries", 5),
        ("SAGAQ_RETRYABLE_RETRIES", "0", "retryable_retries", 0),
        ("SAGAQ_COMPENSATION_RETRIES", " 7 ", "compensation_retries", 7),
        ("SAGAQ_POOL_SIZE", "4", "pool_size", 4),
        ("SAGAQ_RETRY_BASE", "0.25", "retry_base", 0.25),
        ("SAGAQ_RETRY_CAP", "60", "retry_cap", 60.0),
        ("SAGAQ_VISIBILITY_TIMEOUT", "7200", "visibility_timeout", 7200.0),
        ("SAGAQ_STEP_TIMEOUT", "1e2", "step_timeout", 100.0),
        ("SAGAQ_IMPORTS", "a, b", "imports", ("a", "b")),
        ("SAGAQ_IMPORTS", "tasks.orders", "imports", ("tasks.orders",)),
        ("SAGAQ_IMPORTS", " a ,, b.c , ", "imports", ("a", "b.c")),
        ("SAGAQ_QUEUE", "sagas-eu", "queue", "sagas-eu"),
        ("SAGAQ_REDIS_PREFIX", "team-a:", "redis_prefix", "team-a:"),
        ("SAGAQ_DATABASE_URL", "postgresql+psycopg://u@h/x", "database_url",
         "postgresql+psycopg://u@h/x"),
        ("SAGAQ_BROKER_URL", "redis://r:6379/3", "broker_url", "redis://r:6379/3"),
    ],
)
def test_from_env_parses(var: str, raw: str, field: str, expected: Any) -> None:
    s = Settings.from_env({var: raw})
    value = getattr(s, field)
    assert value == expected
    assert type(value) is type(expected)


def test_empty_values_keep_the_default() -> None:
    assert Settings.from_env({"SAGAQ_RETRIES": "", "SAGAQ_IMPORTS": ""}) == Settings()


def test_unrelated_variables_are_ignored() -> None:
    env = {"RETRIES": "9", "SAGAQ_NOPE": "1", "sagaq_retries": "9"}
    assert Settings.from_env(env) == Settings()


def test_overrides_win_over_the_environment() -> None:
    s = Settings.from_env({"SAGAQ_RETRIES": "5", "SAGAQ_QUEUE": "env"}, retries=1)
    assert (s.retries, s.queue) == (1, "env")


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAQ_RETRY_CAP", "45")
    monkeypatch.setenv("SAGAQ_IMPORTS", "x,y")
    s = Settings.from_env()
    assert (s.retry_cap, s.imports) == (45.0, ("x", "y"))


@pytest.mark.parametrize(
    ("var", "raw", "kind"),
    [
        ("SAGAQ_RETRIES", "three", "int"),
        ("SAGAQ_RETRIES", "1.5", "int"),
        ("SAGAQ_POOL_SIZE", "2x", "int"),
        ("SAGAQ_RETRY_CAP", "abc", "float"),
        ("SAGAQ_VISIBILITY_TIMEOUT", "1h", "float"),
    ],
)
def test_bad_number_names_the_variable(var: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: raw})
    assert str(info.value) == f"{var}={raw!r} is not a valid {kind}"


@pytest.mark.parametrize(
    ("env", "sums"),
    [
        (
            {
                "SAGAQ_VISIBILITY_TIMEOUT": "100",
                "SAGAQ_STEP_TIMEOUT": "80",
                "SAGAQ_LEASE_MARGIN": "20",
            },
            "80 + 20 >= 100",
        ),  # equal is not below
        ({"SAGAQ_VISIBILITY_TIMEOUT": "60"}, "300 + 30 >= 60"),
        ({"SAGAQ_STEP_TIMEOUT": "3600"}, "3600 + 30 >= 3600"),
        ({"SAGAQ_STEP_TIMEOUT": "3500", "SAGAQ_LEASE_MARGIN": "150.5"}, "3500 + 150.5 >= 3600"),
    ],
)
def test_step_timeout_must_stay_below_visibility_timeout(env: dict[str, str], sums: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    msg = str(info.value)
    assert "SAGAQ_VISIBILITY_TIMEOUT" in msg
    assert "SAGAQ_STEP_TIMEOUT + SAGAQ_LEASE_MARGIN must stay below" in msg
    assert f"({sums})" in msg


def test_just_below_visibility_timeout_is_fine() -> None:
    s = Settings.from_env(
        {
            "SAGAQ_VISIBILITY_TIMEOUT": "100",
            "SAGAQ_STEP_TIMEOUT": "79.5",
            "SAGAQ_LEASE_MARGIN": "20",
        }
    )
    assert (s.step_timeout, s.lease_margin, s.visibility_timeout) == (79.5, 20.0, 100.0)


def test_with_validates_too() -> None:
    s = Settings()
    assert s.with_(retries=9).retries == 9
    with pytest.raises(ConfigurationError, match="SAGAQ_VISIBILITY_TIMEOUT"):
        s.with_(visibility_timeout=10.0)


BASE_RULE = "SAGAQ_RETRY_BASE must be > 0 and <= SAGAQ_RETRY_CAP"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"retry_base": 0.0}, BASE_RULE),
        ({"retry_base": 5.0, "retry_cap": 4.0}, BASE_RULE),
        ({"retries": -1}, "SAGAQ_RETRIES must be >= 0"),
        ({"retryable_retries": -1}, "SAGAQ_RETRYABLE_RETRIES must be >= 0"),
        ({"compensation_retries": -2}, "SAGAQ_COMPENSATION_RETRIES must be >= 0"),
        ({"pool_size": -1}, "SAGAQ_POOL_SIZE must be >= 0"),
    ],
)
def test_other_rules(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings().with_(**changes)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        # the embedded server's form: a Unix socket, no host or port
        ("postgresql://postgres:@/sagaq?host=/tmp/pg",
         "postgresql+psycopg://postgres:@/sagaq?host=/tmp/pg"),
    ],
)
def test_normalize_database_url(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://alice:s3cr3t@db:5432/app", "postgresql+psycopg://alice:***@db:5432/app"),
        ("postgres://alice:p%40ss@db/app", "postgresql+psycopg://alice:***@db/app"),
        ("postgresql+psycopg://alice@db/app", "postgresql+psycopg://alice@db/app"),
        ("postgresql://postgres:@/sagaq?host=/tmp/pg",
         "postgresql+psycopg://postgres:***@/sagaq?host=%2Ftmp%2Fpg"),
        ("not a url", "<unparseable database URL>"),
    ],
)
def test_safe_url_hides_the_password(url: str, expected: str) -> None:
    shown = safe_url(url)
    assert shown == expected
    assert "s3cr3t" not in shown and "p%40ss" not in shown and "p@ss" not in shown


@pytest.mark.parametrize(
    "var",
    [
        "SAGAQ_VISIBILITY_TIMEOUT",
        "SAGAQ_STEP_TIMEOUT",
        "SAGAQ_LEASE_MARGIN",
        "SAGAQ_RETRY_BASE",
        "SAGAQ_RETRY_CAP",
    ],
)
def test_nan_is_not_a_number_of_seconds(var: str) -> None:
    # float("nan") parses, and every comparison with NaN is False, so without an explicit
    # check it slips past the visibility-timeout and backoff rules.
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: "nan"})
    assert var in str(info.value)


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("SAGAQ_STEP_TIMEOUT", "0"),
        ("SAGAQ_STEP_TIMEOUT", "-5"),
        ("SAGAQ_LEASE_MARGIN", "-100"),  # a lease shorter than the step's own time limit
    ],
)
def test_step_timeout_and_lease_margin_must_be_sane(var: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: raw})
    assert var in str(info.value)


def test_repr_masks_passwords_and_the_secret_key() -> None:
    key = "Zx9kQ3s3cr3tK3yZx9kQ3s3cr3tK3yZx9kQ3s3cr3t="
    s = Settings(database_url="postgresql+psycopg://sagaq:hunter2pw@db:5432/sagaq",
                 broker_url="redis://:r3dispw@redis:6379/0", secret_key=key)
    shown = repr(s)
    for leaked in ("hunter2pw", "r3dispw", key, key[:12]):
        assert leaked not in shown, shown
    assert "postgresql+psycopg://sagaq:***@db:5432/sagaq" in shown
    assert "redis://:***@redis:6379/0" in shown and "secret_key='***'" in shown
    assert str(s) == shown and "retries=3" in shown
    assert "secret_key=''" in repr(Settings())  # an unset key says so: nothing to hide


@pytest.mark.parametrize("raw", ["1e12", "inf", "31622401"])
def test_an_approval_deadline_beyond_a_year_is_refused(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="SAGAQ_APPROVAL_DEADLINE"):
        Settings.from_env({"SAGAQ_APPROVAL_DEADLINE": raw})
    assert Settings.from_env({"SAGAQ_APPROVAL_DEADLINE": "31536000"}).approval_deadline == 31536000


@pytest.mark.parametrize("url", ["sqlite:///sagaq.db", "sqlite://", "sqlite+pysqlite:///x.db"])
def test_a_sqlite_url_is_refused_naming_postgresql_and_the_embedded_one(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"SAGAQ_DATABASE_URL": url})
    said = str(info.value)
    assert said.startswith("SAGAQ_DATABASE_URL (or --database-url) is a SQLite URL; sagaq "
                           "needs PostgreSQL: expected postgresql://USER[:PASSWORD]@HOST")
    assert "leave it unset" in said and "pip install 'sagaq[embedded]'" in said
    assert "\n" not in said

"""The process files and the README a new user copies from (issues 12.1, 12.6, 13.11).

The Procfile is checked by honcho and its Flower line is run for real through honcho;
docker-compose.yml and the Dockerfile are read as compose reads them (no containers start
here: the shared PostgreSQL and Redis already hold the ports); the README's settings table
is compared with the settings sagaq really reads.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
import yaml

from sagaq import Settings
from sagaq.notify import config as notify_config
from tests.acceptance.test_cli import env_for

ROOT = Path(__file__).resolve().parents[2]
HONCHO = str(Path(sys.executable).with_name("honcho"))
# The Procfile's commands (sagaq, celery) as in an activated virtualenv
ACTIVATED = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
README = (ROOT / "README.md").read_text()


# -- the README lists every variable ----------------------------------------------------------


def _table_after(heading: str) -> str:
    """The first Markdown table under ``heading``."""
    section = README.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return "\n".join(rows)


def test_the_readme_settings_table_lists_every_setting_and_no_other() -> None:
    table = _table_after("## Running it for real")
    listed = set(re.findall(r"`(SAGAQ_[A-Z_]+)`", table))
    settings = {f"SAGAQ_{f.name.upper()}" for f in fields(Settings)}
    assert settings - listed == set(), f"not in the README's table: {sorted(settings - listed)}"
    # Read by the CLI, not Settings: who decides (SAGAQ_OPERATOR), where the embedded
    # PostgreSQL keeps its data (SAGAQ_HOME).
    assert listed - settings == {"SAGAQ_OPERATOR", "SAGAQ_HOME"}, sorted(listed - settings)


def test_the_readme_notifier_table_lists_every_notifier_variable() -> None:
    table = _table_after("### Pages and notifications")
    listed = set(re.findall(r"`(SAGAQ_[A-Z_]+)`", table))
    variables = {v for k, v in vars(notify_config).items()
                 if k.isupper() and isinstance(v, str) and v.startswith("SAGAQ_")}
    assert variables and variables == listed, (sorted(variables), sorted(listed))


# -- the Procfile ------------------------------------------------------------------------------


def test_honcho_checks_the_procfile() -> None:
    done = subprocess.run([HONCHO, "check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Valid procfile detected (release, worker, beat, flower)" in done.stderr
    procfile = dict(line.split(": ", 1) for line in
                    (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert procfile["release"] == "sagaq db upgrade"
    assert "--address=127.0.0.1" in procfile["flower"]


def _port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_the_procfiles_flower_listens_on_loopback_with_basic_auth(settings) -> None:
    port = _port()
    env = {**os.environ, **env_for(settings.with_(queue=f"{settings.queue}-procfile")),
           "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": "ops:s3cret-pw",
           "FLOWER_UNAUTHENTICATED_API": "", "PATH": ACTIVATED}
    proc = subprocess.Popen([HONCHO, "start", "flower"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "flower never came up"
                time.sleep(0.5)
        assert anonymous.status_code == 401
        allowed = httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=5,
                            auth=("ops", "s3cret-pw"))
        assert allowed.status_code == 200
        # bound to loopback only: the machine's other addresses do not answer
        outside = socket.gethostbyname(socket.gethostname())
        if not outside.startswith("127."):
            with closing(socket.socket()) as s:
                s.settimeout(2)
                assert s.connect_ex((outside, port)) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_procfiles_flower_refuses_to_start_without_basic_auth() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    env["PATH"] = ACTIVATED
    done = subprocess.run([HONCHO, "start", "flower"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert "set FLOWER_BASIC_AUTH=user:password" in done.stdout + done.stderr


# -- docker-compose.yml and the Dockerfile -------------------------------------------------------


COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SAGAQ_SERVICES = ("migrate", "worker", "beat", "flower")


def test_compose_publishes_nothing_beyond_loopback() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert {n for n, s in SERVICES.items() if s.get("ports")} <= {"postgres", "redis", "flower"}


def test_compose_takes_every_password_and_the_key_from_the_env_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "sagaq:sagaq" not in text and "POSTGRES_PASSWORD: sagaq" not in text
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?")
    assert SERVICES["postgres"]["environment"]["POSTGRES_USER"] == "postgres"  # the tests' hint
    assert "--requirepass" in SERVICES["redis"]["command"]
    for name in SAGAQ_SERVICES:
        env = SERVICES[name]["environment"]
        assert "${REDIS_PASSWORD:?" in env["SAGAQ_BROKER_URL"], name
        assert "${POSTGRES_PASSWORD:?" in env["SAGAQ_DATABASE_URL"], name
        assert env["SAGAQ_SECRET_KEY"].startswith("${SAGAQ_SECRET_KEY:?"), name
        assert env["SAGAQ_ENV"] and env["SAGAQ_POLICY_FILE"], name
    assert SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?")
    example = (ROOT / ".env.example").read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SAGAQ_SECRET_KEY", "FLOWER_BASIC_AUTH",
                "SAGAQ_ENV", "SAGAQ_POLICY_FILE"):
        assert re.search(rf"^{var}=", example, re.M), var
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_compose_builds_one_image_with_healthchecks_everywhere() -> None:
    builds = [s["build"] for s in SERVICES.values() if "build" in s]
    assert len(builds) == len(SAGAQ_SERVICES)
    assert all(b is COMPOSE["x-sagaq"]["build"] for b in builds)  # one anchor, not four copies
    for name in ("postgres", "redis", "worker", "beat", "flower"):
        assert SERVICES[name]["healthcheck"]["test"], name
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)  # never root
    assert "ARG APP=" in text and "COPY ${APP} /app/${APP}" in text  # the user's own modules


def _compose_installed() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_installed(), reason="docker compose is not installed")
def test_docker_compose_config_accepts_the_file(tmp_path) -> None:
    env = {**os.environ, "POSTGRES_PASSWORD": "pw", "REDIS_PASSWORD": "pw",
           "SAGAQ_SECRET_KEY": "k", "FLOWER_BASIC_AUTH": "a:b"}
    done = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

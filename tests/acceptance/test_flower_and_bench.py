"""Flower shows what runs by name; the benchmark commands run (--quick: tiny N, CI smoke)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from sagaq import Runtime, SagaState
from tests.acceptance.test_cli import env_for

ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_flower_shows_each_step_as_a_named_task(settings) -> None:
    mine = settings.with_(queue=f"{settings.queue}-flower")
    env = {**os.environ, **env_for(mine), "FLOWER_UNAUTHENTICATED_API": "true"}
    port = _port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "sagaq", "worker", "--pool", "solo",
             "--loglevel", "WARNING", "--hostname", f"flower-{os.getpid()}@test"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "sagaq", "flower", f"--port={port}",
             "--address=127.0.0.1"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
    ]
    rt = Runtime(mine)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        saga_id = None
        while time.monotonic() < deadline:
            try:
                tasks = httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=2).json()
            except (httpx.HTTPError, json.JSONDecodeError):
                time.sleep(0.5)
                continue
            if saga_id is None:  # Flower is up and listening for events: start a saga
                saga_id = rt.engine.enqueue("order_flow", {"customer": "f@x", "amount": 1})
            seen = {t.get("name") for t in tasks.values()}
            if "sagaq.order_flow.notify_customer" in seen:
                break
            time.sleep(0.5)
        assert {
            "sagaq.order_flow.create_crm_record",
            "sagaq.order_flow.create_invoice",
            "sagaq.order_flow.notify_customer",
        } <= seen, seen
        assert saga_id is not None
        assert rt.store.get_saga_or_raise(saga_id).state is SagaState.COMPLETED
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        rt.close()


def _bench(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.usefixtures("pg_admin_url", "redis_base_url")  # the servers the bench uses
@pytest.mark.slow
def test_throughput_quick_reports_the_ratios_and_the_commit_count() -> None:
    out = _bench("throughput", "--cases", "ABCD")
    for key in ("ratio_c_a", "ratio_c_b", "ratio_c_b_p50", "commits_per_step"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert set(out["cases"]) == {"A", "B", "C", "D"}
    # A count, not a time: claim + result-and-next per step, plus a few commits of
    # connection setup that a tiny N cannot amortise.
    assert 1.9 <= out["commits_per_step"] <= 2.5
    assert out["cases"]["B"]["commits_per_unit"] == pytest.approx(6.0, abs=0.5)


@pytest.mark.usefixtures("pg_admin_url", "redis_base_url")  # the servers the bench uses
@pytest.mark.slow
def test_enqueue_and_reconciler_quick_run() -> None:
    enqueue = _bench("enqueue")
    assert len(enqueue["variants"]) == 4
    assert all(v["per_s"] > 0 for v in enqueue["variants"].values())
    reconciler = _bench("reconciler")
    sizes = [r["finished"] for r in reconciler["results"]]
    assert sizes == [1000, 10000]
    for r in reconciler["results"]:  # every sweep found its share of the active rows
        assert r["acted"]["woken"] == 200 and r["acted"]["expired"] == 400, r["acted"]
        assert r["acted"]["stalled"] == 200 and r["acted"]["republished"] == 200, r["acted"]


@pytest.mark.usefixtures("pg_admin_url", "redis_base_url")  # the servers the bench uses
def test_store_quick_times_each_case_against_the_floor() -> None:
    out = _bench("store")
    assert set(out["ms_per_step"]) == {"floor", "forward", "rollback"}
    assert all(v > 0 for v in out["ms_per_step"].values())
    assert out["forward_over_floor"] == pytest.approx(
        out["ms_per_step"]["forward"] / out["ms_per_step"]["floor"], rel=0.01)

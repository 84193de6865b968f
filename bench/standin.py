"""A stand-in external service over loopback HTTP, shared by every worker process.

It records every call with its idempotency key. ``/apply`` lands an effect once per key (a
second call with the same key is a replay: recorded, nothing new lands); ``/landed`` answers
whether a key's effect landed (for ``verify``). The chaos run counts effects here, so
"landed exactly once" is counted, not assumed.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx


@dataclass
class Ledger:
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)  # key → first call
    calls: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, call: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        with self.lock:
            replay = call["key"] in self.effects
            self.calls.append({**call, "replay": replay})
            if not replay:
                self.effects[call["key"]] = call
            return self.effects[call["key"]], replay

    def landed(self, key: str) -> bool:
        with self.lock:
            return key in self.effects

    def per_action(self) -> Counter[tuple[str, str, str]]:
        """Effects per (saga, step, direction): more than one means a duplicate effect."""
        with self.lock:
            return Counter((c["saga_id"], c["step"], c["direction"]) for c in self.effects.values())

    def raw_calls(self, *, op: str) -> Counter[tuple[str, str]]:
        """Every call of ``op`` per (saga, step), replays included."""
        with self.lock:
            return Counter((c["saga_id"], c["step"]) for c in self.calls if c["op"] == op)


class StandIn:
    """The HTTP server, in a thread of the process that owns the ledger."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        ledger = self.ledger

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                call = json.loads(self.rfile.read(length))
                record, replay = ledger.apply(call)
                self._reply({"record": record, "replay": replay})

            def do_GET(self) -> None:
                key = parse_qs(urlparse(self.path).query).get("key", [""])[0]
                self._reply({"landed": ledger.landed(key)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def apply(url: str, **call: Any) -> dict[str, Any]:
    """Call the stand-in from a step: raises on network errors (a transient failure)."""
    response = httpx.post(f"{url}/apply", json=call, timeout=5.0)
    response.raise_for_status()
    record: dict[str, Any] = response.json()["record"]
    return record


def landed(url: str, key: str) -> bool:
    response = httpx.get(f"{url}/landed", params={"key": key}, timeout=5.0)
    response.raise_for_status()
    return bool(response.json()["landed"])

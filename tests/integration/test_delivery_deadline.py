"""A slow endpoint cannot hold a delivery past its timeout (issue 13, item 10).

httpx's timeouts apply to each read: a server that drips a byte every second never trips a
read timeout of 2 s, and held a ``timeout=3`` call for 30 s. The delivery's timeout is now a
total deadline. The servers here are real sockets on 127.0.0.1 that drip for 30 s.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sagaq.notify.base import DeliveryError
from sagaq.notify.http import post_json


class Dripper:
    """Accepts connections and answers one byte a second, for ``seconds`` seconds."""

    def __init__(self, *, headers_first: bool, seconds: int = 30) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.headers_first = headers_first
        self.seconds = seconds
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
            try:
                if self.headers_first:  # the status line at once, then the body drips
                    conn.sendall(head)
                    chunks = [b"x"] * self.seconds
                else:  # even the status line comes a byte at a time
                    chunks = [bytes([b]) for b in head][: self.seconds]
                for chunk in chunks:
                    if self.stop.wait(1.0):
                        return
                    conn.sendall(chunk)
            except OSError:
                return  # the client gave up: what we want


@pytest.fixture(params=[True, False], ids=["body-drips", "headers-drip"])
def dripper(request: pytest.FixtureRequest) -> Iterator[Dripper]:
    server = Dripper(headers_first=request.param)
    yield server
    server.stop.set()
    server.sock.close()


def test_a_dripping_endpoint_is_cut_off_at_the_total_timeout(dripper: Dripper) -> None:
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        post_json(dripper.url, {"a": 1}, timeout=2.0, channel="webhook")
    elapsed = time.monotonic() - started
    assert elapsed < 3.5, elapsed  # not 30 s: a byte a second never trips a read timeout
    assert caught.value.retryable
    assert "timed out after 2s" in caught.value.message and "127.0.0.1" in caught.value.message
    assert "/hook" not in caught.value.message  # the path may be the credential

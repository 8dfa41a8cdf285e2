"""The Kratos HTTP client keeps nothing between calls but quiet keep-alive sockets, and
one deadline bounds a whole exchange. Both clients keep these rules: the one that blocks
a thread (``HTTPClient``) and the one on an event loop (``AsyncHTTPClient``, driven here
from the test's thread through a loop of its own, as the server's loop would run it).

A real Kratos answers one request with one answer; the case below needs an upstream
that does not (a desyncing proxy between the bridge and Kratos), so a FAKE server,
named as such, plays it over a real socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import resource
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from bridge.kratos.http_client import Answer, AsyncHTTPClient, HTTPClient, RequestFailed
from tests.support.harness import SlowLink


class OnLoop:
    """An ``AsyncHTTPClient`` asked from this thread: its coroutines run on one event loop
    in a thread of its own."""

    def __init__(self, url: str) -> None:
        self.client = AsyncHTTPClient(url)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def get(self, path: str, headers: list[tuple[str, str]], timeout: float) -> Answer:
        return self.run(self.client.get(path, headers, timeout))

    def idle_ports(self) -> list[int]:
        return [s.transport.get_extra_info("sockname")[1] for s in self.client._idle]

    def close(self) -> None:
        async def close() -> None:
            self.client.close()

        self.run(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _closing(stream) -> bool:
    return stream.transport.is_closing()


class OnThread:
    def __init__(self, url: str) -> None:
        self.client = HTTPClient(url)
        self.get = self.client.get
        self.close = self.client.close

    def idle_ports(self) -> list[int]:
        return [c.sock.getsockname()[1] for c in self.client._idle]


@pytest.fixture(params=[OnThread, OnLoop], ids=["thread", "loop"])
def open_client(request):
    """``open_client(url)``: a client of either kind, closed after the test."""
    opened = []

    def open_one(url: str):
        opened.append(request.param(url))
        return opened[-1]

    yield open_one
    for client in opened:
        client.close()


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class DesyncingUpstream:
    """FAKE upstream: answers the first request on a connection with two answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        first = True
        with conn:
            while conn.recv(65536):
                if first:
                    conn.sendall(_answer(b'{"who":"you"}') + _answer(b'{"who":"VICTIM"}'))
                    first = False
                else:
                    conn.sendall(_answer(b'{"who":"you"}'))

    def close(self) -> None:
        self._listener.close()


def test_bytes_past_an_answer_never_become_the_next_answer(open_client):
    upstream = DesyncingUpstream()
    client = open_client(upstream.url)
    try:
        answers = [client.get("/sessions/whoami", [], timeout=2).body for _ in range(3)]
    finally:
        upstream.close()
    assert answers == [b'{"who":"you"}'] * 3
    assert upstream.connections >= 2  # the desynced socket was not reused


def test_requests_carry_only_their_own_headers(kratos, open_client):
    """Against the real Kratos: a cookie Kratos sets is not sent back, whatever came
    before; a call with no credential is a 401 however many answers came before it."""
    from tests.support import kratos_flows as flows

    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    client = open_client(kratos.public_url)
    for _ in range(3):
        with_cookie = client.get(
            "/sessions/whoami", [("Cookie", f"ory_kratos_session={cookie}")], timeout=2
        )
        assert with_cookie.status == 200
        assert client.get("/sessions/whoami", [], timeout=2).status == 401


def test_a_quiet_connection_is_kept_for_the_next_call(kratos, open_client):
    client = open_client(kratos.public_url)
    ports = set()
    for _ in range(3):
        assert client.get("/health/alive", [], timeout=5).status == 200
        (port,) = client.idle_ports()  # white-box: the one connection kept
        ports.add(port)
    assert len(ports) == 1, "each call opened a new connection"


def test_one_deadline_bounds_an_answer_that_trickles(kratos, open_client):
    """Kratos's answer, one byte every 50 ms: no read waits long, so only a deadline
    for the whole exchange ends it (the answer would take seconds to arrive)."""
    link = SlowLink(kratos.public_port, delay=0.05, trickle=True)
    client = open_client(link.url)
    try:
        with pytest.raises(RequestFailed):
            client.get("/sessions/whoami", [], timeout=0.5)
        assert client.idle_ports() == []
    finally:
        link.close()


def test_a_call_cancelled_halfway_leaves_no_connection_behind(kratos):
    """A request whose client went away is cancelled while Kratos's answer is on its way:
    that connection is closed, so the answer cannot reach the next call, which gets its
    own (401 without a credential, where the cancelled one would have been 200)."""
    from tests.support import kratos_flows as flows

    user = flows.register(kratos)
    link = SlowLink(kratos.public_port, delay=0.0)
    on_loop = OnLoop(link.url)
    try:
        assert on_loop.get("/health/alive", [], timeout=5).status == 200
        (kept,) = on_loop.client._idle  # white-box: the connection the next call takes
        link.delay = 1.0
        held = link.held
        pending = asyncio.run_coroutine_threadsafe(
            on_loop.client.get("/sessions/whoami", [("X-Session-Token", user.token)], 5),
            on_loop.loop,
        )
        deadline = time.monotonic() + 5
        while link.held == held and time.monotonic() < deadline:  # Kratos has answered
            time.sleep(0.01)
        assert link.held > held
        pending.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            pending.result()
        assert on_loop.idle_ports() == []
        assert on_loop.run(_closing(kept))
        link.delay = 0.0
        assert on_loop.get("/sessions/whoami", [], timeout=5).status == 401
    finally:
        on_loop.close()
        link.close()


def test_keep_alive_holds_when_the_process_has_more_than_1024_descriptors(kratos):
    """A server process busy with many clients holds descriptors past 1024, where
    select() cannot look: the client must still reuse its quiet socket to Kratos."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this machine allows {hard} open files, not enough to pass 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    client = HTTPClient(kratos.public_url)
    try:
        local_ports = set()
        for _ in range(3):
            assert client.get("/health/alive", [], timeout=5).status == 200
            (connection,) = client._idle  # white-box: the one socket kept for the next call
            assert connection.sock.fileno() > 1024
            local_ports.add(connection.sock.getsockname()[1])
    finally:
        client.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(local_ports) == 1, "each call opened a new connection"

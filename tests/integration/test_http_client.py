"""The Kratos HTTP client keeps nothing between calls but quiet keep-alive sockets.

A real Kratos answers one request with one answer; the case below needs an upstream
that does not (a desyncing proxy between the bridge and Kratos), so a FAKE server,
named as such, plays it over a real socket.
"""

from __future__ import annotations

import os
import resource
import socket
import threading

import pytest

from bridge.kratos.http_client import HTTPClient


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


def test_bytes_past_an_answer_never_become_the_next_answer():
    upstream = DesyncingUpstream()
    client = HTTPClient(upstream.url)
    try:
        answers = [client.get("/sessions/whoami", [], timeout=2).body for _ in range(3)]
    finally:
        client.close()
        upstream.close()
    assert answers == [b'{"who":"you"}'] * 3
    assert upstream.connections >= 2  # the desynced socket was not reused


def test_requests_carry_only_their_own_headers(kratos):
    """Against the real Kratos: a cookie Kratos sets is not sent back, whatever came
    before; a call with no credential is a 401 however many answers came before it."""
    from tests.support import kratos_flows as flows

    user = flows.register(kratos)
    cookie = flows.browser_login(kratos, user)
    client = HTTPClient(kratos.public_url)
    try:
        for _ in range(3):
            with_cookie = client.get(
                "/sessions/whoami", [("Cookie", f"ory_kratos_session={cookie}")], timeout=2
            )
            assert with_cookie.status == 200
            assert client.get("/sessions/whoami", [], timeout=2).status == 401
    finally:
        client.close()


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

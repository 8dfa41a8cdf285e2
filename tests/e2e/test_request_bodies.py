"""Request bodies over a real socket to ``kratos-bridge serve``, on both listeners: only a
route that takes a body reads one, and a client that sends its headers and then stalls or
trickles the body is answered ``408`` within ``BRIDGE_BODY_TIMEOUT``, not held for ever."""

from __future__ import annotations

import json
import selectors
import socket
import time

import pytest

from bridge.web.app import BODY_ENDPOINTS
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer

APP_TOKEN = "app-token-for-tests-" + "a" * 24
HOOK_SECRET = "hook-secret-for-tests-" + "h" * 24
ADMIN_TOKEN = "admin-token-for-tests-" + "t" * 24
BODY_TIMEOUT = 1.0
# Guards against a hung test only: far above BODY_TIMEOUT, never what the test asserts.
HANG_GUARD = 30.0


@pytest.fixture(scope="module")
def bridge(kratos, workdir):
    server = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_APP_TOKEN": APP_TOKEN,
            "BRIDGE_HOOK_SECRET": HOOK_SECRET,
            "BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "BRIDGE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        },
        workdir,
    )
    yield server
    server.stop()


def _head(method: str, path: str, length: int, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bridge.test", f"Content-Length: {length}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of one response (``Content-Length`` framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    length = int({k.lower(): v for k, v in fields.items()}["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length])


def _connect(bridge: BridgeServer, port: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port or bridge.port))
    sock.settimeout(HANG_GUARD)
    return sock


BODY_ROUTES = [
    ("PATCH", "/whoami/app", {"Content-Type": "application/merge-patch+json"}),
    ("POST", "/hooks/kratos/registration", {"Content-Type": "application/json"}),
]


# The dashboard's sign-in form on the admin listener (werkzeug, WSGI): read by the route.
ADMIN_FORM = ("/admin/ui/login", 1000, {"Content-Type": "application/x-www-form-urlencoded"})


@pytest.mark.parametrize(("method", "path", "headers"), BODY_ROUTES, ids=["app", "hook"])
def test_a_body_that_stalls_is_answered_408(bridge, method, path, headers):
    with _connect(bridge) as sock:
        sock.sendall(_head(method, path, 1000, **headers) + b'{"cart": "')  # then nothing
        status, body = _answer(sock)
    assert status == 408
    assert body == {"error": "request_timeout", "message": "Request Timeout"}


def test_a_form_that_stalls_on_the_admin_listener_is_answered_408(bridge):
    path, length, headers = ADMIN_FORM
    with _connect(bridge, bridge.admin_port) as sock:
        sock.sendall(_head("POST", path, length, **headers) + b"token=adm")  # then nothing
        status, body = _answer(sock)
    assert status == 408
    assert body["error"] == "request_timeout"


def test_a_whole_form_on_the_admin_listener_is_read(bridge):
    form = f"token={ADMIN_TOKEN}".encode()
    path, _, headers = ADMIN_FORM
    with _connect(bridge, bridge.admin_port) as sock:
        sock.sendall(_head("POST", path, len(form), **headers) + form[:4])
        sock.sendall(form[4:])
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    assert data.startswith(b"HTTP/1.1 303 "), data[:200]  # signed in: on to the dashboard


@pytest.mark.parametrize("listener", ["main", "admin"])
def test_a_body_that_trickles_is_answered_408_although_no_read_stalls(bridge, listener):
    """The deadline is for the whole body: a byte now and then does not renew it."""
    if listener == "main":
        port, head = bridge.port, _head("PATCH", "/whoami/app", 1000, **BODY_ROUTES[0][2])
    else:
        path, length, headers = ADMIN_FORM
        port, head = bridge.admin_port, _head("POST", path, length, **headers)
    # A selector, not select(): late in the suite this process may hold descriptors past
    # select()'s limit of 1024.
    with _connect(bridge, port) as sock, selectors.DefaultSelector() as answer_arrived:
        answer_arrived.register(sock, selectors.EVENT_READ)
        sock.sendall(head)
        started = time.monotonic()
        # A byte every tenth of the deadline, until the answer starts to arrive (no byte
        # after it: one the server never reads could reset the connection under it).
        while not answer_arrived.select(BODY_TIMEOUT / 10):
            assert time.monotonic() - started < HANG_GUARD, "no answer"
            sock.sendall(b" ")
        status, body = _answer(sock)
    assert status == 408
    assert body["error"] == "request_timeout"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/whoami", 401), ("POST", "/no/such/route", 404), ("POST", "/whoami", 405)],
)
def test_a_route_that_takes_no_body_answers_without_waiting_for_one(bridge, method, path, status):
    with _connect(bridge) as sock:
        sock.sendall(_head(method, path, 10 << 20))  # 10 MiB declared, none sent
        answer, body = _answer(sock)
    assert answer == status
    assert set(body) >= {"error", "message"}


def test_a_whole_body_is_read_and_written(bridge, kratos):
    user = flows.register(kratos)
    patch = b'{"cart": "3 items"}'
    headers = {
        "Content_Type": "application/merge-patch+json",
        "X_Session_Token": user.token,
        "X_Bridge_App_Token": APP_TOKEN,
    }
    with _connect(bridge) as sock:
        sock.sendall(_head("PATCH", "/whoami/app", len(patch), **headers))
        sock.sendall(patch[:5])
        sock.sendall(patch[5:])
        status, body = _answer(sock)
    assert status == 200, body
    assert body["app"] == {"cart": "3 items"}


def test_the_routes_said_to_take_a_body_are_routes(client):
    """A renamed view would otherwise be answered with an empty body, silently."""
    assert BODY_ENDPOINTS <= set(client.application.view_functions)

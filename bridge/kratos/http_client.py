"""A small HTTP/1.1 client for talking to Kratos: stateless, and bounded by one deadline.

Why not a general-purpose client: two properties matter more here than features.

- *No state between calls.* A general client keeps a cookie jar and default headers;
  a cookie Kratos sets on one user's whoami would then ride along on the next user's
  call, and Kratos reads the session cookie before ``Authorization: Bearer``. Here a
  request is exactly the method, path and headers the caller passes, nothing else. The
  only thing kept between calls is idle keep-alive sockets, and an HTTP/1.1 connection
  carries no credential of its own: every request states its own.
- *One deadline for the whole exchange.* Socket timeouts apply per read, so a server
  that trickles its answer can hold a caller for many times the timeout. Here every
  name lookup, connect (to each address in turn), send and read gets only the time
  left until the caller's deadline.
- *A kept-alive socket is reused only when it is quiet.* One with bytes waiting (or
  closed by the server) when taken from the pool, or left with bytes past the end of
  its last answer, is closed: those bytes would otherwise be read as the next
  request's answer.

HTTP parsing is h11's (the state machine underneath httpx).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

_READ_SIZE = 65536
_MAX_IDLE = 32
_IDLE_SECONDS = 20.0  # below the idle timeouts of common servers and load balancers
_ADDRESSES_SECONDS = 5.0  # how long a name's addresses are reused


class RequestFailed(Exception):
    """The server could not be reached, did not answer in time, or broke HTTP."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in order, repeats kept
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)

    def header_list(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]

    def text_header(self, name: str) -> str | None:
        """``header`` by a ``str`` name, as text (Latin-1, as HTTP/1.1 carries it)."""
        value = self.header(name.encode("ascii"))
        return None if value is None else value.decode("latin-1")


class _Connection:
    __slots__ = ("h11", "idle_since", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def quiet(self) -> bool:
        """Still fit for a request: not idle too long, and nothing to read (neither bytes
        nor the server's close) before a request has been sent."""
        if time.monotonic() - self.idle_since > _IDLE_SECONDS:
            return False
        # poll(), not select(): select() cannot watch a descriptor past 1024, and a busy
        # server process holds that many (its clients' sockets count too).
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class HTTPClient:
    """Idempotent requests (GET, DELETE) to one origin (``http://`` or ``https://``) with
    keep-alive."""

    def __init__(self, base_url: str, max_body: int = 1 << 20) -> None:
        parts = urlsplit(base_url)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._base_path = parts.path.rstrip("/")
        self._max_body = max_body
        self._idle: deque[_Connection] = deque()
        self._addresses: tuple[float, list[tuple[Any, ...]]] = (0.0, [])
        self._resolver = ThreadPoolExecutor(1, thread_name_prefix="bridge-resolve")

    def get(self, path: str, headers: list[tuple[str, str]], timeout: float) -> Answer:
        """Send ``GET path`` with exactly ``headers`` (plus Host); raise ``RequestFailed``
        when the whole exchange does not finish within ``timeout`` seconds."""
        return self.request("GET", path, headers, timeout)

    def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        timeout: float,
        body: bytes = b"",
    ) -> Answer:
        """``method path`` with exactly ``headers`` (plus Host, and Content-Length for a
        body), as ``get``. Only for idempotent methods (GET, DELETE): a request on a
        kept-alive connection that failed before any answer is sent once more."""
        deadline = time.monotonic() + timeout
        sent = [("Host", self._host_header), *headers]
        if body:
            sent.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=self._base_path + path, headers=sent)
        # A kept-alive socket the server has closed meanwhile fails before any byte of an
        # answer arrives; the method is idempotent, so one retry on a new connection is safe.
        while self._idle:
            try:
                connection = self._idle.pop()
            except IndexError:
                break
            if not connection.quiet():
                connection.close()
                continue
            answer = self._exchange(connection, request, body, deadline, reused=True)
            if answer is not None:
                return answer
        answer = self._exchange(self._connect(deadline), request, body, deadline, reused=False)
        assert answer is not None
        return answer

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        self._resolver.shutdown(wait=False)

    def _connect(self, deadline: float) -> _Connection:
        error: Exception = RequestFailed("no address")
        for family, kind, protocol, _, address in self._resolve(deadline):
            sock = socket.socket(family, kind, protocol)
            try:
                sock.settimeout(_left(deadline))
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:
                    sock.settimeout(_left(deadline))
                    sock = self._tls.wrap_socket(sock, server_hostname=self._host)
                return _Connection(sock)
            except (OSError, ValueError) as failure:
                sock.close()
                error = failure
                if isinstance(failure, TimeoutError):
                    break
        raise RequestFailed(f"connect: {type(error).__name__}")

    def _resolve(self, deadline: float) -> list[tuple[Any, ...]]:
        """The host's addresses, looked up at most every few seconds (a name in compose
        may move), and never past the deadline: ``getaddrinfo`` itself cannot be bounded,
        so it runs on a thread of its own."""
        looked_up_at, addresses = self._addresses
        if addresses and time.monotonic() - looked_up_at < _ADDRESSES_SECONDS:
            return addresses
        lookup = self._resolver.submit(
            socket.getaddrinfo, self._host, self._port, type=socket.SOCK_STREAM
        )
        try:
            addresses = lookup.result(timeout=_left(deadline))
        except FutureTimeout:
            raise RequestFailed("name lookup: TimeoutError") from None
        except (OSError, UnicodeError) as error:
            raise RequestFailed(f"name lookup: {type(error).__name__}") from None
        self._addresses = (time.monotonic(), addresses)
        return addresses

    def _exchange(
        self,
        connection: _Connection,
        request: h11.Request,
        body: bytes,
        deadline: float,
        *,
        reused: bool,
    ) -> Answer | None:
        """The answer, or ``None`` when a reused connection turned out to be closed."""
        received = False
        try:
            data = connection.h11.send(request)
            if body:
                data += connection.h11.send(h11.Data(data=body))
            data += connection.h11.send(h11.EndOfMessage())
            connection.sock.settimeout(_left(deadline))
            connection.sock.sendall(data)
            status, headers, chunks, size = 0, [], [], 0
            while True:
                event = connection.h11.next_event()
                if event is h11.NEED_DATA:
                    connection.sock.settimeout(_left(deadline))
                    chunk = connection.sock.recv(_READ_SIZE)
                    received = received or bool(chunk)
                    connection.h11.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self._max_body:
                        raise RequestFailed("answer too large")
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("closed before the answer ended")
        except (OSError, h11.ProtocolError, RequestFailed) as error:
            connection.close()
            if reused and not received and not isinstance(error, TimeoutError | _Late):
                return None
            if isinstance(error, RequestFailed):
                raise
            raise RequestFailed(type(error).__name__) from None
        self._keep(connection)
        return Answer(status, headers, b"".join(chunks))

    def _keep(self, connection: _Connection) -> None:
        if (
            connection.h11.our_state is h11.DONE
            and connection.h11.their_state is h11.DONE
            and connection.h11.trailing_data == (b"", False)
            and len(self._idle) < _MAX_IDLE
        ):
            connection.h11.start_next_cycle()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()


class _Late(TimeoutError):
    """The deadline passed before the next step could start."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Late("deadline passed")
    return left

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

HTTP parsing is h11's (the state machine underneath httpx). One exchange is written
once, as steps that say what they need sent and read (``_exchange_steps``); the
blocking client (``HTTPClient``, for threads) and the event-loop client
(``AsyncHTTPClient``, for coroutines on the server's loop) only carry those bytes, and
keep the same rules.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
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


class _Kept(Protocol):
    h11: h11.Connection
    idle_since: float

    def quiet(self) -> bool: ...

    def close(self) -> None: ...


K = TypeVar("K", bound=_Kept)


class _Idle(Generic[K]):
    """Kept-alive connections: given out only while quiet, kept only after a clean end."""

    def __init__(self) -> None:
        self._kept: deque[K] = deque()

    def __iter__(self) -> Iterator[K]:
        return iter(self._kept)

    def quiet_ones(self) -> Iterator[K]:
        """Each kept connection still fit for a request, most recent first; the others
        are closed on the way."""
        while self._kept:
            try:
                connection = self._kept.pop()
            except IndexError:  # another thread took the last one
                return
            if connection.quiet():
                yield connection
            else:
                connection.close()

    def keep(self, connection: K) -> None:
        """Keep ``connection`` for the next request if its exchange ended cleanly (no
        byte past the answer) and there is room; else close it."""
        ended = connection.h11
        if (
            ended.our_state is h11.DONE
            and ended.their_state is h11.DONE
            and ended.trailing_data == (b"", False)
            and len(self._kept) < _MAX_IDLE
        ):
            ended.start_next_cycle()
            connection.idle_since = time.monotonic()
            self._kept.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        while self._kept:
            self._kept.pop().close()


class _Origin:
    """What both clients know of their one origin: where it is, how a request to it is
    written, and its addresses as last looked up."""

    def __init__(self, base_url: str, max_body: int) -> None:
        parts = urlsplit(base_url)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._base_path = parts.path.rstrip("/")
        self._max_body = max_body
        self._addresses: tuple[float, list[tuple[Any, ...]]] = (0.0, [])

    def _request(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> h11.Request:
        """Exactly ``headers``, plus Host, and Content-Length for a body."""
        sent = [("Host", self._host_header), *headers]
        if body:
            sent.append(("Content-Length", str(len(body))))
        return h11.Request(method=method, target=self._base_path + path, headers=sent)

    def _known_addresses(self) -> list[tuple[Any, ...]] | None:
        """The addresses looked up in the last few seconds (a name in compose may move)."""
        looked_up_at, addresses = self._addresses
        if addresses and time.monotonic() - looked_up_at < _ADDRESSES_SECONDS:
            return addresses
        return None

    def _lookup(self) -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)


class HTTPClient(_Origin):
    """Idempotent requests (GET, DELETE) to one origin (``http://`` or ``https://``) with
    keep-alive, on the calling thread."""

    def __init__(self, base_url: str, max_body: int = 1 << 20) -> None:
        super().__init__(base_url, max_body)
        self._idle: _Idle[_Connection] = _Idle()
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
        request = self._request(method, path, headers, body)
        # A kept-alive socket the server has closed meanwhile fails before any byte of an
        # answer arrives; the method is idempotent, so one retry on a new connection is safe.
        for connection in self._idle.quiet_ones():
            answer = self._exchange(connection, request, body, deadline, reused=True)
            if answer is not None:
                return answer
        answer = self._exchange(self._connect(deadline), request, body, deadline, reused=False)
        assert answer is not None
        return answer

    def close(self) -> None:
        self._idle.close()
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
        addresses = self._known_addresses()
        if addresses is not None:
            return addresses
        lookup = self._resolver.submit(self._lookup)
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
        steps = _exchange_steps(connection.h11, request, body, self._max_body)
        try:
            step = _advance(steps, None)
            while not isinstance(step, Answer):
                connection.sock.settimeout(_left(deadline))
                if step:
                    connection.sock.sendall(step)
                    step = _advance(steps, b"")
                else:
                    chunk = connection.sock.recv(_READ_SIZE)
                    received = received or bool(chunk)
                    step = _advance(steps, chunk)
        except (OSError, h11.ProtocolError, RequestFailed) as error:
            connection.close()
            _raise_unless_retry(error, reused=reused, received=received)
            return None
        self._idle.keep(connection)
        return step


class _Stream(asyncio.Protocol):
    """One connection on an event loop: what the server sent, until it is read."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT)
        self.loop = asyncio.get_running_loop()
        self.idle_since = 0.0
        self.transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._ended = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._received += data
        if len(self._received) >= _READ_SIZE and not self._paused:
            assert self.transport is not None
            self.transport.pause_reading()  # a server faster than the reader waits
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False  # and the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """What the server sent since the last read; ``b""`` once it closed."""
        while not self._received and not self._ended:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = bytes(self._received)
        self._received.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def send(self, data: bytes) -> None:
        if self._ended or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("closed")
        self.transport.write(data)

    def quiet(self) -> bool:
        """Fit for a request: on this loop, not idle too long, nothing sent by the server
        (neither bytes nor its close) since its last answer."""
        return (
            self.loop is asyncio.get_running_loop()
            and not self._received
            and not self._ended
            and time.monotonic() - self.idle_since <= _IDLE_SECONDS
        )

    def close(self) -> None:
        """Closed now on its own loop; from elsewhere, handed to its loop (if it runs)."""
        if self.transport is None:
            return
        try:
            on_its_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_its_loop = False
        if on_its_loop:
            self.transport.close()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.transport.close)


class AsyncHTTPClient(_Origin):
    """``HTTPClient``'s requests as coroutines on the running event loop, with the same
    rules: exactly the caller's headers, one deadline for the whole exchange, a kept-alive
    connection reused only while quiet. Connections belong to the loop that opened them;
    one on another loop is never reused."""

    def __init__(self, base_url: str, max_body: int = 1 << 20) -> None:
        super().__init__(base_url, max_body)
        self._idle: _Idle[_Stream] = _Idle()

    async def get(self, path: str, headers: list[tuple[str, str]], timeout: float) -> Answer:
        """As ``HTTPClient.get``."""
        return await self.request("GET", path, headers, timeout)

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        timeout: float,
        body: bytes = b"",
    ) -> Answer:
        """As ``HTTPClient.request``. A caller cancelled mid-exchange leaves no connection
        behind: the one it was using is closed, not kept."""
        deadline = time.monotonic() + timeout
        request = self._request(method, path, headers, body)
        for stream in self._idle.quiet_ones():
            answer = await self._exchange(stream, request, body, deadline, reused=True)
            if answer is not None:
                return answer
        stream = await self._connect(deadline)
        answer = await self._exchange(stream, request, body, deadline, reused=False)
        assert answer is not None
        return answer

    def close(self) -> None:
        self._idle.close()

    async def _connect(self, deadline: float) -> _Stream:
        loop = asyncio.get_running_loop()
        error: Exception = RequestFailed("no address")
        for family, _, protocol, _, address in await self._resolve(deadline):
            try:
                async with asyncio.timeout(_left(deadline)):
                    _, stream = await loop.create_connection(
                        _Stream,
                        host=address[0],
                        port=address[1],
                        family=family,
                        proto=protocol,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
                return stream
            except (OSError, ValueError) as failure:
                error = failure
                if isinstance(failure, TimeoutError):
                    break
        raise RequestFailed(f"connect: {type(error).__name__}")

    async def _resolve(self, deadline: float) -> list[tuple[Any, ...]]:
        addresses = self._known_addresses()
        if addresses is not None:
            return addresses
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_left(deadline)):
                addresses = await loop.run_in_executor(None, self._lookup)
        except TimeoutError:
            raise RequestFailed("name lookup: TimeoutError") from None
        except (OSError, UnicodeError) as error:
            raise RequestFailed(f"name lookup: {type(error).__name__}") from None
        self._addresses = (time.monotonic(), addresses)
        return addresses

    async def _exchange(
        self,
        stream: _Stream,
        request: h11.Request,
        body: bytes,
        deadline: float,
        *,
        reused: bool,
    ) -> Answer | None:
        """The answer, or ``None`` when a reused connection turned out to be closed."""
        received = False
        steps = _exchange_steps(stream.h11, request, body, self._max_body)
        try:
            async with asyncio.timeout(_left(deadline)):
                step = _advance(steps, None)
                while not isinstance(step, Answer):
                    if step:
                        stream.send(step)
                        step = _advance(steps, b"")
                    else:
                        chunk = await stream.read()
                        received = received or bool(chunk)
                        step = _advance(steps, chunk)
        except (OSError, h11.ProtocolError, RequestFailed) as error:
            stream.close()
            _raise_unless_retry(error, reused=reused, received=received)
            return None
        except BaseException:
            stream.close()  # cancelled halfway: its next bytes belong to this exchange
            raise
        self._idle.keep(stream)
        return step


class _Late(TimeoutError):
    """The deadline passed before the next step could start."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Late("deadline passed")
    return left


def _exchange_steps(
    connection: h11.Connection, request: h11.Request, body: bytes, max_body: int
) -> Generator[bytes, bytes, Answer]:
    """One request and its answer, without I/O: yields bytes to send (the driver sends
    back ``b""`` once they are sent) or ``b""`` to ask for what the server sent next (the
    driver sends back the chunk, ``b""`` at the end of the stream); returns the answer."""
    data = connection.send(request) or b""
    if body:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    yield data
    status, headers, chunks, size = 0, [], [], 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data((yield b""))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                raise RequestFailed("answer too large")
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return Answer(status, headers, b"".join(chunks))
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("closed before the answer ended")


def _advance(steps: Generator[bytes, bytes, Answer], sent: bytes | None) -> bytes | Answer:
    """The exchange's next need, or its answer once it has one."""
    try:
        return next(steps) if sent is None else steps.send(sent)
    except StopIteration as done:
        return done.value


def _raise_unless_retry(error: BaseException, *, reused: bool, received: bool) -> None:
    """After an exchange failed (its connection closed): ``RequestFailed``, unless a
    reused connection failed before a byte of answer (the server had closed it meanwhile:
    the caller tries a new one)."""
    if reused and not received and not isinstance(error, TimeoutError | _Late):
        return
    if isinstance(error, RequestFailed):
        raise error
    raise RequestFailed(type(error).__name__) from None

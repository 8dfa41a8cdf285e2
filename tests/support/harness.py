"""Real servers for the tests: redis-server, Kratos (built from its Go module) and the bridge."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
import yaml

TESTS = Path(__file__).resolve().parents[1]
KRATOS_VERSION = "v1.3.1"
KRATOS_BIN = Path(
    os.environ.get("KRATOS_BIN")
    or Path.home() / ".cache" / "kratos-session-bridge" / f"kratos-{KRATOS_VERSION}" / "kratos"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def forwarded(
    uri: str = "/", host: str = "app.test", method: str = "GET", proto: str = "https"
) -> dict[str, str]:
    """The original request as Traefik and Caddy tell /forward-auth about it."""
    return {
        "X-Forwarded-Method": method,
        "X-Forwarded-Proto": proto,
        "X-Forwarded-Host": host,
        "X-Forwarded-Uri": uri,
    }


def token_status(bridge: BridgeServer, token: str) -> int:
    """What the bridge answers ``/forward-auth`` for a request with this session token."""
    return _forward_auth_status(bridge, {"X-Session-Token": token})


def cookie_status(bridge: BridgeServer, cookie: str) -> int:
    """What the bridge answers ``/forward-auth`` for a request with this session cookie
    (Kratos's default name), asked directly as a proxy would ask it."""
    return _forward_auth_status(bridge, {"Cookie": f"ory_kratos_session={cookie}"})


def _forward_auth_status(bridge: BridgeServer, credential: dict[str, str]) -> int:
    headers = {**credential, **forwarded("/")}
    return httpx.get(bridge.url + "/forward-auth", headers=headers).status_code


def start_demo(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The demo app (``compose/demo/app.py``) as a process on ``port``, importing this
    checkout's bridge (the venv's editable install may point at another tree)."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen(
        [sys.executable, str(root / "compose" / "demo" / "app.py")],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "DEMO_PORT": str(port), **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RedisServer:
    """A redis-server of its own on a free port; ``stop`` it and ``start`` it again on the
    same port (empty: nothing is saved), as an outage and its end."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run the README test command")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ]
        self.client = redis.Redis(port=self.port)
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL)
        wait_until(self.client.ping, 10, "redis-server")

    def stop(self) -> None:
        stop_process(self.process)


# Kratos's `memory` DSN is SQLite in shared-cache mode, where a write locks whole tables and
# a concurrent read fails at once ("database table is locked") instead of waiting. Kratos's
# whoami answers any error fetching the session with 401, so under load a valid session was
# now and then refused. A file in WAL mode lets readers run beside a writer, and writers
# wait for each other (pop's busy timeout); durability is not needed in tests.
SQLITE_OPTIONS = "_fk=true&mode=rwc&_journal_mode=WAL&_sync=OFF"


def _migrated_database(workdir: Path) -> Path:
    """An empty Kratos database with every migration applied, made once per test session
    (a migration takes seconds; copying the file, no time)."""
    template = workdir / f"kratos-{KRATOS_VERSION}-migrated.sqlite"
    if not template.exists():
        partial = template.with_suffix(f".{os.getpid()}.partial")
        subprocess.run(
            [str(KRATOS_BIN), "migrate", "sql", "--yes", f"sqlite://{partial}?{SQLITE_OPTIONS}"],
            check=True,
            capture_output=True,
        )
        # Fold the write-ahead log into the file, so the one file is the whole database.
        import sqlite3

        with sqlite3.connect(partial) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        partial.replace(template)
    return template


class Kratos:
    """One Kratos process with its own ports and in-memory database."""

    def __init__(
        self,
        workdir: Path,
        required_aal: str = "aal1",
        lifespan: str = "1h",
        extra_config: dict | None = None,
    ) -> None:
        """``extra_config`` is merged over the test config (mappings key by key, anything
        else replaced), after the ports and the rest are filled in."""
        if not KRATOS_BIN.exists():
            subprocess.run(
                ["bash", str(TESTS / "tools" / "build-kratos.sh"), str(KRATOS_BIN), KRATOS_VERSION],
                check=True,
            )
        self.public_port, self.admin_port = free_port(), free_port()
        self.public_url = f"http://127.0.0.1:{self.public_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        config = yaml.safe_load((TESTS / "kratos" / "kratos.yml").read_text())
        config["serve"]["public"].update(base_url=self.public_url + "/", port=self.public_port)
        config["serve"]["admin"].update(base_url=self.admin_url + "/", port=self.admin_port)
        config["identity"]["schemas"][0]["url"] = (
            TESTS / "kratos" / "identity.schema.json"
        ).as_uri()
        config["session"]["whoami"]["required_aal"] = required_aal
        config["session"]["lifespan"] = lifespan
        database = workdir / f"kratos-{self.public_port}.sqlite"
        shutil.copyfile(_migrated_database(workdir), database)
        self.database = database  # for tests that make it fail under Kratos
        config["dsn"] = f"sqlite://{database}?{SQLITE_OPTIONS}"
        if extra_config:
            _merge(config, extra_config)
        self.config_path = workdir / f"kratos-{self.public_port}.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"kratos-{self.public_port}.log"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(KRATOS_BIN), "serve", "-c", str(self.config_path), "--dev", "--sqa-opt-out"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
            )
        wait_until(
            lambda: httpx.get(self.public_url + "/health/ready").status_code == 200,
            60,
            "kratos",
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def whoami_calls(self) -> int:
        """How many times Kratos answered /sessions/whoami: counted by Kratos itself."""
        return self.calls("/sessions/whoami")

    def calls(self, endpoint: str) -> int:
        """How many times Kratos answered ``endpoint`` (any status), by its own metrics."""
        text = httpx.get(self.admin_url + "/admin/metrics/prometheus").text
        pattern = re.compile(
            r'^http_requests_duration_seconds_count\{[^}]*endpoint="'
            + re.escape(endpoint)
            + r'"[^}]*\} (\d+)',
            re.M,
        )
        return sum(int(n) for n in pattern.findall(text))


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# The Redis and Kratos timeouts of a bridge in a test, unless the test names its own: a
# busy CI machine stalls a process for seconds (a full run took 36 min there against 20),
# and with the product's defaults (0.5 s, 2 s) such a stall is a 503 in whatever test runs
# at that moment. A dependency that is down refuses at once; tests of slowness set theirs.
PATIENT_TIMEOUTS = {"BRIDGE_REDIS_TIMEOUT": "5", "BRIDGE_KRATOS_TIMEOUT": "15"}


class BridgeServer:
    """``kratos-bridge serve`` as a real process; ``launcher`` runs it (``taskset -c 1``).
    ``patient``: with ``PATIENT_TIMEOUTS`` under ``env``; False runs the product's defaults,
    as a user's bridge does (a benchmark, the failover test)."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        extra_args: list[str] = (),
        launcher: list[str] = (),
        *,
        patient: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"bridge-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        # Each bridge its own admin port, unless the test chose one (0: none).
        self.admin_port = int(env.get("BRIDGE_ADMIN_PORT") or free_port())
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        full_env["BRIDGE_ADMIN_PORT"] = str(self.admin_port)
        full_env.update(PATIENT_TIMEOUTS if patient else {})
        full_env.update(env)
        serve = [sys.executable, "-m", "bridge", "serve"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*launcher, *serve, "--port", str(self.port), *extra_args],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: httpx.get(self.url + "/health/alive").status_code == 200, 30, "bridge")
        if self.admin_port:
            wait_until(
                lambda: httpx.get(self.admin_url + "/health/alive").status_code in (200, 401),
                30,
                "bridge admin listener",
            )

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def shut_down(*ends: socket.socket) -> None:
    """Both ways of each socket, whatever state it is in (a relay's ends)."""
    for end in ends:
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class SlowLink:
    """A TCP relay that holds every chunk coming back from the server for ``delay``
    seconds: a real Kratos behind a slow network, so that races can be staged. With
    ``trickle`` set, the answer comes back one byte per ``delay`` instead: a server
    that never stalls long enough for a per-read timeout. Both may change at any time.
    ``held`` counts the chunks the server has sent back so far (held or passed on): a
    test waits on it to know that the server has answered, instead of guessing a time."""

    def __init__(self, target_port: int, delay: float, trickle: bool = False) -> None:
        import threading

        self.delay = delay
        self.trickle = trickle
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open = True
        self.held = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while self._open:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()  # the server behind the link is down: so is the link
                continue
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if slow:
                    self.held += 1  # only ever grows: "more than before" is all tests ask
                if not slow:
                    sink.sendall(chunk)
                elif self.trickle:
                    for byte in chunk:
                        time.sleep(self.delay)
                        sink.sendall(bytes([byte]))
                else:
                    time.sleep(self.delay)
                    sink.sendall(chunk)
        except OSError:
            pass
        finally:
            shut_down(source, sink)

    def close(self) -> None:
        self._open = False
        self._listener.close()

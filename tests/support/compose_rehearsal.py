"""compose/docker-compose.yml run for real without a container engine: each service a
process in a network namespace of its own, on one bridge network, from the binaries the
tests already have.

What Docker Compose would run comes from the compose file itself, read by compose-spec's
compose-go (the loader Compose uses; tests/tools/compose-config, built by
tests/tools/build-compose-config.sh): services, ``entrypoint``/``command``,
``environment``, ``secrets``, bind mounts and volumes, ``ports``, ``depends_on`` with its
conditions, health checks and profiles. What an image brings (its entrypoint, default
command, working directory, files) is :data:`IMAGES`, which names the binary that stands
in for it.

- **Network**: a namespace per service (``ip netns``), a veth into one Linux bridge, an
  address each; ``/etc/netns/NS/hosts`` (which ``ip netns exec`` mounts over
  ``/etc/hosts``) resolves every service name, as Compose's DNS does. Nothing else is
  reachable from a service: no route leaves the bridge.
- **Published ports**: a relay per port in one more namespace, the "host" one, listening
  where the compose file publishes (``127.0.0.1:8080``); the browser runs in that
  namespace, so the machine's own ports are never touched.
- **Files**: ``ip netns exec`` gives each process a private mount namespace, where the
  service's bind mounts, named volumes (a folder per run) and secrets
  (``/run/secrets/NAME``) are bind-mounted at their container paths. A missing mount point
  is created empty for the run and removed after, as Docker creates it in a container;
  it is on the machine's own file system (``/etc/config``, ``/app``...), so two
  rehearsals must not run at once.
- **Start order**: ``depends_on`` in order: ``service_started`` (running),
  ``service_healthy`` (its health check passed, run in its namespace as ``docker exec``
  would, every ``interval``, ``retries`` times) and ``service_completed_successfully``
  (exited 0).

Every failure names the service, with the end of its log.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.harness import KRATOS_BIN, TESTS, stop_process
from tests.support.proxies import ROOT, TRAEFIK_VERSION

COMPOSE_GO_VERSION = "v2.16.2"
COMPOSE_CONFIG_BIN = Path(
    os.environ.get("COMPOSE_CONFIG_BIN")
    or Path.home()
    / ".cache"
    / "kratos-session-bridge"
    / f"compose-go-{COMPOSE_GO_VERSION}"
    / "compose-config"
)
TRAEFIK_BIN = Path(
    os.environ.get("TRAEFIK_BIN")
    or Path.home() / ".cache" / "kratos-session-bridge" / f"traefik-{TRAEFIK_VERSION}" / "traefik"
)
SUBNET = "10.89.{run}.{host}"
# The status a URL answers a browser's navigation with (no redirect followed), for probes
# run in a namespace.
STATUS_OF = """
import http.client, sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
connection = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
connection.request("GET", url.path or "/", headers={"Accept": "text/html"})
print(connection.getresponse().status)
"""


class RehearsalFailed(AssertionError):
    """The stack did not come up as the compose file says; the message names the service."""


def load_project(compose_file: Path, profiles: tuple[str, ...] = ()) -> dict:
    """The compose file as Compose reads it: compose-go's normalized project."""
    if not COMPOSE_CONFIG_BIN.exists():
        subprocess.run(
            [
                "bash",
                str(TESTS / "tools" / "build-compose-config.sh"),
                str(COMPOSE_CONFIG_BIN),
                COMPOSE_GO_VERSION,
            ],
            check=True,
        )
    loaded = subprocess.run(
        [str(COMPOSE_CONFIG_BIN), str(compose_file), *profiles],
        capture_output=True,
        text=True,
        cwd=compose_file.parent,
    )
    if loaded.returncode != 0:
        raise RehearsalFailed(f"compose-go refused {compose_file}: {loaded.stderr.strip()}")
    return json.loads(loaded.stdout)


@dataclass(frozen=True)
class Image:
    """What an image gives a container, and what stands in for it here. ``tools`` are
    the names its commands use (on the container's PATH), each mapped to a command line
    on this machine; ``files`` are files the image carries, container path -> repository
    path (or text written for the run)."""

    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    workdir: str
    tools: dict[str, str]
    files: dict[str, str | Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    tmpfs: tuple[str, ...] = ()  # folders the container has of its own (not the machine's)
    stand_in: str = ""  # what runs instead of the image, for the report


PYTHON = f"{sys.executable}"
# The bridge and the demo import the checkout's package, as their images install it.
PYTHON_ENV = {"PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
# nginx:1.27-alpine's /etc/nginx/nginx.conf, but with logs to the process's output (the
# image links its log files there) and root workers (Debian has no "nginx" user).
NGINX_IMAGE_CONF = """user root;
worker_processes 1;
error_log /dev/stderr notice;
pid /run/nginx.pid;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;
    include /etc/nginx/conf.d/*.conf;
}
"""

IMAGES: dict[str, Image] = {
    "oryd/kratos:v1.3.1": Image(
        entrypoint=("kratos",),
        command=(),
        workdir="/",
        tools={"kratos": str(KRATOS_BIN)},
        stand_in=f"Kratos v1.3.1 ({KRATOS_BIN})",
    ),
    "redis:7-alpine": Image(
        entrypoint=(),
        command=("redis-server",),
        workdir="/data",
        # The image's redis-server is built with protected mode off (it listens for other
        # containers without a password); Debian's has it on.
        tools={
            "redis-server": '/usr/bin/redis-server "$@" --protected-mode no',
            "redis-cli": "/usr/bin/redis-cli",
        },
        stand_in="Debian's redis-server",
    ),
    "traefik:v3.6": Image(
        entrypoint=(),
        command=("traefik",),
        workdir="/",
        tools={"traefik": str(TRAEFIK_BIN)},
        stand_in=f"Traefik v3.6.12 ({TRAEFIK_BIN})",
    ),
    "nginx:1.27-alpine": Image(
        entrypoint=(),
        command=("nginx", "-g", "daemon off;"),
        workdir="/",
        tools={"nginx": shutil.which("nginx") or "/usr/sbin/nginx"},
        files={"/etc/nginx/nginx.conf": NGINX_IMAGE_CONF},
        tmpfs=("/run",),
        stand_in="Debian's nginx",
    ),
    # The two images the compose file builds: compose/bridge.Dockerfile and
    # compose/demo/Dockerfile (entrypoint, command and workdir as they say).
    "compose/bridge.Dockerfile": Image(
        entrypoint=("kratos-bridge",),
        command=("serve", "--host", "0.0.0.0", "--port", "4480"),
        workdir="/",
        tools={"kratos-bridge": f"{PYTHON} -m bridge", "python": PYTHON},
        env=PYTHON_ENV,
        stand_in="the bridge from the checkout",
    ),
    "compose/demo/Dockerfile": Image(
        entrypoint=(),
        command=("python", "/app/app.py"),
        workdir="/app",
        tools={"python": PYTHON},
        files={
            "/app/app.py": ROOT / "compose" / "demo" / "app.py",
            "/app/selfservice.py": ROOT / "compose" / "demo" / "selfservice.py",
        },
        env=PYTHON_ENV,
        stand_in="the demo app from the checkout",
    ),
}


def image_of(service: dict) -> Image:
    if "build" in service:
        key = service["build"]["dockerfile"]
    else:
        key = service["image"]
    if key not in IMAGES:
        raise RehearsalFailed(f"no stand-in for image {key!r}; add one to IMAGES")
    return IMAGES[key]


def start_order(services: dict[str, dict]) -> list[str]:
    """Every service after what it depends on (Compose refuses a cycle; so does this)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise RehearsalFailed(f"service {name}: depends_on has a cycle")
        visiting.add(name)
        for dependency in sorted(services[name].get("depends_on") or {}):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in sorted(services):
        visit(name)
    return order


def _seconds(duration: str | None, default: float) -> float:
    """Compose durations as compose-go prints them ("5s", "1m30s", "500ms")."""
    if not duration:
        return default
    total, number = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    text = str(duration)
    i = 0
    while i < len(text):
        if text[i].isdigit() or text[i] == ".":
            number += text[i]
            i += 1
            continue
        unit = text[i : i + 2] if text[i : i + 2] in units else text[i]
        total += float(number) * units[unit]
        number, i = "", i + len(unit)
    return total + (float(number) if number else 0.0)


@dataclass
class Service:
    name: str
    namespace: str
    address: str
    spec: dict
    image: Image
    log_path: Path
    process: subprocess.Popen | None = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    """One run of the compose project: namespaces, processes, relays; ``stop`` undoes all."""

    HOST = "host"  # the namespace standing in for the machine: published ports, the browser

    def __init__(self, project: dict, workdir: Path) -> None:
        self.project = project
        self.workdir = workdir
        self.run = uuid.uuid4().hex[:4]
        # A /24 of its own per run (10.89.N.0/24), never routed anywhere.
        self.subnet_byte = int(self.run, 16) % 250 + 1
        self.bridge = f"ksb{self.run}"
        self.services: dict[str, Service] = {}
        self.namespaces: list[str] = []
        self.created_paths: list[Path] = []
        self.relays: list[subprocess.Popen] = []
        self.tools = workdir / "tools"
        self.health: dict[str, str] = {}  # service -> starting, healthy or unhealthy: why
        self.stopping = threading.Event()

    # -- network ------------------------------------------------------------------------

    def _ip(self, *args: str, namespace: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        done = subprocess.run([*prefix, "ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RehearsalFailed(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _namespace(self, label: str, host: int) -> tuple[str, str]:
        namespace = f"ksb{self.run}-{label}"
        address = SUBNET.format(run=self.subnet_byte, host=host)
        subprocess.run(["ip", "netns", "add", namespace], check=True)
        self.namespaces.append(namespace)
        outside, inside = f"ksb{self.run}v{host}", f"ksb{self.run}p{host}"
        self._ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._ip("link", "set", inside, "netns", namespace)
        self._ip("link", "set", outside, "master", self.bridge, "up")
        self._ip("addr", "add", f"{address}/24", "dev", inside, namespace=namespace)
        self._ip("link", "set", inside, "name", "eth0", namespace=namespace)
        self._ip("link", "set", "eth0", "up", namespace=namespace)
        self._ip("link", "set", "lo", "up", namespace=namespace)
        return namespace, address

    def _network(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("link", "set", self.bridge, "up")
        self.host_namespace, _ = self._namespace(self.HOST, 254)
        for number, name in enumerate(sorted(self.project["services"]), start=2):
            spec = self.project["services"][name]
            namespace, address = self._namespace(name, number)
            self.services[name] = Service(
                name, namespace, address, spec, image_of(spec), self.workdir / f"{name}.log"
            )
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{s.address} {s.name}\n" for s in self.services.values()
        )
        for namespace in self.namespaces:
            folder = Path("/etc/netns") / namespace
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts)

    # -- files --------------------------------------------------------------------------

    def _mount_point(self, target: Path, is_dir: bool) -> None:
        """Create an empty mount point (and its missing parents) for this run only."""
        missing = [p for p in [target, *target.parents] if not p.exists() and not p.is_symlink()]
        for path in reversed(missing):
            if path == target and not is_dir:
                path.touch()
            else:
                path.mkdir()
            self.created_paths.append(path)

    def _mounts(self, service: Service) -> list[tuple[Path, str, bool]]:
        """(source on this machine, container path, read-only) for each of the service's
        bind mounts, volumes, secrets and image files."""
        mounts: list[tuple[Path, str, bool]] = []
        for path, content in service.image.files.items():
            if isinstance(content, Path):
                mounts.append((content, path, True))
            else:
                written = self.workdir / "image-files" / service.name / path.lstrip("/")
                written.parent.mkdir(parents=True, exist_ok=True)
                written.write_text(content)
                mounts.append((written, path, True))
        for volume in service.spec.get("volumes") or []:
            if volume["type"] == "bind":
                source = Path(volume["source"])
            elif volume["type"] == "volume":
                source = self.workdir / "volumes" / volume["source"]
                source.mkdir(parents=True, exist_ok=True)
            else:
                raise RehearsalFailed(f"service {service.name}: volume type {volume['type']}")
            mounts.append((source, volume["target"], bool(volume.get("read_only"))))
        for secret in service.spec.get("secrets") or []:
            declared = self.project["secrets"][secret["source"]]
            target = secret.get("target") or secret["source"]
            if not target.startswith("/"):
                target = "/run/secrets/" + target
            mounts.append((Path(declared["file"]), target, True))
        for source, target, _ in mounts:
            if not source.exists():
                raise RehearsalFailed(
                    f"service {service.name}: {source} (mounted at {target}) does not exist"
                )
        return mounts

    def _tool_dir(self, service: Service) -> Path:
        """The image's command names, each a script running this machine's stand-in."""
        folder = self.tools / service.name
        folder.mkdir(parents=True, exist_ok=True)
        for name, command in service.image.tools.items():
            script = folder / name
            line = command if '"$@"' in command else f'{command} "$@"'
            script.write_text(f"#!/bin/sh\nexec {line}\n")
            script.chmod(0o755)
        return folder

    def _in_container(self, service: Service, argv: list[str]) -> tuple[list[str], dict]:
        """A command line that runs ``argv`` as in the service's container: its
        namespace, its mounts, its working directory, its environment."""
        lines = ["set -e"]
        for folder in service.image.tmpfs:
            lines.append(f"mount -t tmpfs tmpfs {shlex.quote(folder)}")
        for source, target, read_only in self._mounts(service):
            self._mount_point(Path(target), source.is_dir())
            lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
            if read_only:
                lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        lines.append(f"cd {shlex.quote(service.image.workdir)}")
        lines.append('exec "$@"')
        tools = self._tool_dir(service)
        env = {
            "PATH": f"{tools}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": service.name,
            **service.image.env,
            **{k: v for k, v in (service.spec.get("environment") or {}).items() if v is not None},
        }
        command = ["ip", "netns", "exec", service.namespace, "sh", "-c", "\n".join(lines)]
        return [*command, service.name, *argv], env

    # -- services -----------------------------------------------------------------------

    def _argv(self, service: Service) -> list[str]:
        entrypoint = service.spec.get("entrypoint")
        command = service.spec.get("command")
        if entrypoint is not None:
            # An entrypoint in the compose file drops the image's command too.
            return [*entrypoint, *(command or [])]
        return [*service.image.entrypoint, *(command or service.image.command)]

    def _start(self, service: Service) -> None:
        argv, env = self._in_container(service, self._argv(service))
        with service.log_path.open("ab") as log:
            service.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _fail(self, service: Service, why: str) -> RehearsalFailed:
        return RehearsalFailed(
            f"service {service.name} ({service.image.stand_in}): {why}\n"
            f"--- the end of its log ({service.log_path}):\n{service.log_tail()}"
        )

    def _health_checks(self, service: Service) -> None:
        """Run the service's health check as Docker does, from the container's start:
        every ``interval``, each try given ``timeout``; healthy at the first success,
        unhealthy after ``retries`` failures in a row."""
        check = service.spec.get("healthcheck")
        if not check or check.get("disable"):
            return
        test = list(check["test"])
        if test[0] == "CMD-SHELL":
            test = ["sh", "-c", test[1]]
        elif test[0] == "CMD":
            test = test[1:]
        else:
            raise self._fail(service, f"health check {test[0]} is not CMD or CMD-SHELL")
        interval = _seconds(check.get("interval"), 30)
        timeout = _seconds(check.get("timeout"), 30)
        retries = int(check.get("retries") or 3)
        argv, env = self._in_container(service, test)

        def run() -> None:
            failures = 0
            while not self.stopping.wait(interval):
                try:
                    done = subprocess.run(
                        argv, env=env, capture_output=True, text=True, timeout=timeout
                    )
                    if done.returncode == 0:
                        self.health[service.name] = "healthy"
                        return
                    last = (done.stdout + done.stderr).strip()[-500:] or "(no output)"
                except subprocess.TimeoutExpired:
                    last = f"no answer within {timeout}s"
                failures += 1
                if failures >= retries:
                    self.health[service.name] = (
                        f"unhealthy: health check {test} failed {failures} times: {last}"
                    )
                    return

        self.health[service.name] = "starting"
        threading.Thread(target=run, daemon=True).start()

    def _healthy(self, service: Service) -> None:
        if service.name not in self.health:
            raise self._fail(service, "depends_on wants it healthy, but it has no health check")
        while self.health[service.name] == "starting":
            if service.process is not None and service.process.poll() is not None:
                raise self._fail(service, f"exited ({service.process.returncode}) before healthy")
            time.sleep(0.1)
        if self.health[service.name] != "healthy":
            raise self._fail(service, self.health[service.name])

    def _wait_for(self, dependent: str, name: str, condition: str) -> None:
        service = self.services[name]
        if condition == "service_started":
            return
        if condition == "service_healthy":
            self._healthy(service)
            return
        if condition == "service_completed_successfully":
            assert service.process is not None
            try:
                code = service.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise self._fail(service, "a one-shot still running after 120 s") from None
            if code != 0:
                raise self._fail(service, f"exited {code}; {dependent} needs it to succeed")
            return
        raise RehearsalFailed(f"service {dependent}: depends_on condition {condition!r}")

    def _relay(self, service: Service) -> None:
        for port in service.spec.get("ports") or []:
            listen = f"{port.get('host_ip') or '0.0.0.0'}:{port['published']}"
            target = f"{service.address}:{port['target']}"
            log = (self.workdir / "relays.log").open("ab")
            relay = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.host_namespace,
                    sys.executable, "-m", "tests.support.port_relay", listen, target,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            self.relays.append(relay)

    def up(self) -> None:
        self._network()
        for name in start_order(self.project["services"]):
            service = self.services[name]
            for dependency, wants in sorted((service.spec.get("depends_on") or {}).items()):
                self._wait_for(name, dependency, wants["condition"])
            self._start(service)
            self._health_checks(service)
            self._relay(service)
        # Like `docker compose up --wait`: every service with a health check is healthy,
        # every other one still running (one-shots have exited 0).
        for name, service in self.services.items():
            if name in self.health:
                self._healthy(service)
            elif service.process is not None and service.process.poll() not in (None, 0):
                raise self._fail(service, f"exited {service.process.returncode}")

    def published(self) -> dict[str, str]:
        """Each published port's URL on the machine, by service."""
        return {
            name: f"http://{port.get('host_ip') or '127.0.0.1'}:{port['published']}"
            for name, service in self.services.items()
            for port in service.spec.get("ports") or []
        }

    def wait_until_answering(
        self, expect: Mapping[str, Collection[int]] | None = None, timeout: float = 60
    ) -> None:
        """Every published port answers GET / with a status ``expect`` names for its
        service, else with anything but a 5xx. A service without a health check is
        "started" before it listens, as with Compose, and a proxy may answer 404 until it
        has read its routes: ``expect`` says what the service answers once it is up."""
        expect = expect or {}
        for name, url in self.published().items():
            deadline = time.monotonic() + timeout
            status = ""
            while time.monotonic() < deadline:
                probe = [sys.executable, "-c", STATUS_OF, url]
                status = subprocess.run(
                    self.in_host(probe), capture_output=True, text=True
                ).stdout.strip()
                if status.isdigit() and (
                    int(status) in expect[name] if name in expect else 200 <= int(status) < 500
                ):
                    break
                time.sleep(0.2)
            else:
                raise self._fail(self.services[name], f"{url} answered {status or 'nothing'}")

    def in_host(self, argv: list[str]) -> list[str]:
        """``argv`` run where the published ports are, as on the machine Compose runs on."""
        return ["ip", "netns", "exec", self.host_namespace, *argv]

    def stop(self) -> None:
        self.stopping.set()
        for relay in self.relays:
            stop_process(relay)
        for service in reversed(list(self.services.values())):
            if service.process is not None and service.process.poll() is None:
                # The whole process group: the namespace's sh has exec'd, so it is the service.
                os.killpg(service.process.pid, signal.SIGTERM)
                try:
                    service.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(service.process.pid, signal.SIGKILL)
                    service.process.wait()
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for path in reversed(self.created_paths):
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass


@contextmanager
def running(project: dict, workdir: Path) -> Iterator[Stack]:
    stack = Stack(project, workdir)
    try:
        stack.up()
        yield stack
    finally:
        stack.stop()

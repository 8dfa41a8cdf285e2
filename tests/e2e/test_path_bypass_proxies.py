"""The path-reading bypass class (issue 18, section 1) through the real proxies with the
shipped configs: nginx with config/nginx, Caddy with config/caddy, Traefik with
config/traefik, Envoy with config/envoy (ext_authz over HTTP and over gRPC), each in front
of the real bridge (with a real Kratos and Redis) and of tests/upstreams/route.js, a Node
app that reports which route a raw router and a WHATWG router reach for the path the proxy
sent it.

Rules: ``/public`` public, ``/admin`` aal2, ``/internal`` deny, everything else
authenticated. Every request is anonymous (no credential at all). The promise: an
anonymous request either is refused (by the proxy or the bridge) or reaches the public
route under both readings; never the deny, aal2 or authenticated one. Paths are sent as
raw bytes (http.client sends the target as given; httpx would normalise it).

What each proxy sends the bridge and the app is in README.md ("Paths through the
proxies"): nginx and Caddy pass the path as received to both, so the bridge alone must
tell an ambiguous path; Traefik resolves dot segments (on the still-encoded path, after
decoding unreserved escapes such as ``%2e``) and merges ``//`` before both.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import SECRET
from tests.support.harness import BridgeServer
from tests.support.proxies import (
    Addresses,
    RunningProxy,
    grpc_address,
    grpc_settings,
    start_proxy,
    start_upstream,
)

RULES = """\
default: authenticated
rules:
  - id: public
    match: {path: /public}
    access: public
  - id: admin
    match: {path: /admin}
    access: aal2
  - id: internal
    match: {path: /internal}
    access: deny
"""

# Paths under /public as sent that some common reading puts under another rule. On commit
# ccf1258 the bridge let the RFC 3986 / WHATWG ones through on the public rule (its two
# readings, as sent and decoded first, both said /public).
BYPASS_PATHS = [
    # RFC 3986 / WHATWG: dot segments resolved while "a%2Fb" is still one segment.
    "/public/a%2Fb/../../internal",
    "/public/a%2Fb/../../admin/users",
    "/public/a%2fb/../../reports",
    "/public/a%5Cb/../../internal",
    "/public/a%2Fb/%2e%2e/%2E%2E/internal",
    "/public/a%252Fb/../../internal",
    # WHATWG: %2e is a dot.
    "/public/%2e%2e/internal",
    "/public/.%2e/admin/users",
    # `//` merged before `..` (nginx's $uri, Go's path.Clean) or kept (WHATWG).
    "/public//../internal",
    # Servlet containers: `;params` dropped per segment.
    "/public/..;/internal",
    # `\` as `/`: encoded (decoders that read it so) and raw (WHATWG).
    "/public/..%5Cinternal",
    "/public\\..\\internal",
    # A fragment in the request line: dropped by some readers, kept (or encoded) by others.
    "/public/x#/../../internal",
]

REFUSED = (400, 401, 403)  # nginx turns the bridge's 400 into 403 (see README)


@dataclass
class Answer:
    status: int
    body: bytes

    @property
    def upstream(self) -> dict | None:
        """What route.js reported, when the request reached it."""
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        return data if isinstance(data, dict) and data.get("upstream") == "route.js" else None


@dataclass
class Stack:
    proxy: RunningProxy
    bridge: BridgeServer

    def send(self, target: str, headers: dict[str, str] | None = None) -> Answer:
        """GET ``target`` through the proxy, byte for byte as given, with no credential."""
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        try:
            headers = {"Accept": "application/json", **(headers or {})}
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            return Answer(response.status, response.read())
        finally:
            connection.close()

    def where(self, target: str, answer: Answer) -> str:
        return f"{self.proxy.kind} {target!r}: {answer.status} {answer.body[:300]!r}"


@pytest.fixture(scope="module", params=["nginx", "caddy", "traefik", "envoy", "envoy-grpc"])
def stack(request, kratos, redis_server, workdir) -> Iterator[Stack]:
    kind = request.param
    home = workdir / f"bypass-{kind}"
    home.mkdir(exist_ok=True)
    rules = home / "rules.yml"
    rules.write_text(RULES)
    grpc = grpc_settings(kind)
    bridge = BridgeServer(
        {
            **grpc,
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": f"bypass-{kind}:",
            "BRIDGE_WORKERS": "1",
            "BRIDGE_RULES_FILE": str(rules),
        },
        workdir,
    )
    upstream_url, stop_upstream = start_upstream("route")
    try:
        addresses = Addresses(bridge.url, upstream_url, kratos.public_url, grpc_address(grpc))
        proxy = start_proxy(kind, addresses, home)
    except BaseException:
        stop_upstream()
        bridge.stop()
        raise
    yield Stack(proxy, bridge)
    proxy.stop()
    stop_upstream()
    bridge.stop()


def test_the_stack_routes_and_refuses_plain_paths(stack):
    """The setup the bypass test relies on: a public path reaches the app, read as public
    both ways; the protected ones are refused without reaching it."""
    answer = stack.send("/public/page?x=1")
    reached = answer.upstream
    assert answer.status == 200 and reached, stack.where("/public/page", answer)
    assert reached["raw"]["route"] == reached["whatwg"]["route"] == "public"
    for target, status in (("/internal/x", 403), ("/admin/users", 401), ("/reports", 401)):
        answer = stack.send(target)
        assert answer.status == status and answer.upstream is None, stack.where(target, answer)


def test_a_client_cannot_name_the_path_the_bridge_judges(stack):
    """The header each proxy tells the bridge the path in is the proxy's own: a client's
    copy naming a public path does not get /internal through."""
    lies = {
        "X-Forwarded-Uri": "/public/page",
        "X-Original-URL": f"http://127.0.0.1:{stack.proxy.port}/public/page",
    }
    answer = stack.send("/internal/x", lies)
    assert answer.status == 403 and answer.upstream is None, stack.where("/internal/x", answer)


@pytest.mark.parametrize("target", BYPASS_PATHS)
def test_an_anonymous_path_trick_reaches_no_protected_route(stack, target):
    answer = stack.send(target)
    reached = answer.upstream
    if reached is None:
        assert answer.status in REFUSED, stack.where(target, answer)
        return
    assert answer.status == 200, stack.where(target, answer)
    # Let through without a credential: then every reading of what the app received must
    # be the public route, or the bridge judged a path the app does not route.
    routes = {reading: reached[reading]["route"] for reading in ("raw", "whatwg")}
    assert set(routes.values()) == {"public"}, (stack.where(target, answer), routes)

"""Envoy's gRPC ext_authz: a client built on Envoy's own protos sends ``CheckRequest``s as
Envoy does, and each answer is checked against what ``/ext-authz`` (the HTTP dialect) answers
for the same request, on the same bridge, with the real Kratos and Redis."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import random
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from envoy.service.auth.v3.external_auth_pb2_grpc import AuthorizationStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.pipeline.tokens import generate_key
from bridge.web.app import create_app
from bridge.web.envoy_grpc import SERVICE, GrpcAuthz
from tests.conftest import bridge_settings
from tests.support import kratos_flows as flows
from tests.support.harness import RedisServer, free_port, wait_until
from tests.support.stand_in_kratos import StandInKratos

HOST = "app.example.test"
BROWSER = {
    "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "sec-fetch-mode": "navigate",
}
API = {"accept": "application/json"}
RULES = """
default: authenticated
rules:
  - id: public
    match: { path: /public/ }
    access: public
  - id: second-factor
    match: { path: /aal2 }
    access: aal2
  - id: internal
    match: { path: /internal }
    access: deny
  - id: app-one
    match: { path: /one/ }
    access: authenticated
    jwt_audience: app-one
  - id: app-two
    match: { path: /two/ }
    access: authenticated
    jwt_audience: app-two
"""
OK, PERMISSION_DENIED, UNAUTHENTICATED = 0, 7, 16


@dataclass
class Pair:
    """One bridge, asked over HTTP (``/ext-authz``) and over gRPC."""

    http: object
    stub: AuthorizationStub
    channel: grpc.Channel
    server: GrpcAuthz

    def both(
        self,
        path: str,
        headers: dict[str, str],
        method: str = "GET",
        scheme: str = "https",
        host: str = HOST,
    ) -> tuple[object, CheckResponse]:
        over_http = self.http.open(
            "/ext-authz" + path,
            method=method,
            headers={"Host": host, "X-Forwarded-Proto": scheme, **headers},
        )
        return over_http, self.stub.Check(check_request(method, path, host, scheme, headers))


def check_request(
    method: str, path: str, host: str, scheme: str, headers: dict[str, str]
) -> CheckRequest:
    """What Envoy sends: the original request's method, path (with its query), host,
    scheme and headers (lower case, pseudo-headers too; X-Forwarded-Proto set by Envoy)."""
    http = AttributeContext.HttpRequest(
        id="1234",
        method=method,
        path=path,
        host=host,
        scheme=scheme,
        protocol="HTTP/1.1",
        headers={
            ":authority": host,
            ":method": method,
            ":path": path,
            ":scheme": scheme,
            "x-forwarded-proto": scheme,
            **{k.lower(): v for k, v in headers.items()},
        },
    )
    return CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))


def grpc_server(app, settings) -> GrpcAuthz:
    """The gRPC server of ``app``'s bridge, started."""
    bridge = app.extensions["bridge"]
    server = GrpcAuthz(bridge.forward_auth, settings, bridge.ready)
    server.start()
    return server


def start(settings) -> Pair:
    app = create_app(settings)
    server = grpc_server(app, settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return Pair(app.test_client(use_cookies=False), AuthorizationStub(channel), channel, server)


@pytest.fixture
def pair(kratos, redis_server, prefix, tmp_path) -> Iterator[Pair]:
    generate_key(tmp_path / "keys")
    (tmp_path / "rules.yml").write_text(RULES)
    settings = bridge_settings(
        kratos,
        redis_server.url,
        prefix,
        BRIDGE_GRPC_PORT=str(free_port()),
        BRIDGE_RULES_FILE=str(tmp_path / "rules.yml"),
        BRIDGE_RETURN_TO_ORIGINS=f"https://{HOST}",
        BRIDGE_JWT_HEADER="X-Bridge-Jwt",
        BRIDGE_JWT_KEYS_DIR=str(tmp_path / "keys"),
        BRIDGE_REVALIDATE_AFTER="60",
    )
    made = start(settings)
    yield made
    made.channel.close()
    made.server.stop()


def assert_same(over_http, check: CheckResponse) -> None:
    """The gRPC answer says what the HTTP one says, in Envoy's terms."""
    http_headers = [
        (k.lower(), v) for k, v in over_http.headers.items() if k.lower() != "content-length"
    ]
    if over_http.status_code == 200:
        assert check.status.code == OK
        assert check.WhichOneof("http_response") == "ok_response"
        ok = check.ok_response
        upstream = [(h.header.key, h.header.value) for h in ok.headers]
        # The test client adds a Content-Type; no-store is for the auth answer itself.
        skipped = ("content-type", "cache-control", "set-cookie")
        assert upstream == [(k, v) for k, v in http_headers if k not in skipped]
        cookies = [(h.header.key, h.header.value) for h in ok.response_headers_to_add]
        assert cookies == [(k, v) for k, v in http_headers if k == "set-cookie"]
        for option in ok.headers:
            assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD
        return
    assert check.WhichOneof("http_response") == "denied_response"
    login = over_http.status_code in (302, 303, 401)
    assert check.status.code == (UNAUTHENTICATED if login else PERMISSION_DENIED)
    denied = check.denied_response
    assert denied.status.code == over_http.status_code
    assert [(h.header.key, h.header.value) for h in denied.headers] == http_headers
    assert denied.body.encode() == over_http.get_data()


def test_allowed_checks_carry_the_same_identity_headers_and_jwt(pair, kratos):
    user = flows.register(kratos)
    over_http, check = pair.both("/reports?year=2026", {"x-session-token": user.token})
    assert over_http.status_code == 200
    assert_same(over_http, check)
    upstream = {h.header.key: h.header.value for h in check.ok_response.headers}
    assert upstream["x-user-id"] == user.identity_id
    assert upstream["x-bridge-jwt"].count(".") == 2

    cookie = flows.browser_login(kratos, user)
    browser = {**BROWSER, "cookie": f"other=caf\u00e9; ory_kratos_session={cookie}"}
    over_http, check = pair.both("/any/path", browser, method="PROPFIND")
    assert over_http.status_code == 200
    assert_same(over_http, check)


def test_a_warm_check_never_asks_kratos(pair, kratos):
    user = flows.register(kratos)
    token = {"x-session-token": user.token}
    first = pair.stub.Check(check_request("GET", "/a", HOST, "https", token))
    asked = kratos.whoami_calls()
    for path in ("/a", "/b?c=d", "/e"):
        again = pair.stub.Check(check_request("GET", path, HOST, "https", token))
        assert again.ok_response.headers == first.ok_response.headers
    assert kratos.whoami_calls() == asked


@pytest.mark.parametrize(
    ("method", "path", "caller", "status"),
    [
        ("GET", "/public/page", {"x-user-id": "forged"}, 200),
        ("GET", "/reports?year=2026&q=a", API, 401),
        ("GET", "/reports?year=2026&q=a", {}, 401),
        ("GET", "/reports?year=2026&q=a", BROWSER, 302),
        ("POST", "/reports", BROWSER, 303),
        ("GET", "/reports", {**BROWSER, "x-requested-with": "XMLHttpRequest"}, 401),
    ],
    ids=["public-anonymous", "api", "no-accept", "browser", "browser-post", "xhr"],
)
def test_without_a_session_the_answers_match(pair, method, path, caller, status):
    over_http, check = pair.both(path, caller, method=method)
    assert over_http.status_code == status
    assert_same(over_http, check)
    if status == 200:  # the client's forged copy is overwritten, empty
        assert ("x-user-id", "") in [
            (h.header.key, h.header.value) for h in check.ok_response.headers
        ]


@pytest.mark.parametrize(
    ("path", "caller", "status"),
    [
        ("/internal", API, 403),
        ("/aal2", BROWSER, 302),
        ("/aal2", API, 401),
    ],
    ids=["deny-rule", "step-up-browser", "step-up-api"],
)
def test_with_a_session_refusals_match(pair, kratos, path, caller, status):
    user = flows.register(kratos)
    over_http, check = pair.both(path, {**caller, "x-session-token": user.token})
    assert over_http.status_code == status
    assert_same(over_http, check)
    if path == "/aal2" and status == 302:
        location = dict((h.header.key, h.header.value) for h in check.denied_response.headers)
        assert "aal=aal2" in location["location"]


def test_a_kratos_rate_limit_is_a_429_denial_with_retry_after(redis_server, prefix):
    stand_in = StandInKratos()
    token = "ory_st_" + "r" * 32
    stand_in.answers[token] = (429, {"Retry-After": "7"}, b'{"error":{"code":429}}')
    settings = bridge_settings(
        stand_in, redis_server.url, prefix, BRIDGE_GRPC_PORT=str(free_port())
    )
    made = start(settings)
    try:
        over_http, check = made.both("/page", {**BROWSER, "x-session-token": token})
        assert over_http.status_code == 429
        assert_same(over_http, check)
        headers = {h.header.key: h.header.value for h in check.denied_response.headers}
        assert headers["retry-after"] == "7"
    finally:
        made.channel.close()
        made.server.stop()
        stand_in.close()


def test_the_scheme_comes_from_the_check_request_when_envoy_sends_no_header(pair):
    request = check_request("GET", "/reports", HOST, "https", BROWSER)
    del request.attributes.request.http.headers["x-forwarded-proto"]
    check = pair.stub.Check(request)
    headers = {h.header.key: h.header.value for h in check.denied_response.headers}
    assert check.denied_response.status.code == 302
    assert "return_to=https%3A%2F%2Fapp.example.test%2Freports" in headers["location"]
    request.attributes.request.http.scheme = ""
    refused = pair.stub.Check(request)
    assert refused.denied_response.status.code == 400
    assert "X-Forwarded-Proto" in refused.denied_response.body


# State the gRPC path keeps between checks (the dialect's memo of how a request was read,
# the allow memo by session copy and audience, the serialized allows of ``Checks``) must
# never answer one caller with another's identity.

IDENTITY = ("x-user-id", "x-session-id", "x-user-email", "x-user-aal", "x-bridge-jwt")
AUDIENCES = {"/one/page": "app-one", "/two/page": "app-two", "/reports?x=1": None}


def _claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass(frozen=True)
class Caller:
    name: str
    headers: dict[str, str]
    user: flows.User | None  # None: no session


def _leaks(callers: list[Caller], path: str, check: CheckResponse, caller: Caller) -> None:
    """``check`` answers ``caller`` on ``path`` with its own identity, or none; no other
    caller's identity id or email is anywhere in it."""
    others = [c.user for c in callers if c.user is not None and c.user is not caller.user]
    sent = check.SerializeToString()
    for other in others:
        assert other.identity_id.encode() not in sent, (caller.name, path)
        assert other.email.encode() not in sent, (caller.name, path)
    if caller.user is None:
        if check.status.code == OK:  # the anonymous allow of a public route: empty headers
            assert path.startswith("/public/"), (caller.name, path)
            headers = [(h.header.key, h.header.value) for h in check.ok_response.headers]
            assert all(value == "" for key, value in headers if key in IDENTITY), headers
        else:
            assert check.status.code == UNAUTHENTICATED, (caller.name, path)
        return
    assert check.status.code == OK, (caller.name, path)
    headers = {h.header.key: h.header.value for h in check.ok_response.headers}
    assert headers["x-user-id"] == caller.user.identity_id, (caller.name, path)
    assert headers["x-user-email"] == caller.user.email, (caller.name, path)
    claims = _claims(headers["x-bridge-jwt"])
    assert (claims["sub"], claims["sid"]) == (caller.user.identity_id, headers["x-session-id"])
    assert claims.get("aud") == AUDIENCES.get(path), (caller.name, path)


def _callers(kratos) -> list[Caller]:
    a, b = flows.register(kratos, "a"), flows.register(kratos, "b")
    b_cookie = flows.browser_login(kratos, b)
    return [
        Caller("a", {"x-session-token": a.token}, a),
        Caller("b-token", {"x-session-token": b.token}, b),
        Caller("b-cookie", {**BROWSER, "cookie": f"ory_kratos_session={b_cookie}"}, b),
        Caller("anonymous", dict(API), None),
        Caller("anonymous-forging-a", {"x-user-id": a.identity_id, "x-user-email": a.email}, None),
    ]


def test_one_users_check_never_answers_the_next_caller(pair, kratos):
    """A, then B (token and cookie), then nobody, on the same path and host, over and over
    (each order, so every memo is warm with another caller's answer when asked)."""
    callers = _callers(kratos)
    paths = [*AUDIENCES, "/public/page"]
    for round_ in range(4):
        order = callers if round_ % 2 == 0 else callers[::-1]
        for path in paths:
            for caller in order:
                check = pair.stub.Check(check_request("GET", path, HOST, "https", caller.headers))
                _leaks(callers, path, check, caller)


def test_concurrent_checks_of_several_users_each_get_their_own(pair, kratos):
    callers = _callers(kratos)
    paths = [*AUDIENCES, "/public/page"]
    jobs = [(caller, path) for caller in callers for path in paths] * 8
    random.Random(23).shuffle(jobs)

    def ask(job: tuple[Caller, str]) -> tuple[Caller, str, CheckResponse]:
        caller, path = job
        return (
            caller,
            path,
            pair.stub.Check(check_request("GET", path, HOST, "https", caller.headers)),
        )

    with ThreadPoolExecutor(8) as pool:
        for caller, path, check in pool.map(ask, jobs):
            _leaks(callers, path, check, caller)


def _changed(value: str, at: int) -> str:
    """``value`` with the character at ``at`` replaced by another of the same kind."""
    swap = "B" if value[at] == "A" else "A"
    return value[:at] + swap + value[at + 1 :]


def test_a_forged_credential_right_after_a_valid_one_is_refused(pair, kratos):
    a = flows.register(kratos, "a")
    cookie = flows.browser_login(kratos, a)
    valid = {"x-session-token": a.token}
    forged = {
        "token-last-changed": {"x-session-token": _changed(a.token, -1)},
        "token-middle-changed": {"x-session-token": _changed(a.token, len(a.token) // 2)},
        "token-longer": {"x-session-token": a.token + "A"},
        "token-shorter": {"x-session-token": a.token[:-1]},
        "token-upper": {"x-session-token": a.token.upper()},
        "token-random": {"x-session-token": "ory_st_" + secrets.token_hex(16)},
        "bearer-changed": {"authorization": "Bearer " + _changed(a.token, -2)},
        "cookie-changed": {"cookie": "ory_kratos_session=" + _changed(cookie, len(cookie) // 2)},
        "cookie-shorter": {"cookie": "ory_kratos_session=" + cookie[:-2]},
        "identity-headers": {"x-user-id": a.identity_id, "x-user-email": a.email},
        "a-repeated-token": {"x-session-token": a.token + ", " + a.token},
    }
    for name, headers in forged.items():
        for path in AUDIENCES:
            good = pair.stub.Check(check_request("GET", path, HOST, "https", valid))
            assert good.status.code == OK, name
            check = pair.stub.Check(check_request("GET", path, HOST, "https", {**API, **headers}))
            assert check.status.code == UNAUTHENTICATED, (name, path)
            assert check.denied_response.status.code == 401, (name, path)
            sent = check.SerializeToString()
            assert a.identity_id.encode() not in sent and a.email.encode() not in sent, name


# Hostile check requests: each is a denial, never a gRPC error (which Envoy's
# failure_mode_allow: true would let through) and never an allow.


def _raw_check(pair: Pair, data: bytes) -> CheckResponse:
    call = pair.channel.unary_unary(
        f"/{SERVICE}/Check", request_serializer=None, response_deserializer=CheckResponse.FromString
    )
    return call(data)


def _not_utf8(request: CheckRequest, placeholder: str) -> bytes:
    data = request.SerializeToString()
    assert placeholder.encode() in data
    return data.replace(placeholder.encode(), b"\xff" * len(placeholder))


def test_hostile_check_requests_are_denials(pair, kratos, caplog):
    caplog.set_level(logging.DEBUG)
    user = flows.register(kratos)
    token = {"x-session-token": user.token}
    denials = {
        "empty": CheckRequest(),
        "no-path": check_request("GET", "", HOST, "https", token),
        "no-host": check_request("GET", "/x", "", "https", token),
        "lower-case-method": check_request("get", "/x", HOST, "https", token),
        "long-method": check_request("G" * 100_000, "/x", HOST, "https", token),
        "crlf-in-path": check_request("GET", "/x\r\nX-User-Id: admin", HOST, "https", token),
        "non-ascii-path": check_request("GET", "/caf\u00e9", HOST, "https", token),
        "non-ascii-host": check_request("GET", "/x", "caf\u00e9.test", "https", token),
        "long-path": check_request("GET", "/" + "a" * 9000, HOST, "https", token),
        "bad-scheme": check_request("GET", "/x", HOST, "ftp", token),
        "huge-cookie": check_request(
            "GET", "/x", HOST, "https", {"cookie": "a=" + "b" * 1_000_000}
        ),
        "huge-token": check_request("GET", "/x", HOST, "https", {"x-session-token": "t" * 100_000}),
        "many-headers": check_request(
            "GET", "/x", HOST, "https", {f"x-h{i}": "v" * 100 for i in range(10_000)}
        ),
    }
    for name, request in denials.items():
        check = pair.stub.Check(request)
        assert check.WhichOneof("http_response") == "denied_response", name
        assert check.status.code != OK, name
        assert check.denied_response.status.code in (400, 401), name

    raw = {
        "garbage": b"\xff\x00garbage",
        "truncated": check_request("GET", "/x", HOST, "https", token).SerializeToString()[:-3],
        "not-utf8-header": _not_utf8(
            check_request("GET", "/x", HOST, "https", {**token, "x-other": "PLACEHOLDER"}),
            "PLACEHOLDER",
        ),
    }
    for name, data in raw.items():
        check = _raw_check(pair, data)
        assert check.status.code != OK, name
        assert check.denied_response.status.code == 400, name
    assert user.token not in caplog.text
    assert "Traceback" not in caplog.text


# The health service follows readiness (/health/ready): a real Redis stopped and started.

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Bounds, not expectations: readiness is kept a second, the store's client reconnects.
WATCH_DEADLINE_S = 120


def _health(stub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


@dataclass
class HealthRig:
    """A bridge with its gRPC port on a Redis of its own, which a test may stop and start."""

    redis_server: RedisServer
    app: object
    server: GrpcAuthz
    stub: health_pb2_grpc.HealthStub


@pytest.fixture
def health_rig(kratos, workdir, prefix) -> Iterator[HealthRig]:
    redis_server = RedisServer(workdir)
    settings = bridge_settings(
        kratos,
        redis_server.url,
        prefix,
        BRIDGE_GRPC_PORT=str(free_port()),
        BRIDGE_REDIS_TIMEOUT="0.5",
    )
    app = create_app(settings)
    server = grpc_server(app, settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield HealthRig(redis_server, app, server, health_pb2_grpc.HealthStub(channel))
    finally:
        channel.close()
        server.stop()
        redis_server.stop()
        app.extensions["bridge"].close()


def test_the_health_service_follows_readiness(health_rig):
    redis_server, app, server, stub = (
        health_rig.redis_server,
        health_rig.app,
        health_rig.server,
        health_rig.stub,
    )
    assert [_health(stub, service) for service in ("", SERVICE)] == [SERVING, SERVING]
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=WATCH_DEADLINE_S)
    assert next(watch).status == SERVING

    redis_server.stop()  # the stream hears of it without a Check
    assert next(watch).status == NOT_SERVING
    assert [_health(stub, service) for service in ("", SERVICE)] == [NOT_SERVING] * 2
    assert app.test_client().get("/health/ready").status_code == 503

    redis_server.start()
    assert next(watch).status == SERVING
    assert _health(stub) == SERVING
    assert app.test_client().get("/health/ready").status_code == 200
    watch.cancel()

    with pytest.raises(grpc.RpcError) as unknown:
        _health(stub, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    # Stopping: NOT_SERVING to the streams before the server goes.
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=WATCH_DEADLINE_S)
    assert next(watch).status == SERVING
    server.stop()
    assert next(watch).status == NOT_SERVING


def test_a_check_alone_sees_readiness_change(health_rig):
    """Without a stream open, each ``Check`` asks (readiness kept a second): polled."""
    redis_server, stub = health_rig.redis_server, health_rig.stub
    assert _health(stub, SERVICE) == SERVING
    redis_server.stop()
    wait_until(lambda: _health(stub, SERVICE) == NOT_SERVING, 60, "NOT_SERVING")
    redis_server.start()
    wait_until(lambda: _health(stub, SERVICE) == SERVING, 60, "SERVING again")


def test_the_health_service_answers_while_every_check_thread_waits_on_kratos(redis_server, prefix):
    """Readiness is not asked on the checks' threads: with each of them held by a check
    that waits on Kratos (a FAKE Kratos whose whoami hangs while its health says ready),
    the health service still answers, and says SERVING."""
    stand_in = StandInKratos()
    stand_in.hold.clear()
    settings = bridge_settings(
        stand_in,
        redis_server.url,
        prefix,
        BRIDGE_GRPC_PORT=str(free_port()),
        BRIDGE_THREADS="2",
        BRIDGE_KRATOS_TIMEOUT="60",
    )
    made = start(settings)
    health = health_pb2_grpc.HealthStub(made.channel)
    waiting = [
        made.stub.Check.future(
            check_request("GET", "/x", HOST, "https", {"x-session-token": f"ory_st_{n:032d}"})
        )
        for n in range(4)
    ]
    try:
        wait_until(lambda: len(stand_in.asked) >= 2, 30, "both check threads asking Kratos")
        assert _health(health) == SERVING
        assert not any(call.done() for call in waiting)  # the threads are still held
    finally:
        stand_in.hold.set()
        for call in waiting:
            call.cancel()
        made.channel.close()
        made.server.stop()
        stand_in.close()


def _self_signed(tmp_path) -> tuple[str, str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), pem


def test_tls_when_a_certificate_and_key_are_set(kratos, redis_server, prefix, tmp_path):
    cert, key, pem = _self_signed(tmp_path)
    settings = bridge_settings(
        kratos,
        redis_server.url,
        prefix,
        BRIDGE_GRPC_PORT=str(free_port()),
        BRIDGE_GRPC_TLS_CERT_FILE=cert,
        BRIDGE_GRPC_TLS_KEY_FILE=key,
    )
    server = grpc_server(create_app(settings), settings)
    user = flows.register(kratos)
    request = check_request("GET", "/x", HOST, "https", {"x-session-token": user.token})
    try:
        with grpc.secure_channel(
            f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(root_certificates=pem)
        ) as channel:
            check = AuthorizationStub(channel).Check(request)
            assert check.status.code == OK
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
            with pytest.raises(grpc.RpcError):
                AuthorizationStub(plain).Check(request, timeout=5)
    finally:
        server.stop()

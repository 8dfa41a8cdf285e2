"""The running bridge answers as its own OpenAPI document says, on both listeners.

schemathesis reads ``/openapi.json`` from a real bridge process (real Redis, real Kratos)
and sends each operation requests generated from the document; every answer must be one
the document lists for it, with the status, headers and body it promises, and none may
be a 5xx. Each path is sent to the listener its ``servers`` name.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from bridge.pipeline.tokens import generate_key
from bridge.web import openapi
from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, Kratos, RedisServer

ADMIN_TOKEN = "conformance-admin-token-" + "a" * 20
APP_TOKEN = "conformance-app-token-" + "b" * 20
HOOK_SECRET = "conformance-hook-secret-" + "c" * 20
PUBLIC_PORT, ADMIN_PORT = "4480", "4481"  # as the document's `servers` name the listeners
# One-segment paths are public, so that generated requests meet allows as well as refusals.
RULES = """\
rules:
  - {id: closed, match: {path: /internal}, access: deny}
  - {id: second-factor, match: {path: "/admin/**"}, access: aal2}
  - {id: open, match: {path: "/*"}, access: public}
"""


@pytest.fixture(scope="module")
def bridge(kratos: Kratos, redis_server: RedisServer, workdir: Path) -> Iterator[BridgeServer]:
    home = workdir / f"conformance-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    generate_key(home / "jwt")
    (home / "rules.yml").write_text(RULES)
    server = BridgeServer(
        {
            "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
            "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
            "BRIDGE_REDIS_URL": redis_server.url,
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KEY_PREFIX": f"conf{uuid.uuid4().hex[:8]}:",
            "BRIDGE_WORKERS": "1",
            "BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "BRIDGE_APP_TOKEN": APP_TOKEN,
            "BRIDGE_HOOK_SECRET": HOOK_SECRET,
            "BRIDGE_JWT_HEADER": "X-Bridge-Jwt",
            "BRIDGE_JWT_KEYS_DIR": str(home / "jwt"),
            "BRIDGE_RULES_FILE": str(home / "rules.yml"),
            "BRIDGE_METRICS": "true",
            # A hook waits this long for Kratos to show a session, and most of the
            # generated ones Kratos never will.
            "BRIDGE_KRATOS_TIMEOUT": "1",
        },
        home,
    )
    yield server
    server.stop()


def _operations(port: str) -> list[tuple[str, str]]:
    """``(method, path)`` of every operation the shipped document puts on a listener."""
    return [
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        if any(server["url"].endswith(":" + port) for server in item["servers"])
        for method in item
        if method in _METHODS
    ]


_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")


@pytest.fixture(scope="module")
def served(bridge: BridgeServer):
    """The document as the public listener serves it, for schemathesis."""
    schema = schemathesis.openapi.from_url(bridge.url + "/openapi.json")
    schema.config.generation.update(max_examples=EXAMPLES)
    return schema


def _conforms(served, method: str, path: str, base_url: str, headers: dict[str, str]) -> None:
    operation = served[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        response = case.call(base_url=base_url, headers=headers)
        excluded = [positive_data_acceptance] if _refused_by_design(path, response) else []
        case.validate_response(response, headers=headers, excluded_checks=excluded)
        if "X-Session-Token" not in headers and response.status_code == 200:
            # Generated credentials name no session Kratos knows: an allow is anonymous.
            names = {name.lower(): values for name, values in response.headers.items()}
            assert names.get("x-user-id", [""]) == [""], response.headers

    check()


EXAMPLES = 25

# Refusals of schema-valid data that the document cannot rule out by a schema, by design;
# only these skip schemathesis's "schema-valid data is accepted" check, nothing else does.
_BY_DESIGN = {
    # The dialects judge a path by every common reading of it: one with a bad escape,
    # bytes that are not UTF-8, a control character once decoded, a leading "//", or
    # readings that fall under different rules is refused (bridge.pipeline.rules), whatever
    # characters it is written in.
    "/forward-auth": re.compile(r"(the )?path "),
    "/ext-authz/{path}": re.compile(r"(the )?path "),
    # The app section keeps numbers exactly; JSON Schema cannot bound every integer
    # nested in an arbitrary value.
    "/whoami/app": re.compile(r"the body is not JSON the app section can keep \(.* 64 bits\)"),
    # Page tokens are opaque on purpose: only the ones the API gave out mean anything.
    "/admin/sessions": re.compile(r"page_token is not one this API gave out"),
    "/admin/identities/{identity_id}/sessions": re.compile(
        r"page_token is not one this API gave out"
    ),
    # A window must lie between 1970 and now, since before until, and stats reach back at
    # most 366 days: bounds relative to the clock, which a schema cannot state.
    "/admin/events/aal2": re.compile(
        r"page_token is not one this API gave out|since is after until"
        r"|(since|until) is before 1970 or in the future"
    ),
    "/admin/stats": re.compile(
        r"since reaches back more than 366 days|since is before 1970 or in the future"
    ),
}


def _refused_by_design(path: str, response) -> bool:
    pattern = _BY_DESIGN.get(path)
    if pattern is None or response.status_code not in (400, 403):
        return False
    content = response.content
    if response.request.method == "HEAD":
        # A HEAD answer has no body to say why; the same request as a GET says it.
        sent = response.request
        content = httpx.request("GET", sent.url, headers=dict(sent.headers)).content
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return body.get("error") == "bad_request" and bool(pattern.match(body.get("message", "")))


@pytest.fixture(scope="module")
def user_token(kratos: Kratos, bridge: BridgeServer) -> str:
    """A real session's token: with it, the answers for a session (allows, `/whoami`, app
    writes, and sessions on the admin listener) are checked too, not only refusals."""
    return flows.register(kratos, "conformance").token


def _public_cases() -> list[tuple[str, str, str]]:
    """Each public operation with generated credentials, and those that take a session's
    credential with a real session's too."""
    cases = []
    for method, path in _operations(PUBLIC_PORT):
        cases.append((method, path, "generated"))
        security = openapi.document()["paths"][path][method.lower()].get("security", [])
        if any("sessionToken" in requirement for requirement in security):
            cases.append((method, path, "real"))
    return cases


@pytest.mark.parametrize(("method", "path", "session"), _public_cases())
def test_public_listener(
    bridge: BridgeServer, served, user_token: str, method: str, path: str, session: str
) -> None:
    headers = {"X-Bridge-App-Token": APP_TOKEN, "X-Bridge-Hook-Key": HOOK_SECRET}
    if session == "real":
        headers["X-Session-Token"] = user_token
    _conforms(served, method, path, bridge.url, headers)


@pytest.mark.parametrize(("method", "path"), _operations(ADMIN_PORT))
def test_admin_listener(
    bridge: BridgeServer, served, user_token: str, method: str, path: str
) -> None:
    """With ``user_token``'s session seen, the admin lists and stats are not all empty."""
    _conforms(served, method, path, bridge.admin_url, {"Authorization": f"Bearer {ADMIN_TOKEN}"})


def test_a_session_detail_is_as_the_document_says(bridge: BridgeServer, kratos: Kratos) -> None:
    """Generated session ids name no session Kratos knows, so schemathesis meets only the
    detail's 404: a real session's detail is checked against ``SessionDetail`` here, one
    the bridge saw and one it never did, active and revoked. (Its own user: the generated
    sign-outs end ``user_token``'s session.)"""
    document = openapi.document()
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/SessionDetail", "components": document["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    user = flows.register(kratos, "conformance-detail")
    whoami = httpx.get(bridge.url + "/whoami", headers={"X-Session-Token": user.token})
    assert whoami.status_code == 200, whoami.text
    seen = whoami.json()["session_id"]
    unseen = flows.session_of(kratos, token=flows.login_api(kratos, user)).json()["id"]
    revoked = flows.session_of(kratos, token=flows.login_api(kratos, user)).json()["id"]
    assert httpx.delete(f"{kratos.admin_url}/admin/sessions/{revoked}").status_code == 204
    for sid in (seen, unseen, revoked):
        answer = httpx.get(
            f"{bridge.admin_url}/admin/sessions/{sid}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert answer.status_code == 200, answer.text
        errors = [error.message for error in validator.iter_errors(answer.json())]
        assert errors == [], (sid, errors)

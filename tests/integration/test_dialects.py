"""One endpoint per proxy dialect: what each reads of the original request, and how each
answers a browser, an API client, and a proxy that left a header out (real Kratos)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support import kratos_flows as flows
from tests.support.harness import forwarded

ORIGIN = "https://app.example.test"
BROWSER = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Sec-Fetch-Mode": "navigate",
}
FORWARDED = forwarded("/reports?year=2026&q=a", host="app.example.test")
RETURN_TO = "https://app.example.test/reports?year=2026&q=a"


@pytest.fixture
def bridge(make_client, kratos):
    return make_client(kratos, BRIDGE_RETURN_TO_ORIGINS=f"{ORIGIN},http://localhost:8080")


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def _login(kratos) -> str:
    return f"{kratos.public_url}/self-service/login/browser"


# /forward-auth: Traefik, Caddy, HAProxy


def test_forward_auth_sends_a_browser_to_the_login_with_return_to(bridge, kratos):
    response = bridge.get("/forward-auth", headers={**FORWARDED, **BROWSER})
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(_login(kratos) + "?")
    assert _query(location)["return_to"] == [RETURN_TO]
    assert "X-User-Id" not in response.headers


def test_forward_auth_sends_a_browser_post_with_303(bridge, kratos):
    headers = {**FORWARDED, **BROWSER, "X-Forwarded-Method": "POST"}
    response = bridge.get("/forward-auth", headers=headers)
    assert response.status_code == 303
    assert _query(response.headers["Location"])["return_to"] == [RETURN_TO]


@pytest.mark.parametrize(
    "caller",
    [
        {"Accept": "application/json"},
        {"Accept": "*/*"},
        {},
        {**BROWSER, "X-Requested-With": "XMLHttpRequest"},
        {**BROWSER, "Sec-Fetch-Mode": "cors"},
        {"Accept": "application/json, text/html;q=0.5"},
        {"Accept": "text/html;q=0"},
    ],
    ids=["json", "any", "no-accept", "xhr", "fetch", "json-first", "html-refused"],
)
def test_forward_auth_gives_api_and_xhr_callers_401_json(bridge, kratos, caller):
    response = bridge.get("/forward-auth", headers={**FORWARDED, **caller})
    assert response.status_code == 401
    body = response.get_json()
    assert body["error"] == "session_missing"
    assert _query(body["redirect_browser_to"])["return_to"] == [RETURN_TO]
    assert "Location" not in response.headers


def test_forward_auth_allows_a_session_whatever_the_caller(bridge, kratos):
    user = flows.register(kratos)
    for caller in ({}, BROWSER):
        headers = {**FORWARDED, **caller, "X-Session-Token": user.token}
        response = bridge.get("/forward-auth", headers=headers)
        assert response.status_code == 200
        assert response.headers["X-User-Id"] == user.identity_id


@pytest.mark.parametrize("missing", list(FORWARDED))
def test_forward_auth_without_a_forwarded_header_is_400_naming_it(bridge, kratos, missing):
    user = flows.register(kratos)
    headers = {k: v for k, v in FORWARDED.items() if k != missing}
    response = bridge.get("/forward-auth", headers={**headers, "X-Session-Token": user.token})
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"
    assert missing in response.get_json()["message"]
    assert "X-User-Id" not in response.headers


def test_forward_auth_step_up_redirects_a_browser_to_the_aal2_login(bridge, kratos):
    user = flows.register(kratos)
    headers = {**FORWARDED, **BROWSER, "X-Session-Token": user.token}
    response = bridge.get("/forward-auth?aal=aal2", headers=headers)
    assert response.status_code == 302
    query = _query(response.headers["Location"])
    assert query["aal"] == ["aal2"]
    assert query["return_to"] == [RETURN_TO]
    api = bridge.get("/forward-auth?aal=aal2", headers={**FORWARDED, "X-Session-Token": user.token})
    assert api.status_code == 401
    assert api.get_json()["error"] == "aal2_required"


# /auth: nginx auth_request


def test_nginx_auth_401_always_carries_x_bridge_redirect_and_location_for_a_browser(bridge, kratos):
    """An nginx config that reads ``$upstream_http_x_bridge_redirect`` on every 401 finds
    the login there for browsers too; ``Location`` says the browser should be redirected."""
    original = {"X-Original-URL": RETURN_TO, "X-Original-Method": "GET"}
    browser = bridge.get("/auth", headers={**original, **BROWSER})
    assert browser.status_code == 401  # nginx turns anything but 200/401/403 into 500
    assert _query(browser.headers["X-Bridge-Redirect"])["return_to"] == [RETURN_TO]
    assert browser.headers["Location"] == browser.headers["X-Bridge-Redirect"]

    api = bridge.get("/auth", headers={**original, "Accept": "application/json"})
    assert api.status_code == 401
    assert "Location" not in api.headers
    assert _query(api.headers["X-Bridge-Redirect"])["return_to"] == [RETURN_TO]

    user = flows.register(kratos)
    step_up = bridge.get(
        "/auth?aal=aal2", headers={**original, **BROWSER, "X-Session-Token": user.token}
    )
    assert step_up.status_code == 401
    assert step_up.get_json()["error"] == "aal2_required"
    assert _query(step_up.headers["X-Bridge-Redirect"])["aal"] == ["aal2"]
    assert step_up.headers["Location"] == step_up.headers["X-Bridge-Redirect"]


def test_nginx_auth_without_a_rules_file_needs_no_original_url(bridge, kratos):
    user = flows.register(kratos)
    assert bridge.get("/auth", headers={"X-Session-Token": user.token}).status_code == 200
    response = bridge.get("/auth", headers=BROWSER)
    assert response.status_code == 401
    assert "return_to" not in response.headers["Location"]
    assert response.headers["X-Bridge-Redirect"] == response.headers["Location"]


# /ext-authz/<path>: Envoy


def test_ext_authz_judges_the_appended_path_and_redirects_a_browser(bridge, kratos):
    headers = {**BROWSER, "Host": "app.example.test", "X-Forwarded-Proto": "https"}
    response = bridge.post("/ext-authz/reports?year=2026&q=a", headers=headers)
    assert response.status_code == 303  # the check request keeps the original method
    assert _query(response.headers["Location"])["return_to"] == [RETURN_TO]

    user = flows.register(kratos)
    allowed = bridge.open(
        "/ext-authz/any/path", method="PROPFIND", headers={**headers, "X-Session-Token": user.token}
    )
    assert allowed.status_code == 200
    assert allowed.headers["X-User-Id"] == user.identity_id


def test_ext_authz_query_is_the_apps_not_an_aal_for_the_bridge(bridge, kratos):
    user = flows.register(kratos)
    headers = {"Host": "app.example.test", "X-Forwarded-Proto": "https"}
    response = bridge.get(
        "/ext-authz/x?aal=aal9", headers={**headers, "X-Session-Token": user.token}
    )
    assert response.status_code == 200


def test_ext_authz_without_the_scheme_is_400(bridge, kratos):
    response = bridge.get("/ext-authz/x", headers={"Host": "app.example.test"})
    assert response.status_code == 400
    assert "X-Forwarded-Proto" in response.get_json()["message"]


def test_the_old_envoy_path_under_auth_is_not_a_dialect(bridge, kratos):
    user = flows.register(kratos)
    response = bridge.get("/auth/some/path", headers={"X-Session-Token": user.token})
    assert response.status_code == 404
    assert "X-User-Id" not in response.headers


# return_to: never an open redirect


@pytest.mark.parametrize(
    ("headers", "return_to"),
    [
        ({"X-Forwarded-Host": "evil.example"}, None),
        ({"X-Forwarded-Host": "app.example.test.evil.example"}, None),
        ({"X-Forwarded-Proto": "http"}, None),  # an origin is scheme, host and port
        ({"X-Forwarded-Host": "app.example.test:8443"}, None),
        ({"X-Forwarded-Uri": "//evil.example/x"}, "https://app.example.test//evil.example/x"),
        ({"X-Forwarded-Uri": "/\\evil.example"}, "https://app.example.test/%5Cevil.example"),
        (
            {"X-Forwarded-Host": "localhost:8080", "X-Forwarded-Proto": "http"},
            "http://localhost:8080/reports?year=2026&q=a",
        ),
    ],
)
def test_return_to_is_only_ever_an_allow_listed_origin(bridge, kratos, headers, return_to):
    response = bridge.get("/forward-auth", headers={**FORWARDED, **BROWSER, **headers})
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.split("?")[0] == _login(kratos)
    assert _query(location).get("return_to") == ([return_to] if return_to else None)


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"X-Forwarded-Uri": "/a\r\nSet-Cookie: x=1"}, "X-Forwarded-Uri"),
        ({"X-Forwarded-Uri": "https://evil.example/"}, "X-Forwarded-Uri"),
        ({"X-Forwarded-Uri": "javascript:alert(1)"}, "X-Forwarded-Uri"),
        ({"X-Forwarded-Uri": "/" + "a" * 8300}, "X-Forwarded-Uri"),
        ({"X-Forwarded-Host": "evil.example/@app.example.test"}, "X-Forwarded-Host"),
        ({"X-Forwarded-Host": "evil.example\r\nX-User-Id: admin"}, "X-Forwarded-Host"),
        ({"X-Forwarded-Proto": "javascript"}, "X-Forwarded-Proto"),
        ({"X-Forwarded-Method": "GE T"}, "X-Forwarded-Method"),
    ],
)
def test_hostile_forwarded_headers_are_400_naming_the_header(bridge, kratos, headers, named):
    # Through the environ: the test client itself refuses header values holding CR or LF.
    environ = {
        "HTTP_" + name.upper().replace("-", "_"): value
        for name, value in {**FORWARDED, **BROWSER, **headers}.items()
    }
    response = bridge.get("/forward-auth", environ_overrides=environ)
    assert response.status_code == 400
    assert named in response.get_json()["message"]
    assert "Location" not in response.headers
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "//evil.example/",
        "https://app.example.test\\@evil.example/",
        "https://app.example.test/a b",
        "ftp://app.example.test/",
        "https://app.example.test/" + "a" * 8300,
        "http://http://admin.example.test/secret",  # not host "http:" and a path "//admin..."
        "https://app.example.test:/x",  # a colon with no port
    ],
)
def test_hostile_original_url_is_refused_as_nginx_can_carry_it(bridge, kratos, url):
    """nginx turns any auth answer but 200, 401 and 403 into its own 500: a malformed
    request is 403 there, the body says why."""
    headers = {**BROWSER, "X-Original-URL": url, "X-Original-Method": "GET"}
    response = bridge.get("/auth", headers=headers)
    assert response.status_code == 403
    assert response.get_json()["error"] == "bad_request"
    assert "X-Original-URL" in response.get_json()["message"]
    assert "Location" not in response.headers


def test_absolute_original_url_of_another_host_gets_no_return_to(bridge, kratos):
    headers = {**BROWSER, "X-Original-URL": "https://evil.example/x", "X-Original-Method": "GET"}
    response = bridge.get("/auth", headers=headers)
    assert response.status_code == 401
    assert response.headers["Location"] == _login(kratos)


def test_unknown_method_is_judged_not_refused(bridge, kratos):
    headers = {**FORWARDED, **BROWSER, "X-Forwarded-Method": "BREW"}
    response = bridge.get("/forward-auth", headers=headers)
    assert response.status_code == 303


def test_without_origins_or_rules_return_to_is_never_set(make_client, kratos):
    bridge = make_client(kratos)
    response = bridge.get("/forward-auth", headers={**FORWARDED, **BROWSER})
    assert response.status_code == 302
    assert response.headers["Location"] == _login(kratos)


def test_a_lowercase_method_is_not_judged_as_its_uppercase_one(bridge, kratos):
    """A proxy passes "get" on unchanged; rules for GET must not judge it."""
    response = bridge.get("/forward-auth", headers={**FORWARDED, "X-Forwarded-Method": "get"})
    assert response.status_code == 400
    assert "X-Forwarded-Method" in response.get_json()["message"]


def test_nginx_refuses_a_url_whose_host_is_not_the_one_nginx_routes_by(bridge, kratos):
    """An absolute-form request line picks nginx's server (and the app's Host) while the
    Host header built the URL: the two must agree."""
    user = flows.register(kratos)
    headers = {
        "X-Session-Token": user.token,
        "X-Original-URL": "https://www.example.test/x",
        "X-Original-Method": "GET",
    }
    same = bridge.get("/auth", headers={**headers, "X-Forwarded-Host": "WWW.example.test"})
    assert same.status_code == 200
    other = bridge.get("/auth", headers={**headers, "X-Forwarded-Host": "admin.example.test"})
    assert other.status_code == 403
    assert other.get_json()["error"] == "bad_request"
    assert "X-Forwarded-Host" in other.get_json()["message"]


def test_a_long_url_is_sent_to_the_login_without_return_to(bridge, kratos):
    uri = "/search?q=" + "%2F" * 700
    response = bridge.get("/forward-auth", headers={**FORWARDED, **BROWSER, "X-Forwarded-Uri": uri})
    assert response.status_code == 302
    assert response.headers["Location"] == _login(kratos)
    short = bridge.get("/forward-auth", headers={**FORWARDED, **BROWSER})
    assert "return_to" in _query(short.headers["Location"])


def test_a_host_with_an_empty_port_is_a_host(bridge, kratos):
    headers = {**FORWARDED, **BROWSER, "X-Forwarded-Host": "app.example.test:"}
    assert bridge.get("/forward-auth", headers=headers).status_code == 302


HOST_RULES = """\
default: public
rules:
  - match: { host: admin.example.test }
    access: deny
"""


@pytest.fixture
def host_rules_bridge(make_client, kratos, tmp_path):
    """A rules file that names a host: everything is public but admin.example.test."""
    (tmp_path / "rules.yml").write_text(HOST_RULES)
    return make_client(kratos, BRIDGE_RULES_FILE=str(tmp_path / "rules.yml"))


def test_nginx_auth_needs_the_routed_host_when_a_rule_names_a_host(host_rules_bridge, kratos):
    """Without X-Forwarded-Host the rules would judge the URL's host, which the client
    chose (the Host header) and nginx did not route by (an absolute-form request line)."""
    original = {"X-Original-URL": "http://public.example.test/secret", "X-Original-Method": "GET"}
    missing = host_rules_bridge.get("/auth", headers=original)
    assert missing.status_code == 403
    assert missing.get_json()["error"] == "bad_request"
    assert "X-Forwarded-Host" in missing.get_json()["message"]

    routed = {**original, "X-Forwarded-Host": "public.example.test"}
    assert host_rules_bridge.get("/auth", headers=routed).status_code == 200
    confused = host_rules_bridge.get(
        "/auth", headers={**original, "X-Forwarded-Host": "admin.example.test"}
    )
    assert confused.status_code == 403
    assert confused.get_json()["error"] == "bad_request"


@pytest.mark.parametrize("routed", ["public.example.test:", "public.example.test/x", ""])
def test_a_malformed_routed_host_is_refused_naming_it(host_rules_bridge, kratos, routed):
    headers = {
        "X-Original-URL": "http://public.example.test/secret",
        "X-Original-Method": "GET",
        "X-Forwarded-Host": routed,
    }
    response = host_rules_bridge.get("/auth", headers=headers)
    assert response.status_code == 403
    assert response.get_json()["error"] == "bad_request"
    assert "X-Forwarded-Host" in response.get_json()["message"]


def test_without_a_host_rule_the_routed_host_stays_optional(make_client, kratos, tmp_path):
    (tmp_path / "rules.yml").write_text("default: public\nrules: []\n")
    bridge = make_client(kratos, BRIDGE_RULES_FILE=str(tmp_path / "rules.yml"))
    headers = {"X-Original-URL": "http://public.example.test/x", "X-Original-Method": "GET"}
    assert bridge.get("/auth", headers=headers).status_code == 200

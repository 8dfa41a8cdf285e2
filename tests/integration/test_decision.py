"""A rules file deciding real Kratos sessions through ``/forward-auth``: public, deny, aal2,
``max_age`` and ``when``, each as a browser and as an API client would see it."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest

from bridge.pipeline.forward_auth import ASK_AGAIN_BURST, ASK_AGAIN_EVERY_MS
from tests.support import kratos_flows as flows
from tests.support.harness import forwarded

RULES = """
rules:
  - id: open
    match: {path: /public/}
    access: public
  - id: closed
    match: {path: /internal}
    access: deny
  - id: money
    match: {path: /pay, methods: [POST]}
    access: aal2
  - id: recent
    match: {path: /settings}
    access: authenticated
    max_age: 2s
  - id: staff
    match: {host: "*.staff.test", path: /}
    access: authenticated
    when: {traits: {email: boss@example.test}}
  - id: verified
    match: {path: /verified}
    access: authenticated
    when: {verified_address: email}
"""
BROWSER = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


@pytest.fixture
def bridge(make_client, kratos, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    return make_client(kratos, BRIDGE_RULES_FILE=str(rules), BRIDGE_REVALIDATE_AFTER="60")


def ask(bridge, uri, method="GET", host="app.example.test", token=None, browser=False):
    headers = {
        **forwarded(uri, host=host, method=method),
        **(BROWSER if browser else {"Accept": "application/json"}),
    }
    if token is not None:
        headers["X-Session-Token"] = token
    return bridge.get("/forward-auth", headers=headers)


def redirect_query(response):
    return parse_qs(urlsplit(response.headers["Location"]).query)


def test_public_route_needs_no_session_and_still_names_a_valid_one(bridge, kratos):
    anonymous = ask(bridge, "/public/page")
    assert anonymous.status_code == 200
    # Every mapped header is there, empty: a proxy copying them overwrites forged ones.
    for name in ("X-User-Id", "X-Session-Id", "X-User-Aal", "X-User-Email"):
        assert anonymous.headers[name] == ""
    assert ask(bridge, "/public/page", token="ory_st_" + "z" * 32).headers["X-User-Id"] == ""

    user = flows.register(kratos)
    known = ask(bridge, "/public/page", token=user.token)
    assert known.status_code == 200
    assert known.headers["X-User-Id"] == user.identity_id


def test_deny_is_403_with_or_without_a_session(bridge, kratos):
    user = flows.register(kratos)
    for token in (None, user.token):
        for browser in (False, True):
            response = ask(bridge, "/internal/x", token=token, browser=browser)
            assert response.status_code == 403
            assert response.get_json()["error"] == "forbidden"
            assert "X-User-Id" not in response.headers
    # A path that reads as another rule's once decoded or normalised is refused, not
    # judged by the reading that lets it pass.
    for uri in ("/public/../internal", "/public/..%2Finternal", "/%69nternal", "//internal"):
        response = ask(bridge, uri, token=user.token)
        assert response.status_code == 400, uri
        assert response.get_json()["error"] == "bad_request", uri
    assert ask(bridge, "/internal/../internal/x", token=user.token).status_code == 403


def test_aal2_rule_steps_up_an_aal1_session_then_lets_it_pass(bridge, kratos):
    user = flows.register(kratos)
    assert ask(bridge, "/pay", method="GET", token=user.token).status_code == 200  # GET: default

    api = ask(bridge, "/pay", method="POST", token=user.token)
    assert api.status_code == 401
    assert api.get_json()["error"] == "aal2_required"
    browser = ask(bridge, "/pay", method="POST", token=user.token, browser=True)
    assert browser.status_code == 303
    assert redirect_query(browser)["aal"] == ["aal2"]

    flows.enable_totp(kratos, user)  # this session is now aal2 at Kratos
    # At once, although the copy is fresh for 60 s: a step-up asks Kratos again.
    allowed = ask(bridge, "/pay", method="POST", token=user.token)
    assert allowed.status_code == 200
    assert allowed.headers["X-User-Aal"] == "aal2"


def test_max_age_sends_an_old_login_to_log_in_again(bridge, kratos):
    user = flows.register(kratos)
    token = flows.login_api(kratos, user)
    assert ask(bridge, "/settings", token=token).status_code == 200
    time.sleep(2.5)
    api = ask(bridge, "/settings", token=token)
    assert api.status_code == 401
    assert api.get_json()["error"] == "reauthentication_required"
    browser = ask(bridge, "/settings", token=token, browser=True)
    assert browser.status_code == 302
    assert redirect_query(browser)["refresh"] == ["true"]
    # Other routes do not care how old the login is.
    assert ask(bridge, "/reports", token=token).status_code == 200


def test_when_conditions_refuse_an_identity_that_does_not_meet_them(bridge, kratos):
    user = flows.register(kratos)
    response = ask(bridge, "/", host="hr.staff.test", token=user.token, browser=True)
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    # The registration's email address is not verified yet.
    assert ask(bridge, "/verified", token=user.token).status_code == 403
    # The wildcard does not cover the parent domain itself.
    assert ask(bridge, "/", host="staff.test", token=user.token).status_code == 200


def test_without_a_session_the_default_rule_sends_a_browser_to_log_in(bridge, kratos):
    response = ask(bridge, "/reports", browser=True)
    assert response.status_code == 302
    assert urlsplit(response.headers["Location"]).path == "/self-service/login/browser"


def test_with_a_rules_file_nginx_must_send_the_original_url(bridge, kratos):
    user = flows.register(kratos)
    response = bridge.get("/auth", headers={"X-Session-Token": user.token})
    assert response.status_code == 403  # all nginx can carry; the body says why
    assert response.get_json()["error"] == "bad_request"
    assert "X-Original-URL" in response.get_json()["message"]
    headers = {
        "X-Session-Token": user.token,
        "X-Original-URL": "https://app.example.test/internal",
        "X-Original-Method": "GET",
        "X-Forwarded-Host": "app.example.test",  # a rule names a host: nginx sends $host
    }
    denied = bridge.get("/auth", headers=headers)
    assert denied.status_code == 403
    assert denied.get_json()["error"] == "forbidden"


def test_rules_hosts_are_the_default_return_to_origins(make_client, kratos, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text("rules:\n  - match: {host: app.example.test}\n    access: authenticated\n")
    bridge = make_client(kratos, BRIDGE_RULES_FILE=str(rules))
    listed = ask(bridge, "/reports?x=1", browser=True)
    assert redirect_query(listed)["return_to"] == ["https://app.example.test/reports?x=1"]
    other = ask(bridge, "/reports", host="evil.example", browser=True)
    assert "return_to" not in redirect_query(other)


def test_a_token_that_steps_up_right_after_a_refusal_is_let_in_on_its_next_request(bridge, kratos):
    user = flows.register(kratos)
    flows.enable_totp(kratos, user)
    token = flows.login_api(kratos, user)  # a password login: aal1, same user with TOTP
    # The first refusal fills the copy; the second asks Kratos again, right before the
    # step-up, so the next request falls within any "once a second" of that ask.
    for _ in range(2):
        refused = ask(bridge, "/pay", method="POST", token=token)
        assert refused.status_code == 401
        assert refused.get_json()["error"] == "aal2_required"
    flows.upgrade_to_aal2(kratos, user, token)  # the same token, now aal2 at Kratos
    allowed = ask(bridge, "/pay", method="POST", token=token)
    assert allowed.status_code == 200
    assert allowed.headers["X-User-Aal"] == "aal2"


def test_a_page_hammering_a_step_up_route_asks_kratos_a_bounded_number_of_times(bridge, kratos):
    user = flows.register(kratos)
    assert ask(bridge, "/reports", token=user.token).status_code == 200  # the copy is fresh
    before = kratos.whoami_calls()
    started = time.monotonic()
    for _ in range(30):
        assert ask(bridge, "/pay", method="POST", token=user.token).status_code == 401
    elapsed_ms = (time.monotonic() - started) * 1000
    # The promise: a burst of asks at once, then one per ASK_AGAIN_EVERY_MS, however
    # long the 30 requests took on this machine.
    budget = ASK_AGAIN_BURST + int(elapsed_ms // ASK_AGAIN_EVERY_MS)
    assert kratos.whoami_calls() - before <= budget

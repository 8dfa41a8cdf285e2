"""What the upstream app receives on an allow: the mapped identity headers, and a JWT that
verifies against the bridge's JWKS (real Kratos, real keys)."""

from __future__ import annotations

import time
from urllib.parse import unquote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.pipeline.tokens import generate_key
from bridge.pipeline.upstream_headers import header_value, parse_mapping
from tests.support import kratos_flows as flows
from tests.support.harness import forwarded

MAPPING = (
    "X-User-Id=identity.id,X-User-Mail=traits.email,X-Nick=traits.nickname,"
    "X-Schema=identity.schema_id,X-Amr=session.amr,X-Aal=session.aal"
)


@pytest.fixture
def keys(tmp_path):
    generate_key(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def bridge(make_client, kratos, keys):
    return make_client(
        kratos,
        BRIDGE_IDENTITY_HEADERS=MAPPING,
        BRIDGE_JWT_HEADER="X-Bridge-Jwt",
        BRIDGE_JWT_KEYS_DIR=str(keys),
        BRIDGE_JWT_ISSUER="https://bridge.example.test",
        BRIDGE_JWT_AUDIENCE="demo-app",
        BRIDGE_JWT_TRAITS="email",
    )


def test_every_mapped_header_is_sent_empty_when_the_identity_lacks_it(bridge, kratos):
    user = flows.register(kratos)
    response = bridge.get("/auth", headers={"X-Session-Token": user.token})
    assert response.status_code == 200
    assert response.headers["X-User-Id"] == user.identity_id
    assert response.headers["X-User-Mail"] == user.email
    assert response.headers["X-Nick"] == ""  # the schema has no such trait
    assert response.headers["X-Schema"] == "default"
    assert response.headers["X-Amr"] == "password"
    assert response.headers["X-Aal"] == "aal1"
    assert "X-Session-Id" not in response.headers  # not in this mapping


def test_jwt_verifies_against_the_served_jwks_and_names_the_session(bridge, kratos):
    user = flows.register(kratos)
    response = bridge.get("/auth", headers={"X-Session-Token": user.token})
    token = response.headers["X-Bridge-Jwt"]
    jwks = bridge.get("/.well-known/jwks.json")
    assert jwks.status_code == 200
    assert jwks.headers["Content-Type"] == "application/jwk-set+json"
    keys = jwt.PyJWKSet.from_json(jwks.get_data(as_text=True))
    key = next(k for k in keys.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        audience="demo-app",
        issuer="https://bridge.example.test",
    )
    whoami = bridge.get("/whoami", headers={"X-Session-Token": user.token}).get_json()
    assert claims["sub"] == user.identity_id
    assert claims["sid"] == whoami["session_id"]
    assert claims["aal"] == "aal1"
    assert claims["amr"] == ["password"]
    assert claims["traits"] == {"email": user.email}
    assert claims["exp"] <= claims["iat"] + 300
    assert abs(claims["iat"] - time.time()) < 60
    # Not minted per request: the next allow carries the same token.
    again = bridge.get("/auth", headers={"X-Session-Token": user.token})
    assert again.headers["X-Bridge-Jwt"] == token


def test_a_jwt_from_another_key_does_not_verify(bridge, kratos):
    user = flows.register(kratos)
    token = bridge.get("/auth", headers={"X-Session-Token": user.token}).headers["X-Bridge-Jwt"]
    other = jwt.PyJWKSet.from_json(bridge.get("/.well-known/jwks.json").get_data(as_text=True))
    forged = jwt.encode(
        jwt.decode(token, options={"verify_signature": False}),
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": jwt.get_unverified_header(token)["kid"]},
    )
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, other.keys[0].key, algorithms=["ES256"], audience="demo-app")


def test_each_apps_routes_get_a_jwt_for_that_app_alone(make_client, kratos, keys, tmp_path):
    """A rule's ``jwt_audience`` wins over BRIDGE_JWT_AUDIENCE, so a token handed to app A
    is no good at app B; one session asking for both in turn gets each its own token."""
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "rules:\n"
        "  - {match: {host: a.example.test}, access: authenticated, jwt_audience: app-a}\n"
        "  - {match: {host: b.example.test}, access: authenticated, jwt_audience: app-b}\n"
    )
    bridge = make_client(
        kratos,
        BRIDGE_RULES_FILE=str(rules),
        BRIDGE_JWT_HEADER="X-Bridge-Jwt",
        BRIDGE_JWT_KEYS_DIR=str(keys),
        BRIDGE_JWT_AUDIENCE="everyone-else",
    )
    user = flows.register(kratos)

    def audience(host: str) -> str:
        headers = {**forwarded(host=host), "X-Session-Token": user.token}
        response = bridge.get("/forward-auth", headers=headers)
        assert response.status_code == 200
        claims = jwt.decode(response.headers["X-Bridge-Jwt"], options={"verify_signature": False})
        return claims["aud"]

    for _ in range(2):  # the second round comes from the process's copy and its memo
        assert audience("a.example.test") == "app-a"
        assert audience("b.example.test") == "app-b"
        assert audience("c.example.test") == "everyone-else"


def test_without_jwt_there_is_no_jwks(make_client, kratos):
    assert make_client(kratos).get("/.well-known/jwks.json").status_code == 404


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("plain@example.test", "plain@example.test"),
        ("Ada Lovelace", "Ada%20Lovelace"),
        ("Jürgen", "J%C3%BCrgen"),
        ("100%", "100%25"),
        ("a\r\nX-User-Id: admin", "a%0D%0AX-User-Id:%20admin"),
        (["admin", "ops"], "admin,ops"),
        (["a,b"], "a%2Cb"),
        (["Ada L", "ü"], "Ada%20L,%C3%BC"),
        ("Doe, Jane", "Doe,%20Jane"),
        ([{"nested": 1}], ""),
        ({"first": "Ada"}, ""),
        (None, ""),
        (True, "true"),
        (42, "42"),
        ("x" * 5000, ""),
    ],
)
def test_header_values_are_safe_and_decode_back(value, sent):
    assert header_value(value) == sent
    assert "\r" not in sent and "\n" not in sent
    if isinstance(value, str) and sent:
        assert unquote(sent) == value


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ("X-User-Id", "is not Header-Name=source"),
        ("X-User-Id=identity.id,x-user-id=session.id", "mapped twice"),
        ("Set-Cookie=identity.id", "owns"),
        ("Location=identity.id", "owns"),
        ("X User=identity.id", "not a header name"),
        ("X-User=identity.password", "is not one of"),
        ("X-User=traits.", "is not one of"),
        ("X-User=traits.a..b", "each part"),
        ("", "maps no header"),
    ],
)
def test_bad_mappings_are_refused_with_the_entry_named(mapping, problem):
    with pytest.raises(ValueError, match=problem):
        parse_mapping(mapping)


def test_jwt_settings_must_come_together(keys):
    with pytest.raises(ConfigError, match="BRIDGE_JWT_HEADER: needs BRIDGE_JWT_KEYS_DIR"):
        load_settings({"BRIDGE_JWT_HEADER": "X-Bridge-Jwt"})
    with pytest.raises(ConfigError, match="BRIDGE_JWT_KEYS_DIR: needs BRIDGE_JWT_HEADER"):
        load_settings({"BRIDGE_JWT_KEYS_DIR": str(keys)})
    with pytest.raises(ConfigError, match="BRIDGE_JWT_KEYS_DIR"):
        load_settings({"BRIDGE_JWT_HEADER": "X-Jwt", "BRIDGE_JWT_KEYS_DIR": str(keys / "none")})
    with pytest.raises(ConfigError, match="BRIDGE_JWT_HEADER: is also in"):
        load_settings({"BRIDGE_JWT_HEADER": "X-User-Id", "BRIDGE_JWT_KEYS_DIR": str(keys)})

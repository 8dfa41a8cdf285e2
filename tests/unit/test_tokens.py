"""The upstream JWT: what it says, when it is signed again, and the keys that verify it.

Every token here is checked the way an app checks it: with PyJWT, against the JWKS
document the ring serves. Keys are real P-256 keys in a temporary directory, and time
is a clock the test moves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bridge.errors import ConfigError
from bridge.pipeline.tokens import KeyRing, TokenMinter, generate_key
from bridge.sessions.session import MirroredSession

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC).timestamp()
NOW_MS = int(NOW * 1000)
ISSUER = "https://bridge.example"
KEYS_DIR = "BRIDGE_JWT_KEYS_DIR"
PKCS8 = serialization.PrivateFormat.PKCS8
SEC1 = serialization.PrivateFormat.TraditionalOpenSSL


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pem(key, form=PKCS8, encryption=None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, form, encryption or serialization.NoEncryption()
    )


def write_key(directory, name, key=None, form=PKCS8):
    key = key or ec.generate_private_key(ec.SECP256R1())
    (directory / name).write_bytes(pem(key, form))
    return key


def session(
    sid="sess-1",
    identity="ident-1",
    aal="aal1",
    methods=(("password", "aal1"),),
    authenticated_at="2026-11-24T09:59:00Z",
    expires_at_ms=NOW_MS + 3_600_000,
    traits=None,
) -> MirroredSession:
    return MirroredSession(
        kratos={
            "session_id": sid,
            "identity": {
                "id": identity,
                "schema_id": "default",
                "state": "active",
                "traits": traits if traits is not None else {"email": "ada@example.com"},
                "metadata_public": None,
            },
            "aal": aal,
            "authentication_methods": [
                {"method": method, "aal": level, "completed_at": "2026-11-24T09:59:00Z"}
                for method, level in methods
            ],
            "authenticated_at": authenticated_at,
            "issued_at": "2026-11-24T09:59:00Z",
            "expires_at": datetime.fromtimestamp(expires_at_ms / 1000, UTC).isoformat(),
            "device": None,
        },
        validated_at_ms=NOW_MS,
        expires_at_ms=expires_at_ms,
    )


def verify(token: str, jwks: bytes, audience: str | None = None) -> dict:
    """The claims, if the JWKS holds the token's kid and that key signed it. Times are
    checked by the tests themselves, against their own clock."""
    keys = jwt.PyJWKSet.from_json(jwks.decode())
    key = keys[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        issuer=ISSUER,
        audience=audience,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


def kids(ring: KeyRing) -> set[str]:
    return {key["kid"] for key in json.loads(ring.jwks())["keys"]}


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys_dir(tmp_path):
    directory = tmp_path / "jwt"
    directory.mkdir()
    write_key(directory, "20261101.pem")
    return directory


@pytest.fixture
def ring(keys_dir, clock) -> KeyRing:
    return KeyRing(keys_dir, rescan_after_s=30.0, clock=clock)


def minter(ring, clock, ttl_s=300.0, **options) -> TokenMinter:
    return TokenMinter(ring, ISSUER, ttl_s, clock=clock, **options)


def test_the_token_verifies_against_the_served_jwks_and_says_who_and_how(ring, clock):
    mint = minter(ring, clock, audience="orders", traits=("email", "name.first", "nickname"))
    two_factors = session(
        aal="aal2",
        methods=(("password", "aal1"), ("totp", "aal2"), ("password", "aal1")),
        authenticated_at="2026-11-24T09:59:00.999999999Z",
        traits={"email": "ada@example.com", "name": {"first": "Ada", "last": "L"}, "age": 36},
    )

    token, _ = mint.token_for(two_factors)

    assert jwt.get_unverified_header(token) == {
        "alg": "ES256",
        "typ": "JWT",
        "kid": ring.signing_key().kid,
    }
    assert verify(token, ring.jwks(), audience="orders") == {
        "iss": ISSUER,
        "sub": "ident-1",
        "sid": "sess-1",
        "aud": "orders",
        "aal": "aal2",
        "amr": ["password", "totp"],
        "auth_time": int(NOW) - 60,  # floored, nanoseconds and all
        "iat": int(NOW),
        "exp": int(NOW) + 300,
        "traits": {"email": "ada@example.com", "name": {"first": "Ada"}},
    }


def test_claims_without_a_value_are_left_out(ring, clock):
    token, _ = minter(ring, clock).token_for(session(authenticated_at=None))

    claims = verify(token, ring.jwks())
    assert "aud" not in claims
    assert "auth_time" not in claims
    assert "traits" not in claims


def test_a_rules_audience_wins_and_each_audience_has_its_own_token(ring, clock):
    mint = minter(ring, clock, audience="everyone")

    for_a, _ = mint.token_for(session(), "app-a")
    for_b, _ = mint.token_for(session(), "app-b")
    default, _ = mint.token_for(session())

    assert verify(for_a, ring.jwks(), audience="app-a")["aud"] == "app-a"
    assert verify(for_b, ring.jwks(), audience="app-b")["aud"] == "app-b"
    assert verify(default, ring.jwks(), audience="everyone")["aud"] == "everyone"
    with pytest.raises(jwt.InvalidAudienceError):
        verify(for_a, ring.jwks(), audience="app-b")
    # Each is kept for its audience: asking again in any order gives the same three.
    assert [mint.token_for(session(), aud)[0] for aud in (None, "app-b", "app-a")] == [
        default,
        for_b,
        for_a,
    ]


def test_exp_is_never_after_the_session_expires(ring, clock):
    ends_soon = session(expires_at_ms=NOW_MS + 100_500)

    token, refresh_at_ms = minter(ring, clock, ttl_s=300).token_for(ends_soon)

    assert verify(token, ring.jwks())["exp"] == int(NOW) + 100
    assert refresh_at_ms <= (int(NOW) + 100) * 1000 - 1000


def test_a_session_with_less_than_a_second_left_gets_a_token_that_ends_with_it(ring, clock):
    token, _ = minter(ring, clock).token_for(session(expires_at_ms=NOW_MS + 400))

    assert verify(token, ring.jwks())["exp"] * 1000 <= NOW_MS + 400


def test_refresh_at_is_when_a_fifth_of_the_lifetime_is_left_at_most_exp_less_1s(ring, clock):
    _, long_lived = minter(ring, clock, ttl_s=300).token_for(session(sid="a"))
    _, short_lived = minter(ring, clock, ttl_s=3).token_for(session(sid="b"))

    assert long_lived == NOW_MS + 240_000
    assert short_lived == NOW_MS + 2_000  # 80% would be 2.4 s, past exp - 1 s


def test_the_same_token_is_returned_until_refresh_at_then_a_new_one(ring, clock):
    mint = minter(ring, clock)
    first, refresh_at_ms = mint.token_for(session())

    clock.now = (refresh_at_ms - 1) / 1000
    assert mint.token_for(session()) == (first, refresh_at_ms)

    clock.now = refresh_at_ms / 1000
    second, later = mint.token_for(session())
    assert second != first
    assert later > refresh_at_ms
    assert verify(second, ring.jwks())["exp"] > verify(first, ring.jwks())["exp"]


def test_a_token_already_ending_with_its_session_is_not_signed_again(ring, clock):
    mint = minter(ring, clock, ttl_s=300)
    capped, refresh_at_ms = mint.token_for(session(expires_at_ms=NOW_MS + 100_000))

    clock.now = refresh_at_ms / 1000 + 10
    assert mint.token_for(session(expires_at_ms=NOW_MS + 100_000))[0] == capped

    extended, _ = mint.token_for(session(expires_at_ms=NOW_MS + 3_600_000))
    assert extended != capped
    assert verify(extended, ring.jwks())["exp"] == int(clock.now) + 300


def test_a_session_that_stepped_up_gets_a_new_token_at_once(ring, clock):
    mint = minter(ring, clock)
    before, _ = mint.token_for(session())

    after, _ = mint.token_for(
        session(aal="aal2", methods=(("password", "aal1"), ("webauthn", "aal2")))
    )

    assert after != before
    claims = verify(after, ring.jwks())
    assert (claims["aal"], claims["amr"]) == ("aal2", ["password", "webauthn"])


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"identity": "ident-2"}, id="sub"),
        pytest.param({"aal": "aal2"}, id="aal"),
        pytest.param({"methods": (("password", "aal1"), ("code", "aal1"))}, id="amr"),
        pytest.param({"authenticated_at": "2026-11-24T09:59:30Z"}, id="auth_time"),
        pytest.param({"expires_at_ms": NOW_MS + 100_000}, id="session-expiry"),
        pytest.param({"traits": {"email": "ada@lovelace.example"}}, id="carried-trait"),
    ],
)
def test_any_change_to_what_the_token_says_gives_a_new_token_at_once(ring, clock, changed):
    mint = minter(ring, clock, traits=("email",))
    before, _ = mint.token_for(session())

    after, _ = mint.token_for(session(**changed))

    assert after != before
    assert verify(after, ring.jwks()) != verify(before, ring.jwks())


def test_only_a_change_to_a_trait_the_token_carries_gives_a_new_token(ring, clock):
    mint = minter(ring, clock, traits=("email",))
    first, _ = mint.token_for(session(traits={"email": "ada@example.com", "age": 36}))

    same, _ = mint.token_for(session(traits={"email": "ada@example.com", "age": 37}))
    changed, _ = mint.token_for(session(traits={"email": "ada@lovelace.example", "age": 37}))

    assert same == first
    assert changed != first
    assert verify(changed, ring.jwks())["traits"] == {"email": "ada@lovelace.example"}


def test_threads_asking_at_once_get_valid_tokens_and_sign_at_most_once_each(ring, clock):
    mint = minter(ring, clock)
    signed = []
    sign = ring.sign
    ring.sign = lambda key, claims: signed.append(claims["sid"]) or sign(key, claims)
    sessions = [session(sid=f"sess-{n}") for n in range(20)]

    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(lambda s: mint.token_for(s)[0], sessions * 50))

    jwks = ring.jwks()
    assert {verify(token, jwks)["sid"] for token in tokens} == {s.id for s in sessions}
    assert len(signed) <= 20 * 8  # at worst each thread raced once per session
    assert [mint.token_for(s)[0] for s in sessions] == [mint.token_for(s)[0] for s in sessions]


def test_the_kid_is_the_rfc_7638_thumbprint_of_the_public_key(tmp_path, clock):
    # A key whose x has a leading zero byte: coordinates are fixed at 32 bytes.
    key = next(
        k
        for k in (ec.generate_private_key(ec.SECP256R1()) for _ in range(20_000))
        if k.public_key().public_numbers().x < 2**248
    )
    write_key(tmp_path, "20261101.pem", key)

    (published,) = json.loads(KeyRing(tmp_path, clock=clock).jwks())["keys"]

    numbers = key.public_key().public_numbers()
    x = base64.urlsafe_b64encode(numbers.x.to_bytes(32, "big")).rstrip(b"=").decode()
    y = base64.urlsafe_b64encode(numbers.y.to_bytes(32, "big")).rstrip(b"=").decode()
    required = json.dumps(
        {"kty": "EC", "crv": "P-256", "x": x, "y": y}, sort_keys=True, separators=(",", ":")
    )
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(required.encode()).digest())
    assert published == {
        "kty": "EC",
        "crv": "P-256",
        "x": x,
        "y": y,
        "kid": thumbprint.rstrip(b"=").decode(),
        "alg": "ES256",
        "use": "sig",
    }


def test_a_sec1_key_is_read_like_its_pkcs8_form(tmp_path, clock):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "pkcs8").mkdir()
    (tmp_path / "sec1").mkdir()
    write_key(tmp_path / "pkcs8", "a.pem", key, PKCS8)
    write_key(tmp_path / "sec1", "a.pem", key, SEC1)

    pkcs8 = KeyRing(tmp_path / "pkcs8", clock=clock).signing_key().kid
    assert KeyRing(tmp_path / "sec1", clock=clock).signing_key().kid == pkcs8


def test_a_token_signed_by_a_key_not_in_the_jwks_fails_verification(ring, clock, tmp_path):
    genuine, _ = minter(ring, clock).token_for(session())
    stranger = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(genuine, options={"verify_signature": False})

    forged = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": kid_of(genuine)})
    with pytest.raises(jwt.InvalidSignatureError):
        verify(forged, ring.jwks())

    (tmp_path / "other").mkdir()
    write_key(tmp_path / "other", "a.pem", stranger)
    foreign_ring = KeyRing(tmp_path / "other", clock=clock)
    foreign, _ = minter(foreign_ring, clock).token_for(session())
    assert verify(foreign, foreign_ring.jwks())["sub"] == "ident-1"
    with pytest.raises(KeyError):
        verify(foreign, ring.jwks())


def test_the_key_named_last_signs_once_the_directory_is_read_again(ring, keys_dir, clock):
    mint = minter(ring, clock)
    old = ring.signing_key().kid
    before, _ = mint.token_for(session())
    write_key(keys_dir, "20261201.pem")

    clock.advance(29)
    assert ring.signing_key().kid == old  # read at most once per rescan_after_s
    clock.advance(1)
    new = ring.signing_key().kid

    assert new != old
    assert kids(ring) == {old, new}
    after, _ = mint.token_for(session())  # the kid is part of what the token says
    assert kid_of(after) == new
    assert verify(before, ring.jwks())["sid"] == verify(after, ring.jwks())["sid"]


def test_a_removed_key_is_published_until_its_last_token_expired(keys_dir, clock):
    ring = KeyRing(keys_dir, rescan_after_s=120.0, clock=clock)
    mint = minter(ring, clock, ttl_s=300)
    old = ring.signing_key().kid
    first, _ = mint.token_for(session(sid="a"))  # exp NOW + 300
    clock.advance(100)
    last, _ = mint.token_for(session(sid="b"))  # exp NOW + 400
    write_key(keys_dir, "20261201.pem")
    (keys_dir / "20261101.pem").unlink()

    clock.now = NOW + 150  # past the rescan that saw the file go
    assert ring.signing_key().kid != old
    assert old in kids(ring)
    clock.now = NOW + 399
    assert verify(last, ring.jwks())["sid"] == "b"

    clock.now = NOW + 400
    assert old not in kids(ring)
    with pytest.raises(KeyError):
        verify(last, ring.jwks())
    assert kid_of(first) == kid_of(last) == old


def test_a_removed_key_that_signed_nothing_leaves_at_the_rescan(keys_dir, clock):
    write_key(keys_dir, "20261201.pem")
    ring = KeyRing(keys_dir, clock=clock)
    assert len(kids(ring)) == 2
    signing = ring.signing_key().kid

    (keys_dir / "20261101.pem").unlink()
    clock.advance(30)

    assert kids(ring) == {signing}


def test_the_directory_is_read_at_most_once_per_rescan_interval(ring, keys_dir, clock):
    write_key(keys_dir, "20261201.pem")
    clock.advance(29)
    assert ring.signing_key().file_name == "20261101.pem"
    clock.advance(1)
    assert ring.signing_key().file_name == "20261201.pem"

    write_key(keys_dir, "20261202.pem")
    clock.advance(29)
    assert ring.jwks() == ring.jwks()
    assert ring.signing_key().file_name == "20261201.pem"
    clock.advance(1)
    assert ring.signing_key().file_name == "20261202.pem"


def test_the_jwks_is_encoded_once_per_change(ring, keys_dir, clock):
    document = ring.jwks()
    clock.advance(30)
    assert ring.jwks() is document

    write_key(keys_dir, "20261201.pem")
    clock.advance(30)
    assert ring.jwks() is not document


def test_files_starting_with_a_dot_are_not_keys(keys_dir, clock):
    (keys_dir / ".20991231.pem").write_bytes(b"half a key")

    assert KeyRing(keys_dir, clock=clock).signing_key().file_name == "20261101.pem"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda key: b"not a key\n", id="not-pem"),
        pytest.param(lambda key: pem(key)[:120], id="truncated"),
        pytest.param(
            lambda key: key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            id="public-key",
        ),
        pytest.param(
            lambda key: pem(key, encryption=serialization.BestAvailableEncryption(b"pw")),
            id="encrypted",
        ),
    ],
)
def test_a_key_file_that_cannot_be_used_stops_the_start_naming_it(keys_dir, clock, content):
    broken = content(ec.generate_private_key(ec.SECP256R1()))
    (keys_dir / "20261102.pem").write_bytes(broken)

    with pytest.raises(ConfigError) as refused:
        KeyRing(keys_dir, clock=clock)

    assert refused.value.key == KEYS_DIR
    assert str(keys_dir / "20261102.pem") in refused.value.problem
    for line in broken.splitlines():
        if len(line) > 20:
            assert line.decode() not in str(refused.value)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="P-384"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="RSA"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, id="Ed25519"),
    ],
)
def test_only_p256_keys_are_accepted(tmp_path, clock, key):
    (tmp_path / "20261101.pem").write_bytes(pem(key()))

    with pytest.raises(ConfigError) as refused:
        KeyRing(tmp_path, clock=clock)

    assert refused.value.key == KEYS_DIR
    assert "20261101.pem is not an EC P-256 private key" in refused.value.problem


def test_a_missing_or_keyless_directory_stops_the_start(tmp_path, clock):
    (tmp_path / "README.txt").write_text("keys go here")

    for directory in (tmp_path / "absent", tmp_path):
        with pytest.raises(ConfigError) as refused:
            KeyRing(directory, clock=clock)
        assert refused.value.key == KEYS_DIR
        assert str(directory) in refused.value.problem


def test_a_bad_file_met_at_a_rescan_keeps_the_keys_and_signing_goes_on(
    ring, keys_dir, clock, caplog
):
    mint = minter(ring, clock, ttl_s=10)
    signing, document = ring.signing_key().kid, ring.jwks()
    (keys_dir / "20261201.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf")

    clock.advance(30)
    with caplog.at_level(logging.WARNING, logger="bridge.pipeline.tokens"):
        token, _ = mint.token_for(session())

    assert kid_of(token) == signing
    assert ring.jwks() == document
    assert any("20261201.pem" in record.getMessage() for record in caplog.records)

    write_key(keys_dir, "20261201.pem")
    clock.advance(30)
    assert ring.signing_key().kid != signing


def test_a_directory_emptied_at_a_rescan_keeps_the_keys(ring, keys_dir, clock, caplog):
    signing = ring.signing_key().kid
    (keys_dir / "20261101.pem").unlink()

    clock.advance(30)
    with caplog.at_level(logging.WARNING, logger="bridge.pipeline.tokens"):
        assert ring.signing_key().kid == signing

    assert kids(ring) == {signing}
    assert any(KEYS_DIR in record.getMessage() for record in caplog.records)


def test_generate_key_writes_a_p256_key_named_by_utc_time_for_its_owner_only(tmp_path, clock):
    directory = tmp_path / "secrets" / "jwt"

    path = generate_key(directory, clock=clock)

    assert path == directory / "20261124T100000Z.pem"
    assert directory.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert KeyRing(directory, clock=clock).signing_key().file_name == path.name


def test_generate_key_never_overwrites_a_key(tmp_path, clock):
    path = generate_key(tmp_path, clock=clock)
    first = path.read_bytes()

    with pytest.raises(FileExistsError):
        generate_key(tmp_path, clock=clock)

    assert path.read_bytes() == first
    assert os.listdir(tmp_path) == [path.name]


def test_a_new_key_is_published_before_it_signs(tmp_path):
    """An app holding a JWKS cached before the new key appeared must not meet a token
    signed by it: the key signs only once its file is old enough (its mtime, the same for
    every replica), and is in the JWKS from the first rescan."""
    directory = tmp_path / "jwt"
    directory.mkdir()
    write_key(directory, "20261101.pem")
    now = os.stat(directory / "20261101.pem").st_mtime
    os.utime(directory / "20261101.pem", (now - 3600, now - 3600))
    clock = Clock(now)
    ring = KeyRing(directory, rescan_after_s=30.0, clock=clock, publish_before_signing_s=90.0)
    old = ring.signing_key().kid
    write_key(directory, "20261201.pem")
    os.utime(directory / "20261201.pem", (now, now))

    clock.advance(31)  # rescanned: published, not signing
    assert ring.signing_key().kid == old
    assert len(kids(ring)) == 2
    clock.advance(60)  # 91 s: the next rescan finds it settled
    new = ring.signing_key().kid
    assert new != old
    assert new in kids(ring) and old in kids(ring)


def test_a_first_key_signs_at_once_however_new(tmp_path):
    directory = tmp_path / "jwt"
    generate_key(directory)
    now = os.stat(next(directory.glob("*.pem"))).st_mtime
    ring = KeyRing(directory, clock=Clock(now), publish_before_signing_s=90.0)
    assert ring.signing_key().kid in kids(ring)

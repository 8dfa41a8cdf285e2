"""Which credential a request carries, and the key it is stored under."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from bridge.errors import CredentialMissing, SessionInvalid
from bridge.pipeline.credentials import Credential, Fingerprints, Kind
from bridge.pipeline.credentials import extract as extract_from
from bridge.web.request import HeaderView

TOKEN = "ory_st_" + "A1b2" * 8
COOKIE = base64.urlsafe_b64encode(b"1795347480|abc_-=|" + bytes(range(32))).decode()


def extract(headers, cookie_name):
    """``extract`` over headers written as a dict, or as a list of pairs for repeats."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    return extract_from(HeaderView((k.lower(), v) for k, v in pairs), cookie_name)


def test_precedence_is_token_then_cookie_then_bearer():
    cookie = f"ory_kratos_session={COOKIE}"
    both = {"X-Session-Token": TOKEN, "Cookie": cookie, "Authorization": "Bearer " + TOKEN}
    assert extract(both, "ory_kratos_session").kind is Kind.TOKEN
    no_token = {"Cookie": cookie, "Authorization": "Bearer " + TOKEN}
    assert extract(no_token, "ory_kratos_session").kind is Kind.COOKIE
    assert extract({"Authorization": "bearer " + TOKEN}, "ory_kratos_session").kind is Kind.BEARER


def test_cookie_name_is_configurable_and_other_cookies_are_ignored():
    headers = {"Cookie": f"a=1; my_session={COOKIE}; ory_kratos_session=zzz"}
    credential = extract(headers, "my_session")
    assert credential.values == (COOKIE,)
    assert credential.headers("my_session") == {"Cookie": f"my_session={COOKIE}"}


def _cookie(n: int) -> str:
    return base64.urlsafe_b64encode(b"17953474%02d|xyz|" % n + bytes(32)).decode()


def test_every_plausible_session_cookie_is_sent_in_order():
    many = [_cookie(n) for n in range(10)]
    rest = "; ".join(f"s={c}" for c in many[1:])
    header = f's=junk; s={many[0]}; s="{COOKIE}"; s=a b; {rest}'
    assert extract({"Cookie": header}, "s").values == (many[0], COOKIE, *many[1:])


@pytest.mark.parametrize("header", ["s", "s=", "s=a,b", " s =x y"])
def test_session_cookies_go_keeps_are_never_skipped_for_a_bearer(header):
    """Go keeps these as session cookies Kratos cannot decode; it then errors, so do we."""
    with pytest.raises(SessionInvalid):
        extract({"Cookie": header, "Authorization": "Bearer " + TOKEN}, "s")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Session-Token": "short"},
        {"X-Session-Token": TOKEN + "!"},
        {"Cookie": "ory_kratos_session=garbage"},
        {"Cookie": "ory_kratos_session=garbage", "Authorization": "Bearer " + TOKEN},
        {"Authorization": "Bearer not a token"},
    ],
)
def test_malformed_credentials_are_invalid(headers):
    with pytest.raises(SessionInvalid):
        extract(headers, "ory_kratos_session")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic " + TOKEN}, {"Cookie": "theme=dark"}, {"X-Session-Token": ""}],
)
def test_absent_credentials_are_missing(headers):
    with pytest.raises(CredentialMissing):
        extract(headers, "ory_kratos_session")


def test_repr_never_shows_the_secret():
    assert TOKEN not in repr(Credential(Kind.TOKEN, (TOKEN,)))


def test_fingerprint_is_hmac_sha256_of_kind_and_values():
    secret = b"k" * 40
    credential = Credential(Kind.TOKEN, (TOKEN,))
    expected = hmac.new(secret, b"token\x00" + TOKEN.encode(), hashlib.sha256).digest()
    assert Fingerprints(secret).of(credential) == base64.urlsafe_b64encode(
        expected
    ).decode().rstrip("=")
    assert Fingerprints(secret).of(credential) == Fingerprints(secret).of(credential)
    assert Fingerprints(b"j" * 40).of(credential) != Fingerprints(secret).of(credential)
    as_bearer = Credential(Kind.BEARER, (TOKEN,))
    assert Fingerprints(secret).of(as_bearer) != Fingerprints(secret).of(credential)


def test_fingerprint_covers_every_cookie_in_order():
    """Kratos uses the first cookie it can decode, so (c1, c2) and (c2, c1) may be
    different sessions."""
    keys = Fingerprints(b"k" * 40)
    one, two = _cookie(1), _cookie(2)
    pairs = [(one, two), (two, one), (one,), (two,)]
    assert len({keys.of(Credential(Kind.COOKIE, pair)) for pair in pairs}) == 4

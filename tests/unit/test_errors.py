"""How each error is answered, on each listener: the main one answers a refusal with the
code and status its class carries; the admin one, API and dashboard alike, names four
errors and answers every other as an internal error. Both tables are written out here as
the clients see them, so a change to either is a change to this specification."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge import errors
from bridge.admin import statuses
from bridge.config import load_settings
from bridge.errors import BridgeError
from bridge.pipeline.redirects import BrowserRedirects
from bridge.web.responses import refusal
from tests.conftest import SECRET

# (status, error code) on the main listener; the rest of the answer is the error's message.
MAIN = {
    errors.BridgeError: (500, "internal_error"),
    errors.ConfigError: (500, "internal_error"),
    errors.BadRequest: (400, "bad_request"),
    errors.NotFound: (404, "not_found"),
    errors.CredentialMissing: (401, "session_missing"),
    errors.SessionInvalid: (401, "session_invalid"),
    errors.RejectedRecently: (401, "session_invalid"),
    errors.StepUpRequired: (401, "aal2_required"),
    errors.ReauthenticationRequired: (401, "reauthentication_required"),
    errors.SessionEnded: (401, "session_ended"),
    errors.Forbidden: (403, "forbidden"),
    errors.DeviceChanged: (403, "device_changed"),
    errors.AppTokenMissing: (401, "app_token_required"),
    errors.AppWritesDisabled: (403, "app_writes_disabled"),
    errors.AppDataTooLarge: (413, "app_data_too_large"),
    errors.TooManyAppFields: (413, "app_data_too_large"),
    errors.KratosUnavailable: (503, "kratos_unavailable"),
    errors.KratosRateLimited: (429, "kratos_rate_limited"),
    errors.KratosUnreachable: (503, "kratos_unavailable"),
    errors.KratosAdminRefused: (503, "kratos_unavailable"),
    errors.StoreUnavailable: (503, "store_unavailable"),
}
# The admin listener: Kratos out of reach is a bad gateway there, and a rate-limited Kratos
# is one out of reach.
ADMIN = {
    errors.BadRequest: (400, "bad_request"),
    errors.NotFound: (404, "not_found"),
    errors.KratosUnavailable: (502, "kratos_unavailable"),
    errors.KratosRateLimited: (502, "kratos_unavailable"),
    errors.KratosUnreachable: (502, "kratos_unavailable"),
    errors.KratosAdminRefused: (502, "kratos_unavailable"),
    errors.StoreUnavailable: (503, "store_unavailable"),
}
ADMIN_INTERNAL = (500, "internal_error")
REDIRECTS = BrowserRedirects("http://127.0.0.1:4433/self-service/login/browser", ())


def _kinds(root: type[BridgeError] = BridgeError) -> Iterator[type[BridgeError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _kinds(sub)


def _instance(kind: type[BridgeError]) -> BridgeError:
    """One of ``kind``, whatever its constructor wants."""
    made = {
        errors.ConfigError: lambda: errors.ConfigError("BRIDGE_X", "is bad"),
        errors.RejectedRecently: errors.RejectedRecently,
        errors.StepUpRequired: lambda: errors.StepUpRequired(None),
        errors.KratosRateLimited: lambda: errors.KratosRateLimited("7"),
        errors.SessionEnded: errors.SessionEnded,
        errors.AppDataTooLarge: lambda: errors.AppDataTooLarge(10, 11),
        errors.TooManyAppFields: lambda: errors.TooManyAppFields(2, 3),
    }.get(kind)
    return made() if made else kind(f"a {kind.__name__}")


def test_the_tables_name_every_error() -> None:
    assert set(_kinds()) == set(MAIN)


@pytest.mark.parametrize("kind", list(MAIN), ids=lambda kind: kind.__name__)
def test_a_refusal_carries_its_code_and_status(kind: type[BridgeError]) -> None:
    assert (kind.status, kind.code) == MAIN[kind]
    refused = refusal(_instance(kind), REDIRECTS, None)
    assert (refused.status, refused.code) == MAIN[kind]


@pytest.mark.parametrize("kind", list(MAIN), ids=lambda kind: kind.__name__)
def test_the_admin_listener_has_one_table(kind: type[BridgeError]) -> None:
    error = _instance(kind)
    status, code, message = statuses.answer(error)
    assert (status, code) == ADMIN.get(kind, ADMIN_INTERNAL)
    assert message == (str(error) if kind in ADMIN else "the request could not be handled")


@pytest.fixture
def admin_app():
    """The admin listener's app, as the server builds it, with Kratos out of reach."""
    from bridge.admin.api import create_admin_app
    from bridge.wiring import build_bridge

    closed = "http://127.0.0.1:9"
    settings = load_settings(
        {
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_KRATOS_PUBLIC_URL": closed,
            "BRIDGE_KRATOS_ADMIN_URL": closed,
        }
    )
    built = build_bridge(settings)
    try:
        yield create_admin_app(built)
    finally:
        built.close()


SESSION = "00000000-0000-4000-8000-000000000001"


def test_the_api_and_the_dashboard_answer_an_unreachable_kratos_alike(admin_app) -> None:
    client = admin_app.test_client()
    api = client.get(f"/admin/sessions/{SESSION}")
    page = client.get(f"/admin/ui/sessions/{SESSION}")
    assert api.status_code == page.status_code == 502
    assert api.json["error"] == "kratos_unavailable"
    assert "Kratos did not answer" in page.text


@pytest.mark.parametrize("kind", list(MAIN), ids=lambda kind: kind.__name__)
def test_the_api_and_the_dashboard_answer_each_error_alike(
    admin_app, monkeypatch: pytest.MonkeyPatch, kind: type[BridgeError]
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise _instance(kind)

    monkeypatch.setattr(admin_app.extensions["session_admin"], "show", fail)
    client = admin_app.test_client()
    api = client.get(f"/admin/sessions/{SESSION}")
    page = client.get(f"/admin/ui/sessions/{SESSION}")
    assert api.status_code == page.status_code == ADMIN.get(kind, ADMIN_INTERNAL)[0]
    assert api.json["error"] == ADMIN.get(kind, ADMIN_INTERNAL)[1]

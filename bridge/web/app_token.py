"""Who may write a session's app section over HTTP: an app, never the session's own user.

``PATCH /whoami/app`` needs two credentials. The user's session credential (the Kratos
cookie, ``X-Session-Token`` or ``Authorization: Bearer``) names the session; the app
credential, ``BRIDGE_APP_TOKEN`` sent in ``X-Bridge-App-Token``, says that an app, not
the user, is writing. The app section is where apps keep what the user must not choose
(a role, a plan), and the user holds their own session credential, so that alone must
never be enough. The app credential has a header of its own, so that it never competes
with a session token in ``Authorization``.

Without ``BRIDGE_APP_TOKEN`` nothing may write over HTTP (closed by default); apps that
reach Redis write through ``bridge.client`` and ``bridge.flask`` instead, where the Redis
credential is the app's.
"""

from __future__ import annotations

import hmac

from bridge.errors import AppTokenMissing, AppWritesDisabled

APP_TOKEN_HEADER = "X-Bridge-App-Token"  # noqa: S105 (a header name)


def require_app_token(configured: str | None, presented: str | None) -> None:
    """Raise unless ``presented`` (the header's value, one Latin-1 character per byte
    sent) is the configured app token; compared in constant time."""
    if configured is None:
        raise AppWritesDisabled(
            "writing the app section over HTTP is off: set BRIDGE_APP_TOKEN (or "
            f"BRIDGE_APP_TOKEN_FILE) and send it in {APP_TOKEN_HEADER}"
        )
    given = (presented or "").encode("latin-1", "replace")
    if not hmac.compare_digest(given, configured.encode()) or presented is None:
        raise AppTokenMissing(
            f"writing the app section needs the app's token in {APP_TOKEN_HEADER}"
        )

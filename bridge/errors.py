"""Every failure the request path can meet, as one small hierarchy.

Each refusal carries its error ``code`` and the ``status`` the main listener answers it
with; ``bridge.web.responses`` reads them, so a stage raises what it means and never decides
a status code itself. The admin listener names fewer of them and substitutes a status or
two (``bridge.admin.statuses``). An error without a code of its own is answered as
``internal_error``, its message kept to the log::

    BridgeError                        500  internal_error
    ├── ConfigError                    500  internal_error (start-up; never a refusal)
    ├── BadRequest                     400  bad_request
    ├── NotFound                       404  not_found (the admin listener's)
    ├── CredentialMissing              401  session_missing
    ├── SessionInvalid                 401  session_invalid
    │   └── RejectedRecently           401  session_invalid
    ├── StepUpRequired                 401  aal2_required
    ├── ReauthenticationRequired       401  reauthentication_required
    ├── SessionEnded                   401  session_ended
    ├── Forbidden                      403  forbidden
    │   └── DeviceChanged              403  device_changed
    ├── AppTokenMissing                401  app_token_required
    ├── AppWritesDisabled              403  app_writes_disabled
    ├── AppDataTooLarge                413  app_data_too_large
    │   └── TooManyAppFields           413  app_data_too_large
    ├── KratosUnavailable              503  kratos_unavailable
    │   ├── KratosRateLimited          429  kratos_rate_limited
    │   ├── KratosUnreachable          503  kratos_unavailable
    │   └── KratosAdminRefused         503  kratos_unavailable
    └── StoreUnavailable               503  store_unavailable

Outside it, on purpose: the failures of the code apps and operators run
(``bridge.flask``'s ``SessionMissing`` and ``HandOffUnverifiable``, ``bridge.admin.cli``'s
``AdminCommandFailed``), which are no refusal of the bridge's; the transport's
``http_client.RequestFailed``, which its callers turn into ``KratosUnavailable``; and
``hooks.BadHookBody``, which the hook route answers itself.
"""

from __future__ import annotations

from typing import ClassVar


class BridgeError(Exception):
    """Base of everything the bridge raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500


class ConfigError(BridgeError):
    """A configuration key has a value the bridge cannot run with."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class BadRequest(BridgeError):
    """The request to the bridge itself is malformed (e.g. an unknown ``aal`` value)."""

    code = "bad_request"
    status = 400


class NotFound(BridgeError):
    """The bridge and Kratos know no such session or identity (the admin listener)."""

    code = "not_found"
    status = 404


class CredentialMissing(BridgeError):
    """The request carries no session cookie, session token or bearer token."""

    code = "session_missing"
    status = 401


class SessionInvalid(BridgeError):
    """Kratos does not accept the credential (or its shape rules it out first)."""

    code = "session_invalid"
    status = 401


class RejectedRecently(SessionInvalid):
    """Kratos rejected this credential a moment ago (``BRIDGE_NEGATIVE_CACHE_TTL``): it is
    refused from that memory, without asking Kratos again. Answered as any
    ``SessionInvalid``; its own class is what the metrics count as a negative-cache hit."""

    def __init__(self) -> None:
        super().__init__("Kratos rejected this credential recently")


class StepUpRequired(BridgeError):
    """The session is valid but a second factor is needed (Kratos 403 aal2)."""

    code = "aal2_required"
    status = 401

    def __init__(self, redirect_browser_to: str | None) -> None:
        super().__init__("a second factor is required")
        self.redirect_browser_to = redirect_browser_to


class ReauthenticationRequired(BridgeError):
    """The session is valid, but the route wants a more recent login (a rule's ``max_age``)."""

    code = "reauthentication_required"
    status = 401


class Forbidden(BridgeError):
    """The route is closed to this request: a ``deny`` rule, or a rule's ``when`` conditions
    that the identity does not meet."""

    code = "forbidden"
    status = 403


class DeviceChanged(Forbidden):
    """The session is used from another device than Kratos recorded, and
    ``BRIDGE_ON_DEVICE_CHANGE=deny``."""

    code = "device_changed"
    status = 403


class AppTokenMissing(BridgeError):
    """A write to the app section came without the app credential, or with a wrong one."""

    code = "app_token_required"
    status = 401


class AppWritesDisabled(BridgeError):
    """A write to the app section, with no app credential configured to allow any."""

    code = "app_writes_disabled"
    status = 403


class KratosUnavailable(BridgeError):
    """Kratos could not be asked, or answered something we cannot trust."""

    code = "kratos_unavailable"
    status = 503


class StoreUnavailable(BridgeError):
    """The session store (Redis) could not be reached."""

    code = "store_unavailable"
    status = 503


class KratosUnreachable(KratosUnavailable):
    """Kratos gave no answer at all (no connection, or none in time), as opposed to one
    the bridge cannot use: the web hooks wait out the first, never the second."""


class KratosAdminRefused(KratosUnavailable):
    """Kratos's admin API answered 401 or 403: the bridge's ``BRIDGE_KRATOS_ADMIN_TOKEN``
    is missing or not accepted (Ory Network's API key check, or a gateway's)."""


class KratosRateLimited(KratosUnavailable):
    """Kratos answered 429; ``retry_after`` is its ``Retry-After`` (seconds)."""

    code = "kratos_rate_limited"
    status = 429

    def __init__(
        self, retry_after: str, message: str = "Kratos is rate limiting the bridge"
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionEnded(BridgeError):
    """The session's mirror is gone: it expired, was revoked or logged out; or it was
    unused for longer than ``BRIDGE_IDLE_TIMEOUT``."""

    code = "session_ended"
    status = 401

    def __init__(
        self, message: str = "the session has ended (expired, revoked or logged out)"
    ) -> None:
        super().__init__(message)


class AppDataTooLarge(BridgeError):
    """A write would take a session's app data past its cap; nothing was written."""

    code = "app_data_too_large"
    status = 413

    def __init__(self, max_bytes: int, size: int) -> None:
        super().__init__(
            f"app data is capped at {max_bytes} bytes per session; this write would make it {size}"
        )
        self.max_bytes = max_bytes
        self.size = size


class TooManyAppFields(AppDataTooLarge):
    """A write would give a session more app fields than ``MAX_APP_FIELDS``; nothing was
    written. (Many tiny fields would make every write of the session slow for Redis.)"""

    def __init__(self, max_fields: int, count: int) -> None:
        BridgeError.__init__(
            self,
            f"app data is capped at {max_fields} fields per session; this write would make "
            f"it {count}",
        )
        self.max_bytes = 0
        self.size = count

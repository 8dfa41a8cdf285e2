"""Every failure the request path can meet, as one small hierarchy.

The HTTP layer maps these to status codes in one place (``bridge.responses``),
so a stage raises what it means and never decides a status code itself.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of everything the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A configuration key has a value the bridge cannot run with."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class BadRequest(BridgeError):
    """The request to the bridge itself is malformed (e.g. an unknown ``aal`` value)."""


class CredentialMissing(BridgeError):
    """The request carries no session cookie, session token or bearer token."""


class SessionInvalid(BridgeError):
    """Kratos does not accept the credential (or its shape rules it out first)."""


class RejectedRecently(SessionInvalid):
    """Kratos rejected this credential a moment ago (``BRIDGE_NEGATIVE_CACHE_TTL``): it is
    refused from that memory, without asking Kratos again. Answered as any
    ``SessionInvalid``; its own class is what the metrics count as a negative-cache hit."""

    def __init__(self) -> None:
        super().__init__("Kratos rejected this credential recently")


class StepUpRequired(BridgeError):
    """The session is valid but a second factor is needed (Kratos 403 aal2)."""

    def __init__(self, redirect_browser_to: str | None) -> None:
        super().__init__("a second factor is required")
        self.redirect_browser_to = redirect_browser_to


class ReauthenticationRequired(BridgeError):
    """The session is valid, but the route wants a more recent login (a rule's ``max_age``)."""


class Forbidden(BridgeError):
    """The route is closed to this request: a ``deny`` rule, or a rule's ``when`` conditions
    that the identity does not meet."""


class DeviceChanged(Forbidden):
    """The session is used from another device than Kratos recorded, and
    ``BRIDGE_ON_DEVICE_CHANGE=deny``."""


class AppTokenMissing(BridgeError):
    """A write to the app section came without the app credential, or with a wrong one."""


class AppWritesDisabled(BridgeError):
    """A write to the app section, with no app credential configured to allow any."""


class KratosUnavailable(BridgeError):
    """Kratos could not be asked, or answered something we cannot trust."""


class StoreUnavailable(BridgeError):
    """The session store (Redis) could not be reached."""


class KratosRateLimited(KratosUnavailable):
    """Kratos answered 429; ``retry_after`` is its ``Retry-After`` (seconds)."""

    def __init__(self, retry_after: str) -> None:
        super().__init__("Kratos is rate limiting the bridge")
        self.retry_after = retry_after


class SessionEnded(BridgeError):
    """The session's mirror is gone: it expired, was revoked or logged out."""

    def __init__(self) -> None:
        super().__init__("the session has ended (expired, revoked or logged out)")


class AppDataTooLarge(BridgeError):
    """A write would take a session's app data past its cap; nothing was written."""

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

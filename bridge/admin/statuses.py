"""The admin listener's one table from a ``BridgeError`` to its answer, for the API and
the dashboard alike.

The admin listener names only the errors an operator can act on, and answers each with
the code and status its class carries (``bridge.errors``), except where ``SUBSTITUTES``
says otherwise, the way a dialect substitutes statuses: an unreachable Kratos is a bad
gateway here (502), where the main listener asks a proxy to retry (503). A subclass is
answered as the named error it is (a rate-limited Kratos is ``kratos_unavailable``).
Every other error is an internal one, its message kept from the answer.
"""

from __future__ import annotations

from bridge.errors import BadRequest, BridgeError, KratosUnavailable, NotFound, StoreUnavailable

NAMED: tuple[type[BridgeError], ...] = (NotFound, BadRequest, KratosUnavailable, StoreUnavailable)
SUBSTITUTES: dict[type[BridgeError], int] = {KratosUnavailable: 502}
INTERNAL_MESSAGE = "the request could not be handled"


def named(error: BridgeError) -> type[BridgeError]:
    """The named error ``error`` is answered as; ``BridgeError`` for every other one."""
    return next((kind for kind in NAMED if isinstance(error, kind)), BridgeError)


def answer(error: BridgeError) -> tuple[int, str, str]:
    """(status, error code, message) for ``error`` on the admin listener."""
    kind = named(error)
    if kind is BridgeError:
        return kind.status, kind.code, INTERNAL_MESSAGE
    return SUBSTITUTES.get(kind, kind.status), kind.code, str(error)

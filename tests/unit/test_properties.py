"""Properties of every entry point hostile input reaches (``tests/support/fuzz_targets.py``):
credential extraction, cookie parsing, each dialect's headers, return_to, rules,
identity headers, the whole no-I/O step of a forward-auth decision, and Envoy's gRPC
check against ``/ext-authz`` for the same request. For any input,
built from pieces that smuggle CR/LF, NUL, separators and escapes: only the documented
exceptions, no header with CR, LF or NUL, no allow without a session on a route that is
not public. ``tests/fuzz.py`` runs the same targets for a time budget.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.fuzz_targets import TARGETS, Target

EXAMPLES = 150


@pytest.mark.parametrize("target", TARGETS, ids=[target.name for target in TARGETS])
def test_property(target: Target) -> None:
    @given(target.strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    def holds(value) -> None:
        target.check(value)

    holds()

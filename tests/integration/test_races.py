"""Races staged against a real Kratos behind a slow link: answers that land late must
never let a request through that Kratos would no longer accept."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from bridge.web.app import create_app
from tests.conftest import bridge_settings, store_of
from tests.support import kratos_flows as flows
from tests.support.harness import SlowLink, wait_until

DELAY = 1.0


@pytest.fixture
def slow_kratos(kratos):
    link = SlowLink(kratos.public_port, DELAY)
    yield SimpleNamespace(public_url=link.url, admin_url=kratos.admin_url, link=link)
    link.close()


def _answered_by_kratos(link: SlowLink, held_before: int) -> None:
    """Kratos has answered the request under way (its answer held in the link): what the
    race needs, however long the request took to get there."""
    wait_until(lambda: link.held > held_before, 10, "Kratos's answer")


def _in_background(call):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()))
    thread.start()
    return thread, result


def test_a_request_never_gets_an_answer_asked_before_it_started(make_client, slow_kratos, kratos):
    """With revalidate_after 0, a request that joins a Kratos call already under way
    must not take that call's answer: it was asked before the request began."""
    client = make_client(slow_kratos, BRIDGE_REVALIDATE_AFTER="0", BRIDGE_KRATOS_TIMEOUT="5")
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}
    session_id = flows.session_of(kratos, token=user.token).json()["id"]

    held_before = slow_kratos.link.held
    first, first_result = _in_background(lambda: client.get("/auth", headers=headers))
    _answered_by_kratos(slow_kratos.link, held_before)  # the answer is on its way back
    assert httpx.delete(f"{kratos.admin_url}/admin/sessions/{session_id}").status_code == 204
    second, second_result = _in_background(lambda: client.get("/auth", headers=headers))
    first.join()
    second.join()
    assert first_result["value"].status_code == 200  # asked before the revocation
    assert second_result["value"].status_code == 401
    assert "X-User-Id" not in second_result["value"].headers


def test_an_acceptance_landing_after_a_rejection_is_not_reused(
    slow_kratos, kratos, redis_server, prefix
):
    """Two bridge processes on one Redis: one asks Kratos over a slow link, the user logs
    out, the other gets the 401. The late 200 answers its own request and nothing else."""
    env = {"BRIDGE_NEGATIVE_CACHE_TTL": "0", "BRIDGE_KRATOS_TIMEOUT": "5"}
    slow = create_app(bridge_settings(slow_kratos, redis_server.url, prefix, **env))
    fast = create_app(bridge_settings(kratos, redis_server.url, prefix, **env))
    slow, fast = slow.test_client(use_cookies=False), fast.test_client(use_cookies=False)
    user = flows.register(kratos)
    headers = {"X-Session-Token": user.token}

    held_before = slow_kratos.link.held
    late, late_result = _in_background(lambda: slow.get("/auth", headers=headers))
    _answered_by_kratos(slow_kratos.link, held_before)
    flows.logout_api(kratos, user.token)
    assert fast.get("/auth", headers=headers).status_code == 401
    late.join()
    assert late_result["value"].status_code == 200  # asked before the logout

    assert fast.get("/auth", headers=headers).status_code == 401
    assert slow.get("/auth", headers=headers).status_code == 401
    assert store_of(fast).identity_session_ids(user.identity_id, int(time.time() * 1000)) == []

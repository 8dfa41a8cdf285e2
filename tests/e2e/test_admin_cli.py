"""``kratos-bridge sessions|events|stats`` against a real bridge with its admin listener
(real Redis, real Kratos), and the OpenAPI document kept in step with the routes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from bridge.admin import cli as admin_cli
from bridge.cli import main
from bridge.config import load_settings
from bridge.web import openapi
from tests.conftest import SECRET
from tests.support import kratos_flows as flows
from tests.support.harness import BridgeServer, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "admin-token-" + secrets.token_hex(16)
APP_TOKEN = "app-token-" + secrets.token_hex(16)
PREFIX = "tadmincli" + secrets.token_hex(3) + ":"


@pytest.fixture(scope="module")
def bridge(kratos, redis_server, workdir):
    """One bridge (two worker processes) with the admin listener, for the module."""
    env = {
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        "BRIDGE_REDIS_URL": redis_server.url,
        "BRIDGE_KEY_PREFIX": PREFIX,
        "BRIDGE_SECRET": SECRET,
        "BRIDGE_WORKERS": "2",
        "BRIDGE_ADMIN_TOKEN": TOKEN,
        "BRIDGE_APP_TOKEN": APP_TOKEN,
    }
    server = BridgeServer(env, workdir)  # on an admin port of its own: server.admin_url
    try:
        wait_until(
            lambda: admin_get(server, "/health/alive").status_code == 200, 30, "admin listener"
        )
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def admin_get(server, path: str, **params) -> httpx.Response:
    return httpx.get(
        server.admin_url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}
    )


def cli_env(server, **extra: str) -> dict[str, str]:
    """The environment an operator's shell would have: the admin listener's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_ADMIN_PORT=server.admin_url.rsplit(":", 1)[1],
        BRIDGE_ADMIN_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def cli(server, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``kratos-bridge ARGS`` as a process; an empty ``env`` value unsets that variable."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=cli_env(server, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_json(server, *args: str) -> dict:
    done = cli(server, *args, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return orjson.loads(done.stdout)


def seen_by_bridge(server, token: str) -> None:
    """A request through the proxy with this session: the bridge mirrors and registers it."""
    response = httpx.get(
        server.url + "/forward-auth",
        headers={"X-Session-Token": token, **forwarded()},
    )
    assert response.status_code == 200, response.text


def forwarded() -> dict[str, str]:
    return {
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "app.test",
        "X-Forwarded-Uri": "/",
    }


def registered(server, identity_id: str, count: int) -> list[dict]:
    """The identity's sessions once the bridge has reported ``count`` of them (reports
    run about once a second; Kratos lists them all at once, unseen ones marked)."""
    found: list[dict] = []

    def enough() -> bool:
        found[:] = admin_get(server, f"/admin/identities/{identity_id}/sessions").json()["sessions"]
        return sum(s["seen_by_bridge"] for s in found) >= count

    wait_until(enough, 15, f"{count} sessions of {identity_id} in the registry")
    return found


def user_with_sessions(server, kratos, count: int) -> tuple[flows.User, list[str]]:
    """A new identity with ``count`` sessions the bridge has seen, oldest first."""
    user = flows.register(kratos, "admin-cli")
    tokens = [user.token] + [flows.login_api(kratos, user) for _ in range(count - 1)]
    for token in tokens:
        seen_by_bridge(server, token)
    registered(server, user.identity_id, count)
    return user, tokens


def session_id_of(kratos, token: str) -> str:
    return flows.session_of(kratos, token=token).json()["id"]


def forward_auth_status(server, token: str) -> int:
    return httpx.get(
        server.url + "/forward-auth", headers={"X-Session-Token": token, **forwarded()}
    ).status_code


# sessions list


def test_sessions_list_shows_the_sessions_the_bridge_saw(bridge, kratos):
    user, tokens = user_with_sessions(bridge, kratos, 2)
    ids = [session_id_of(kratos, t) for t in tokens]

    listed = cli_json(bridge, "sessions", "list", "--identity", user.identity_id)
    sessions = listed["sessions"]
    assert [s["session_id"] for s in sessions] == ids[::-1]  # newest first
    assert {s["label"] for s in sessions} == {user.email}
    assert {s["identity_id"] for s in sessions} == {user.identity_id}
    assert listed["next_page_token"] is None

    table = cli(bridge, "sessions", "list", "--identity", user.identity_id)
    assert table.returncode == 0, table.stderr
    for session_id in ids:
        assert session_id in table.stdout
    assert user.email in table.stdout
    assert sessions[0]["device"]["user_agent_family"] in table.stdout  # Kratos's, at login
    assert f"2 sessions of identity {user.identity_id}" in table.stdout


def test_sessions_list_of_everyone_holds_every_identity(bridge, kratos):
    first, _ = user_with_sessions(bridge, kratos, 1)
    second, _ = user_with_sessions(bridge, kratos, 1)
    everyone = cli_json(bridge, "sessions", "list", "--limit", "0")["sessions"]
    assert {first.identity_id, second.identity_id} <= {s["identity_id"] for s in everyone}
    started = [s["started_at"] for s in everyone]
    assert started == sorted(started, reverse=True)


def test_sessions_list_follows_pages_up_to_the_limit(bridge, kratos, monkeypatch, capsys):
    user, _ = user_with_sessions(bridge, kratos, 3)
    for name in [k for k in os.environ if k.startswith("BRIDGE_")]:
        monkeypatch.delenv(name)
    for name, value in cli_env(bridge).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(admin_cli, "MAX_PAGE_SIZE", 1)  # a page per session

    assert main(["sessions", "list", "--identity", user.identity_id, "--json"]) == 0
    everything = orjson.loads(capsys.readouterr().out)
    assert len(everything["sessions"]) == 3
    assert everything["next_page_token"] is None

    assert main(["sessions", "list", "--identity", user.identity_id, "--limit", "2", "--json"]) == 0
    limited = orjson.loads(capsys.readouterr().out)
    assert limited["sessions"] == everything["sessions"][:2]
    assert limited["next_page_token"] is not None  # there is more

    assert main(["sessions", "list", "--identity", user.identity_id, "--limit", "2"]) == 0
    assert "2 sessions of identity" in capsys.readouterr().out


# sessions show


def test_sessions_show_gives_the_bridge_and_kratos_views(bridge, kratos):
    user, [token] = user_with_sessions(bridge, kratos, 1)
    session_id = session_id_of(kratos, token)
    patched = httpx.patch(
        bridge.url + "/whoami/app",
        headers={
            "X-Bridge-App-Token": APP_TOKEN,
            "X-Session-Token": token,
            "Content-Type": "application/merge-patch+json",
        },
        content=b'{"cart": ["book", 2]}',
    )
    assert patched.status_code == 200, patched.text

    detail = cli_json(bridge, "sessions", "show", session_id)
    assert detail["session"]["session_id"] == session_id
    assert detail["session"]["label"] == user.email
    assert detail["active_in_kratos"] is True
    assert detail["unified"]["identity"]["id"] == user.identity_id
    assert detail["app_keys"] == ["cart"]

    shown = cli(bridge, "sessions", "show", session_id)
    assert shown.returncode == 0, shown.stderr
    for line in ("active in kratos", "yes", user.email, user.identity_id, "cart"):
        assert line in shown.stdout


@pytest.mark.parametrize("session_id", ["not-a-session", str(uuid.uuid4())])
def test_sessions_show_prints_the_api_error(bridge, session_id):
    answer = admin_get(bridge, f"/admin/sessions/{session_id}")
    assert answer.status_code in (400, 404)

    shown = cli(bridge, "sessions", "show", session_id)
    assert shown.returncode == 1
    assert shown.stdout == ""
    assert shown.stderr == f"error: {answer.json()['message']}\n"


# sessions revoke


def test_sessions_revoke_ends_one_session_everywhere(bridge, kratos):
    _, [kept, doomed] = user_with_sessions(bridge, kratos, 2)
    doomed_id = session_id_of(kratos, doomed)

    revoked = cli(bridge, "sessions", "revoke", doomed_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.splitlines() == ["revoked 1 session:", f"  {doomed_id}"]

    assert flows.session_of(kratos, token=doomed).status_code == 401
    # Every worker process answers from its own copy first: all must have dropped it.
    assert {forward_auth_status(bridge, doomed) for _ in range(20)} == {401}
    assert forward_auth_status(bridge, kept) == 200


def test_sessions_revoke_every_session_of_an_identity_but_one(bridge, kratos):
    user, tokens = user_with_sessions(bridge, kratos, 3)
    ids = [session_id_of(kratos, t) for t in tokens]

    revoked = cli(bridge, "sessions", "revoke", "--identity", user.identity_id, "--except", ids[0])
    assert revoked.returncode == 0, revoked.stderr
    lines = revoked.stdout.splitlines()
    assert lines[0] == f"revoked 2 sessions of identity {user.identity_id}, kept {ids[0]}:"
    assert sorted(line.strip() for line in lines[1:]) == sorted(ids[1:])

    assert forward_auth_status(bridge, tokens[0]) == 200
    for token in tokens[1:]:
        assert {forward_auth_status(bridge, token) for _ in range(10)} == {401}

    rest = cli_json(bridge, "sessions", "revoke", "--identity", user.identity_id)
    assert ids[0] in rest["revoked"]
    assert forward_auth_status(bridge, tokens[0]) == 401


def test_sessions_revoke_of_an_unknown_session_fails(bridge):
    unknown = str(uuid.uuid4())
    answer = httpx.delete(
        bridge.admin_url + f"/admin/sessions/{unknown}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 404

    revoked = cli(bridge, "sessions", "revoke", unknown)
    assert revoked.returncode == 1
    assert revoked.stderr == f"error: {answer.json()['message']}\n"


@pytest.mark.parametrize(
    "args",
    [
        [],
        [str(uuid.uuid4()), "--identity", str(uuid.uuid4())],
        [str(uuid.uuid4()), "--except", str(uuid.uuid4())],
    ],
)
def test_sessions_revoke_needs_one_target(bridge, args):
    refused = cli(bridge, "sessions", "revoke", *args)
    assert refused.returncode == 2
    assert "sessions revoke:" in refused.stderr


# events tail


def aal2_user(server, kratos) -> tuple[flows.User, str]:
    """A user whose session reached aal2 through the bridge: one AAL2 event."""
    user = flows.register(kratos, "admin-cli-aal2")
    flows.enable_totp(kratos, user)
    seen_by_bridge(server, user.token)
    return user, session_id_of(kratos, user.token)


def events_of(server, identity_id: str, count: int) -> list[dict]:
    found: list[dict] = []

    def enough() -> bool:
        answer = admin_get(server, "/admin/events/aal2", identity_id=identity_id, since="1h")
        found[:] = answer.json()["events"]
        return len(found) >= count

    wait_until(enough, 15, f"{count} aal2 events of {identity_id}")
    return found


def test_events_tail_prints_the_identitys_aal2_events(bridge, kratos):
    user, session_id = aal2_user(bridge, kratos)
    aal2_user(bridge, kratos)  # someone else's
    events_of(bridge, user.identity_id, 1)

    tail = cli_json(bridge, "events", "tail", "--identity", user.identity_id, "--since", "1h")
    assert [e["session_id"] for e in tail["events"]] == [session_id]
    assert tail["events"][0]["identity_id"] == user.identity_id
    assert tail["events"][0]["id"] and tail["events"][0]["at"]

    table = cli(bridge, "events", "tail", "--identity", user.identity_id)
    assert table.returncode == 0, table.stderr
    assert session_id in table.stdout
    assert user.identity_id in table.stdout
    assert table.stdout.rstrip().endswith("1 event")


def test_events_tail_since_the_future_is_refused(bridge):
    done = cli(bridge, "events", "tail", "--since", "2999-01-01T00:00:00Z", "--json")
    assert done.returncode == 1
    assert done.stderr == "error: since is before 1970 or in the future\n"
    assert done.stdout == ""


@contextmanager
def ctrl_c_reaches_children():
    """Children started inside get Ctrl-C (SIGINT) as a terminal gives it, even when this
    run ignores it (a job started in the background by a non-interactive shell does, and
    an ignored signal stays ignored across exec, where a handled one is reset)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def test_events_tail_follow_prints_new_events_once_and_stops_on_ctrl_c(bridge, kratos):
    user, first = aal2_user(bridge, kratos)
    events_of(bridge, user.identity_id, 1)
    command = ["events", "tail", "--follow", "--json", "--identity", user.identity_id]
    with ctrl_c_reaches_children():
        follower = subprocess.Popen(
            [sys.executable, "-m", "bridge", *command],
            env=cli_env(bridge),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(lines) >= 1, 15, "the first event")
        # A second session of the same identity reaches aal2 while the CLI follows.
        token = flows.login_api(kratos, user)
        flows.upgrade_to_aal2(kratos, user, token)
        seen_by_bridge(bridge, token)
        second = session_id_of(kratos, token)
        wait_until(lambda: len(lines) >= 2, 20, "the new event")
        time.sleep(2 * admin_cli.FOLLOW_INTERVAL + 0.5)  # more polls: nothing printed twice
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=10)
        finally:
            if follower.poll() is None:
                follower.kill()
    reader.join(timeout=5)
    assert follower.returncode == 0, follower.stderr.read()
    printed = [orjson.loads(line)["session_id"] for line in lines]
    assert printed == [first, second]


# stats


def test_stats_reports_the_window(bridge, kratos):
    user_with_sessions(bridge, kratos, 1)
    aal2_user(bridge, kratos)

    report = cli_json(bridge, "stats", "--since", "1d")
    assert report["active_sessions"] >= 2
    assert report["active_aal2_sessions"] >= 1
    assert len(report["sessions_started_by_hour"]) == 24
    assert sum(report["sessions_started_by_hour"]) >= 2
    assert report["aal2_events_by_method"].get("totp", 0) >= 1

    table = cli(bridge, "stats")
    assert table.returncode == 0, table.stderr
    for line in ("active sessions", "unique identities", "aal2 events", "totp", "day"):
        assert line in table.stdout


def test_stats_refuses_a_window_past_what_is_kept(bridge):
    refused = cli(bridge, "stats", "--since", "400d")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ")
    assert "\n" not in refused.stderr.rstrip("\n")


# reaching the API, and the token


@pytest.mark.parametrize("token", ["", "wrong-token-" + "w" * 32])
def test_a_missing_or_wrong_token_is_named_never_printed(bridge, token):
    refused = cli(bridge, "sessions", "list", BRIDGE_ADMIN_TOKEN=token)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "BRIDGE_ADMIN_TOKEN" in refused.stderr
    assert bridge.admin_url in refused.stderr
    if token:
        assert token not in refused.stderr


def test_the_token_is_never_printed(bridge, kratos):
    _, [token] = user_with_sessions(bridge, kratos, 1)
    session_id = session_id_of(kratos, token)
    for args in (
        ["sessions", "list"],
        ["sessions", "show", session_id],
        ["stats"],
        ["events", "tail"],
        ["sessions", "show", "nope"],
    ):
        done = cli(bridge, *args)
        assert TOKEN not in done.stdout + done.stderr


def test_an_unreachable_admin_api_is_named():
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "stats", "--admin-url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot reach the admin API at {url}")


def test_a_configuration_error_exits_2(bridge):
    done = cli(bridge, "sessions", "list", BRIDGE_ADMIN_PORT="nope")
    assert done.returncode == 2
    assert "configuration error" in done.stderr
    assert "BRIDGE_ADMIN_PORT" in done.stderr


def test_an_admin_listener_that_is_off_exits_2(bridge):
    done = cli(bridge, "stats", BRIDGE_ADMIN_PORT="0")
    assert done.returncode == 2
    assert "--admin-url" in done.stderr


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:5001"),
        ("0.0.0.0", "http://127.0.0.1:5001"),
        ("::", "http://[::1]:5001"),
        ("::1", "http://[::1]:5001"),
        ("10.1.2.3", "http://10.1.2.3:5001"),
    ],
)
def test_the_admin_url_comes_from_the_listener_settings(host, url):
    settings = load_settings(
        {
            "BRIDGE_ADMIN_HOST": host,
            "BRIDGE_ADMIN_PORT": "5001",
            "BRIDGE_ADMIN_TOKEN": TOKEN,
        }
    )
    where = admin_cli.target(settings, None)
    assert (where.url, where.token) == (url, TOKEN)
    assert TOKEN not in repr(where)
    assert admin_cli.target(settings, "https://admin.example/").url == "https://admin.example"


# the OpenAPI document


def test_the_openapi_document_is_valid():
    from openapi_spec_validator import validate

    validate(openapi.document())
    assert openapi.document()["openapi"].startswith("3.1.")
    assert orjson.loads(openapi.as_json()) == openapi.document()
    assert yaml.safe_load(openapi.as_yaml()) == openapi.document()


def test_the_openapi_document_is_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "web/openapi.yaml" in pyproject["tool"]["setuptools"]["package-data"]["bridge"]
    assert (ROOT / "bridge" / "web" / "openapi.yaml").is_file()


@pytest.fixture
def flask_apps():
    """The public listener's Flask app and the admin app, as the server builds them."""
    from bridge.admin.api import create_admin_app
    from bridge.web.app import create_flask_app
    from bridge.wiring import build_bridge

    settings = load_settings(
        {
            "BRIDGE_SECRET": SECRET,
            "BRIDGE_HOOK_SECRET": SECRET,
            "BRIDGE_KRATOS_PUBLIC_URL": "http://127.0.0.1:9",
            "BRIDGE_KRATOS_ADMIN_URL": "http://127.0.0.1:9",
        }
    )
    built = build_bridge(settings)
    try:
        yield {"public": create_flask_app(built), "admin": create_admin_app(built)}
    finally:
        built.close()


def routes(app) -> dict[str, set[str]]:
    """``{OpenAPI path: methods}`` of a Flask app (HEAD and OPTIONS aside: automatic). The
    dashboard's pages (``ui.*``, HTML for people under /admin/ui/) are not an API."""
    found: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("ui."):
            continue
        path = rule.rule
        for argument in rule.arguments:
            path = path.replace(f"<{argument}>", f"{{{argument}}}")
            path = path.replace(f"<path:{argument}>", f"{{{argument}}}")
        found.setdefault(path, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    return found


SERVED_OUTSIDE_FLASK = {"/auth", "/forward-auth", "/ext-authz/{path}"}  # bridge.web.asgi's loop
PUBLIC_URL, ADMIN_URL = (server["url"] for server in openapi.document()["servers"])


def test_every_route_the_apps_register_is_documented(flask_apps):
    paths = openapi.document()["paths"]
    for listener, app in flask_apps.items():
        for path, methods in routes(app).items():
            assert path in paths, f"{listener} listener: {path} is not in bridge/web/openapi.yaml"
            for method in methods:
                assert method.lower() in paths[path], f"{method} {path} is not documented"
            listed = {server["url"] for server in paths[path]["servers"]}
            expected = PUBLIC_URL if listener == "public" else ADMIN_URL
            assert expected in listed, f"{path} does not name the {listener} listener"


def test_every_documented_path_is_served(flask_apps):
    registered_routes = {listener: routes(app) for listener, app in flask_apps.items()}
    for path, item in openapi.document()["paths"].items():
        methods = {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
        for server in item["servers"]:
            listener = "public" if server["url"] == PUBLIC_URL else "admin"
            if listener == "public" and path in SERVED_OUTSIDE_FLASK:
                continue
            served = registered_routes[listener].get(path)
            assert served is not None, f"{path} is documented on the {listener} listener"
            assert methods <= served, f"{path}: {methods - served} not on the {listener} listener"


def test_the_forward_auth_paths_are_the_dialects():
    from bridge.pipeline.dialects import Dialects

    dialects = Dialects(url_required=False)
    for path in SERVED_OUTSIDE_FLASK:
        assert dialects.for_path(path.replace("{path}", "x")) is not None, path
    assert dialects.for_path("/whoami") is None


def test_both_listeners_serve_the_document(bridge):
    public = httpx.get(bridge.url + "/openapi.json")
    assert public.status_code == 200
    assert public.json() == openapi.document()
    admin = admin_get(bridge, "/openapi.json")
    assert admin.status_code == 200
    assert admin.json() == openapi.document()
    as_yaml = httpx.get(bridge.url + "/openapi.yaml")
    assert as_yaml.status_code == 200
    assert as_yaml.content == openapi.as_yaml()
    assert httpx.get(bridge.admin_url + "/openapi.json").status_code == 401

"""What ``kratos-bridge`` prints: the store (never a password), how a rule decides a URL,
rules-file errors, and a new JWT key."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import _store_label, _topology_label, build_parser, main
from bridge.config import load_settings
from bridge.web.cpu_budget import worker_count
from tests.support import kratos_flows as flows
from tests.support.harness import free_port


@pytest.mark.parametrize(
    ("url", "label"),
    [
        (None, "embedded (in-process, single process only)"),
        ("redis://:pw@redis:6379/2", "redis redis://redis:6379/2"),
        ("rediss://user:pw@[::1]", "redis rediss://[::1]:6379"),
        ("unix:///run/redis.sock?db=1", "redis unix:///run/redis.sock"),
        (
            "redis+sentinel://:pw@s1,[fd00::2]:26380/mymaster",
            "redis redis+sentinel://s1:26379,[fd00::2]:26380/mymaster/0",
        ),
        (
            "rediss+cluster://user:pw@n1:7000,n2?ssl_cert_reqs=none",
            "redis rediss+cluster://n1:7000,n2:6379",
        ),
    ],
)
def test_store_label_hides_user_and_password(url, label):
    env = {"BRIDGE_SECRET": "s" * 40} | ({"BRIDGE_REDIS_URL": url} if url else {})
    assert _store_label(load_settings(env)) == label


@pytest.mark.parametrize(
    ("topology", "line"),
    [
        (
            {"kind": "standalone", "address": "redis:6379", "role": "master", "replicas": 1},
            "standalone redis:6379 (master, 1 replica)",
        ),
        (
            {
                "kind": "sentinel",
                "service": "mymaster",
                "master": "10.0.0.5:6379",
                "replicas": 2,
                "sentinels": 3,
            },
            "sentinel service mymaster: master 10.0.0.5:6379, 2 replicas, 3 sentinels configured",
        ),
        ({"kind": "cluster", "masters": 3, "replicas": 3}, "cluster: 3 masters, 3 replicas"),
        ({"kind": "embedded"}, "embedded (this process only)"),
        ({"kind": "new", "nodes": 2}, "kind new, nodes 2"),
    ],
)
def test_topology_line(topology, line):
    assert _topology_label(topology) == line


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")} | env
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


RULES = """
rules:
  - id: admin
    match: {host: app.example.test, path: /admin, methods: [POST]}
    access: aal2
    max_age: 10m
  - match: {path: /internal}
    access: deny
"""


def test_check_url_prints_the_rule_and_the_decision(kratos, tmp_path):
    (tmp_path / "rules.yml").write_text(RULES)
    env = {
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        "BRIDGE_RULES_FILE": str(tmp_path / "rules.yml"),
    }
    user = flows.register(kratos)
    url = "https://app.example.test/admin"
    done = _cli(env, "check", "--url", url, "--method", "POST", "--session-token", user.token)
    assert done.returncode == 0, done.stderr
    assert "rules[0] (admin)" in done.stdout
    assert "aal2" in done.stdout
    assert "401 aal2_required" in done.stdout  # an aal1 session, as an API client sees it
    assert "redirect to " + kratos.public_url in done.stdout  # and as a browser does
    assert user.token not in done.stdout + done.stderr

    anonymous = _cli(env, "check", "--url", "https://app.example.test/internal/x")
    assert "rules[1]" in anonymous.stdout
    assert "403 forbidden" in anonymous.stdout

    allowed = _cli(env, "check", "--url", url, "--session-token", user.token)  # GET
    assert "default" in allowed.stdout
    assert f"200 allow (X-User-Id: {user.identity_id}" in allowed.stdout


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        ("rules:\n  - match: {path: admin}\n    access: deny\n", "rules[0].match.path"),
        ("rules:\n  - access: public\n  - access: allow\n", "rules[1].access"),
        ("rules:\n  - access: deny\n    max_age: 5m\n", "rules[0].max_age"),
        ("rules:\n  - acess: deny\n", "rules[0]"),
    ],
)
def test_a_bad_rules_file_stops_the_bridge_naming_rule_and_field(tmp_path, rules, named):
    (tmp_path / "rules.yml").write_text(rules)
    done = _cli({"BRIDGE_RULES_FILE": str(tmp_path / "rules.yml")}, "serve", "--port", "1")
    assert done.returncode == 2
    assert "BRIDGE_RULES_FILE" in done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr


def test_jwt_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    done = _cli({}, "jwt-keygen", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.strip())
    assert written.parent == tmp_path / "keys"
    assert written.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in written.read_bytes()


def _subcommand_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command line that has a help of its own: the parser's, then each subcommand's,
    read from the parser itself (a new subcommand is covered without naming it here)."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommand_paths(sub, (*path, name))


_MARKUP = re.compile(r"``|:[a-z]+:`|`[^`\s][^`]*`_?")  # literals, roles, interpreted text


def test_every_help_is_plain_words(capsys):
    paths = list(_subcommand_paths(build_parser()))
    assert ("sessions", "list") in paths  # the walk reaches the nested ones
    for path in paths:
        with pytest.raises(SystemExit) as leaving:
            main([*path, "--help"])
        assert leaving.value.code == 0
        shown = capsys.readouterr().out
        assert "usage: kratos-bridge" in shown
        assert not _MARKUP.search(shown), (path, _MARKUP.search(shown))


_CHECK_LABELS = (
    "kratos public:",
    "kratos admin:",
    "store:",
    "workers:",
    "revalidate after",
    "redis:",
    "topology:",
    "kratos:",
    "kratos version:",
)
_DECIDE_LABELS = ("rules:", "request:", "rule:", "api client:", "browser:")


def _labels(stdout: str, known: tuple[str, ...]) -> list[str | None]:
    """Which of check's own lines each printed line is (``None``: not one of them)."""
    return [
        next((label for label in known if line.startswith(label)), None)
        for line in stdout.splitlines()
    ]


def _kratos_down() -> dict[str, str]:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return {
        "BRIDGE_KRATOS_PUBLIC_URL": nobody,
        "BRIDGE_KRATOS_ADMIN_URL": nobody,
        "BRIDGE_KRATOS_TIMEOUT": "0.5",
    }


def test_check_with_kratos_down_prints_only_its_own_lines():
    """No log between them: not the Ory SDK's retry warnings, not the store's warning that
    repeats ``redis: FAILED``."""
    done = _cli(_kratos_down(), "check")
    assert done.returncode == 1
    assert (done.stderr, _labels(done.stdout, _CHECK_LABELS)) == ("", list(_CHECK_LABELS))
    assert "kratos:          FAILED (unreachable" in done.stdout

    redis_down = {
        "BRIDGE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "BRIDGE_SECRET": "s" * 40,
    }
    done = _cli(_kratos_down() | redis_down, "check")
    assert done.returncode == 1
    without_topology = [label for label in _CHECK_LABELS if label != "topology:"]
    assert (done.stderr, _labels(done.stdout, _CHECK_LABELS)) == ("", without_topology)
    assert "redis:           FAILED" in done.stdout

    url = "https://app.example.test/"
    done = _cli(_kratos_down(), "check", "--url", url, "--session-token", "ory_st_" + "x" * 32)
    assert done.returncode == 0
    assert (done.stderr, _labels(done.stdout, _DECIDE_LABELS)) == ("", list(_DECIDE_LABELS))
    assert "503 kratos_unavailable" in done.stdout


def test_check_prints_the_worker_count_and_why():
    done = _cli(_kratos_down(), "check")
    assert "\nworkers:         1 (embedded store: one process)\n" in done.stdout

    redis_down = {
        "BRIDGE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "BRIDGE_SECRET": "s" * 40,
    }
    done = _cli(_kratos_down() | redis_down | {"BRIDGE_WORKERS": "3"}, "check")
    assert "\nworkers:         3 (BRIDGE_WORKERS=3)\n" in done.stdout

    # The CPU budget of the machine the test runs on, however many CPUs that is.
    default = worker_count(load_settings(redis_down))
    done = _cli(_kratos_down() | redis_down, "check")
    assert f"\nworkers:         {default.count} ({default.reason})\n" in done.stdout
    assert "affinity mask" in default.reason or "CPU quota" in default.reason


def test_check_asks_kratos_for_its_version_once():
    """The log is there at debug; it shows one connection for ``/version`` and no retry."""
    done = _cli(_kratos_down() | {"BRIDGE_LOG_LEVEL": "debug"}, "check")
    assert "kratos version:  unknown (admin API not reachable)" in done.stdout
    assert done.stderr.count("Starting new HTTP connection") == 1, done.stderr
    assert "Retrying" not in done.stderr

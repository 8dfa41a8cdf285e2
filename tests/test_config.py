"""Settings: defaults, overrides, and a precise error naming the key for every bad value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import OPTIONS, load_settings, reference_table
from bridge.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults():
    settings = load_settings({})
    assert settings.kratos_public_url == "http://127.0.0.1:4433"
    assert settings.kratos_admin_url == "http://127.0.0.1:4434"
    assert settings.redis_url is None
    assert settings.secret_is_random and len(settings.secret) == 32
    assert settings.session_cookie == "ory_kratos_session"
    assert settings.key_prefix == "bridge:"
    assert settings.aal2_stream == "bridge:events:aal2"
    assert settings.login_url == "http://127.0.0.1:4433/self-service/login/browser"
    assert settings.revalidate_after == 5.0


def test_secret_is_hidden_from_repr():
    settings = load_settings({"BRIDGE_SECRET": "s" * 40})
    assert "s" * 40 not in repr(settings)


@pytest.mark.parametrize(
    ("env", "key", "problem"),
    [
        ({"BRIDGE_REDIS_URL": "http://localhost"}, "BRIDGE_REDIS_URL", "not a redis://"),
        ({"BRIDGE_KRATOS_PUBLIC_URL": "kratos:4433"}, "BRIDGE_KRATOS_PUBLIC_URL", "not an http"),
        ({"BRIDGE_REVALIDATE_AFTER": "soon"}, "BRIDGE_REVALIDATE_AFTER", "not a number"),
        ({"BRIDGE_REVALIDATE_AFTER": "-1"}, "BRIDGE_REVALIDATE_AFTER", "outside"),
        ({"BRIDGE_PORT": "99999"}, "BRIDGE_PORT", "outside"),
        ({"BRIDGE_SESSION_COOKIE": "a b"}, "BRIDGE_SESSION_COOKIE", "not a cookie name"),
        ({"BRIDGE_KEY_PREFIX": "{x}"}, "BRIDGE_KEY_PREFIX", "1-64 of"),
        ({"BRIDGE_SECRET": "short"}, "BRIDGE_SECRET", "at least 32"),
        ({"BRIDGE_REDIS_URL": "redis://127.0.0.1:6379"}, "BRIDGE_SECRET", "required"),
        ({"BRIDGE_REDIS_ULR": "redis://x"}, "BRIDGE_REDIS_ULR", "unknown setting"),
        ({"BRIDGE_LOG_LEVEL": "loud"}, "BRIDGE_LOG_LEVEL", "not one of"),
    ],
)
def test_bad_value_names_the_key(env, key, problem):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.key == key
    assert problem in caught.value.problem


_PORT = "port is not a number from 1 to 65535"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://kratos:http", _PORT),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://kratos:65536", _PORT),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://kratos:0", _PORT),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://kratos:4433/?debug=1", "must not have a query"),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://kratos:4433/#x", "must not have a fragment"),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://user:pw@kratos", "user name or password"),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://:4433", "has no host"),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://kra tos:4433", "not a host name"),
        ("BRIDGE_KRATOS_ADMIN_URL", "https://kratos:-1", _PORT),
        ("BRIDGE_LOGIN_URL", "https://auth.example.com:99999/login", _PORT),
        ("BRIDGE_LOGIN_URL", "https://auth.example.com/log in", "visible ASCII"),
        ("BRIDGE_REDIS_URL", "redis://redis:port/0", _PORT),
        ("BRIDGE_REDIS_URL", "redis://redis:123456/0", _PORT),
        ("BRIDGE_REDIS_URL", "redis://redis:6379/zero", "database 'zero' is not a number"),
        ("BRIDGE_REDIS_URL", "redis://redis:6379/0?db=one", "database 'one' is not a number"),
        ("BRIDGE_REDIS_URL", "redis://redis:6379/0?socket_timeout=soon", "socket_timeout"),
        ("BRIDGE_REDIS_URL", "redis://redis:6379/0?socket_timeout=60", "set by the bridge"),
        ("BRIDGE_REDIS_URL", "redis://r/0?retry_on_timeout=true", "set by the bridge"),
        ("BRIDGE_REDIS_URL", "rediss://:6379/0", "has no host"),
        ("BRIDGE_REDIS_URL", "unix://", "has no socket path"),
        ("BRIDGE_REDIS_URL", "unix:///", "has no socket path"),
        ("BRIDGE_HOST", "no-such-host.invalid", "does not resolve"),
        ("BRIDGE_HOST", "0.0.0.0; rm", "not a host name"),
    ],
)
def test_every_url_part_is_checked_at_start_up(key, value, problem):
    with pytest.raises(ConfigError) as caught:
        load_settings({key: value, "BRIDGE_SECRET": "s" * 40})
    assert caught.value.key == key
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("key", "value", "attribute", "expected"),
    [
        (
            "BRIDGE_KRATOS_PUBLIC_URL",
            "http://kratos_public:4433/",
            "kratos_public_url",
            "http://kratos_public:4433",
        ),
        (
            "BRIDGE_KRATOS_PUBLIC_URL",
            "https://auth.example.com/.ory/kratos/public",
            "kratos_public_url",
            "https://auth.example.com/.ory/kratos/public",
        ),
        ("BRIDGE_KRATOS_PUBLIC_URL", "http://[::1]:4433", "kratos_public_url", "http://[::1]:4433"),
        (
            "BRIDGE_LOGIN_URL",
            "https://a.example.com/login?via=bridge",
            "login_url",
            "https://a.example.com/login?via=bridge",
        ),
        ("BRIDGE_REDIS_URL", "redis://:pw@redis:6379/3", "redis_url", "redis://:pw@redis:6379/3"),
        ("BRIDGE_REDIS_URL", "rediss://redis", "redis_url", "rediss://redis"),
        (
            "BRIDGE_REDIS_URL",
            "unix:///run/redis.sock?db=2",
            "redis_url",
            "unix:///run/redis.sock?db=2",
        ),
        ("BRIDGE_HOST", "localhost", "host", "127.0.0.1"),
        ("BRIDGE_HOST", "::", "host", "::"),
    ],
)
def test_good_urls_and_hosts(key, value, attribute, expected):
    """Names that resolve only later (compose services) are fine in URLs."""
    settings = load_settings({key: value, "BRIDGE_SECRET": "s" * 40})
    assert getattr(settings, attribute) == expected


def test_yaml_file_with_env_on_top(tmp_path):
    path = tmp_path / "bridge.yml"
    path.write_text('revalidate_after: 30\nsession_cookie: my_session\nkey_prefix: "app1:"\n')
    settings = load_settings({"BRIDGE_REVALIDATE_AFTER": "2"}, path)
    assert settings.revalidate_after == 2
    assert settings.session_cookie == "my_session"
    assert settings.aal2_stream == "app1:events:aal2"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("revalidate_afterr: 3\n", "revalidate_afterr"),
        ("revalidate_after: [1]\n", "revalidate_after"),
        ("port: http\n", "port"),
        ("- a\n", "bridge.yml"),
        ("a: [\n", "bridge.yml"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, key):
    path = tmp_path / "bridge.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings({}, path)
    assert key in caught.value.key


def test_secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("f" * 48 + "\n")
    settings = load_settings({"BRIDGE_SECRET_FILE": str(path), "BRIDGE_SECRET": "e" * 40})
    assert settings.secret == b"f" * 48
    path.write_text("short\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_SECRET_FILE": str(path)})
    assert caught.value.key == "BRIDGE_SECRET_FILE"
    with pytest.raises(ConfigError):
        load_settings({"BRIDGE_SECRET_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        (
            ["serve"],
            {"BRIDGE_REDIS_URL": "http://nope"},
            "BRIDGE_REDIS_URL: not a redis://, rediss:// or unix:// URL",
        ),
        (
            ["check"],
            {"BRIDGE_REDIS_URL": "http://nope"},
            "BRIDGE_REDIS_URL: not a redis://, rediss:// or unix:// URL",
        ),
        (["serve"], {"BRIDGE_KRATOS_PUBLIC_URL": "http://kratos:44x3"}, "BRIDGE_KRATOS_PUBLIC_URL"),
        (
            ["serve"],
            {"BRIDGE_REDIS_URL": "redis://r/x", "BRIDGE_SECRET": "s" * 40},
            "BRIDGE_REDIS_URL: database 'x' is not a number",
        ),
        (
            ["serve"],
            {"BRIDGE_REDIS_URL": "unix://", "BRIDGE_SECRET": "s" * 40},
            "BRIDGE_REDIS_URL: unix:// URL has no socket path",
        ),
        (["serve"], {"BRIDGE_HOST": "nowhere.invalid"}, "BRIDGE_HOST: 'nowhere.invalid' does"),
        (["serve", "--host", "nowhere.invalid"], {}, "--host: 'nowhere.invalid' does not"),
        (["serve", "--port", "0"], {}, "--port: 0 is outside"),
    ],
)
def test_cli_exits_2_naming_the_key(command, env, message):
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *command],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_config_table_matches_the_code():
    readme = README.read_text()
    assert reference_table() in readme
    documented = set(re.findall(r"^\| `(BRIDGE_[A-Z0-9_]+)` \|", readme, re.M))
    assert documented == {option.env for option in OPTIONS}

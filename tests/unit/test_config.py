"""Settings: defaults, overrides, and a precise error naming the key for every bad value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from redis.crc import key_slot

from bridge.config import load_settings
from bridge.config.options import OPTIONS, reference_table
from bridge.errors import ConfigError
from bridge.store import Keys
from bridge.store.redis.url import parse_redis_url

README = Path(__file__).resolve().parents[2] / "README.md"


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


def test_a_request_waits_for_one_kratos_call_and_a_redis_command_either_side():
    settings = load_settings({"BRIDGE_KRATOS_TIMEOUT": "3", "BRIDGE_REDIS_TIMEOUT": "0.25"})
    assert settings.request_budget == 3.5


@pytest.mark.parametrize(
    ("env", "key", "problem"),
    [
        ({"BRIDGE_GRPC_PORT": "0"}, "BRIDGE_GRPC_PORT", "outside"),
        ({"BRIDGE_GRPC_PORT": "4480"}, "BRIDGE_GRPC_PORT", "is BRIDGE_PORT or BRIDGE_ADMIN_PORT"),
        ({"BRIDGE_GRPC_PORT": "4481"}, "BRIDGE_GRPC_PORT", "is BRIDGE_PORT or BRIDGE_ADMIN_PORT"),
        (
            {"BRIDGE_GRPC_PORT": "4482", "BRIDGE_GRPC_TLS_CERT_FILE": "/dev/null"},
            "BRIDGE_GRPC_TLS_CERT_FILE",
            "needs BRIDGE_GRPC_TLS_KEY_FILE",
        ),
        (
            {"BRIDGE_GRPC_PORT": "4482", "BRIDGE_GRPC_TLS_KEY_FILE": "/dev/null"},
            "BRIDGE_GRPC_TLS_KEY_FILE",
            "needs BRIDGE_GRPC_TLS_CERT_FILE",
        ),
        (
            {"BRIDGE_GRPC_TLS_CERT_FILE": "/dev/null", "BRIDGE_GRPC_TLS_KEY_FILE": "/dev/null"},
            "BRIDGE_GRPC_TLS_CERT_FILE",
            "needs BRIDGE_GRPC_PORT",
        ),
        (
            {
                "BRIDGE_GRPC_PORT": "4482",
                "BRIDGE_GRPC_TLS_CERT_FILE": "/no/such/cert.pem",
                "BRIDGE_GRPC_TLS_KEY_FILE": "/dev/null",
            },
            "BRIDGE_GRPC_TLS_CERT_FILE",
            "cannot be read",
        ),
    ],
)
def test_the_grpc_port_and_its_tls_files_are_checked_together(env, key, problem):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_the_grpc_port_is_off_unless_set():
    assert load_settings({}).grpc_port is None
    assert load_settings({"BRIDGE_GRPC_PORT": "4482"}).grpc_port == 4482


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
        ("BRIDGE_LOGOUT_PATH", "logout", "not an absolute path"),
        ("BRIDGE_LOGOUT_PATH", "/logout?x=1", "not an absolute path"),
        ("BRIDGE_LOGOUT_PATH", "//logout", "not an absolute path"),
        ("BRIDGE_LOGOUT_PATH", "/auth", "the bridge's own routes"),
        ("BRIDGE_LOGOUT_PATH", "/whoami/app", "the bridge's own routes"),
        ("BRIDGE_LOGOUT_PATH", "/ext-authz/logout", "the bridge's own routes"),
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


def test_app_token_from_env_or_file_never_printed(tmp_path):
    assert load_settings({}).app_token is None  # writes over HTTP are off
    settings = load_settings({"BRIDGE_APP_TOKEN": "t" * 40})
    assert settings.app_token == "t" * 40
    assert "t" * 40 not in repr(settings)
    path = tmp_path / "app_token"
    path.write_text("u" * 48 + "\n")
    from_file = load_settings({"BRIDGE_APP_TOKEN_FILE": str(path), "BRIDGE_APP_TOKEN": "t" * 40})
    assert from_file.app_token == "u" * 48
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_APP_TOKEN": "short"})
    assert caught.value.key == "BRIDGE_APP_TOKEN"
    path.write_text("short\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_APP_TOKEN_FILE": str(path)})
    assert caught.value.key == "BRIDGE_APP_TOKEN_FILE"


def test_a_rules_jwt_audience_needs_the_jwt_on(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text("rules: [{id: shop, access: authenticated, jwt_audience: shop}]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_RULES_FILE": str(rules)})
    assert caught.value.key == "BRIDGE_RULES_FILE"
    assert "rules[0] (shop) sets jwt_audience" in caught.value.problem
    assert "BRIDGE_JWT_HEADER" in caught.value.problem


_NOT_A_REDIS_URL = (
    "BRIDGE_REDIS_URL: not a redis://, rediss://, unix://, redis[s]+sentinel:// or "
    "redis[s]+cluster:// URL"
)


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        (
            ["serve"],
            {"BRIDGE_REDIS_URL": "http://nope"},
            _NOT_A_REDIS_URL,
        ),
        (
            ["check"],
            {"BRIDGE_REDIS_URL": "http://nope"},
            _NOT_A_REDIS_URL,
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


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1:26380,s2,[::1]:26381/mymaster",
            dict(
                kind="sentinel",
                tls=False,
                nodes=(("s1", 26380), ("s2", 26379), ("::1", 26381)),
                service="mymaster",
                db=0,
                username=None,
                password=None,
            ),
        ),
        (
            "redis+sentinel://:pw@10.0.0.1:26379/mymaster/3",
            dict(nodes=(("10.0.0.1", 26379),), service="mymaster", db=3, password="pw"),
        ),
        (
            "redis+sentinel://bridge:p%40ss%2Fw@sentinel-1/cache.main/",
            dict(service="cache.main", db=0, username="bridge", password="p@ss/w"),
        ),
        (
            "rediss+sentinel://s1/m?ssl_cert_reqs=optional&ssl_check_hostname=false",
            dict(
                kind="sentinel",
                tls=True,
                tls_options={"ssl_cert_reqs": "optional", "ssl_check_hostname": False},
            ),
        ),
        (
            "redis+cluster://n1,n2:7000,[fd00::1]",
            dict(
                kind="cluster",
                tls=False,
                nodes=(("n1", 6379), ("n2", 7000), ("fd00::1", 6379)),
                service=None,
                db=0,
            ),
        ),
        ("redis+cluster://u:pw@n1/0", dict(kind="cluster", username="u", password="pw")),
        ("redis+cluster://n1/", dict(kind="cluster", nodes=(("n1", 6379),))),
        ("rediss+cluster://n1?ssl_cert_reqs=none", dict(tls_options={"ssl_cert_reqs": "none"})),
        ("rediss://r:6380/0?ssl_check_hostname=false", dict(kind="standalone", tls=True)),
        ("unix:///run/redis.sock", dict(kind="standalone", tls=False)),
    ],
)
def test_sentinel_and_cluster_urls(url, expected):
    """Sentinels default to port 26379, cluster seeds to 6379; the user name and password
    are percent-decoded."""
    settings = load_settings({"BRIDGE_REDIS_URL": url, "BRIDGE_SECRET": "s" * 40})
    assert settings.redis_url == url
    address = parse_redis_url(url)
    assert {name: getattr(address, name) for name in expected} == expected
    assert "pw" not in repr(address)


def test_tls_files_are_read_at_start_up(tmp_path):
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    query = (
        f"ssl_ca_certs={files['ca']}&ssl_certfile={files['cert']}&ssl_keyfile={files['key']}"
        "&ssl_cert_reqs=required&ssl_check_hostname=true"
    )
    for url in (f"rediss+cluster://:pw@n1:7000?{query}", f"rediss+sentinel://s1/m/1?{query}"):
        address = parse_redis_url(
            load_settings({"BRIDGE_REDIS_URL": url, "BRIDGE_SECRET": "s" * 40}).redis_url
        )
        assert address.tls_options == {
            "ssl_ca_certs": str(files["ca"]),
            "ssl_certfile": str(files["cert"]),
            "ssl_keyfile": str(files["key"]),
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }
    files["ca"].unlink()
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {"BRIDGE_REDIS_URL": f"rediss+cluster://:pw@n1?{query}", "BRIDGE_SECRET": "s" * 40}
        )
    assert caught.value.key == "BRIDGE_REDIS_URL"
    assert "ssl_ca_certs" in caught.value.problem
    assert "cannot be read (No such file or directory)" in caught.value.problem


_PASSWORD = "hunter2-pw"
_EXISTING_FILE = str(README)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis+sentinel://:{_PASSWORD}@s1:26379", "has no service name"),
        (f"redis+sentinel://:{_PASSWORD}@s1:26379/", "has no service name"),
        (f"redis+sentinel://:{_PASSWORD}@s1:0/m", "port of host 's1' is not a number from 1 to"),
        ("redis+sentinel://s1:65536/m", "port of host 's1' is not a number from 1 to 65535"),
        ("redis+sentinel://s1:/m", "port of host 's1' is not a number"),
        ("redis+sentinel://s1:2637x/m", "port of host 's1' is not a number"),
        ("redis+sentinel://s1:\uff11\uff12/m", "visible ASCII"),
        (f"redis+sentinel://:{_PASSWORD}@s1,,s2/m", "empty host"),
        ("redis+sentinel://s1,/m", "empty host"),
        ("redis+sentinel:///m", "empty host"),
        (f"redis+sentinel://:{_PASSWORD}@", "empty host"),
        ("redis+sentinel://:26379/m", "host ':26379' has no host name"),
        ("redis+sentinel://::1:26379/m", "IPv6 host '::1:26379' must be in brackets"),
        ("redis+sentinel://[::1/m", "is not an IPv6 address in brackets"),
        ("redis+sentinel://[s1]:26379/m", "is not an IPv6 address in brackets"),
        ("redis+sentinel://[::1]26379/m", "has text after its IPv6 address"),
        ("redis+sentinel://[::1]:0/m", "port of host '::1' is not a number"),
        ("redis+sentinel://s!1/m", "host 's!1' is not a host name"),
        ("redis+sentinel://s1/my$master", "service name 'my$master' is not 1-128 of"),
        ("redis+sentinel://s1/m/x", "database 'x' is not a number"),
        ("redis+sentinel://s1/m/0/1", "database '0/1' is not a number"),
        ("redis+sentinel://s1,s1:26379/m", "the same host and port twice"),
        ("redis+sentinel://@s1/m", "has an '@' but no user name or password"),
        ("redis+sentinel://s1/m#x", "must not have a fragment"),
        ("redis+sentinel://s 1/m", "visible ASCII"),
        (f"redis+sentinel://:{_PASSWORD}@s1/m?db=2", "unknown option 'db'"),
        ("redis+sentinel://s1/m?socket_timeout=3", "socket_timeout is set by the bridge"),
        ("rediss+sentinel://s1/m?max_connections=3", "max_connections is set by the bridge"),
        (
            f"redis+sentinel://:{_PASSWORD}@s1/m?ssl_cert_reqs=none",
            "ssl_cert_reqs needs TLS: use rediss+sentinel://",
        ),
        (f"redis+cluster://:{_PASSWORD}@n1/1", "database '1': a Redis Cluster has only database 0"),
        ("redis+cluster://n1/0/0", "a Redis Cluster has only database 0"),
        ("redis+cluster://n1:7000,n2:70000", "port of host 'n2' is not a number"),
        ("redis+cluster://n1?protocol=3", "unknown option 'protocol'"),
        ("rediss+cluster://n1?ssl_ca_path=/etc/ssl", "unknown option 'ssl_ca_path'"),
        ("redis+cluster://n1?ssl_ca_certs=/x", "ssl_ca_certs needs TLS: use rediss+cluster://"),
        (
            "rediss+cluster://n1?ssl_cert_reqs=maybe",
            "'maybe' is not one of none, optional, required",
        ),
        ("rediss+cluster://n1?ssl_cert_reqs=NONE", "is not one of none, optional, required"),
        ("rediss+cluster://n1?ssl_check_hostname=yes", "ssl_check_hostname 'yes' is not true or"),
        ("rediss+cluster://n1?ssl_ca_certs=", "ssl_ca_certs is empty"),
        ("rediss+cluster://n1?ssl_certfile=/no/such/cert.pem", "cannot be read"),
        (
            "rediss+cluster://n1?ssl_cert_reqs=none&ssl_cert_reqs=required",
            "ssl_cert_reqs is given more than once",
        ),
        (f"rediss+cluster://n1?ssl_keyfile={_EXISTING_FILE}", "ssl_keyfile needs ssl_certfile"),
        ("redis://r:6379/0?ssl_ca_certs=/x", "ssl_ca_certs needs TLS: use rediss://"),
        ("unix:///run/redis.sock?ssl_cert_reqs=none", "ssl_cert_reqs needs TLS: use rediss://"),
        ("rediss://r?ssl_cert_reqs=maybe", "is not one of none, optional, required"),
        ("redis+sentinels://s1/m", "not a redis://"),
        # A password with an unencoded "/", "?" or "#" cuts the host part short; what
        # follows may be password, so it is not quoted.
        (f"redis+sentinel://user:12/{_PASSWORD}@s1/m", "service name (not shown)"),
        (f"redis+sentinel://:{_PASSWORD[:3]}/{_PASSWORD[3:]}@s1/m", "(not shown) has no host"),
        (f"redis+cluster://:{_PASSWORD[:3]}?{_PASSWORD[3:]}@n1", "(not shown) has no host"),
        (f"redis+cluster://:{_PASSWORD[:3]}#{_PASSWORD[3:]}@n1", "must not have a fragment"),
        (f"redis+cluster://user:12/{_PASSWORD}@n1", "database (not shown)"),
        (f"redis://user:12/{_PASSWORD}@r:6379/0", "database (not shown) is not a number"),
    ],
)
def test_bad_redis_urls_name_the_key_and_hide_the_password(url, problem):
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_REDIS_URL": url, "BRIDGE_SECRET": "s" * 40})
    assert caught.value.key == "BRIDGE_REDIS_URL"
    assert problem in caught.value.problem
    for part in (_PASSWORD, _PASSWORD[:3], _PASSWORD[3:]):
        assert part not in str(caught.value)


_SENTINEL_URL = "redis+sentinel://:data-pw@s1,s2/mymaster"


def test_sentinel_password(tmp_path):
    env = {"BRIDGE_REDIS_URL": _SENTINEL_URL, "BRIDGE_SECRET": "s" * 40}
    assert load_settings(env).redis_sentinel_password is None
    settings = load_settings({**env, "BRIDGE_REDIS_SENTINEL_PASSWORD": "sentinel-pw"})
    assert settings.redis_sentinel_password == "sentinel-pw"
    assert "sentinel-pw" not in repr(settings)
    path = tmp_path / "sentinel-password"
    path.write_text("from-file\n")
    settings = load_settings(
        {
            **env,
            "BRIDGE_REDIS_SENTINEL_PASSWORD": "sentinel-pw",
            "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE": str(path),
        }
    )
    assert settings.redis_sentinel_password == "from-file"


@pytest.mark.parametrize(
    ("env", "key", "problem"),
    [
        (
            {"BRIDGE_REDIS_SENTINEL_PASSWORD": "sentinel-pw"},
            "BRIDGE_REDIS_SENTINEL_PASSWORD",
            "only used with a redis+sentinel:// or rediss+sentinel:// BRIDGE_REDIS_URL",
        ),
        (
            {
                "BRIDGE_REDIS_URL": "redis://:data-pw@r:6379/0",
                "BRIDGE_REDIS_SENTINEL_PASSWORD": "sentinel-pw",
            },
            "BRIDGE_REDIS_SENTINEL_PASSWORD",
            "only used with a redis+sentinel://",
        ),
        (
            {
                "BRIDGE_REDIS_URL": "redis+cluster://:data-pw@n1",
                "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE": "/no/such/file",
            },
            "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE",
            "only used with a redis+sentinel://",
        ),
        (
            {"BRIDGE_REDIS_URL": _SENTINEL_URL, "BRIDGE_REDIS_SENTINEL_PASSWORD": " "},
            "BRIDGE_REDIS_SENTINEL_PASSWORD",
            "is empty",
        ),
        (
            {
                "BRIDGE_REDIS_URL": _SENTINEL_URL,
                "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE": "/no/such/file",
            },
            "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE",
            "cannot be read",
        ),
    ],
)
def test_sentinel_password_needs_a_sentinel_url(env, key, problem):
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_SECRET": "s" * 40, **env})
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert "sentinel-pw" not in str(caught.value)
    assert "data-pw" not in str(caught.value)


def test_empty_sentinel_password_file(tmp_path):
    path = tmp_path / "empty"
    path.write_text("\n")
    env = {"BRIDGE_REDIS_URL": _SENTINEL_URL, "BRIDGE_SECRET": "s" * 40}
    with pytest.raises(ConfigError) as caught:
        load_settings({**env, "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE": str(path)})
    assert (caught.value.key, caught.value.problem) == (
        "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE",
        "holds no password",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"BRIDGE_REDIS_URL": "redis+cluster://:hunter2@n1/2"},
            "BRIDGE_REDIS_URL: database '2': a Redis Cluster has only database 0",
        ),
        (
            {"BRIDGE_REDIS_URL": "redis+sentinel://:hunter2@s1:26379"},
            "BRIDGE_REDIS_URL: has no service name",
        ),
        (
            {
                "BRIDGE_REDIS_URL": "redis://:hunter2@r:6379/0",
                "BRIDGE_REDIS_SENTINEL_PASSWORD": "hunter2",
            },
            "BRIDGE_REDIS_SENTINEL_PASSWORD: only used with a redis+sentinel://",
        ),
    ],
)
@pytest.mark.parametrize("command", ["serve", "check"])
def test_cli_exits_2_on_bad_sentinel_and_cluster_settings(command, env, message):
    result = subprocess.run(
        [sys.executable, "-m", "bridge", command],
        env={"PATH": "/usr/bin:/bin", "BRIDGE_SECRET": "s" * 40, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_readme_config_table_matches_the_code():
    readme = README.read_text()
    assert reference_table() in readme
    documented = set(re.findall(r"^\| `(BRIDGE_[A-Z0-9_]+)` \|", readme, re.M))
    assert documented == {option.env for option in OPTIONS}


@pytest.mark.parametrize(
    "stream", ["bridge:events:aal2", "events:{aal2}", "{a}b}", "x{y", "a{b}{c}", "a}{b}"]
)
def test_an_accepted_stream_name_keeps_its_upgrade_keys_in_its_slot(stream):
    """Redis Cluster: the stream step writes the stream and the upgrade's key in one script."""
    settings = load_settings({"BRIDGE_AAL2_STREAM": stream})
    keys = Keys(settings.key_prefix, settings.aal2_stream)
    assert key_slot(keys.aal2_upgrade("u-1").encode()) == key_slot(stream.encode())


@pytest.mark.parametrize("stream", ["a}b", "a{}b", "{}", "}{"])
def test_a_stream_name_whose_slot_the_upgrade_keys_cannot_share_is_refused(stream):
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_AAL2_STREAM": stream})
    assert str(caught.value).startswith("BRIDGE_AAL2_STREAM:")
    assert "hash tag" in str(caught.value)


def test_the_sign_out_path_is_configurable():
    assert load_settings({}).logout_path == "/.bridge/logout"
    assert load_settings({"BRIDGE_LOGOUT_PATH": "/sso/sign-out"}).logout_path == "/sso/sign-out"


def test_kratos_admin_token_from_env_or_file_never_printed(tmp_path):
    assert load_settings({}).kratos_admin_token is None  # nothing is sent
    key = "ory_pat_" + "k" * 32
    settings = load_settings({"BRIDGE_KRATOS_ADMIN_TOKEN": key})
    assert settings.kratos_admin_token == key
    assert key not in repr(settings)
    path = tmp_path / "kratos_admin_token"
    path.write_text("ory_apikey_from_file\n")
    from_file = load_settings(
        {"BRIDGE_KRATOS_ADMIN_TOKEN_FILE": str(path), "BRIDGE_KRATOS_ADMIN_TOKEN": key}
    )
    assert from_file.kratos_admin_token == "ory_apikey_from_file"
    for bad in ("two words", "", "caf\u00e9"):
        with pytest.raises(ConfigError) as caught:
            load_settings({"BRIDGE_KRATOS_ADMIN_TOKEN": bad})
        assert caught.value.key == "BRIDGE_KRATOS_ADMIN_TOKEN"
        assert "visible ASCII" in caught.value.problem  # the value itself is not repeated
    path.write_text("\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_KRATOS_ADMIN_TOKEN_FILE": str(path)})
    assert caught.value.key == "BRIDGE_KRATOS_ADMIN_TOKEN_FILE"


def test_an_ory_project_slug_names_the_urls_and_the_cookie():
    """As Ory Network names them: one host for both APIs, and the cookie after the slug
    without its dashes (``fancy-moofasa-nsuq4mdx5a``: ``ory_session_fancymoofasansuq4mdx5a``)."""
    settings = load_settings({"BRIDGE_ORY_PROJECT_SLUG": "Fancy-Moofasa-nsuq4mdx5a"})
    project = "https://fancy-moofasa-nsuq4mdx5a.projects.oryapis.com"
    assert settings.ory_project_slug == "fancy-moofasa-nsuq4mdx5a"
    assert settings.kratos_public_url == settings.kratos_admin_url == project
    assert settings.session_cookie == "ory_session_fancymoofasansuq4mdx5a"
    assert settings.login_url == project + "/self-service/login/browser"

    custom = load_settings(
        {
            "BRIDGE_ORY_PROJECT_SLUG": "fancy-moofasa-nsuq4mdx5a",
            "BRIDGE_KRATOS_PUBLIC_URL": "https://auth.example.com",
        }
    )
    assert custom.kratos_public_url == "https://auth.example.com"  # a custom domain wins
    assert custom.kratos_admin_url == project
    assert custom.session_cookie == "ory_session_fancymoofasansuq4mdx5a"

    for bad in ("-leading", "under_score", "dots.in.it", "x" * 64):
        with pytest.raises(ConfigError) as caught:
            load_settings({"BRIDGE_ORY_PROJECT_SLUG": bad})
        assert caught.value.key == "BRIDGE_ORY_PROJECT_SLUG"


def test_sliding_sessions_and_the_idle_timeout_are_off_by_default():
    settings = load_settings({})
    assert (settings.session_extend, settings.idle_timeout) == (0, 0)


@pytest.mark.parametrize(
    ("revalidate_after", "idle_timeout", "least"),
    [
        ("1", "2.9", "3"),  # 2 x 1 s, plus the 1 s a recorded use may lag at least
        ("5", "11", "11.1111"),  # 2 x 5 s, plus a tenth of the timeout
        ("600", "1200", "1260"),  # 2 x 600 s, plus 60 s at most
        ("0", "0.5", "1"),
    ],
)
def test_the_idle_timeout_leaves_room_for_the_copy_and_the_recorded_use(
    revalidate_after, idle_timeout, least
):
    env = {"BRIDGE_REVALIDATE_AFTER": revalidate_after, "BRIDGE_IDLE_TIMEOUT": idle_timeout}
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.key == "BRIDGE_IDLE_TIMEOUT"
    assert caught.value.problem.endswith(f": {least}, or 0 (off)")
    env["BRIDGE_IDLE_TIMEOUT"] = str(float(least) + 0.001)
    assert load_settings(env).idle_timeout == float(least) + 0.001


def test_the_redis_url_from_its_file_wins_and_is_what_every_reader_sees(tmp_path):
    """The URL holds the password: a file keeps it out of the environment."""
    path = tmp_path / "redis-url"
    path.write_text("redis+sentinel://:from-file@s1,s2/mymaster\n")
    settings = load_settings(
        {
            "BRIDGE_REDIS_URL_FILE": str(path),
            "BRIDGE_REDIS_URL": "redis://:from-env@r:6379/0",
            "BRIDGE_REDIS_SENTINEL_PASSWORD": "sentinel-pw",  # needs the file's Sentinel URL
            "BRIDGE_SECRET": "s" * 40,
        }
    )
    assert settings.redis_url == "redis+sentinel://:from-file@s1,s2/mymaster"
    assert parse_redis_url(settings.redis_url).kind == "sentinel"
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_REDIS_URL_FILE": str(path)})
    assert caught.value.key == "BRIDGE_SECRET"  # Redis is configured: replicas must agree


def test_an_unreadable_redis_url_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {"BRIDGE_REDIS_URL_FILE": str(tmp_path / "missing"), "BRIDGE_SECRET": "s" * 40}
        )
    assert caught.value.key == "BRIDGE_REDIS_URL_FILE"
    assert "cannot be read" in caught.value.problem


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://:hunter2@redis:6379/0", "not a redis://"),
        ("redis://:hunter2@redis:6379/zero", "database 'zero' is not a number"),
        ("redis://:hunter2/x@redis:6379/0", ""),  # a "/" in the password ends the host early
        ("redis+cluster://:hunter2@n1/2", "a Redis Cluster has only database 0"),
        ("redis+sentinel://:hunter2@s1,s1/m", "lists the same host and port twice"),
    ],
)
def test_a_bad_url_in_the_redis_url_file_names_the_key_not_the_password(tmp_path, url, problem):
    path = tmp_path / "redis-url"
    path.write_text(url + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({"BRIDGE_REDIS_URL_FILE": str(path), "BRIDGE_SECRET": "s" * 40})
    assert caught.value.key == "BRIDGE_REDIS_URL_FILE"
    assert caught.value.problem.startswith("the file's content: ")
    assert problem in caught.value.problem
    assert "hunter2" not in str(caught.value)

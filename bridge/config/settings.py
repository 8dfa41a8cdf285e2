"""Settings: read once at start-up from ``BRIDGE_*`` variables over an optional YAML file,
each value parsed by its option (``bridge.config.options``), then checked together. A bad
value raises ``ConfigError`` naming the key, and nothing starts."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bridge.config.options import BY_NAME, ENV_PREFIX, OPTIONS, parse_api_key, parse_secret
from bridge.errors import ConfigError
from bridge.pipeline.redirects import Origin
from bridge.pipeline.rules import Rules
from bridge.sessions.activity import least_idle_timeout
from bridge.store.redis.url import parse_redis_url


@dataclass(frozen=True)
class Settings:
    """The validated configuration; build it with ``load_settings``."""

    host: str
    port: int
    grpc_port: int | None
    grpc_tls_cert_file: str | None
    grpc_tls_key_file: str | None
    kratos_public_url: str
    kratos_admin_url: str
    kratos_admin_token: str | None = field(repr=False)
    ory_project_slug: str | None
    kratos_timeout: float
    login_url: str
    rules_file: str | None
    return_to_origins: tuple[Origin, ...] | None
    logout_path: str
    identity_headers: tuple[tuple[str, str], ...]
    jwt_header: str | None
    jwt_keys_dir: str | None
    jwt_issuer: str
    jwt_audience: str | None
    jwt_ttl: float
    jwt_traits: tuple[str, ...]
    redis_url: str | None
    redis_sentinel_password: str | None = field(repr=False)
    redis_timeout: float
    key_prefix: str
    session_cookie: str
    revalidate_after: float
    session_extend: float
    idle_timeout: float
    negative_cache_ttl: float
    secret: bytes = field(repr=False)
    secret_is_random: bool
    hook_secret: str | None = field(repr=False)
    app_token: str | None = field(repr=False)
    aal2_stream: str
    aal2_stream_maxlen: int
    app_data_max_bytes: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None
    on_device_change: str
    device_stream: str
    device_stream_maxlen: int
    workers: int
    threads: int
    body_timeout: float
    log_level: str
    log_format: str
    log_decisions: bool
    admin_host: str
    admin_port: int
    admin_token: str | None = field(repr=False)
    analytics: bool
    analytics_retention_days: int
    metrics: bool

    def with_overrides(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in changes.items() if v is not None})
        return Settings(**values)

    @property
    def request_budget(self) -> float:
        """Seconds a request may wait in all for Kratos and Redis: one Kratos call (bounded
        as a whole) and a Redis command on either side of it. The front answers 503 past
        it; the mirror's revalidation lock, its wait for a peer's answer, and how long an
        admin's revocation holds off a save already under way are measured from it."""
        return self.kratos_timeout + 2 * self.redis_timeout


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | Path | None = None
) -> Settings:
    """Read, validate and resolve every option; raise ``ConfigError`` on the first bad one."""
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[str, str]] = {}  # name -> (key as the user wrote it, value)

    if config_file is not None:
        for key, value in _read_yaml(Path(config_file)).items():
            raw[key] = (f"{config_file}: {key}", value)

    for env_key, value in environ.items():
        if not env_key.startswith(ENV_PREFIX):
            continue
        name = env_key[len(ENV_PREFIX) :].lower()
        if name not in BY_NAME:
            raise ConfigError(env_key, "unknown setting (see `kratos-bridge config-reference`)")
        raw[name] = (env_key, value)

    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name not in raw:
            # A default written as text is read like a value (each such parse is idempotent).
            default = option.default
            values[option.name] = option.parse(default) if isinstance(default, str) else default
            continue
        key, text = raw[option.name]
        try:
            values[option.name] = option.parse(text.strip())
        except ValueError as error:
            raise ConfigError(key, str(error)) from None

    return _resolve(values, {name: key for name, (key, _) in raw.items()})


def _read_yaml(path: Path) -> dict[str, str]:
    key = str(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(key, f"cannot be read ({error.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(key, f"is not valid YAML ({error})") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(key, "must be a mapping of setting names to values")
    result = {}
    for name, value in document.items():
        if name not in BY_NAME:
            raise ConfigError(
                f"{key}: {name}", "unknown setting (see `kratos-bridge config-reference`)"
            )
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{key}: {name}", "must be a single value")
        result[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return result


def _resolve(values: dict[str, Any], keys: dict[str, str]) -> Settings:
    def key_of(name: str) -> str:
        return keys.get(name, BY_NAME[name].env)

    secret_text = _secret_or_file(values, "secret", key_of)
    values["hook_secret"] = _secret_or_file(values, "hook_secret", key_of)
    values["app_token"] = _secret_or_file(values, "app_token", key_of)
    values["admin_token"] = _secret_or_file(values, "admin_token", key_of)
    values["kratos_admin_token"] = _secret_or_file(
        values, "kratos_admin_token", key_of, parse_api_key
    )
    if values["ory_project_slug"] is not None:
        _ory_network_defaults(values, keys)
    if (
        values["admin_token"] is None
        and values["admin_port"]
        and not _loopback(values["admin_host"])
    ):
        raise ConfigError(
            key_of("admin_token"),
            f"required: the admin listener is on {values['admin_host']}, not a loopback "
            "address (set BRIDGE_ADMIN_TOKEN or BRIDGE_ADMIN_TOKEN_FILE, or BRIDGE_ADMIN_PORT=0)",
        )

    # Before the Sentinel password's check and the secret's, which both read the URL.
    values["redis_url"] = _secret_or_file(values, "redis_url", key_of, BY_NAME["redis_url"].parse)
    values["redis_sentinel_password"] = _sentinel_password(
        values.pop("redis_sentinel_password"),
        values.pop("redis_sentinel_password_file"),
        values["redis_url"],
        key_of,
    )

    if secret_text is None and values["redis_url"] is not None:
        raise ConfigError(
            "BRIDGE_SECRET",
            "required when BRIDGE_REDIS_URL or BRIDGE_REDIS_URL_FILE is set, so that replicas "
            "agree",
        )
    values["secret_is_random"] = secret_text is None
    values["secret"] = os.urandom(32) if secret_text is None else secret_text.encode()

    values["jwt_traits"] = values["jwt_traits"] or ()
    if values["rules_file"] is not None:
        # Compiled again by each process; here to fail early.
        rules = Rules.load(values["rules_file"])
        if rules.jwt_audiences and values["jwt_header"] is None:
            label = next(iter(rules.jwt_audiences))
            raise ConfigError(
                key_of("rules_file"),
                f"{label} sets jwt_audience, but no JWT is minted (set BRIDGE_JWT_HEADER "
                "and BRIDGE_JWT_KEYS_DIR)",
            )
    _both_or_neither(values, "jwt_header", "jwt_keys_dir", key_of)
    _check_grpc(values, key_of)
    if values["jwt_header"] is not None:
        if values["jwt_header"].lower() in {n.lower() for n, _ in values["identity_headers"]}:
            raise ConfigError(key_of("jwt_header"), "is also in BRIDGE_IDENTITY_HEADERS")
        from bridge.pipeline.tokens import KeyRing  # cryptography, only when JWTs are on

        KeyRing(Path(values["jwt_keys_dir"]))  # raises naming BRIDGE_JWT_KEYS_DIR

    if values["idle_timeout"]:
        least = least_idle_timeout(values["revalidate_after"])
        if values["idle_timeout"] < least:
            raise ConfigError(
                key_of("idle_timeout"),
                "must be at least 2 x BRIDGE_REVALIDATE_AFTER plus a tenth of itself (1 to "
                f"60 s: the most a recorded use lags): {least:g}, or 0 (off)",
            )

    if values["login_url"] is None:
        values["login_url"] = values["kratos_public_url"] + "/self-service/login/browser"
    if values["aal2_stream"] is None:
        values["aal2_stream"] = values["key_prefix"] + "events:aal2"
    if values["device_stream"] is None:
        values["device_stream"] = values["key_prefix"] + "events:device"
    return Settings(**values)


def _secret_or_file(
    values: dict[str, Any],
    name: str,
    key_of: Callable[[str], str],
    parse: Callable[[str], str] = parse_secret,
) -> str | None:
    """A secret option, or the content of its ``<name>_file`` twin, which wins. The
    file's content is checked by ``parse``, whose message must not quote the secret."""
    secret, secret_file = values.pop(name), values.pop(name + "_file")
    if secret_file is None:
        return secret
    try:
        secret = Path(secret_file).read_text(encoding="utf-8").rstrip("\r\n")
        return parse(secret)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(key_of(name + "_file"), f"cannot be read ({error})") from None
    except ValueError as error:
        raise ConfigError(key_of(name + "_file"), f"the file's content: {error}") from None


def _ory_network_defaults(values: dict[str, Any], given: dict[str, str]) -> None:
    """The project's URLs and session cookie, where no setting names them. Ory Network
    serves the public and the admin API on one host (the admin API under ``/admin``,
    behind the project API key) and names the cookie after the slug without its dashes."""
    slug = values["ory_project_slug"]
    derived = {
        "kratos_public_url": f"https://{slug}.projects.oryapis.com",
        "kratos_admin_url": f"https://{slug}.projects.oryapis.com",
        "session_cookie": "ory_session_" + slug.replace("-", ""),
    }
    for name, value in derived.items():
        if name not in given:
            values[name] = value


def _both_or_neither(
    values: dict[str, Any], first: str, second: str, key_of: Callable[[str], str]
) -> None:
    """Two options that only work together: one without the other is an error naming it."""
    if (values[first] is None) != (values[second] is None):
        given, missing = (first, second) if values[second] is None else (second, first)
        raise ConfigError(key_of(given), f"needs {BY_NAME[missing].env} too")


def _check_grpc(values: dict[str, Any], key_of: Callable[[str], str]) -> None:
    """The gRPC port is not another listener's, and its TLS files are both there and
    readable, or neither is set."""
    _both_or_neither(values, "grpc_tls_cert_file", "grpc_tls_key_file", key_of)
    port = values["grpc_port"]
    if port is None:
        if values["grpc_tls_cert_file"] is not None:
            raise ConfigError(key_of("grpc_tls_cert_file"), "needs BRIDGE_GRPC_PORT too")
        return
    if port in (values["port"], values["admin_port"]):
        raise ConfigError(key_of("grpc_port"), f"{port} is BRIDGE_PORT or BRIDGE_ADMIN_PORT")
    for name in ("grpc_tls_cert_file", "grpc_tls_key_file"):
        if values[name] is not None:
            try:
                Path(values[name]).read_bytes()
            except OSError as error:
                raise ConfigError(key_of(name), f"cannot be read ({error.strerror})") from None


def _loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _sentinel_password(
    password: str | None,
    password_file: str | None,
    redis_url: str | None,
    key_of: Callable[[str], str],
) -> str | None:
    """The Sentinels' own password, from its file when one is named; refused without a
    Sentinel URL, where it would silently do nothing."""
    name = (
        "redis_sentinel_password_file" if password_file is not None else "redis_sentinel_password"
    )
    if password is None and password_file is None:
        return None
    if redis_url is None or parse_redis_url(redis_url).kind != "sentinel":
        raise ConfigError(
            key_of(name),
            "only used with a redis+sentinel:// or rediss+sentinel:// BRIDGE_REDIS_URL",
        )
    if password_file is None:
        return password
    try:
        password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(key_of(name), f"cannot be read ({error})") from None
    if not password:
        raise ConfigError(key_of(name), "holds no password")
    return password

"""Every setting, declared once in ``OPTIONS`` with its parser, default and one line of
documentation; the README's configuration table is generated from the same list
(``kratos-bridge config-reference``) and a test keeps the two in step."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from bridge.errors import ConfigError
from bridge.hosts import HOST_NAME, check_host_and_port, is_ip, require_visible_ascii
from bridge.pipeline.redirects import Origin, parse_origin
from bridge.pipeline.upstream_headers import DEFAULT_MAPPING, RESERVED, parse_mapping
from bridge.store.base import has_hash_tag
from bridge.store.redis.url import parse_redis_url

ENV_PREFIX = "BRIDGE_"
MIN_SECRET_LENGTH = 32


def _http_url(value: str) -> str:
    """An API base URL: scheme, host, port and path; no query, fragment or user."""
    parts = _browser_url_parts(value)
    if parts.query:
        raise ValueError("must not have a query string")
    return value.rstrip("/")


def _browser_url(value: str) -> str:
    _browser_url_parts(value)
    return value


def _browser_url_parts(value: str) -> SplitResult:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL")
    check_host_and_port(parts)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password")
    if parts.fragment or "#" in value:
        raise ValueError("must not have a fragment")
    require_visible_ascii(value)
    return parts


def _redis_url(value: str) -> str:
    parse_redis_url(value)
    return value


def _origins(value: str) -> tuple[Origin, ...]:
    origins = tuple(parse_origin(entry) for entry in value.split(",") if entry.strip())
    if not origins:
        raise ValueError("names no origin")
    return origins


# The bridge's own routes, which the sign-out path must not shadow.
_OWN_PATHS = (
    "/auth",
    "/forward-auth",
    "/ext-authz",
    "/whoami",
    "/hooks",
    "/health",
    "/openapi.json",
    "/openapi.yaml",
    "/.well-known",
    "/metrics",
    "/admin",
)


def _logout_path(value: str) -> str:
    if not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+", value):
        raise ValueError(
            f"{value!r} is not an absolute path of plain segments like /.bridge/logout"
        )
    if any(value == own or value.startswith(own + "/") for own in _OWN_PATHS):
        raise ValueError(f"{value!r} is one of the bridge's own routes")
    return value


def _identity_headers(value: str) -> tuple[tuple[str, str], ...]:
    return parse_mapping(value)


def _jwt_header(value: str) -> str:
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}", value):
        raise ValueError(f"{value!r} is not a header name")
    if value.lower() in RESERVED and value.lower() != "authorization":
        raise ValueError(f"{value!r} is a header the bridge or the proxy owns")
    return value


def _trait_list(value: str) -> tuple[str, ...]:
    traits = tuple(entry.strip() for entry in value.split(",") if entry.strip())
    for trait in traits:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})*", trait):
            raise ValueError(f"{trait!r} is not a dotted trait path")
    return traits


def _listen_host(value: str) -> str:
    """An IP address, or a host name resolved now to the address ``serve`` binds."""
    if is_ip(value):
        return value
    if not HOST_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    try:
        found = socket.getaddrinfo(value, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(f"{value!r} does not resolve to an address") from None
    return str(found[0][4][0])


def _number(low: float, high: float, *, integer: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise ValueError(f"{value!r} is not {kind}") from None
        if not low <= number <= high:
            raise ValueError(f"{value} is outside {low:g}..{high:g}")
        return number

    return parse


def _matching(pattern: str, description: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)

    def parse(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not {description}")
        return value

    return parse


def _stream_key(value: str) -> str:
    """A Redis key the bridge can keep its per-upgrade keys beside, in one hash slot."""
    _matching(r"[A-Za-z0-9:_.{}-]{1,128}", "a Redis key")(value)
    if "}" in value and not has_hash_tag(value):
        raise ValueError(
            f"{value!r} has '}}' but no {{tag}}: name a hash tag, e.g. 'events:{{aal2}}'"
        )
    return value


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"{value!r} is not true or false")
    return value.lower() == "true"


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    if not networks:
        raise ValueError("names no address")
    return tuple(networks)


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value.lower()

    return parse


def _password(value: str) -> str:
    if not value:
        raise ValueError("is empty")
    return value


def parse_api_key(value: str) -> str:
    """A key the bridge sends (``Authorization: Bearer``): one token of visible ASCII."""
    if not re.fullmatch(r"[\x21-\x7e]{1,4096}", value):
        raise ValueError("must be 1-4096 visible ASCII characters, without spaces")
    return value


def _project_slug(value: str) -> str:
    """An Ory Network project slug, e.g. ``fancy-moofasa-nsuq4mdx5a``: a DNS label."""
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", value.lower()):
        raise ValueError(f"{value!r} is not a project slug (letters, digits and dashes)")
    return value.lower()


def parse_secret(value: str) -> str:
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
    return value


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "host",
        _listen_host,
        "127.0.0.1",
        "Address `serve` listens on (`--host` overrides); a host name is resolved at start-up.",
    ),
    Option(
        "port",
        _number(1, 65535, integer=True),
        4480,
        "Port `serve` listens on (`--port` overrides).",
    ),
    Option(
        "grpc_port",
        _number(1, 65535, integer=True),
        None,
        "Port of Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/Check`, and "
        "the gRPC health service) on `BRIDGE_HOST`, served by every server process; unset = "
        'none. Envoy\'s `failure_mode_allow` must stay `false` (README, "Envoy over gRPC").',
    ),
    Option(
        "grpc_tls_cert_file",
        str,
        None,
        "PEM certificate chain the gRPC port serves TLS with (with "
        "`BRIDGE_GRPC_TLS_KEY_FILE`; read at start-up); unset = plaintext HTTP/2.",
    ),
    Option(
        "grpc_tls_key_file",
        str,
        None,
        "PEM private key of `BRIDGE_GRPC_TLS_CERT_FILE`.",
    ),
    Option(
        "kratos_public_url",
        _http_url,
        "http://127.0.0.1:4433",
        "Kratos public API, where `/sessions/whoami` is asked.",
    ),
    Option(
        "kratos_admin_url",
        _http_url,
        "http://127.0.0.1:4434",
        "Kratos admin API: revocation and the dashboard's session detail, the web hooks' "
        "reads, the check of a whoami `401` for a mirrored session (is it really ended, or "
        "Kratos's own trouble?), `session_extend` and `idle_timeout` (extend, revoke), and "
        "`check` (it reports the Kratos version).",
    ),
    Option(
        "kratos_admin_token",
        parse_api_key,
        None,
        "Sent as `Authorization: Bearer ...` with every call to the Kratos admin API, and "
        'never to the public API: Ory Network\'s project API key (README, "Ory Network"), '
        "or a gateway's token; unset = none sent. A 401 or 403 from the admin API names "
        "this setting. Never printed or logged. Prefer `BRIDGE_KRATOS_ADMIN_TOKEN_FILE`.",
    ),
    Option(
        "kratos_admin_token_file",
        str,
        None,
        "File holding `kratos_admin_token` (trailing newline ignored); wins over "
        "`BRIDGE_KRATOS_ADMIN_TOKEN`.",
    ),
    Option(
        "ory_project_slug",
        _project_slug,
        None,
        "Ory Network project slug (`fancy-moofasa-nsuq4mdx5a`): the defaults of "
        "`kratos_public_url` and `kratos_admin_url` become "
        "`https://<slug>.projects.oryapis.com`, and of `session_cookie` "
        "`ory_session_<slug without dashes>`; set any of them to override (a custom domain).",
    ),
    Option(
        "kratos_timeout",
        _number(0.05, 60),
        2.0,
        "Seconds a request may wait for Kratos in all (connect, send and the whole answer); "
        "then it is answered 503.",
    ),
    Option(
        "login_url",
        _browser_url,
        None,
        "Browser-facing Kratos login URL put in 401 answers; "
        "default `<kratos_public_url>/self-service/login/browser`.",
    ),
    Option(
        "rules_file",
        str,
        None,
        'YAML access-rules file (README, "Access rules"): what each host, path and method '
        "needs (`public`, `authenticated`, `aal2`, `deny`, `max_age`, `when`). Unset = "
        "every request needs a session (and `?aal=aal2` on the endpoint still asks for more).",
    ),
    Option(
        "return_to_origins",
        _origins,
        None,
        "Comma-separated origins a login's `return_to` may point at "
        "(`https://app.example.com`, `http://localhost:8080`, `https://*.example.com`); "
        "default: every host the rules file names (http or https, any port). A URL outside "
        "them is left out of `return_to`; with neither, `return_to` is never set.",
    ),
    Option(
        "logout_path",
        _logout_path,
        "/.bridge/logout",
        'Path of the sign-out endpoint (README, "Sign-out"): `GET` or `POST`, `?return_to=`, '
        "routed by the proxy to the bridge itself. It ends the session in Kratos (a cookie "
        "through Kratos's browser logout, a token through its API logout) and then in every "
        "bridge process at once.",
    ),
    Option(
        "identity_headers",
        _identity_headers,
        DEFAULT_MAPPING,
        "Headers sent to the upstream app on an allow, `Name=source` comma separated. "
        "Sources: `identity.id`, `identity.schema_id`, `identity.state`, `session.id`, "
        "`session.aal`, `session.amr`, `session.authenticated_at`, `session.expires_at`, "
        "`traits.<path>`, `metadata_public.<path>`. Each is sent on every 200, empty when "
        "the session lacks it; non-ASCII, spaces and `%` are percent-encoded (UTF-8).",
    ),
    Option(
        "jwt_header",
        _jwt_header,
        None,
        "Header that carries a signed JWT (ES256) of the session to the upstream app, e.g. "
        "`X-Bridge-Jwt` (`Authorization` sends `Bearer <jwt>`); unset = no JWT. Needs "
        "`BRIDGE_JWT_KEYS_DIR`. Public keys at `/.well-known/jwks.json`.",
    ),
    Option(
        "jwt_keys_dir",
        str,
        None,
        "Directory of P-256 private keys (`*.pem`, made by `kratos-bridge jwt-keygen DIR`). "
        "All are published in the JWKS; the file whose name sorts last signs once it is 90 s "
        "old. Re-read every 30 s: rotate by adding a later-named key, and remove the old one "
        "2 minutes plus `BRIDGE_JWT_TTL` later.",
    ),
    Option(
        "jwt_issuer",
        _matching(r"[\x21-\x7e]{1,256}", "1-256 visible ASCII characters"),
        "kratos-session-bridge",
        "The JWT's `iss`.",
    ),
    Option(
        "jwt_audience",
        _matching(r"[\x21-\x7e]{1,256}", "1-256 visible ASCII characters"),
        None,
        "The JWT's `aud`, for requests whose rule sets no `jwt_audience` of its own; unset "
        "= none (which `bridge.flask` refuses: give each app an audience of its own).",
    ),
    Option(
        "jwt_ttl",
        _number(10, 3600),
        300.0,
        "Seconds a JWT is valid (never past the session's `expires_at`); it is re-minted "
        "when a fifth of that is left, never per request.",
    ),
    Option(
        "jwt_traits",
        _trait_list,
        None,
        "Comma-separated traits (dotted paths, e.g. `email,name.first`) copied into the "
        "JWT's `traits` claim.",
    ),
    Option(
        "redis_url",
        _redis_url,
        None,
        "Redis for the session mirror and AAL2 events; unset = embedded in-process store "
        "(one process only). One server: `redis://[[user]:password@]host[:port][/db]` "
        "(port 6379), `unix:///path.sock[?db=N]`. Sentinel: "
        "`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]` "
        "(the Sentinels, port 26379; the master of `service` is asked of them on every new "
        "connection, so a failover is followed). Cluster: "
        "`redis+cluster://[[user]:password@]host[:port][,host[:port]...]` (seed nodes, port "
        "6379; database 0 only). An IPv6 host goes in brackets, `[::1]:26379`. `rediss` "
        "instead of `redis` means TLS (to the Sentinels too), with the query options "
        "`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` (files, read at start-up), "
        "`ssl_cert_reqs` (`none`, `optional`, `required`: the default) and "
        "`ssl_check_hostname` (`true`, `false`). The URL holds the password: prefer "
        "`BRIDGE_REDIS_URL_FILE`.",
    ),
    Option(
        "redis_url_file",
        str,
        None,
        "File holding `redis_url` (trailing newline ignored); wins over `BRIDGE_REDIS_URL`.",
    ),
    Option(
        "redis_sentinel_password",
        _password,
        None,
        "Password of the Sentinels (`AUTH <password>`), only with a `redis+sentinel://` URL; "
        "unset = the URL's user name and password, as for the master. Never printed. "
        "Prefer `BRIDGE_REDIS_SENTINEL_PASSWORD_FILE`.",
    ),
    Option(
        "redis_sentinel_password_file",
        str,
        None,
        "File holding `redis_sentinel_password` (trailing newline ignored); wins over "
        "`BRIDGE_REDIS_SENTINEL_PASSWORD`.",
    ),
    Option(
        "redis_timeout",
        _number(0.01, 30),
        0.5,
        "Seconds to wait for one Redis command. No request waits longer than "
        "`kratos_timeout + 2 * redis_timeout` in all: then it is answered 503.",
    ),
    Option(
        "key_prefix",
        _matching(r"[A-Za-z0-9:_.-]{1,64}", "1-64 of A-Z a-z 0-9 : _ . -"),
        "bridge:",
        "Prefix of every Redis key the bridge writes.",
    ),
    Option(
        "session_cookie",
        _matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", "a cookie name"),
        "ory_kratos_session",
        "Name of the Kratos session cookie (`session.cookie.name`).",
    ),
    Option(
        "revalidate_after",
        _number(0, 3600),
        5.0,
        "Seconds a mirrored session is trusted before Kratos is asked again; "
        "`0` asks every time. This is the bound on how late a logout or revocation "
        "takes effect.",
    ),
    Option(
        "session_extend",
        _number(0, 10 * 365 * 86400),
        0.0,
        'Sliding sessions (README, "Sliding sessions and the idle timeout"): seconds before '
        "its expiry from which a session in use is extended through Kratos's admin API "
        "(`BRIDGE_KRATOS_ADMIN_URL`), off the request path and once per expiry across every "
        "bridge process; Kratos's re-issued cookie is passed on. Set it to Kratos's "
        "`session.earliest_possible_extend`. `0` = off.",
    ),
    Option(
        "idle_timeout",
        _number(0, 10 * 365 * 86400),
        0.0,
        "Seconds a session may go unused before every bridge process refuses it "
        "(`401 session_ended`) and it is revoked in Kratos: never before, and at its next "
        "request once unused for this plus a tenth of it (1 to 60 s, the most a recorded use "
        "lags). At least `2 * revalidate_after` plus that tenth. `0` = off.",
    ),
    Option(
        "negative_cache_ttl",
        _number(0, 300),
        10.0,
        "Seconds a credential Kratos rejected is answered 401 without asking again.",
    ),
    Option(
        "secret",
        parse_secret,
        None,
        "Key for HMAC-SHA256 of credentials; required with Redis so replicas agree; "
        "random per process when embedded. Prefer `BRIDGE_SECRET_FILE`.",
    ),
    Option(
        "secret_file",
        str,
        None,
        "File holding `secret` (trailing newline ignored); wins over `BRIDGE_SECRET`.",
    ),
    Option(
        "hook_secret",
        parse_secret,
        None,
        "Shared secret Kratos's `web_hook` sends in the `X-Bridge-Hook-Key` header "
        "(`auth.type: api_key`) to `POST /hooks/kratos/<flow>`; unset = that endpoint "
        'answers 404 (README, "Kratos webhooks"). Never printed. Prefer '
        "`BRIDGE_HOOK_SECRET_FILE`.",
    ),
    Option(
        "hook_secret_file",
        str,
        None,
        "File holding `hook_secret` (trailing newline ignored); wins over `BRIDGE_HOOK_SECRET`.",
    ),
    Option(
        "app_token",
        parse_secret,
        None,
        "Bearer token an app sends in `X-Bridge-App-Token` (compared in constant time) to "
        "write a session's app section with `PATCH /whoami/app`, beside the user's own "
        "session credential; unset = that endpoint refuses every write (`403`, "
        "`app_writes_disabled`). Never printed. Prefer `BRIDGE_APP_TOKEN_FILE`.",
    ),
    Option(
        "app_token_file",
        str,
        None,
        "File holding `app_token` (trailing newline ignored); wins over `BRIDGE_APP_TOKEN`.",
    ),
    Option(
        "aal2_stream",
        _stream_key,
        None,
        "Redis Stream that receives AAL2 events; default `<key_prefix>events:aal2`.",
    ),
    Option(
        "aal2_stream_maxlen",
        _number(1, 10**9, integer=True),
        1_000_000,
        "Approximate cap on the length of the AAL2 and the ended stream (`XADD MAXLEN ~`).",
    ),
    Option(
        "app_data_max_bytes",
        _number(256, 16 * 1024 * 1024, integer=True),
        65536,
        "Cap on one session's app-owned data (field names and JSON values, in bytes); a "
        "write past it is refused (`413`, `AppDataTooLarge`) and writes nothing.",
    ),
    Option(
        "trusted_proxies",
        _networks,
        None,
        "Comma-separated addresses or networks (`10.0.0.0/8,127.0.0.1`) of proxies whose "
        "`X-Forwarded-For` names the client; unset = the client address is not known, and "
        "device changes are judged by user agent alone.",
    ),
    Option(
        "on_device_change",
        _one_of("off", "record", "deny"),
        "record",
        "When a session is used from another IP address (with `trusted_proxies`) or user "
        "agent than Kratos recorded: `record` a device-change signal (once per session and "
        "change), `deny` records it and refuses the request (`403`; so is a request without "
        "a user agent when Kratos recorded one), `off` ignores it.",
    ),
    Option(
        "device_stream",
        _stream_key,
        None,
        "Redis Stream of device-change signals; default `<key_prefix>events:device`.",
    ),
    Option(
        "device_stream_maxlen",
        _number(1, 10**9, integer=True),
        100_000,
        "Approximate cap on the device-change stream's length (`XADD MAXLEN ~`).",
    ),
    Option(
        "workers",
        _number(0, 64, integer=True),
        0,
        "Server processes; with Redis `0` = one per CPU the bridge may use: its cgroup's CPU "
        "quota (a container's CPU limit), rounded up and capped by the CPUs in its affinity "
        "mask; always 1 when embedded. `check` and the admin `/health/ready` say how many "
        "and why.",
    ),
    Option(
        "threads",
        _number(1, 256, integer=True),
        16,
        "Worker threads per server process, for requests that need Redis or Kratos (answers "
        "from the process's fresh copy need no thread). Raise it when Kratos is slow or far.",
    ),
    Option(
        "body_timeout",
        _number(0.1, 300),
        10.0,
        "Seconds a client may take to send a request body to a route that takes one "
        "(`PATCH /whoami/app`, the Kratos hooks, the dashboard's forms); then it is answered "
        "`408`. Other routes never wait for a body.",
    ),
    Option(
        "log_level",
        _one_of("debug", "info", "warning", "error"),
        "info",
        "Log level; logs never contain cookies or tokens.",
    ),
    Option(
        "log_format",
        _one_of("auto", "text", "json"),
        "auto",
        "`text` (human-readable lines), `json` (one JSON object per line, with a decision's "
        "fields), or `auto`: text on a terminal, JSON otherwise.",
    ),
    Option(
        "admin_host",
        _listen_host,
        "127.0.0.1",
        "Address of the admin listener (admin API, `/metrics`, OpenAPI); an address that is "
        "not loopback needs `BRIDGE_ADMIN_TOKEN`.",
    ),
    Option(
        "admin_port",
        _number(0, 65535, integer=True),
        4481,
        "Port of the admin listener; `0` = no admin listener.",
    ),
    Option(
        "admin_token",
        parse_secret,
        None,
        "Bearer token the admin listener requires (`Authorization: Bearer ...`, compared in "
        "constant time); unset = only loopback requests from no other site are answered, "
        "and only a loopback `BRIDGE_ADMIN_HOST` is allowed. Never printed. Prefer "
        "`BRIDGE_ADMIN_TOKEN_FILE`.",
    ),
    Option(
        "admin_token_file",
        str,
        None,
        "File holding `admin_token` (trailing newline ignored); wins over `BRIDGE_ADMIN_TOKEN`.",
    ),
    Option(
        "analytics",
        _boolean,
        True,
        'Session analytics that outlive the sessions (README, "Analytics"): who was seen '
        "when, requests per session, how sessions ended; served by `/admin/stats`.",
    ),
    Option(
        "analytics_retention_days",
        _number(1, 3650, integer=True),
        90,
        "Days the per-day analytics (counters, unique identities) are kept.",
    ),
    Option(
        "metrics",
        _boolean,
        True,
        "Prometheus metrics at `/metrics` on the admin listener.",
    ),
    Option(
        "log_decisions",
        _boolean,
        False,
        "One log line per forward-auth decision (`bridge.decisions`, level info): request id "
        "(`X-Request-Id`), dialect, method, decision, status, rule, identity and session id, "
        "tier (process, redis, kratos), latency. Never a credential, host or path.",
    ),
)

BY_NAME = {option.name: option for option in OPTIONS}


def parse_option(name: str, value: object, key: str) -> Any:
    """One option's value given some other way (a command-line flag), checked the same
    way; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        return BY_NAME[name].parse(str(value))
    except ValueError as error:
        raise ConfigError(key, str(error)) from None


def reference_table() -> str:
    """The Markdown configuration table for the README."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for option in OPTIONS:
        default = "unset" if option.default is None else f"`{option.default}`"
        rows.append(f"| `{option.env}` | {default} | {option.doc} |")
    return "\n".join(rows)

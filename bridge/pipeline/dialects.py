"""How each kind of proxy asks the bridge, and how it needs the answer: one class per dialect.

A dialect reads the *original* request (the one the user sent the proxy: method, scheme,
host, path) from the headers that proxy sets, and shapes a refusal so that the proxy
does the right thing with it:

- ``/auth`` (nginx ``auth_request``, ingress-nginx ``auth-url``): nginx accepts only 200,
  401 and 403 from an auth server (anything else becomes its own 500), and redirects
  itself. Every 401 says where to send a browser in ``X-Bridge-Redirect``, and in
  ``Location`` too when the request was a browser navigation: the shipped config
  redirects when ``Location`` is set and answers 401 otherwise. A malformed request is
  403 there (the JSON still says ``bad_request`` and why), a Kratos 429 is 503. When a
  rule names a host, the host nginx routed by (``X-Forwarded-Host``, from ``$host``) is
  required and must be the URL's: the URL is built from the ``Host`` header, which an
  absolute-form request line overrides.
- ``/forward-auth`` (Traefik ``forwardAuth``, Caddy ``forward_auth``, HAProxy): the proxy
  passes a non-2xx answer to the client as it is, so a browser navigation gets the
  redirect itself (302 for GET/HEAD, 303 otherwise) and an API or XHR call gets 401 JSON.
- ``/ext-authz/<original path>`` (Envoy HTTP ``ext_authz`` with ``path_prefix:
  /ext-authz``): the check request keeps the original method and ``Host``, and appends
  the original path; denials reach the client as they are, as with ``/forward-auth``.
- Envoy's gRPC ``ext_authz`` (``bridge.web.envoy_grpc``, on ``BRIDGE_GRPC_PORT``): the
  same reading from the check request's attributes, and the same answers, which the
  server turns into a ``CheckResponse``.

A header the dialect needs that is missing or malformed is a 400 naming it (403 on
``/auth``): the bridge never guesses which URL a rule should judge or where a browser
should come back to.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from bridge.bounded import BoundedMap
from bridge.errors import BadRequest
from bridge.pipeline.rules import normalise_host
from bridge.web.request import HeaderView, OriginalRequest, declare_read
from bridge.web.responses import Refusal, Reply

MAX_TARGET = 8192
# Methods are case-sensitive (RFC 9110) and every registered one is upper case; a proxy
# passes "get" on as it is, so judging it as GET would judge another request.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]{1,32}")
_HOST_NAME = r"(?:[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
_HOST = re.compile(_HOST_NAME + r"(?::[0-9]{0,5})?")
# In a URL (and in what nginx sends for one) a colon must be followed by a port:
# "http://http://admin.example.com/x" is not host "http:" with a path "//admin...".
_STRICT_HOST = re.compile(_HOST_NAME + r"(?::[0-9]{1,5})?")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_SCHEMES = ("http", "https")
_READ_ONLY = frozenset(("GET", "HEAD"))
# What tells a browser navigation from an API call (``is_navigation``), for every dialect.
NAVIGATION_HEADERS = declare_read("accept", "x-requested-with", "sec-fetch-mode")


class Dialect:
    """One way of asking. ``original`` raises ``BadRequest`` naming a missing or malformed
    header; it returns ``None`` only where the dialect lets the proxy leave the URL out.
    ``reads`` names (lower case) every header ``original`` reads: only declared headers are
    kept of a request, so a subclass declares its own when it is defined."""

    name = ""
    reads: tuple[str, ...] = ()
    route = ""  # the bridge's route, as a pattern: what a log may name instead of the path
    redirects_browsers = True  # a browser navigation gets 302/303 (else 401 + Location)
    # Statuses the proxy cannot pass on, and what is sent instead.
    substitutes: dict[int, int] = {}  # noqa: RUF012 - read only

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        declare_read(*cls.reads)

    def original(
        self, headers: HeaderView, method: str, path: str, query: str
    ) -> OriginalRequest | None:
        raise NotImplementedError

    def refuse(
        self, refusal: Refusal, headers: HeaderView, original: OriginalRequest | None
    ) -> Reply:
        """The refusal as this proxy needs it: a browser navigation that has somewhere to go
        is redirected, or told where in ``Location``; a 429 the proxy cannot carry is a 503."""
        navigation = refusal.status == 401 and refusal.redirect is not None
        navigation = navigation and is_navigation(headers)
        if navigation and self.redirects_browsers:
            method = original.method if original is not None else "GET"
            return refusal.reply(redirect_status(method), location=True, redirect_header=False)
        # Every 401 the proxy sees carries X-Bridge-Redirect (an nginx config reads it for
        # every 401), and Location as well for a navigation it should redirect itself.
        return refusal.reply(self.substitutes.get(refusal.status), location=navigation)

    def asked_aal(self, query: str) -> str | None:
        """The ``aal`` the proxy's route asked for in the bridge URL's query, if any."""
        if "aal=" not in query:
            return None
        values = parse_qs(query, keep_blank_values=True).get("aal")
        return values[0] if values else None


class NginxAuthRequestDialect(Dialect):
    """``/auth``: ``X-Original-URL`` and ``X-Original-Method``. Both are required when a
    rules file decides by URL; without one they only give the login's ``return_to``.

    ``X-Forwarded-Host`` is the host nginx routed by (``$host``): an absolute-form request
    line (``GET http://admin.example.com/x`` with ``Host: public.example.com``) picks
    nginx's server, and the app's backend, by its own host, while the URL is built from
    the ``Host`` header. When it is sent, the URL must name that host; when a rule names a
    host it must be sent, since otherwise the rules would judge a host the client chose."""

    name = "nginx"
    route = "/auth"
    reads = ("x-original-url", "x-original-method", "x-forwarded-host")
    redirects_browsers = False
    # nginx answers anything but 200, 401 and 403 from an auth server with its own 500: a
    # request the bridge refuses as malformed is forbidden to the client; a Kratos rate
    # limit is the bridge being unable to decide (503, which nginx shows as 500).
    substitutes = {400: 403, 429: 503}  # noqa: RUF012 - read only

    def __init__(self, url_required: bool, host_required: bool = False) -> None:
        self._url_required = url_required
        self._host_required = host_required

    def original(
        self, headers: HeaderView, method: str, path: str, query: str
    ) -> OriginalRequest | None:
        url = _single(headers, "x-original-url")
        original_method = _single(headers, "x-original-method")
        if url is None or (original_method is None and self._url_required):
            if not self._url_required:
                return None
            missing = "X-Original-URL" if url is None else "X-Original-Method"
            raise BadRequest(f"the {missing} header is missing (nginx: see config/nginx)")
        scheme, _, rest = url.partition("://")
        scheme = scheme.lower()
        if scheme not in _SCHEMES or not rest:
            raise BadRequest("the X-Original-URL header is not an http:// or https:// URL")
        slash = rest.find("/")
        host, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        host = _host(host, "X-Original-URL header", _STRICT_HOST)
        routed = _single(headers, "x-forwarded-host")
        if routed is None and self._host_required:
            raise BadRequest(
                "the X-Forwarded-Host header is missing: a rule names a host, so the host "
                "nginx routed by is needed (proxy_set_header X-Forwarded-Host $host)"
            )
        if routed is not None:
            routed = _host(routed.strip(), "X-Forwarded-Host header", _STRICT_HOST)
            if normalise_host(routed) != normalise_host(host):
                raise BadRequest(
                    "the X-Original-URL header names another host than X-Forwarded-Host"
                )
        return OriginalRequest(
            _method(original_method or "GET", "X-Original-Method header"),
            scheme,
            host,
            _target(target, "X-Original-URL header"),
        )


class ForwardAuthDialect(Dialect):
    """``/forward-auth``: ``X-Forwarded-Method``, ``-Proto``, ``-Host`` and ``-Uri``, all four."""

    name = "forward-auth"
    route = "/forward-auth"
    # In the order ``original`` unpacks them.
    reads = ("x-forwarded-method", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-uri")

    def __init__(self) -> None:
        # Checked requests by their four header values: a page's many requests (and a
        # busy API's) repeat them, so each is checked once. Values only; nothing of a user.
        self._checked: BoundedMap[tuple[str, ...], OriginalRequest] = BoundedMap(10_000)

    def original(self, headers: HeaderView, method: str, path: str, query: str) -> OriginalRequest:
        values = tuple(_required(headers, name) for name in self.reads)
        checked = self._checked.get(values)
        if checked is not None:
            return checked
        original_method, scheme, host, uri = values
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise BadRequest("the X-Forwarded-Proto header is not http or https")
        checked = OriginalRequest(
            _method(original_method, "X-Forwarded-Method header"),
            scheme,
            _host(host, "X-Forwarded-Host header"),
            _target(uri, "X-Forwarded-Uri header"),
        )
        if len(uri) <= _MEMO_MAX_TARGET:
            self._checked.put(values, checked)
        return checked


_MEMO_MAX_TARGET = 1024


class _EnvoyDialect(Dialect):
    """What Envoy's two ``ext_authz`` services share: the original request is the check
    request's own method, ``Host`` and target; the scheme is ``X-Forwarded-Proto`` (list it
    in ``allowed_headers``). The query is the app's, never an ``aal`` for the bridge."""

    reads = ("x-forwarded-proto", "host")

    def _original(
        self, headers: HeaderView, method: str, target: str, source: str
    ) -> OriginalRequest:
        scheme = _required(headers, "x-forwarded-proto").lower()
        if scheme not in _SCHEMES:
            raise BadRequest("the X-Forwarded-Proto header is not http or https")
        return OriginalRequest(
            _method(method, "request method"),
            scheme,
            _host(_required(headers, "host"), "Host header"),
            _target(target, source),
        )

    def asked_aal(self, query: str) -> str | None:
        return None  # the query is the app's, not the proxy's


class EnvoyExtAuthzDialect(_EnvoyDialect):
    """``/ext-authz/<path>`` (Envoy's HTTP ``ext_authz``): the path after the prefix."""

    name = "ext-authz"
    prefix = "/ext-authz"
    route = prefix + "/<path>"  # the path after the prefix is the app's: it may hold a token

    def original(self, headers: HeaderView, method: str, path: str, query: str) -> OriginalRequest:
        target = path[len(self.prefix) :] or "/"
        return self._original(
            headers, method, f"{target}?{query}" if query else target, "original path"
        )


class EnvoyGrpcDialect(_EnvoyDialect):
    """Envoy's gRPC ``ext_authz`` (``bridge.web.envoy_grpc``): a ``CheckRequest``'s
    ``attributes.request.http`` gives the method, ``path`` (with the query), ``host`` and
    ``scheme``; the server passes the path as it is and the host as the ``Host`` header,
    and ``scheme`` as ``X-Forwarded-Proto`` unless Envoy sent that header (which wins, as
    on ``/ext-authz``). A check request without them is refused, never judged as ``/``."""

    name = "ext-authz-grpc"
    route = "envoy.service.auth.v3.Authorization/Check"

    def __init__(self) -> None:
        # Checked requests by what they were read from, as ``ForwardAuthDialect`` keeps.
        self._checked: BoundedMap[tuple[str, ...], OriginalRequest] = BoundedMap(10_000)

    def original(self, headers: HeaderView, method: str, path: str, query: str) -> OriginalRequest:
        if not path:
            raise BadRequest("the check request has no attributes.request.http.path")
        schemes, hosts = headers.get_all("x-forwarded-proto"), headers.get_all("host")
        values = (method, path, str(len(schemes)), *schemes, *hosts)
        checked = self._checked.get(values)
        if checked is None:
            checked = self._original(headers, method, path, "attributes.request.http.path")
            if len(path) <= _MEMO_MAX_TARGET:
                self._checked.put(values, checked)
        return checked


class Dialects:
    """The dialect for a path of the bridge, or ``None`` for the bridge's own routes."""

    def __init__(self, url_required: bool, host_required: bool = False) -> None:
        self.nginx = NginxAuthRequestDialect(url_required, host_required)
        self.forward_auth = ForwardAuthDialect()
        self.ext_authz = EnvoyExtAuthzDialect()
        self.ext_authz_grpc = EnvoyGrpcDialect()  # no path: the gRPC server's own
        self._exact = {dialect.route: dialect for dialect in (self.nginx, self.forward_auth)}

    def for_path(self, path: str) -> Dialect | None:
        found = self._exact.get(path)
        if found is not None:
            return found
        if path == EnvoyExtAuthzDialect.prefix or path.startswith(
            EnvoyExtAuthzDialect.prefix + "/"
        ):
            return self.ext_authz
        return None


def is_navigation(headers: HeaderView) -> bool:
    """A browser loading a page, for which a redirect helps: it accepts HTML at least as
    much as anything else, and is neither an XHR nor a ``fetch``. Everything else (API
    clients, scripts) gets 401 JSON it can act on."""
    if (headers.get("x-requested-with") or "").lower() == "xmlhttprequest":
        return False
    mode = headers.get("sec-fetch-mode")
    if mode is not None and mode.lower() != "navigate":
        return False
    return _prefers_html(headers.get("accept") or "")


def redirect_status(method: str) -> int:
    """302 keeps GET a GET; 303 turns a form POST (or any other method) into a GET of
    the login page."""
    return 302 if method in _READ_ONLY else 303


def _prefers_html(accept: str) -> bool:
    html_q, best_q = 0.0, 0.0
    for media_range in accept.split(","):
        kind, *params = (part.strip() for part in media_range.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        if kind.lower() == "text/html":
            html_q = max(html_q, q)
        best_q = max(best_q, q)
    return html_q > 0 and html_q >= best_q


def _single(headers: HeaderView, name: str) -> str | None:
    values = headers.get_all(name)
    if len(values) > 1:
        raise BadRequest(f"the {_title(name)} header is repeated")
    return values[0] if values else None


def _required(headers: HeaderView, name: str) -> str:
    """The one value of header ``name`` (lower case), stripped; 400 naming it otherwise."""
    values = headers.get_all(name)
    if len(values) == 1:
        value = values[0].strip()
        if value:
            return value
    problem = "repeated" if len(values) > 1 else "missing"
    raise BadRequest(f"the {_title(name)} header is {problem}")


def _method(value: str, source: str) -> str:
    if not _METHOD.fullmatch(value):
        raise BadRequest(f"the {source} is not an upper-case HTTP method")
    return value


def _host(value: str, source: str, form: re.Pattern[str] = _HOST) -> str:
    if not form.fullmatch(value):
        raise BadRequest(f"the {source} does not name a host")
    return value.lower()


def _target(value: str, source: str) -> str:
    if len(value) > MAX_TARGET:
        raise BadRequest(f"the {source} is longer than {MAX_TARGET} characters")
    if not _TARGET.fullmatch(value):
        raise BadRequest(f"the {source} is not a path of visible ASCII starting with /")
    return value


def _title(name: str) -> str:
    return "-".join(part.upper() if part == "url" else part.title() for part in name.split("-"))

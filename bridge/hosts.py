"""Host names, IP addresses and ports as the settings' URLs may hold them, checked the
same way for every URL (Kratos's, the login page's, Redis's), and ``host:port`` as a URL
writes it."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult

# Labels of letters, digits, "-" and "_" (compose service names may hold "_").
HOST_NAME = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*\.?"
)


def check_host_and_port(parts: SplitResult) -> None:
    """A URL's host must be an IP address or a host name (resolving it is left to the
    moment of use: in compose, names resolve only once the other containers run), and
    its port, if any, a number from 1 to 65535."""
    host = parts.hostname
    if not host:
        raise ValueError("has no host")
    if not is_ip(host) and not HOST_NAME.fullmatch(host):
        raise ValueError(f"host {host!r} is not a host name or IP address")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("port is not a number from 1 to 65535")


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def require_visible_ascii(value: str) -> None:
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value):
        raise ValueError("must be visible ASCII, without spaces")

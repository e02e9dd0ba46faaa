"""Who may ask the dashboard what: the ``Host`` header allowlist and the optional bearer token.

On a line network the dashboard is reachable by every machine of that network, and a web page from
anywhere can make a browser on it send requests there (DNS rebinding: a hostile name that resolves to
the dashboard's address). So a request is answered only when

- its ``Host`` header names this dashboard: loopback names, ``dashboard.host``, this machine's name, or
  one of ``dashboard.allowed_hosts`` (``"*"`` admits any); otherwise 421 Misdirected Request;
- with ``dashboard.token`` set, it carries the token: ``Authorization: Bearer <token>`` (Prometheus,
  scripts), or the ``stream_service_token`` cookie that a first visit to ``/?token=<token>`` sets
  (browsers: pictures cannot send headers); otherwise 401. ``/healthz`` answers without the token, with
  its status code and ``ok`` only (the problems name files and hosts).
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Protocol


class Headers(Protocol):
    """Request headers by name (``http.server``'s ``Message``, or a dict in tests)."""

    def get(self, name: str, default: None = None) -> str | None: ...


COOKIE = "stream_service_token"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
OPEN_PATHS = frozenset({"/healthz"})


def host_name(header: str | None) -> str | None:
    """The host of a ``Host`` header without its port (``[::1]:8080`` -> ``::1``); None when absent or empty."""
    if not header:
        return None
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.index("]")] if "]" in value else None
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class Decision:
    """What to do with one request: answer it (``code`` 200), or refuse it with ``code`` and ``reason``."""

    code: int
    reason: str = ""
    authenticated: bool = True


class AccessPolicy:
    """The dashboard's rules for one server (see the module docstring)."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str] = (), token: str | None = None) -> None:
        names = set(LOOPBACK_NAMES) | {h.lower() for h in allowed_hosts}
        if bind_host not in ("0.0.0.0", "::", ""):
            names.add(bind_host.lower())
        for own in (socket.gethostname(), socket.getfqdn()):
            names.add(own.lower())
        self.any_host = "*" in names
        self.hosts = frozenset(names - {"*"})
        self.token = token

    def check(self, path: str, headers: Headers, query_token: str | None = None) -> Decision:
        host = host_name(headers.get("Host"))
        if not self.any_host and host not in self.hosts:
            return Decision(
                421, f"Host: expected one of this dashboard's names, found {host!r} (dashboard.allowed_hosts)"
            )
        if self.token is None:
            return Decision(200)
        if self._presented(headers, query_token):
            return Decision(200)
        if path in OPEN_PATHS:
            return Decision(200, authenticated=False)
        return Decision(401, "expected the dashboard token (Authorization: Bearer ..., or open /?token=... once)")

    def _presented(self, headers: Headers, query_token: str | None) -> bool:
        assert self.token is not None
        offered: list[str] = []
        authorization = headers.get("Authorization") or ""
        if authorization.startswith("Bearer "):
            offered.append(authorization[len("Bearer ") :].strip())
        try:
            cookie = SimpleCookie(headers.get("Cookie") or "")
        except CookieError:
            cookie = SimpleCookie()
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        if query_token is not None:
            offered.append(query_token)
        expected = self.token.encode()
        return any(hmac.compare_digest(o.encode(), expected) for o in offered)

    def cookie_header(self) -> str:
        """The ``Set-Cookie`` value that keeps a browser's token (HttpOnly, same site only)."""
        assert self.token is not None
        return f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"

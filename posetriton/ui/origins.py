"""Which Host and Origin headers the web app answers: an allow-list derived from the address it listens on.

A page elsewhere can reach an app on this machine through the user's browser in two ways. It can
send requests to it cross-origin (its Origin names the other site), or it can rebind its own name
to 127.0.0.1 (DNS rebinding), so that the browser treats the app as that site: both Origin and Host
then carry the other site's name. Neither header can be trusted alone, so both are checked against
the names this app is reached by:

* a loopback bind (127.0.0.0/8, ::1, localhost) answers ``localhost``, ``127.0.0.1`` and ``[::1]``
  with its port, and the bound address itself;
* another address answers that address (IPv6 included, in any spelling) with its port;
* a wildcard bind (``0.0.0.0``, ``::``) answers the loopback names, this machine's host name and the
  addresses it resolves to;
* names given with ``--allowed-host NAME[:PORT]`` are added (a DNS name or a reverse proxy's).

Everything else: a Host not listed gets 400, an Origin not listed 403 (on every request that carries
one: WebSockets and POSTs always do in a browser). A request without Origin comes from no browser
page and is not refused for it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

Authority = tuple[str, int]  # (normalised host, port)


def normalise_host(host: str) -> str:
    """Lower-case, without IPv6 brackets, an IP address in its canonical spelling (``[0:0::1]`` -> ``::1``)."""
    bare = host.strip().lower()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    bare = bare.removesuffix(".")  # "localhost." names the same host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return bare


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    bare = normalise_host(host)
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def parse_authority(text: str, default_port: int) -> Authority | None:
    """``host[:port]`` as a Host header or ``--allowed-host`` spells it (``[v6]:port`` for IPv6); None if malformed."""
    text = text.strip()
    if not text or any(c in text for c in "/?#@ \t"):
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # a bare IPv6 address (no port can follow without brackets)
        host, port_text = text, None
    else:
        host, port_text = text, None
    if port_text is None:
        port = default_port
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        return None
    name = normalise_host(host)
    return (name, port) if name else None


def format_authority(authority: Authority) -> str:
    host, port = authority
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _machine_names() -> set[str]:
    """This machine's host name, its fully qualified name and the addresses they resolve to (for wildcard binds)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except OSError:
            continue
    return {normalise_host(n) for n in names if n}


@dataclass(frozen=True)
class HostPolicy:
    """The Host and Origin values an app listening on one address and port answers."""

    allowed: frozenset[Authority]

    @classmethod
    def for_bind(cls, bind_host: str, port: int, extra: Iterable[str] = ()) -> HostPolicy:
        """The allow-list of an app bound to ``bind_host:port``; ``extra`` adds ``NAME`` (this port), ``NAME:PORT``."""
        bound = normalise_host(bind_host)
        names = {bound}
        if bound in _WILDCARDS:
            names = {*LOOPBACK_NAMES, *_machine_names()}
        elif is_loopback(bound):
            names |= set(LOOPBACK_NAMES)
        allowed = {(name, port) for name in names if name not in _WILDCARDS}
        for text in extra:
            authority = parse_authority(text, port)
            if authority is None:
                raise ValueError(f"--allowed-host takes NAME or NAME:PORT ([IPv6]:PORT), got {text!r}")
            allowed.add(authority)
        return cls(frozenset(allowed))

    def host_allowed(self, host_header: str | None) -> bool:
        """A Host header (HTTP/1.1 requires one) naming this app; its port defaults to 80, as a browser omits it."""
        if host_header is None:
            return False
        authority = parse_authority(host_header, 80)
        return authority is not None and authority in self.allowed

    def origin_allowed(self, origin: str) -> bool:
        """An Origin header (``scheme://host[:port]``) naming this app; ``null`` (sandboxed, file:) never does."""
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            return False
        authority = parse_authority(parts.netloc, _DEFAULT_PORTS[parts.scheme])
        return authority is not None and authority in self.allowed

    def describe(self) -> str:
        return ", ".join(sorted(format_authority(a) for a in self.allowed))

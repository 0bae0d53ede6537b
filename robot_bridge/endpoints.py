"""ZeroMQ endpoint strings, read once for the server's bind and the client's connect."""

from __future__ import annotations

from dataclasses import dataclass

from cosmos_edge.runtime.errors import ConfigError

_SCHEMES = ("tcp", "ipc", "inproc")


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # tcp, ipc or inproc
    host: str  # tcp only (brackets of an IPv6 address removed); "" otherwise
    port: str  # tcp only: its digits, or "*" where a bind picks a free port; "" otherwise


def parse_endpoint(endpoint: str, *, wildcard_port: bool) -> Endpoint:
    """`endpoint` split into its parts, or ConfigError naming what was expected (`wildcard_port`: "*" allowed)."""
    scheme, separator, address = endpoint.partition("://")
    if not separator or scheme not in _SCHEMES or not address:
        raise ConfigError(f"endpoint: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME, got {endpoint!r}")
    if scheme != "tcp":
        return Endpoint(scheme, "", "")
    host, _, port = address.rpartition(":")
    # libzmq takes a TCP port modulo 65536: tcp://localhost:99999 would quietly use port 34463.
    valid_port = (port.isdigit() and int(port) <= 65535) or (wildcard_port and port == "*")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    valid_host = bracketed or (host and "[" not in host and "]" not in host and ":" not in host)
    if not valid_host or not valid_port:
        ports = "a port in 0..65535" + (" or '*'" if wildcard_port else "")
        raise ConfigError(
            f"endpoint: expected tcp://HOST:PORT with {ports} (an IPv6 address in brackets), got {endpoint!r}"
        )
    return Endpoint(scheme, host[1:-1] if bracketed else host, port)


def is_ipv6(endpoint: Endpoint) -> bool:
    """Whether a socket needs ZeroMQ's IPv6 option for `endpoint` (its host is an IPv6 address)."""
    return ":" in endpoint.host

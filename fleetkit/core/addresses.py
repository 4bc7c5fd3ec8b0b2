"""Parsing and checks of host:port and unix socket addresses.

The transport listens on a host:port such as "127.0.0.1:7070" or "[::1]:7070",
and the control API also accepts "unix:///absolute/path". The helpers here
split, join and classify such addresses, raising the `_Invalid` of
`fleetkit.core.config_schema` with an example of the correct form. The
`_check_*` functions are the checks of the `transport.listen`,
`transport.advertise` and `api.listen` keys, and `endpoint_address` turns an
API address into a gRPC target that a client can dial.
"""

from __future__ import annotations

import ipaddress
import os
import re

from fleetkit.core.config_schema import _fail, _Invalid, _show
from fleetkit.core.errors import ConfigError

_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107


def _check_listen(value: str) -> str:
    _split_host_port(value)
    return value


def _check_advertise(value: str) -> str:
    if not value:
        return value
    host, port = _split_host_port(value)
    if _is_unspecified(host) or port == 0:
        _fail('other machines cannot connect to this address; write a reachable host and port, '
              'for example "192.0.2.10:7070"')
    return value


def _check_api_listen(value: str) -> str:
    _parse_api_address(value)
    return value


def endpoint_address(value: str) -> str:
    """Convert an API address (unix:///path, /path or host:port) into a gRPC target.

    A host of 0.0.0.0 or :: becomes the loopback address, since a client
    cannot dial "all addresses". Raises ConfigError naming the value.
    """
    try:
        parsed = _parse_api_address(value if not value.startswith("/") else f"unix://{value}")
    except _Invalid as error:
        raise ConfigError([f"endpoint {_show(value)}: {error}"]) from None
    if parsed[0] == "unix":
        return f"unix://{parsed[1]}"
    host, port = parsed[1], parsed[2]
    if _is_unspecified(host):
        host = "::1" if ":" in host else "127.0.0.1"
    return _join_host_port(host, port)


def _split_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port", raising _Invalid with an example for other forms."""
    example = 'expected host:port, for example "127.0.0.1:7070" or "[::1]:7070"'
    if "://" in value:
        _fail(f"a URL is not accepted here; {example}")
    host, colon, port_text = value.rpartition(":")
    if not colon or not port_text.isdigit() or not host:
        _fail(example)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            _fail(f"invalid IPv6 address {host!r}; {example}")
    elif ":" in host and _is_ipv6(host):
        _fail(f'an IPv6 address needs brackets, for example "[{host}]:{port_text}"')
    elif not _is_host_name(host):
        _fail(f"invalid host {host!r}; {example}")
    port = int(port_text)
    if port > 65535:
        _fail(f"port {port} is out of range; use 0 to 65535")
    return host, port


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_api_address(value: str) -> tuple[str, str, int]:
    """Return ("unix", path, 0) or ("tcp", host, port), raising _Invalid with the corrected form."""
    if value.startswith("unix:"):
        rest = value[len("unix:"):]
        path = rest[2:] if rest.startswith("//") else rest
        if not path.startswith("/") or rest.startswith("/") and not rest.startswith("//"):
            suggestion = "/" + path.lstrip("/")
            _fail(f'a unix socket needs an absolute path after "unix://", for example "unix://{suggestion}"')
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            _fail(f"the socket path is longer than {_MAX_SOCKET_PATH} bytes, the limit of unix socket "
                  "addresses on Linux; choose a shorter path")
        return "unix", path, 0
    host, port = _split_host_port(value)
    if port == 0:
        _fail('the API needs a fixed port so that clients can find it, for example "127.0.0.1:7071"')
    return "tcp", host, port


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_host_name(host: str) -> bool:
    """Return whether `host` is a DNS name or IPv4 address: dot-separated labels of at most 63 characters."""
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

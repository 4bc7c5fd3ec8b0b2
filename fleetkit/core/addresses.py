"""Parsing and checks of host:port and unix socket addresses.

The transport listens on a host:port such as "127.0.0.1:7070" or "[::1]:7070",
and the control API also accepts "unix:///absolute/path". The helpers here
split, join and classify such addresses, raising the `_Invalid` of
`fleetkit.core.config_schema` with an example of the correct form. The
`_check_*` functions are the checks of the `transport.listen`,
`transport.advertise` and `api.listen` keys, and `endpoint_address` turns an
API address into a gRPC target that a client can dial.

The store URLs of `storage.endpoints` depend on the backend: `STORE_URLS`
gives, per backend, the URL schemes it accepts with a description and an
example, and `store_url_problem` checks one URL against them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from fleetkit.core.config_schema import _fail, _Invalid, _show
from fleetkit.core.errors import ConfigError

_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class StoreUrls:
    """The URLs a storage backend accepts: `schemes`, described by `form`, with an `example`."""

    schemes: tuple[str, ...]
    form: str
    example: str


_ETCD_URLS = StoreUrls(("http", "https"), "an http:// or https:// URL with host and port", "http://127.0.0.1:2379")
_REDIS_URLS = StoreUrls(("redis", "rediss", "unix"),
                        "a redis://host:port[/db], rediss://host:port[/db] or unix:///absolute/path.sock URL",
                        "redis://127.0.0.1:6379/0")
# URLs per networked backend. A backend not listed here (the embedded store, or
# one from a plugin) gets no per-backend URL rules.
STORE_URLS: dict[str, StoreUrls] = {"etcd3": _ETCD_URLS, "etcd2": _ETCD_URLS, "redis": _REDIS_URLS}
# Any URL of a known backend, for endpoints whose backend is unknown or unset.
ANY_STORE_URL = StoreUrls(("http", "https", "redis", "rediss", "unix"),
                          "a store URL: http:// or https:// (etcd), redis://, rediss:// or unix:// (redis)",
                          "http://127.0.0.1:2379")
TLS_SCHEMES = frozenset({"https", "rediss"})
_DEFAULT_PORTS = {"http": 2379, "https": 2379, "redis": 6379, "rediss": 6379}


def store_url_problem(url: str, urls: StoreUrls, backend: str = "") -> str:
    """Return why `url` is not one of `urls` (for `backend`, if named), or "" if it is."""
    for_backend = f" for the {backend} backend" if backend else ""
    wanted = f"expected {urls.form}{for_backend}, for example {_show(urls.example)}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # The error's text can quote part of a password, so it is not shown.
        if "@" in url:
            return (f'not a valid URL; write a "/", "@" or ":" in a user name or password as %2F, %40 or %3A, or '
                    f"set storage.password instead; {wanted}")
        return f"not a valid URL; {wanted}"
    if parts.scheme not in urls.schemes:
        return wanted
    if parts.scheme == "unix":
        return _unix_url_problem(url, parts)
    if "://" not in url:
        return wanted
    example = f"{parts.scheme}://{_join_host_port(parts.hostname or '127.0.0.1', _DEFAULT_PORTS[parts.scheme])}"
    if not parts.hostname:
        return f"the host is missing; {wanted}"
    if port is None:
        return f"the port is missing; write it after the host, for example {_show(example)}"
    if port == 0:
        return f"port 0 cannot be dialled; write the store's port, for example {_show(example)}"
    if parts.query or parts.fragment:
        return f"a store URL takes no ?query or #fragment; write {_show(example)}"
    if parts.scheme in ("redis", "rediss"):
        if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]+", parts.path):
            return f'the path is the database number, such as "/0"; for example {_show(example + "/0")}'
    elif parts.path not in ("", "/"):
        return f"an etcd URL takes no path; write only scheme://host:port, for example {_show(example)}"
    return ""


def _unix_url_problem(url: str, parts: SplitResult) -> str:
    path = parts.path
    if not url.lower().startswith("unix://") or parts.hostname or not path.startswith("/"):
        suggestion = "/" + f"{parts.hostname or ''}{path}".lstrip("/")
        return f'a unix socket needs an absolute path after "unix://", for example "unix://{suggestion}"'
    if parts.query or parts.fragment:
        return f'a unix socket URL takes no ?query or #fragment; write "unix://{path}"'
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        return (f"the socket path is longer than {_MAX_SOCKET_PATH} bytes, the limit of unix socket addresses on "
                "Linux; choose a shorter path")
    return ""


def store_host(url: str) -> str | None:
    """Return the host of a valid store URL, or None for a unix socket (always on this machine)."""
    parts = urlsplit(url)
    return None if parts.scheme == "unix" else parts.hostname or ""


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

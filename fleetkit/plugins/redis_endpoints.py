"""Endpoint URLs of the redis storage backend, and the client built from one.

An endpoint is ``redis://[user:password@]host[:port][/db]``,
``rediss://...`` for TLS, or ``unix:///absolute/path.sock[?db=N]``. The
password comes from the URL, else from the ``storage.password`` setting;
`Endpoint.url` is the URL with the password masked, fit for messages and logs.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fleetkit.core.errors import ConfigError

DEFAULT_PORT = 6379
SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint URL; `password` never appears in `url` or the repr."""

    scheme: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``."""
        user = ""
        if self.username or self.password:
            user = urllib.parse.quote(self.username, safe="") + (":***" if self.password else "") + "@"
        if self.scheme == "unix":
            query = f"?db={self.db}" if self.db else ""
            return f"unix://{user}{self.path}{query}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}/{self.db}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse one endpoint URL; raises ConfigError naming the URL (password masked) and the expected form."""
    masked = _mask(text)
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise ConfigError([f"storage.endpoints: {masked!r} is not a valid URL ({error})"]) from error
    if parts.scheme not in SCHEMES:
        raise ConfigError([
            f"storage.endpoints: {masked!r} has scheme {parts.scheme!r}; the redis backend takes "
            "redis://host:port[/db], rediss://host:port[/db] or unix:///path.sock"
        ])
    username = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    query = urllib.parse.parse_qs(parts.query)

    if parts.scheme == "unix":
        if not parts.path.startswith("/") or parts.hostname:
            raise ConfigError([f"storage.endpoints: {masked!r} needs an absolute socket path, as in unix:///run/redis.sock"])
        db_text = (query.get("db") or ["0"])[0]
        return Endpoint("unix", path=parts.path, db=_database(db_text, masked), username=username, password=password)

    if not parts.hostname:
        raise ConfigError([f"storage.endpoints: {masked!r} has no host; write {parts.scheme}://host:port[/db]"])
    db_text = parts.path.strip("/") or "0"
    return Endpoint(parts.scheme, host=parts.hostname, port=port or DEFAULT_PORT, db=_database(db_text, masked),
                    username=username, password=password)


def _database(text: str, masked: str) -> int:
    if not text.isdigit():
        raise ConfigError([f"storage.endpoints: {masked!r} names database {text!r}; a database is a number such as 0"])
    return int(text)


def _mask(text: str) -> str:
    scheme, separator, rest = text.partition("://")
    if not separator or "@" not in rest:
        return text
    userinfo, _, hostpath = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{hostpath}" if colon else text


def build_client(endpoint: Endpoint, *, username: str, password: str, ca_file: str, cert_file: str, key_file: str,
                 dial_timeout: float) -> redis.asyncio.Redis:
    """Return an unconnected redis-py client for `endpoint`.

    The client never retries by itself (a retried script could apply a
    write twice) and has no socket timeout: callers bound each request with
    `asyncio.timeout`, and blocking stream reads must outlast a socket timeout.
    """
    options: dict[str, Any] = {
        "db": endpoint.db,
        "username": endpoint.username or username or None,
        "password": endpoint.password or password or None,
        "socket_connect_timeout": dial_timeout,
        "socket_timeout": None,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        "decode_responses": False,
        "client_name": "fleetkit",
    }
    if not endpoint.tls and (ca_file or cert_file or key_file):
        raise ConfigError([
            f"storage.ca_file, cert_file and key_file need a TLS endpoint, but {endpoint.url} is plain; "
            "write rediss://host:port instead"
        ])
    if endpoint.scheme == "unix":
        return redis.asyncio.Redis(unix_socket_path=endpoint.path, **options)
    if endpoint.tls:
        options.update(ssl=True, ssl_ca_certs=ca_file or None, ssl_certfile=cert_file or None,
                       ssl_keyfile=key_file or None)
    return redis.asyncio.Redis(host=endpoint.host, port=endpoint.port, **options)

"""Endpoints of the etcd3 storage backend: client URLs, channel options and connections.

`parse_endpoint` splits one entry of ``[storage] endpoints``, such as
``http://user:password@127.0.0.1:2379``, into the host, port and credentials
that the gRPC channel needs. The resulting `Endpoint.url` masks the password,
so it is safe to log. Only plain http is supported, and the port defaults to
`DEFAULT_PORT` (2379). `_CHANNEL_OPTIONS` are the gRPC channel options that
`Etcd3Storage` dials with, and `_Connection` wraps the open aetcd client of one
endpoint with the stubs that the backend calls. Choosing which endpoint to
dial is left to `Etcd3Storage`.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aetcd
from aetcd import rpc

from fleetkit.core.errors import ConfigError

DEFAULT_PORT = 2379

# Keepalive pings detect a silently dead connection under a long-lived watch.
# etcd 3.4 rejects pings more frequent than --grpc-keepalive-min-time (5 s by
# default) and pings sent while no call is open, so neither is sent here.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL, split into what the gRPC channel needs."""

    url: str  # without the password, safe to log
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``http://[user:password@]host[:port]`` (scheme optional, port 2379 by default).

    Raises `ConfigError` for TLS URLs, bad ports and missing hosts.
    """
    raw = text.strip()
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urllib.parse.urlsplit(raw)
    shown = text.replace(parts.password, "***") if parts.password else text
    if parts.scheme == "https":
        raise ConfigError([f"storage endpoint {shown!r}: TLS is not supported by the etcd3 backend; use http://"])
    if parts.scheme != "http":
        raise ConfigError([f"storage endpoint {shown!r}: scheme must be http, got {parts.scheme!r}"])
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as error:
        raise ConfigError([f"storage endpoint {shown!r}: invalid port ({error})"]) from error
    host = parts.hostname
    if not host:
        raise ConfigError([f"storage endpoint {shown!r}: host is missing"])
    netloc_host = f"[{host}]" if ":" in host else host
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    credentials = f"{user}:***@" if user else ""
    return Endpoint(f"http://{credentials}{netloc_host}:{port}", netloc_host, port, user, password)


class _Connection:
    """An open aetcd client bound to one endpoint, with the stubs used here."""

    def __init__(self, endpoint: Endpoint, index: int, client: aetcd.Client):
        self.endpoint = endpoint
        self.index = index
        self.client = client
        self.kv = client.kvstub
        self.lease = client.leasestub
        self.maintenance = client.maintenancestub
        self.watch = rpc.WatchStub(client.channel)
        self.metadata = client.metadata

"""Endpoints of the etcd3 storage backend: client URLs, TLS files, channels and connections.

`parse_endpoint` splits one entry of ``[storage] endpoints``, such as
``https://user:password@10.0.0.1:2379``, into the host, port, scheme and
credentials that the gRPC channel needs. The resulting `Endpoint.url` masks
the password, so it is safe to log. The port defaults to `DEFAULT_PORT` (2379).

`TlsFiles` holds ``[storage] ca_file``, ``cert_file`` and ``key_file`` and
reads them each time a connection is dialled, so replaced files take effect
on the next dial. `open_connection` opens a plaintext channel for an
``http://`` endpoint and a TLS channel for an ``https://`` one, then
authenticates on that same channel, so a password given for an https
endpoint only ever travels inside TLS. `describe_tls_failure` turns gRPC's
handshake errors into messages that name the setting to fix. Choosing which
endpoint to dial is left to `Etcd3Storage`.
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import grpc
from aetcd import rpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

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
    tls: bool = False

    @property
    def target(self) -> str:
        """The gRPC target ``host:port``; its host is also the name the server certificate must carry."""
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``http(s)://[user:password@]host[:port]`` (scheme optional, meaning http; port 2379 by default).

    Raises `ConfigError` for other schemes, bad ports and missing hosts.
    """
    raw = text.strip()
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urllib.parse.urlsplit(raw)
    shown = text.replace(parts.password, "***") if parts.password else text
    if parts.scheme not in ("http", "https"):
        raise ConfigError([f"storage endpoint {shown!r}: scheme must be http or https, got {parts.scheme!r}"])
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
    url = f"{parts.scheme}://{credentials}{netloc_host}:{port}"
    return Endpoint(url, netloc_host, port, user, password, tls=parts.scheme == "https")


class TlsFileError(Exception):
    """A TLS file of ``[storage]`` cannot be read or does not contain what its setting needs.

    The message names the setting and the path, never the file's content.
    """


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM files of ``[storage] ca_file``, ``cert_file`` and ``key_file``; "" means not set."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def any(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files now and return the gRPC credentials of a TLS channel.

        Without `ca_file`, the system CA bundle (the file OpenSSL's default
        verify paths name) verifies the server, or gRPC's bundled roots where
        there is none. Raises `TlsFileError` when a file is missing, contains no
        PEM certificate or key, or when the key does not belong to the certificate.
        """
        if self.ca_file:
            roots = _read("ca_file", self.ca_file)
            _certificates("ca_file", self.ca_file, roots)
        else:
            roots = _system_roots()
        chain = key = None
        if self.cert_file or self.key_file:
            if not (self.cert_file and self.key_file):
                missing = "key_file" if self.cert_file else "cert_file"
                raise TlsFileError(f"storage.{missing} is not set; a client certificate needs both "
                                   "storage.cert_file and storage.key_file")
            chain = _read("cert_file", self.cert_file)
            key = _read("key_file", self.key_file)
            _check_key_matches(self, _certificates("cert_file", self.cert_file, chain)[0], key)
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise TlsFileError(f"cannot read storage.{setting} {path!r}: {error.strerror or error}; "
                           f"check the path and that the daemon's user may read it") from None


def _system_roots() -> bytes | None:
    path = ssl.get_default_verify_paths().cafile
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _certificates(setting: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(f"storage.{setting} {path!r} contains no PEM certificate "
                           '("-----BEGIN CERTIFICATE-----"); point it at a PEM certificate file') from None


def _check_key_matches(files: TlsFiles, certificate: x509.Certificate, data: bytes) -> None:
    """Raise `TlsFileError` unless `data` is an unencrypted PEM private key of `certificate`."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(f"storage.key_file {files.key_file!r} is encrypted with a passphrase; fleetkit reads "
                           "unencrypted keys only, so decrypt it and make it readable by the daemon's user only") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError(f"storage.key_file {files.key_file!r} contains no PEM private key that fleetkit can "
                           "read; point it at the PEM key of storage.cert_file") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise TlsFileError(f"storage.key_file {files.key_file!r} is not the private key of the certificate in "
                           f"storage.cert_file {files.cert_file!r}; set both to a certificate and its own key")


# Pattern of OpenSSL's reason, such as "unable to get local issuer certificate",
# in the details that gRPC (grpcio 1.85) gives for a failed TLS handshake.
_OPENSSL_REASON = re.compile(r"OPENSSL_internal:[A-Z0-9_]+: ?([^:]*)")


def describe_tls_failure(details: str, endpoint: Endpoint, files: TlsFiles) -> str:
    """Return what went wrong in a TLS connection to `endpoint` and which setting to fix, or "".

    `details` is the text of a gRPC error. Returns "" when it does not
    describe a TLS failure or `endpoint` does not use TLS.
    """
    if not endpoint.tls:
        return ""
    found = _OPENSSL_REASON.search(details)
    reason = (found.group(1).strip() if found else "") or "verification failed"
    url = endpoint.url
    if "Hostname Verification Check failed" in details:
        host = endpoint.host.strip("[]")
        return (f"the TLS certificate of etcd at {url} is not valid for {host}, which is not among its subject "
                f"alternative names; list etcd in storage.endpoints by a name or address its certificate "
                f"contains, or issue etcd a certificate that includes {host}")
    if "CERTIFICATE_VERIFY_FAILED" in details or "BAD_SIGNATURE" in details:
        authority = (f"storage.ca_file {files.ca_file!r}" if files.ca_file
                     else "the system CAs (storage.ca_file is empty)")
        return (f"the TLS certificate of etcd at {url} failed verification against {authority} ({reason}); "
                "set storage.ca_file to the CA that signed etcd's certificate, and check that the "
                "certificate has not expired")
    if "TSI_DATA_CORRUPTED" in details or "ALERT_BAD_CERTIFICATE" in details or "CERTIFICATE_REQUIRED" in details:
        # With TLS 1.3 the client completes its side of the handshake before the
        # server checks the client certificate, so a rejection arrives as an
        # alert that gRPC reports as "Unwrap failed (TSI_DATA_CORRUPTED)".
        if not files.cert_file:
            return (f"etcd at {url} closed the TLS connection after the handshake, which it does when it "
                    "requires a client certificate (--client-cert-auth) and none was sent; set "
                    "storage.cert_file and storage.key_file to a client certificate signed by a CA in etcd's "
                    "--trusted-ca-file")
        return (f"etcd at {url} closed the TLS connection after the handshake, which it does when it rejects "
                f"the client certificate in storage.cert_file {files.cert_file!r}; the certificate must be "
                "signed by a CA in etcd's --trusted-ca-file, be valid now and allow client authentication")
    if "WRONG_VERSION_NUMBER" in details:
        return (f"etcd at {url} does not serve TLS on this port; use an http:// endpoint, or start etcd with "
                "--cert-file and --key-file")
    if "handshake failed" in details.lower():
        return (f"the TLS handshake with etcd at {url} failed ({reason}); check storage.ca_file, "
                "storage.cert_file and storage.key_file")
    return ""


def open_channel(endpoint: Endpoint, files: TlsFiles) -> grpc.aio.Channel:
    """Open a gRPC channel to `endpoint`: TLS for https, plaintext for http.

    The TLS files are read here; raises `TlsFileError` when one is unusable.
    """
    options = list(_CHANNEL_OPTIONS.items())
    if endpoint.tls:
        return grpc.aio.secure_channel(endpoint.target, files.credentials(), options=options)
    return grpc.aio.insecure_channel(endpoint.target, options=options)


class _Connection:
    """An open gRPC channel to one endpoint, with the stubs used here and the auth token's metadata."""

    def __init__(self, endpoint: Endpoint, index: int, channel: grpc.aio.Channel,
                 metadata: tuple[tuple[str, str], ...] | None):
        self.endpoint = endpoint
        self.index = index
        self.channel = channel
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.maintenance = rpc.MaintenanceStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.metadata = metadata

    async def close(self) -> None:
        await self.channel.close()


async def open_connection(endpoint: Endpoint, index: int, files: TlsFiles, *, timeout: float) -> _Connection:
    """Open a channel to `endpoint` and, when it names a user, authenticate on that channel.

    The password is sent on the channel just opened, so for an https endpoint
    only inside TLS. `timeout` bounds the authentication request, in seconds.
    Raises `TlsFileError`, or `grpc.aio.AioRpcError` when etcd rejects the
    connection or the credentials.
    """
    channel = open_channel(endpoint, files)
    metadata = None
    try:
        if endpoint.username:
            request = rpc.AuthenticateRequest(name=endpoint.username, password=endpoint.password or "")
            response = await rpc.AuthStub(channel).Authenticate(request, timeout=timeout)
            metadata = (("token", response.token),)
    except BaseException:
        await channel.close()
        raise
    return _Connection(endpoint, index, channel, metadata)

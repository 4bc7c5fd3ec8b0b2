"""TLS termination in front of a gRPC server, with one log line per rejected peer.

A `TlsGate` owns a listener's TCP port and peeks at the first byte of each
connection. A TLS handshake record starts a handshake with the listener's
current `ssl.SSLContext`, which requires a client certificate whose chain
leads to the cluster CA. Anything else is plaintext, which passes only when
the listener has ``insecure = true``. A verified peer must carry a fleetkit role
in its certificate, and a node certificate must name the address the
connection comes from (``[tls] check_peer_address``). The gate then opens a
unix connection to the gRPC server behind it and copies bytes both ways.

The gRPC server cannot see the TLS session, so the gate binds each inner
connection to a unique socket path and records the peer under that path in a
`PeerRegistry`. The server reads it back from ``context.peer()``
(`fleetkit.core.access`). The inner socket lives in a directory only the
daemon's user can enter.

Every rejected connection is logged once, with the peer address and the
reason. A peer that keeps retrying with the same fault is summarized every
`RejectionLog.REPEAT` seconds instead of flooding the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass

from cryptography import x509

from fleetkit.core.addresses import _split_host_port
from fleetkit.core.credentials import ServerCredentials, certificate_name, certificate_role
from fleetkit.core.tls import ROLES

log = logging.getLogger(__name__)

TLS_HANDSHAKE_RECORD = 0x16
HANDSHAKE_TIMEOUT = 10.0
CHUNK = 256 * 1024
# Connections that may be in their handshake at once. More are closed right away, so
# clients that never finish their connections cannot use up the daemon's file descriptors.
MAX_ADMITTING = 256
# Seconds to wait after a failed accept before the next one.
ACCEPT_RETRY = 0.5
# Seconds the second direction of a proxied connection may go on after the first one ended.
DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class Peer:
    """The client of one connection through the gate.

    `role` and `name` come from the verified client certificate. A plaintext
    peer has neither.
    """

    address: str
    role: str = ""
    name: str = ""

    @property
    def plaintext(self) -> bool:
        return not self.role

    def describe(self) -> str:
        if self.plaintext:
            return f"{self.address} (plaintext)"
        return f"{self.address} (certificate {self.name!r}, role {self.role})"


class PeerRegistry:
    """Peers of the open inner connections, by the unix path each inner connection is bound to."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def add(self, path: str, peer: Peer) -> None:
        self._peers[path] = peer

    def remove(self, path: str) -> None:
        self._peers.pop(path, None)

    def lookup(self, grpc_peer: str) -> Peer | None:
        """Return the peer of a gRPC ``context.peer()`` string such as ``unix:/dir/api.sock.3``."""
        return self._peers.get(grpc_peer.removeprefix("unix:"))

    def __len__(self) -> int:
        return len(self._peers)


class RejectionLog:
    """Warns about rejected peers: the first time for each (host, reason), then a count every REPEAT seconds."""

    REPEAT = 300.0

    def __init__(self, setting: str, *, clock=time.monotonic):
        self.setting = setting
        self._clock = clock
        self._seen: dict[tuple[str, str], list] = {}

    def report(self, address: str, reason: str) -> None:
        host = address.rpartition(":")[0] or address
        key = (host, reason)
        now = self._clock()
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [now, 0]
            log.warning("%s: rejected a connection from %s: %s", self.setting, address, reason)
            return
        entry[1] += 1
        if now - entry[0] >= self.REPEAT:
            log.warning("%s: rejected %d more connections from %s in the last %.0f minutes: %s",
                        self.setting, entry[1], host, (now - entry[0]) / 60, reason)
            entry[0], entry[1] = now, 0


class Rejected(Exception):
    """A connection the gate does not let through; the message is the reason for the log."""


def _format_address(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_ip(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address[0].partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# OpenSSL verification results that mean the chain does not lead to the CA in use.
_FOREIGN_ISSUER_CODES = frozenset({2, 7, 18, 19, 20, 21})


def handshake_reason(error: BaseException, timeout: float = HANDSHAKE_TIMEOUT) -> str:
    """Explain a failed server-side TLS handshake in words an operator can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = f"the client certificate failed verification: {error.verify_message}"
        if error.verify_code in _FOREIGN_ISSUER_CODES:
            reason += " (it was not issued by this cluster's CA)"
        return reason
    if isinstance(error, TimeoutError):
        return f"no TLS handshake within {timeout:g}s"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client sent no certificate; give it one issued by the cluster CA"
        if "ALERT" in reason:
            alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
            return (f"the client rejected this listener's certificate (TLS alert: {alert}); check that it trusts "
                    "the cluster CA and dials an address named in the certificate")
        return f"TLS handshake failed: {reason.replace('_', ' ').lower() or error}"
    if isinstance(error, (ConnectionError, EOFError)):
        return ("the client closed the connection during the TLS handshake; it may not trust this listener's "
                "certificate: check its CA file and that it dials an address named in the certificate")
    return f"TLS handshake failed: {error}"


async def _peek_first_byte(sock: socket.socket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    readable = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        async with asyncio.timeout(timeout):
            await readable
    finally:
        loop.remove_reader(sock.fileno())
    return sock.recv(1, socket.MSG_PEEK)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()


class TlsGate:
    """Accepts the connections of one TCP listener and passes the admitted ones to `inner_socket`.

    `credentials` is None for a plaintext-only listener. `plaintext` lets
    plaintext peers in. `setting` names the listener in log lines.
    """

    def __init__(self, listen: str, inner_socket: str, registry: PeerRegistry, *, setting: str,
                 credentials: ServerCredentials | None, plaintext: bool, check_peer_address: bool = True,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_admitting: int = MAX_ADMITTING):
        self.listen = listen
        self.max_admitting = max_admitting
        self._admitting = 0
        self.inner_socket = inner_socket
        self.registry = registry
        self.setting = setting
        self.credentials = credentials
        self.plaintext = plaintext
        self.check_peer_address = check_peer_address
        self.handshake_timeout = handshake_timeout
        self.rejections = RejectionLog(setting)
        self._counter = itertools.count(1)
        self._socket: socket.socket | None = None
        self._connections: set[asyncio.Task] = set()

    def bind(self) -> int:
        """Bind and listen on `listen`; return the bound port. Raises OSError naming the setting."""
        host, port = _split_host_port(self.listen)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, kind, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and ipaddress.ip_address(address[0]).is_unspecified:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(address)
            listener.listen(128)
        except OSError as error:
            raise OSError(f"cannot listen on {self.setting} = {self.listen!r}: {error.strerror or error}; "
                          "is the address in use?") from None
        listener.setblocking(False)
        self._socket = listener
        return listener.getsockname()[1]

    async def serve(self) -> None:
        """Accept connections until cancelled; `bind` must have been called."""
        loop = asyncio.get_running_loop()
        assert self._socket is not None, "bind() first"
        try:
            while True:
                try:
                    connection, address = await loop.sock_accept(self._socket)
                except OSError as error:
                    # Out of file descriptors, for example: keep the listener and try again shortly.
                    log.error("%s: accepting a connection failed: %s", self.setting, error)
                    await asyncio.sleep(ACCEPT_RETRY)
                    continue
                if self._admitting >= self.max_admitting:
                    self.rejections.report(
                        _format_address(address),
                        f"{self.max_admitting} connections are already in their handshake, so this one was closed; "
                        "look for a client that opens connections without completing them")
                    connection.close()
                    continue
                task = loop.create_task(self._handle(connection, address))
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)
        finally:
            self._socket.close()
            for task in list(self._connections):
                task.cancel()

    async def _handle(self, connection: socket.socket, address) -> None:
        shown = _format_address(address)
        self._admitting += 1
        try:
            peer, reader, writer = await self._admit(connection, address, shown)
        except Rejected as refusal:
            self.rejections.report(shown, str(refusal))
            connection.close()
            return
        except Exception:
            connection.close()
            log.exception("%s: unexpected failure admitting %s", self.setting, shown)
            return
        finally:
            self._admitting -= 1
        if peer is None:
            connection.close()  # closed before sending anything
            return
        try:
            await self._forward(peer, reader, writer)
        except OSError as error:
            log.error("%s: cannot reach the gRPC server behind the listener for %s: %s", self.setting, shown, error)
        finally:
            writer.close()

    async def _admit(self, connection: socket.socket, address, shown: str):
        try:
            first = await _peek_first_byte(connection, self.handshake_timeout)
        except TimeoutError:
            raise Rejected(f"sent nothing within {self.handshake_timeout:g}s") from None
        except OSError as error:
            log.debug("%s: connection from %s failed before any data: %s", self.setting, shown, error)
            return None, None, None
        if not first:
            log.debug("%s: %s closed the connection without sending anything", self.setting, shown)
            return None, None, None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        if first[0] != TLS_HANDSHAKE_RECORD or self.credentials is None:
            if not self.plaintext:
                raise Rejected("the client speaks plaintext, but this listener requires TLS; give the client the "
                              "cluster CA and a certificate")
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, connection)
            return Peer(shown), reader, asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, connection, ssl=self.credentials.context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (ssl.SSLError, ConnectionError, EOFError, TimeoutError) as error:
            raise Rejected(handshake_reason(error, self.handshake_timeout)) from None
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            peer = await self._identify(transport, address, shown)
        except BaseException:
            # Abort, not close: the socket goes at once and is never closed twice.
            transport.abort()
            raise
        return peer, reader, writer

    async def _identify(self, transport, address, shown: str) -> Peer:
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        certificate = x509.load_der_x509_certificate(der)
        name, role = certificate_name(certificate), certificate_role(certificate)
        if role not in ROLES:
            raise Rejected(f"the certificate {name!r} carries no fleetkit role (found {role or 'none'!r}); issue it "
                          f"with fleetkit tls issue --role {'|'.join(ROLES)}")
        if role == "node" and self.check_peer_address and not await _names_address(certificate, address):
            raise Rejected(f"the node certificate {name!r} does not name {address[0]}, the address the "
                          "connection comes from; reissue it with --ip for that address, or set "
                          "tls.check_peer_address = false where addresses are translated")
        return Peer(shown, role=role, name=name)

    async def _forward(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = f"{self.inner_socket}.{next(self._counter)}"
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.bind(path)
            inner.setblocking(False)
            self.registry.add(path, peer)
            await asyncio.get_running_loop().sock_connect(inner, self.inner_socket)
        except OSError:
            inner.close()
            self.registry.remove(path)
            raise
        finally:
            # The server reads the bound name from the connection; the file itself is not needed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.debug("%s: admitted %s", self.setting, peer.describe())
        try:
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner, limit=CHUNK)
        except BaseException:
            inner.close()
            self.registry.remove(path)
            raise
        tasks = [asyncio.ensure_future(_pump(reader, inner_writer)), asyncio.ensure_future(_pump(inner_reader, writer))]
        try:
            _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                await asyncio.wait(pending, timeout=DRAIN_TIMEOUT)
        finally:
            for task in tasks:
                task.cancel()
            inner_writer.close()
            self.registry.remove(path)


async def _names_address(certificate: x509.Certificate, address) -> bool:
    """Return True when an IP SAN of `certificate`, or an address a DNS SAN resolves to, is the peer's."""
    peer = _peer_ip(address)
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if peer in sans.get_values_for_type(x509.IPAddress):
        return True
    loop = asyncio.get_running_loop()
    for name in sans.get_values_for_type(x509.DNSName):
        try:
            async with asyncio.timeout(2.0):
                found = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            continue
        if any(_peer_ip(item[4]) == peer for item in found):
            return True
    return False

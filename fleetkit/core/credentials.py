"""The certificates one daemon serves and dials with, reloaded when their files change.

`ListenerSecurity` describes how one gRPC listener accepts connections: with TLS
(`TlsFiles`), in plaintext (``insecure = true``), or both while a cluster
moves to TLS. `ServerCredentials` keeps the `ssl.SSLContext` that the
listener's `fleetkit.core.gate.TlsGate` hands to each new connection. Its
`reload` builds a new one from the files, so rotated certificates apply to
new connections, and open ones keep the context they started with. A
failed reload keeps the old context and logs why. Clients read the files
each time they open a channel (`channel_credentials`), so they pick up new
files on their next connection.

`ExpiryWarnings` logs certificates that expire within ``[tls]
expiry_warning``, at most once a day per file.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from fleetkit.core.config import Config, listener_tls_files
from fleetkit.core.durations import format_duration
from fleetkit.core.tls import TlsError

log = logging.getLogger(__name__)

# Seconds between two warnings about the same expiring certificate: one day.
EXPIRY_REPEAT = 86400.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signs peers, and this side's certificate and key."""

    ca: str
    cert: str
    key: str

    def paths(self) -> tuple[str, str, str]:
        return self.ca, self.cert, self.key


@dataclass(frozen=True)
class ListenerSecurity:
    """The security settings of one gRPC listener and of its clients.

    `setting` names the listener's config key, such as "transport.listen",
    for messages. `tls` is None when the listener is plaintext only.
    `plaintext` is True when ``insecure = true`` lets plaintext peers in.
    `role` is the role this side's certificate must carry to serve.
    """

    setting: str
    tls: TlsFiles | None
    plaintext: bool
    check_peer_address: bool = True
    role: str = "node"

    @classmethod
    def of(cls, config: Config, section: str) -> ListenerSecurity:
        """Return the security of listener `section` ("transport" or "api") of a validated config."""
        values = getattr(config, section)
        files = listener_tls_files(config.tls, values)
        tls = TlsFiles(files["ca"], files["cert"], files["key"]) if files["cert"] else None
        return cls(
            setting=f"{section}.listen", tls=tls, plaintext=values.insecure or tls is None,
            check_peer_address=config.tls.check_peer_address,
        )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"cannot read the {what} {path}: {error.strerror or error}; check the path and that "
                       "the daemon's user may read it") from None


def _load_files(context: ssl.SSLContext, files: TlsFiles, prefix: str = "") -> None:
    """Load the CA, certificate and key into `context`, raising TlsError that starts with `prefix` and names the file."""
    try:
        context.load_verify_locations(cafile=files.ca)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(f"{prefix}cannot load the CA file {files.ca}: {_ssl_reason(error)}") from None
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(f"{prefix}cannot use the certificate {files.cert} with the key {files.key}: "
                       f"{_ssl_reason(error)}; check that the key belongs to the certificate") from None


def check_client_files(files: TlsFiles) -> None:
    """Raise TlsError naming the file when the CA, certificate or key cannot be used, or do not belong together."""
    _load_files(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Read and check the files now and return credentials for one new client channel."""
    check_client_files(files)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca, "CA file"),
        private_key=_read(files.key, "key file"),
        certificate_chain=_read(files.cert, "certificate file"),
    )


def open_channel(address: str, security: ListenerSecurity, *, peer_tls: bool = True,
                 peer_plaintext: bool = True) -> grpc.aio.Channel:
    """Open a client channel to a peer's listener at `address`, with this side's certificate when possible.

    TLS is used when this side has certificates and the peer accepts TLS;
    plaintext only when both sides allow it. Raises TlsError naming the
    setting to change when the two sides have no way in common.
    """
    if security.tls is not None and peer_tls:
        return grpc.aio.secure_channel(address, channel_credentials(security.tls))
    if security.plaintext and peer_plaintext:
        return grpc.aio.insecure_channel(address)
    section = security.setting.partition(".")[0]
    if security.tls is None:
        raise TlsError(f"{address} accepts TLS connections only and {section} has no certificate here; set "
                       "tls.ca, tls.cert and tls.key")
    raise TlsError(f"{address} accepts plaintext connections only and this node requires TLS; give that node "
                   f"certificates, or set {section}.insecure = true here while the cluster moves to TLS")


def load_certificate(path: str) -> x509.Certificate:
    """Read the first PEM certificate of `path`, raising TlsError that names the file."""
    data = _read(path, "certificate file")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise TlsError(f"{path} is not a PEM certificate ({error}); give the file written by fleetkit tls "
                       "issue") from None


def certificate_role(certificate: x509.Certificate) -> str:
    """Return a certificate's fleetkit role: its subject's organizational unit, or ""."""
    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if units else ""


def certificate_name(certificate: x509.Certificate) -> str:
    """Return a certificate's common name, or its whole subject when it has none."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def _server_context(files: TlsFiles, setting: str, role: str) -> ssl.SSLContext:
    certificate = load_certificate(files.cert)
    found = certificate_role(certificate)
    if found != role:
        raise TlsError(f"{setting}: the certificate {files.cert} has role {found or 'none'!r}, but a listener "
                       f"serves with a {role} certificate; issue one with fleetkit tls issue --role {role}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    # gRPC clients insist on HTTP/2 being chosen by ALPN.
    context.set_alpn_protocols(["h2"])
    _load_files(context, files, prefix=f"{setting}: ")
    return context


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.replace("_", " ").lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _stamp(paths: Iterable[str]) -> tuple:
    stamps = []
    for path in paths:
        try:
            status = os.stat(path)
            stamps.append((path, status.st_mtime_ns, status.st_size, status.st_ino))
        except OSError:
            stamps.append((path, None, None, None))
    return tuple(stamps)


class ServerCredentials:
    """The TLS context of one listener, rebuilt when its files change.

    Construction loads the files and raises TlsError naming the file and the
    fix when they do not make a working server context.
    """

    def __init__(self, files: TlsFiles, setting: str, role: str = "node"):
        self.files = files
        self.setting = setting
        self.role = role
        self._stamp = _stamp(files.paths())
        self.context = _server_context(files, setting, role)
        self.certificate = load_certificate(files.cert)

    def reload(self, reason: str) -> bool:
        """Build a new context from the files; keep the current one if that fails. Return True on change."""
        stamp = _stamp(self.files.paths())
        try:
            context = _server_context(self.files, self.setting, self.role)
            certificate = load_certificate(self.files.cert)
        except TlsError as error:
            if stamp != self._stamp:
                log.error("%s: keeping the certificates in use, the new files do not load: %s", self.setting, error)
                self._stamp = stamp
            return False
        self._stamp = stamp
        self.context, self.certificate = context, certificate
        log.info("%s: loaded certificate %r (expires %s) for new connections (%s)", self.setting,
                 certificate_name(certificate), certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
                 reason)
        return True

    def reload_if_changed(self) -> bool:
        """Reload when a file's size, time or inode changed since the last load."""
        if _stamp(self.files.paths()) == self._stamp:
            return False
        return self.reload("the files changed")


class ExpiryWarnings:
    """Logs each certificate file that expires within `window` seconds, at most once a day per file."""

    def __init__(self, window: float, *, clock=time.monotonic):
        self.window = window
        self._clock = clock
        self._last: dict[str, tuple[float, datetime.datetime]] = {}

    def check(self, paths: Iterable[str], now: datetime.datetime | None = None) -> list[str]:
        """Log and return warnings for the certificates in `paths` that expire soon or have expired."""
        warnings = []
        for path in dict.fromkeys(paths):
            try:
                certificate = load_certificate(path)
            except TlsError as error:
                log.debug("cannot check the expiry of %s: %s", path, error)
                continue
            message = expiry_warning(path, certificate, self.window, now)
            if message is None:
                continue
            expires = certificate.not_valid_after_utc
            last = self._last.get(path)
            if last is not None and last[1] == expires and self._clock() - last[0] < EXPIRY_REPEAT:
                continue
            self._last[path] = (self._clock(), expires)
            log.warning("%s", message)
            warnings.append(message)
        return warnings


def expiry_warning(path: str, certificate: x509.Certificate, window: float,
                   now: datetime.datetime | None = None) -> str | None:
    """Return the warning for a certificate that expires within `window` seconds or has expired, else None."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    expires = certificate.not_valid_after_utc
    left = (expires - now).total_seconds()
    if left > window:
        return None
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        message = f"certificate {path} ({certificate_name(certificate)!r}) expired on {when}"
    else:
        message = (f"certificate {path} ({certificate_name(certificate)!r}) expires in "
                   f"{format_duration(_round_left(left))}, on {when}")
    return message + "; issue a new one with fleetkit tls issue and replace the file, which the daemon reloads"


def certificate_problems(config: Config) -> tuple[list[str], list[str]]:
    """Load the certificates of a validated config as the daemon will; return (problems, expiry warnings)."""
    problems: list[str] = []
    warnings: list[str] = []
    for section in ("transport", "api"):
        security = ListenerSecurity.of(config, section)
        if security.tls is None or getattr(config, section).listen.startswith("unix://"):
            continue
        try:
            credentials = ServerCredentials(security.tls, security.setting, security.role)
        except TlsError as error:
            problems.append(str(error))
            continue
        name = certificate_name(credentials.certificate)
        if config.tls.check_machine_name and name != config.node.name:
            problems.append(f"{security.setting}: the certificate {security.tls.cert} is named {name!r}, but "
                            f"node.name is {config.node.name!r}; with tls.check_machine_name an agent may only "
                            f"connect as the machine its certificate names, so issue it with --name "
                            f"{config.node.name}, or set node.name = {name!r}")
        for path in (security.tls.cert, security.tls.ca):
            try:
                certificate = load_certificate(path)
            except TlsError as error:
                problems.append(f"{security.setting}: {error}")
                continue
            message = expiry_warning(path, certificate, config.tls.expiry_warning)
            if message is not None and message not in warnings:
                warnings.append(message)
    return list(dict.fromkeys(problems)), warnings


def _round_left(seconds: float) -> float:
    """Round a remaining time to whole hours, or whole minutes below an hour, for messages."""
    unit = 3600 if seconds >= 3600 else 60
    return max(unit, round(seconds / unit) * unit)


def earliest_expiry(paths: Iterable[str]) -> datetime.datetime | None:
    """Return the earliest expiry among the readable certificates in `paths`."""
    found = []
    for path in paths:
        try:
            found.append(load_certificate(path).not_valid_after_utc)
        except TlsError:
            continue
    return min(found, default=None)

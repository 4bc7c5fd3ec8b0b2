"""Certificates for a fleetkit cluster: a cluster CA, node and client certificates, and their roles.

Built on `cryptography`. Keys are ECDSA P-256. A certificate's role is its
subject's organizational unit (``OU``): ``node`` for daemons (engine–agent
transport), ``admin`` for clients of the control API, ``read-only`` for
clients that may only list and show. Private keys are written with mode
0600, and no file is overwritten unless asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetkit.core.errors import FleetkitError

ROLES = ("node", "admin", "read-only")
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"


class TlsError(FleetkitError):
    """A certificate or key could not be made, read or written."""


@dataclass(frozen=True)
class CertificateInfo:
    """What `describe` reports about a certificate."""

    subject: str
    issuer: str
    role: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool

    def days_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise TlsError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    )


_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _check_days(days: int) -> None:
    if days < 1:
        raise TlsError(f"--days {days} is invalid; a certificate must be valid for at least 1 day")


def _check_common_name(name: str, what: str) -> None:
    if not 1 <= len(name) <= 64:
        raise TlsError(f"--name {name!r} is invalid; {what} needs 1 to 64 characters")


def init_ca(directory: Path, *, name: str = "fleetkit cluster CA", days: int = 3650, force: bool = False) -> Path:
    """Create a cluster CA in `directory` (``ca.pem``, ``ca-key.pem``) and return the certificate's path."""
    _check_days(days)
    _check_common_name(name, "a CA name")
    for path in (directory / CA_CERT, directory / CA_KEY):
        if path.exists() and not force:
            raise TlsError(f"{path} already exists; pass --force to replace the CA (every certificate it signed "
                           "then needs to be issued again)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _key_pem(key), private=True, force=force)
    _write(directory / CA_CERT, certificate.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return directory / CA_CERT


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        certificate = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as error:
        raise TlsError(f"no cluster CA in {directory} ({error.filename} not found); create one with "
                       f"fleetkit tls init-ca --dir {directory}") from None
    except ValueError as error:
        raise TlsError(f"the CA in {directory} cannot be read: {error}") from error
    return certificate, key


def issue(
    ca_directory: Path,
    out_directory: Path,
    *,
    name: str,
    role: str,
    ips: list[str],
    dns: list[str],
    days: int = 365,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue a certificate and key for `name` with `role`, signed by the CA; return their paths."""
    if role not in ROLES:
        raise TlsError(f"role {role!r} is unknown; use one of {', '.join(ROLES)}")
    if not _FILE_NAME.fullmatch(name):
        raise TlsError(f"--name {name!r} is invalid; it also names the files NAME.pem and NAME-key.pem, so use 1 to "
                       "64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    _check_days(days)
    addresses = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise TlsError(f"--ip {text!r} is not an IP address; give names with --dns") from None
        if address.is_unspecified:
            raise TlsError(f"--ip {text} is invalid: an unspecified address is never dialled, so give the machine's "
                           "own address")
        addresses.append(address)
    for text in dns:
        if len(text) > 253 or not _DNS_NAME.fullmatch(text):
            raise TlsError(f"--dns {text!r} is not a DNS name; use letters, digits, '-' and dots, such as "
                           "web-1.example.com")
    if role == "node" and not (addresses or dns):
        raise TlsError("a node certificate needs the addresses other machines dial: pass --ip and/or --dns")
    cert_path, key_path = out_directory / f"{name}.pem", out_directory / f"{name}-key.pem"
    for path in (cert_path, key_path):
        if path.exists() and not force:
            raise TlsError(f"{path} already exists; pass --force to overwrite it")

    ca_certificate, ca_key = _load_ca(ca_directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role == "node" else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]))
        .issuer_name(ca_certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    names = [x509.DNSName(value) for value in dns] + [x509.IPAddress(value) for value in addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    _write(key_path, _key_pem(key), private=True, force=force)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return cert_path, key_path


def describe(path: Path) -> CertificateInfo:
    """Read a PEM certificate and return its subject, role, SANs and validity."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise TlsError(f"{path} not found") from None
    except ValueError as error:
        raise TlsError(f"{path} is not a PEM certificate: {error}") from error
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(sans.get_values_for_type(x509.DNSName))
        ip_addresses = tuple(str(value) for value in sans.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ip_addresses = (), ()
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = "ca" if is_ca else (units[0].value if units else "")
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(), issuer=certificate.issuer.rfc4514_string(), role=role,
        dns_names=dns_names, ip_addresses=ip_addresses, not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc, is_ca=is_ca,
    )

"""Throw-away redis servers for tests, and the conformance harness of the redis backend.

`RedisServer` runs one redis-server on 127.0.0.1 with a free port, its data
and log in a directory of its own. By default it writes every change to an
append-only file before it replies (``appendfsync always``), so it can be
killed with SIGKILL and restarted on the same port without losing anything.
With `persistent=False` the data lives in memory only. It can require a password
and serve TLS. It only ever signals the process it started.

`RedisHarness` is the `StoreHarness` of the conformance suite, and
`RedisTlsHarness` the same over TLS with a password. The fixture
`redis_server_factory` builds servers owned by one test, and
`write_tls_files` writes the certificates of a TLS server.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ClassVar

import pytest
import pytest_asyncio
import redis.asyncio
import redis.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetkit.core.config import StorageConfig
from fleetkit.core.netinfo import free_port  # noqa: F401 - also imported from here
from fleetkit.core.storage import Storage
from fleetkit.core.tls import init_ca, issue
from fleetkit.testing import logscan
from fleetkit.testing.conformance import StoreHarness

log = logging.getLogger(__name__)

REDIS_BINARY_ENV = "FLEETKIT_REDIS_BINARY"
DEFAULT_BINARY = "/usr/bin/redis-server"
# Seconds; short so that the paused-server tests stay quick, long enough for a loaded CI machine.
DIAL_TIMEOUT = 2.0
REQUEST_TIMEOUT = 2.0


def find_redis_binary() -> str | None:
    """Return the redis-server executable: $FLEETKIT_REDIS_BINARY, /usr/bin/redis-server or one on PATH."""
    configured = os.environ.get(REDIS_BINARY_ENV)
    if configured:
        return configured
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server on loopback, restartable on the same port and data directory.

    `tls` is a tuple of (certificate, key, CA certificate) files; the server
    then speaks TLS only and does not ask clients for certificates. With
    `unix_socket`, it also listens on `socket_path`.
    """

    def __init__(self, directory: Path, *, password: str = "", persistent: bool = True,
                 tls: tuple[Path, Path, Path] | None = None, unix_socket: bool = False, binary: str | None = None):
        found = binary or find_redis_binary()
        if found is None:
            raise RuntimeError(f"redis-server not found; install redis or set {REDIS_BINARY_ENV}")
        self.binary = found
        self.directory = Path(directory)
        self.password = password
        logscan.register_secret(password)
        self.persistent = persistent
        self.tls = tls
        self.unix_socket = unix_socket
        self.socket_path = self.directory / "redis.sock"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The endpoint URL without password, such as ``redis://127.0.0.1:40123/0``."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "--bind", self.host,
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--save", "",
            "--daemonize", "no",
            "--enable-debug-command", "no",
        ]
        if self.persistent:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.unix_socket:
            command += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.tls:
            cert, key, ca = self.tls
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            command += ["--port", str(self.port)]
        return command

    async def start(self, timeout: float = 15.0) -> None:
        """Start redis-server and wait until it replies to PING, which it does once its data is loaded."""
        if self.running:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT)
        log.info("started redis-server pid %d on %s", self._process.pid, self.url)
        try:
            async with asyncio.timeout(timeout):
                while not await self._responds():
                    if not self.running:
                        raise RuntimeError(f"redis-server exited during start-up; log:\n{self.log_tail()}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            await self.kill()
            raise RuntimeError(f"redis-server on {self.url} did not respond to PING within {timeout}s; log:\n{self.log_tail()}") from None

    async def _responds(self) -> bool:
        client = self.client()
        try:
            async with asyncio.timeout(1.0):
                return bool(await client.ping())
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            return False
        finally:
            await client.aclose()

    def client(self) -> redis.asyncio.Redis:
        """Return a plain redis-py client of this server, for setting up and inspecting tests."""
        options: dict = {"password": self.password or None, "socket_timeout": 5.0, "socket_connect_timeout": 1.0}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls[2]))
        return redis.asyncio.Redis(host=self.host, port=self.port, **options)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop redis-server with SIGTERM, or SIGKILL when it does not exit within `timeout` seconds."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a stopped process must run to handle SIGTERM
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, timeout)
        self._process = None

    async def kill(self) -> None:
        """Kill redis-server with SIGKILL, as a crash would, and reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait, 10.0)
        self._process = None

    def pause(self) -> None:
        """Freeze redis-server with SIGSTOP: connections stay open, and requests get no reply."""
        if self.running:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused redis-server with SIGCONT."""
        if self.running:
            os.kill(self._process.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RedisHarness(StoreHarness):
    """A persistent redis-server on 127.0.0.1 with a free port, its data under the harness directory."""

    backend = "redis"
    durable = True
    # Whether the server speaks TLS only and requires a password (a random one unless `password` is given).
    tls: ClassVar[bool] = False

    def __init__(self, directory: Path, *, password: str = ""):
        super().__init__(directory)
        server_tls = None
        if self.tls:
            password = password or secrets.token_urlsafe(18)
            server_tls = _write_server_tls(self.directory / "tls")
        self.server = RedisServer(self.directory / "data", password=password, tls=server_tls)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def kill(self) -> None:
        await self.server.kill()

    async def restart(self) -> None:
        await self.server.start()

    async def pause(self) -> None:
        self.server.pause()

    async def resume(self) -> None:
        self.server.resume()

    def storage_config(self, prefix: str) -> StorageConfig:
        ca_file = str(self.server.tls[2]) if self.server.tls else ""
        return StorageConfig(backend=self.backend, endpoints=(self.server.url,), prefix=prefix,
                             password=self.server.password, ca_file=ca_file,
                             dial_timeout=DIAL_TIMEOUT, request_timeout=REQUEST_TIMEOUT)

    async def lose_history(self, storage: Storage) -> int:
        """Trim the change stream of `storage`'s prefix to nothing and return the store revision."""
        keys = storage.keys  # a RedisStorage
        client = self.server.client()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT * 5):
                await client.xtrim(keys.changes, maxlen=0, approximate=False)
                revision = await client.hget(keys.meta, "revision")
        finally:
            await client.aclose()
        return int(revision or 0)


class RedisTlsHarness(RedisHarness):
    """A `RedisHarness` whose server speaks TLS only, with a certificate of a test CA, and requires a password."""

    tls = True


def _write_server_tls(directory: Path) -> tuple[Path, Path, Path]:
    """Create a CA with `fleetkit.core.tls` and a server certificate for 127.0.0.1; return (cert, key, CA)."""
    ca_file = init_ca(directory / "ca", name="redis test CA", days=2)
    cert, key = issue(directory / "ca", directory, name="redis-server", role="node", ips=["127.0.0.1"], dns=[],
                      days=2)
    return cert, key, ca_file


def _certificate(name: str, key, issuer_name: str, issuer_key, *, ca: bool) -> x509.Certificate:
    """Return a certificate for `name` signed with `issuer_key`; a non-CA certificate is valid for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_tls_files(directory: Path) -> tuple[Path, Path, Path, Path]:
    """Write a CA, a server certificate and key it signed, and an unrelated CA; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    paths = [directory / name for name in ("ca.pem", "server.pem", "server-key.pem", "other-ca.pem")]
    paths[0].write_bytes(_certificate("test ca", ca_key, "test ca", ca_key, ca=True).public_bytes(pem))
    paths[1].write_bytes(_certificate("127.0.0.1", server_key, "test ca", ca_key, ca=False).public_bytes(pem))
    paths[2].write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    paths[3].write_bytes(_certificate("other ca", other_key, "other ca", other_key, ca=True).public_bytes(pem))
    return paths[0], paths[1], paths[2], paths[3]


@pytest_asyncio.fixture
async def redis_server_factory() -> AsyncIterator[Callable[..., object]]:
    """Yield ``make(**options)``, an async function that starts a `RedisServer` owned by the calling test.

    Options are those of `RedisServer`. Every server is stopped afterwards.
    """
    if find_redis_binary() is None:
        pytest.skip(f"redis-server not found; install redis or set {REDIS_BINARY_ENV}")
    # Short path: unix socket addresses are limited to about 100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="fkredis-"))
    servers: list[RedisServer] = []

    async def make(**options) -> RedisServer:
        server = RedisServer(directory / f"r{len(servers)}", **options)
        servers.append(server)
        await server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.stop()
        shutil.rmtree(directory, ignore_errors=True)

"""A throw-away etcd server for tests, plus pytest fixtures.

`EtcdServer` runs one single-member etcd on 127.0.0.1 with free client and
peer ports and its own data directory. It can be stopped, killed with
SIGKILL, paused and restarted on the same ports and data, which is what the
reconnect and fencing tests need. It only ever signals the process it started.
Given `EtcdTlsFiles` (see `write_tls_files`), it serves clients over TLS
only, at ``https://127.0.0.1:PORT``, and requires a client certificate signed
by the test CA (``--client-cert-auth``); the peer URL stays plain http on
loopback, since a single member has no peers to talk to.

Fixtures: `etcd_server` is one server shared by a whole test session.
`etcd_storage` is a connected `Etcd3Storage` on that server, under a key
prefix unique to the test. `etcd_factory` builds servers owned by one test,
for tests that kill or pause etcd. Load them with
``pytest_plugins = ["fleetkit.testing.etcd"]`` in a conftest, or import the
fixture names into a test module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from fleetkit.core.tls import init_ca, issue
from fleetkit.plugins.etcd3 import Etcd3Storage
from fleetkit.core.netinfo import free_port  # noqa: F401 - also imported from here

log = logging.getLogger(__name__)

ETCD_BINARY_ENV = "FLEETKIT_ETCD_BINARY"
DEFAULT_BINARY = "/usr/bin/etcd"


def find_etcd_binary() -> str | None:
    """Return the etcd executable: $FLEETKIT_ETCD_BINARY, /usr/bin/etcd or etcd on PATH."""
    configured = os.environ.get(ETCD_BINARY_ENV)
    if configured:
        return configured
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("etcd")


@dataclass(frozen=True)
class EtcdTlsFiles:
    """A test CA and the certificates it signed for an etcd server and for its client, as PEM files."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def write_tls_files(directory: Path) -> EtcdTlsFiles:
    """Create a CA in `directory` and issue etcd's and a client's certificates, both valid for 127.0.0.1.

    Both certificates have the role "node", whose extended key usage allows
    server and client authentication alike.
    """
    ca_directory = directory / "ca"
    ca_file = init_ca(ca_directory, name="etcd test CA", days=2)
    server_cert, server_key = issue(ca_directory, directory, name="etcd-server", role="node",
                                    ips=["127.0.0.1"], dns=[], days=2)
    client_cert, client_key = issue(ca_directory, directory, name="fleetkit-client", role="node",
                                    ips=["127.0.0.1"], dns=[], days=2)
    return EtcdTlsFiles(ca_file, server_cert, server_key, client_cert, client_key)


class EtcdServer:
    """One etcd process on loopback, restartable on the same ports and data directory.

    With `tls`, clients must connect over TLS and present a certificate signed by `tls.ca_file`.
    """

    def __init__(self, data_dir: Path, *, binary: str | None = None, name: str = "fleetkit-test",
                 tls: EtcdTlsFiles | None = None):
        found = binary or find_etcd_binary()
        if found is None:
            raise RuntimeError(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")
        self.binary = found
        self.name = name
        self.data_dir = Path(data_dir)
        self.host = "127.0.0.1"
        self.client_port = free_port(self.host)
        self.peer_port = free_port(self.host)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        """The URL clients connect to, such as ``http://127.0.0.1:23791`` (``https://`` with TLS)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """The process id while the server runs, else None."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self.tls:
            command += [
                "--client-cert-auth",
                "--trusted-ca-file", str(self.tls.ca_file),
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
            ]
        return command

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until /health reports a leader.

        Raises RuntimeError with the tail of etcd's log when it exits or stays
        unhealthy for `timeout` seconds.
        """
        if self.running:
            return
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        log.info("started etcd pid %d at %s", self._process.pid, self.client_url)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"etcd exited during start-up; log:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"etcd at {self.client_url} not healthy after {timeout}s; log:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Return True when etcd's /health endpoint reports a leader."""
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0, context=context) as response:
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd with SIGTERM, or SIGKILL when it does not exit within `timeout` seconds."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            # A stopped process must be continued, or SIGTERM waits forever.
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._process = None

    def kill(self) -> None:
        """Kill etcd with SIGKILL, as a crash would, and reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(10.0)
        self._process = None

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP, so connections stay open but requests time out."""
        if self.running:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused etcd with SIGCONT."""
        if self.running:
            os.kill(self._process.pid, signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop etcd if it runs, then start it again on the same ports and data directory."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """Start one etcd for the whole session; tests must not stop or kill it."""
    if find_etcd_binary() is None:
        pytest.skip(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")
    with tempfile.TemporaryDirectory(prefix="fleetkit-etcd-") as tmp:
        server = EtcdServer(Path(tmp) / "data")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[[], EtcdServer]]:
    """Build started etcd servers owned by the calling test; all are stopped afterwards."""
    if find_etcd_binary() is None:
        pytest.skip(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")
    servers: list[EtcdServer] = []

    def make() -> EtcdServer:
        server = EtcdServer(tmp_path / f"etcd{len(servers)}")
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest_asyncio.fixture
async def etcd_storage(etcd_server: EtcdServer) -> AsyncIterator[Etcd3Storage]:
    """Connect an `Etcd3Storage` to the shared server, under a prefix unique to this test."""
    storage = Etcd3Storage([etcd_server.client_url], prefix=f"/fleetkit-test/{uuid.uuid4().hex}/")
    await storage.connect()
    try:
        yield storage
    finally:
        await storage.close()

"""The conformance harnesses of the etcd3 backend: one throw-away etcd per test.

`Etcd3Harness` runs an `EtcdServer` with short raft timings, so that a
single-member etcd elects itself in about 0.1 s instead of a second, and
discards history with etcd's compaction. `Etcd3TlsHarness` is the same
server serving clients over TLS only and requiring client certificates; its
`storage_config` has https endpoints and the CA, certificate and key files.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

from aetcd import rpc

from fleetkit.core.config import StorageConfig
from fleetkit.core.storage import Storage
from fleetkit.plugins.etcd3_endpoints import TlsFiles, open_channel, parse_endpoint
from fleetkit.testing.conformance import StoreHarness
from fleetkit.testing.conformance_support import wait_until
from fleetkit.testing.etcd import EtcdServer, write_tls_files

# Seconds; short so that the paused-server test stays quick, long enough for a loaded CI machine.
DIAL_TIMEOUT = 2.0
REQUEST_TIMEOUT = 2.0


async def _all_threads_stopped(pid: int) -> bool:
    """Return True when every thread of process `pid` is in the stopped state (or the process is gone)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        # The state is the field after the parenthesised command name.
        states = [(task / "stat").read_text().rpartition(")")[2].split()[0] for task in tasks]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return all(state in ("T", "t") for state in states)


class _QuickEtcdServer(EtcdServer):
    """An EtcdServer whose only member becomes leader within about 100 ms."""

    def _command(self) -> list[str]:
        # With one member no peer can miss heartbeats, so short timings cost nothing.
        return [*super()._command(), "--heartbeat-interval", "10", "--election-timeout", "100"]


class Etcd3Harness(StoreHarness):
    """A single-member etcd on 127.0.0.1 with free ports, its data under the harness directory."""

    backend = "etcd3"
    durable = True
    # Whether etcd serves TLS and requires client certificates.
    tls: ClassVar[bool] = False

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.tls_files = write_tls_files(self.directory / "tls") if self.tls else None
        self.server = _QuickEtcdServer(self.directory / "data", tls=self.tls_files)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)

    async def kill(self) -> None:
        await asyncio.to_thread(self.server.kill)

    async def restart(self) -> None:
        await asyncio.to_thread(self.server.restart)

    async def pause(self) -> None:
        """Send SIGSTOP and return once every thread of etcd has stopped.

        SIGSTOP takes effect asynchronously: without the wait, a thread still
        running on another CPU can serve one more request.
        """
        self.server.pause()
        pid = self.server.pid
        if pid is not None:
            await wait_until(lambda: _all_threads_stopped(pid), timeout=5.0, interval=0.01,
                             what=f"SIGSTOP of etcd pid {pid}")

    async def resume(self) -> None:
        self.server.resume()

    def storage_config(self, prefix: str) -> StorageConfig:
        files = self.tls_files
        return StorageConfig(
            backend=self.backend, endpoints=(self.server.client_url,), prefix=prefix,
            ca_file=str(files.ca_file) if files else "",
            cert_file=str(files.client_cert) if files else "",
            key_file=str(files.client_key) if files else "",
            dial_timeout=DIAL_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
        )

    async def lose_history(self, storage: Storage) -> int:
        """Compact etcd up to its current revision, waiting until the compaction is applied."""
        _, revision = await storage.list("")
        config = self.storage_config("/")
        channel = open_channel(parse_endpoint(self.server.client_url),
                               TlsFiles(config.ca_file, config.cert_file, config.key_file))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT * 5):
                await rpc.KVStub(channel).Compact(rpc.CompactionRequest(revision=revision, physical=True))
        finally:
            await channel.close()
        return revision


class Etcd3TlsHarness(Etcd3Harness):
    """An `Etcd3Harness` whose etcd accepts only TLS clients with a certificate signed by its test CA."""

    tls = True

"""The conformance harness of the etcd2 backend: one throw-away etcd with the v2 API per test.

`Etcd2Harness` runs an `EtcdServer` started with ``--enable-v2`` and short
raft timings. etcd's v2 API keeps only the last 1000 events and has no
compaction call, so `lose_history` pushes older events out of that window by
writing more than 1000 changes to a key outside every test prefix.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from fleetkit.core.config import StorageConfig
from fleetkit.core.storage import Storage
from fleetkit.testing.conformance import StoreHarness
from fleetkit.testing.etcd import EtcdServer

# Seconds; short so that the paused-server test stays quick, long enough for a loaded CI machine.
DIAL_TIMEOUT = 2.0
REQUEST_TIMEOUT = 2.0

# etcd's v2 event window, the writes that push a revision out of it, and how many run at once.
V2_HISTORY = 1000
FILLER_KEY = "/fleetkit-history-filler/k"
FILLER_CONCURRENCY = 32


class V2EtcdServer(EtcdServer):
    """An EtcdServer that serves the v2 API and whose only member becomes leader within about 100 ms."""

    def _command(self) -> list[str]:
        # With one member no peer can miss heartbeats, so short timings cost nothing.
        return [*super()._command(), "--enable-v2", "--heartbeat-interval", "10", "--election-timeout", "100"]


class Etcd2Harness(StoreHarness):
    """A single-member etcd with the v2 API on 127.0.0.1 with free ports, its data under the harness directory."""

    backend = "etcd2"
    durable = True

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.server = V2EtcdServer(self.directory / "data")

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)

    async def kill(self) -> None:
        await asyncio.to_thread(self.server.kill)

    async def restart(self) -> None:
        await asyncio.to_thread(self.server.restart)

    async def pause(self) -> None:
        self.server.pause()

    async def resume(self) -> None:
        self.server.resume()

    def storage_config(self, prefix: str) -> StorageConfig:
        return StorageConfig(backend=self.backend, endpoints=(self.server.client_url,), prefix=prefix,
                             dial_timeout=DIAL_TIMEOUT, request_timeout=REQUEST_TIMEOUT)

    async def lose_history(self, storage: Storage) -> int:
        """Write more than 1000 changes elsewhere until etcd's event window no longer contains the current revision."""
        _, before = await storage.list("")
        url = f"{self.server.client_url}/v2/keys{FILLER_KEY}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT * 5)) as session:
            for _ in range(3):
                await self._fill(session, url, V2_HISTORY + 1)
                if await self._cleared(session, url, before):
                    break
            else:
                raise RuntimeError(f"etcd at {self.server.client_url} still keeps revision {before} in its event window "
                                   f"after {3 * (V2_HISTORY + 1)} writes")
        _, revision = await storage.list("")
        return revision

    @staticmethod
    async def _fill(session: aiohttp.ClientSession, url: str, count: int) -> None:
        gate = asyncio.Semaphore(FILLER_CONCURRENCY)

        async def one(number: int) -> None:
            async with gate:
                async with session.put(url, data={"value": str(number)}) as response:
                    response.raise_for_status()

        await asyncio.gather(*(one(number) for number in range(count)))

    @staticmethod
    async def _cleared(session: aiohttp.ClientSession, url: str, revision: int) -> bool:
        """Return True when etcd rejects a watch from `revision` with "event index cleared" (errorCode 401)."""
        params = {"wait": "true", "waitIndex": str(max(revision, 1))}
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async with session.get(url, params=params) as response:
                # etcd responds at once either way: with the error, or with a filler event still in the window.
                body = await response.json(content_type=None)
        return body.get("errorCode") == 401

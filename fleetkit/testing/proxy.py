"""A TCP proxy on loopback that a test can cut and restore, to make a port unreachable on demand."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port` while open."""

    def __init__(self, port: int, target_port: int):
        self.port = port
        self.target_port = target_port
        self._server: asyncio.base_events.Server | None = None
        self._pairs: set[asyncio.Task] = set()

    async def open(self) -> None:
        """Start accepting connections (again) on the same port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        """Stop accepting and break every forwarded connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._pairs):
            task.cancel()
        for task in list(self._pairs):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._pairs.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._pairs.discard(task)
            return
        try:
            await asyncio.gather(self._pump(reader, upstream_writer), self._pump(upstream_reader, writer))
        finally:
            for stream in (writer, upstream_writer):
                stream.close()
            self._pairs.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()

"""The ``hybrid`` transport: speaks both ``grpc`` and ``etcd-watch``, for migrating a live cluster.

The leader serves agents of both kinds at once, so their states appear
together. An agent uses gRPC when the leader's node record shows that it
runs gRPC and a stream works; when gRPC keeps failing (refused, timed out,
blocked) for ``[transport] fallback_after``, the agent takes its work from
storage instead, keeps probing gRPC with backoff, and returns to it once a
connection works. Every fallback and return is logged with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import grpc

from fleetkit.core.agent import Agent
from fleetkit.core.election import LeaderRecord, read_leader
from fleetkit.core.errors import StorageError, TransportError
from fleetkit.core.nodes import read_nodes
from fleetkit.core.tls import TlsError
from fleetkit.core.transport import EngineHost, Transport
from fleetkit.plugins.etcd_watch import EtcdWatchTransport
from fleetkit.plugins.grpc_transport import GrpcTransport

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
LEADER_RECHECK = 5.0
GRPC_MODES = frozenset({"grpc", "hybrid"})


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


class HybridTransport(Transport):
    """Both transports at once; see the module docstring."""

    name = "hybrid"
    speaks = ("etcd-watch", "hybrid", "grpc")
    serves_grpc = True
    required_capabilities = EtcdWatchTransport.required_capabilities | GrpcTransport.required_capabilities

    def __init__(self, config, storage):
        super().__init__(config, storage)
        self._grpc = GrpcTransport(config, storage)
        self._watch = EtcdWatchTransport(config, storage)

    async def serve(self, host: EngineHost) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._grpc.serve(host))
            group.create_task(self._watch.serve(host))

    # -- agent side --------------------------------------------------------

    async def run_agent(self, agent: Agent) -> None:
        await agent.wait_adopted()
        while True:
            try:
                _record, offers_grpc = await self._leader()
            except (StorageError, TransportError) as error:
                log.warning("agent cannot find the leader, retrying: %s", error)
                await asyncio.sleep(1.0)
                continue
            if not offers_grpc:
                await self._storage_until(agent, self._leader_offers_grpc, "the leader does not speak gRPC")
                continue
            failure = await self._try_grpc(agent)
            if failure:
                log.warning(
                    "falling back to storage: gRPC to the leader failed for %.1fs (%s)",
                    self.config.transport.fallback_after, failure,
                )
                await self._storage_until(agent, self._grpc_works, failure)
                log.info("returning to gRPC: the leader answers again")

    async def _leader(self) -> tuple[LeaderRecord, bool]:
        found = await read_leader(self.storage)
        if found is None:
            raise TransportError("no leader is elected yet")
        record, _revision = found
        nodes = await read_nodes(self.storage)
        node = nodes.get(record.machine)
        offers = node is None or node.mode in GRPC_MODES
        return record, offers

    async def _leader_offers_grpc(self) -> bool:
        try:
            _record, offers = await self._leader()
        except (StorageError, TransportError):
            return False
        return offers

    async def _try_grpc(self, agent: Agent) -> str:
        """Run gRPC sessions with the current leader until none works for `fallback_after`; return the failure.

        Returns "" after a session that connected and later ended, so the
        caller looks for the leader again.
        """
        window = self.config.transport.fallback_after
        delay = BACKOFF_INITIAL
        failing_since = time.monotonic()
        failure = ""
        while time.monotonic() - failing_since < window:
            connected = False

            def on_connected() -> None:
                nonlocal connected
                connected = True

            try:
                leader, offers = await self._leader()
                if not offers:
                    return ""
                remaining = max(0.1, window - (time.monotonic() - failing_since))
                await self._grpc._session(agent, leader, snapshot_timeout=remaining, on_connected=on_connected)
                failure = "the leader ended the stream"
            except (TransportError, StorageError, TlsError, grpc.aio.AioRpcError, TimeoutError) as error:
                failure = _describe(error)
            if connected:
                return ""
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(BACKOFF_MAX, delay * 2)
        return failure

    async def _grpc_works(self) -> bool:
        try:
            leader, offers = await self._leader()
            if not offers:
                return False
            channel = self._grpc.channel(leader)
        except (StorageError, TransportError, TlsError):
            return False
        async with channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), PROBE_TIMEOUT)
            except (TimeoutError, grpc.aio.AioRpcError):
                return False
        return True

    async def _storage_until(self, agent: Agent, condition, reason: str) -> None:
        """Take work from storage until `condition()` is true, probing with backoff."""
        log.info("agent takes its work from storage: %s", reason)
        async with asyncio.TaskGroup() as group:
            session = group.create_task(self._watch.run_agent(agent))
            delay = BACKOFF_INITIAL
            while True:
                await asyncio.sleep(min(delay, LEADER_RECHECK) * random.uniform(0.5, 1.0))
                delay = min(BACKOFF_MAX, delay * 2)
                if await condition():
                    break
            session.cancel()

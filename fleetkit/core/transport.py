"""The transport contract: how the engine and the agents talk.

A transport is registered under the entry-point group ``fleetkit.transport``;
the entry-point name is ``[transport] mode``. Every daemon runs both halves:
`serve` accepts agents for the local engine while this node leads, and
`run_agent` keeps the local agent connected to whichever node leads.
"""

from __future__ import annotations

import abc
import asyncio
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from fleetkit.core.agent import Agent
    from fleetkit.core.config import Config
    from fleetkit.core.engine import Engine
    from fleetkit.core.storage import Storage


class EngineHost:
    """The local engine, when this node leads; transports and the API look it up here."""

    def __init__(self, machine_id: str):
        self.machine_id = machine_id
        self.engine: Engine | None = None
        self.changed = asyncio.Event()

    def set_engine(self, engine: Engine | None) -> None:
        self.engine = engine
        self.changed.set()
        self.changed = asyncio.Event()


class Transport(abc.ABC):
    """Abstract engine–agent transport."""

    name: ClassVar[str]
    # Storage capabilities (attribute names of `Capabilities`) this transport needs.
    required_capabilities: ClassVar[frozenset[str]] = frozenset()
    # The modes this transport talks, advertised in the node record.
    speaks: ClassVar[tuple[str, ...]] = ()
    # Whether `serve` runs the gRPC server on [transport] listen itself.
    serves_grpc: ClassVar[bool] = False

    def __init__(self, config: Config, storage: Storage):
        self.config = config
        self.storage = storage

    @abc.abstractmethod
    async def serve(self, host: EngineHost) -> None:
        """Accept agents for `host.engine` until cancelled; runs on every node."""

    @abc.abstractmethod
    async def run_agent(self, agent: Agent) -> None:
        """Keep `agent` connected to the leader until cancelled, reconnecting with backoff."""

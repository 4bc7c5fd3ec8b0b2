"""The ``grpc`` transport: one bidirectional stream per agent to the leader.

Machine presence and unit states travel only over these streams and live in
the leader's memory; storage contains only the persistent state. Agents find
the leader through the leader record and reconnect with backoff when the
stream breaks, sending their full state again on every new stream.

The listener on ``[transport] listen`` is a `fleetkit.core.listener.GrpcListener`:
with TLS only node certificates may use it. Agents dial the leader with
TLS or plaintext, whichever the leader record lists for its listener.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from fleetkit.core.access import current_peer
from fleetkit.core.agent import Agent
from fleetkit.core.credentials import ListenerSecurity, open_channel
from fleetkit.core.election import LeaderRecord, read_leader
from fleetkit.core.errors import StorageError, TransportError
from fleetkit.core.listener import GrpcListener
from fleetkit.core.states import ChangeMessage, DesiredUnit, MachineInfo, SnapshotMessage, UnitState
from fleetkit.core.tls import TlsError
from fleetkit.core.transport import EngineHost, Transport
from fleetkit.rpc import transport_pb2 as pb
from fleetkit.rpc import transport_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
SNAPSHOT_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 3.0


# -- conversions -----------------------------------------------------------

def state_to_pb(state: UnitState) -> pb.UnitState:
    return pb.UnitState(
        name=state.name, hash=state.hash, load_state=state.load_state,
        active_state=state.active_state, sub_state=state.sub_state,
    )


def state_from_pb(message: pb.UnitState) -> UnitState:
    return UnitState(
        name=message.name, hash=message.hash, load_state=message.load_state,
        active_state=message.active_state, sub_state=message.sub_state,
    )


def machine_to_pb(info: MachineInfo) -> pb.MachineInfo:
    return pb.MachineInfo(id=info.id, ip=info.ip, metadata=info.metadata, version=info.version)


def machine_from_pb(message: pb.MachineInfo) -> MachineInfo:
    return MachineInfo(id=message.id, ip=message.ip, metadata=dict(message.metadata), version=message.version)


def desired_to_pb(unit: DesiredUnit) -> pb.DesiredUnit:
    return pb.DesiredUnit(name=unit.name, unit_file=unit.unit_file, hash=unit.hash, desired_state=unit.desired_state)


def desired_from_pb(message: pb.DesiredUnit) -> DesiredUnit:
    return DesiredUnit(
        name=message.name, unit_file=message.unit_file, hash=message.hash, desired_state=message.desired_state,
    )


def engine_message_to_pb(message: SnapshotMessage | ChangeMessage) -> pb.EngineMessage:
    if isinstance(message, SnapshotMessage):
        return pb.EngineMessage(snapshot=pb.Snapshot(units=[desired_to_pb(unit) for unit in message.units]))
    return pb.EngineMessage(
        change=pb.Change(upserted=[desired_to_pb(unit) for unit in message.upserted], removed=message.removed),
    )


def engine_message_from_pb(message: pb.EngineMessage) -> SnapshotMessage | ChangeMessage:
    if message.HasField("snapshot"):
        return SnapshotMessage(units=[desired_from_pb(unit) for unit in message.snapshot.units])
    return ChangeMessage(
        upserted=[desired_from_pb(unit) for unit in message.change.upserted], removed=list(message.change.removed),
    )


# -- engine side -----------------------------------------------------------

class AgentTransportServicer(pb_grpc.AgentTransportServicer):
    """Serves agent streams for the engine in `host`, when there is one.

    With `check_machine_name`, an agent with a node certificate may only
    connect as the machine that the certificate names.
    """

    def __init__(self, host: EngineHost, *, check_machine_name: bool = False):
        self._host = host
        self._check_machine_name = check_machine_name

    async def Connect(self, request_iterator, context):  # noqa: N802 - gRPC method name
        engine = self._host.engine
        if engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self._host.machine_id} is not the leader")
        engine_gone = self._host.changed

        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello from agent within 10s")
        if first is grpc.aio.EOF or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a stream must be a hello")

        info = machine_from_pb(first.hello.machine)
        peer = current_peer.get()
        if self._check_machine_name and peer is not None and not peer.plaintext and peer.name != info.id:
            message = (f"certificate {peer.name!r} may only connect as machine {peer.name!r}, not {info.id!r}; issue "
                       f"the agent a certificate named {info.id!r}, or set tls.check_machine_name = false")
            log.warning("rejected an agent stream from %s: %s", peer.address, message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        queue: asyncio.Queue = asyncio.Queue()
        sender = queue.put_nowait
        await engine.attach_agent(info, [state_from_pb(state) for state in first.hello.states], sender)
        try:
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(context, engine, info.id))
                writer = group.create_task(self._write(context, queue))
                gone = group.create_task(engine_gone.wait())
                done, _ = await asyncio.wait({reader, writer, gone}, return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, writer, gone):
                    task.cancel()
        finally:
            engine.detach_agent(info.id, sender)

    @staticmethod
    async def _read(context, engine, machine_id: str) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            if message.HasField("states"):
                engine.report_states(
                    machine_id,
                    [state_from_pb(state) for state in message.states.changed],
                    list(message.states.removed),
                )
            else:
                engine.touch(machine_id)

    @staticmethod
    async def _write(context, queue: asyncio.Queue) -> None:
        while True:
            message = await queue.get()
            if message is None:
                return
            await context.write(engine_message_to_pb(message))

    async def GetClusterState(self, request, context):  # noqa: N802 - gRPC method name
        engine = self._host.engine
        if engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self._host.machine_id} is not the leader")
        return cluster_state_to_pb(self._host.machine_id, engine)


def cluster_state_to_pb(leader: str, engine) -> pb.ClusterState:
    reply = pb.ClusterState(leader=leader)
    if engine.last_plan is not None:
        reply.unplaceable.update(engine.last_plan.unplaceable)
    for machine_id, presence in sorted(engine.machines.items()):
        reply.machines.append(pb.MachineState(
            machine=machine_to_pb(presence.info),
            units=[state_to_pb(state) for state in presence.states.values()],
            seconds_since_contact=engine.seconds_since_contact(machine_id),
            connected=presence.connected,
            transport=presence.transport,
        ))
    return reply


# -- the plugin ------------------------------------------------------------

class GrpcTransport(Transport):
    """Streams between each agent and the leader."""

    name = "grpc"
    speaks = ("grpc",)
    serves_grpc = True
    # Leader election needs leases; the schedule needs writes that are never lost or reordered.
    required_capabilities = frozenset({"lease_ttl", "linearizable_writes"})

    def __init__(self, config, storage):
        super().__init__(config, storage)
        self.security = ListenerSecurity.of(config, "transport")
        self._host: EngineHost | None = None
        self.listener = GrpcListener(
            config.transport.listen, self.security, self._register, what="engine transport",
            reload_interval=config.tls.reload_interval, state_dir=config.node.state_dir,
        )

    def _register(self, server: grpc.aio.Server) -> None:
        servicer = AgentTransportServicer(self._host, check_machine_name=self.config.tls.check_machine_name)
        pb_grpc.add_AgentTransportServicer_to_server(servicer, server)

    async def serve(self, host: EngineHost) -> None:
        self._host = host
        try:
            await self.listener.serve()
        except OSError as error:
            raise TransportError(str(error)) from None

    def channel(self, leader: LeaderRecord) -> grpc.aio.Channel:
        """Open a channel to the leader's transport listener, with TLS when both sides have it."""
        return open_channel(leader.address, self.security, peer_tls=leader.tls, peer_plaintext=leader.plaintext)

    async def run_agent(self, agent: Agent) -> None:
        await agent.wait_adopted()
        delay = BACKOFF_INITIAL
        last_error = ""
        while True:
            try:
                leader = await self._leader()
                await self._session(agent, leader)
                delay = BACKOFF_INITIAL
            except (TransportError, StorageError, TlsError, grpc.aio.AioRpcError, TimeoutError) as error:
                message = _describe(error)
                if message != last_error:
                    log.warning("agent is not connected to the leader: %s; retrying", message)
                    last_error = message
            except Exception:
                log.exception("agent session failed unexpectedly; retrying")
                last_error = ""
            delay = min(BACKOFF_MAX, delay * 2)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _leader(self) -> LeaderRecord:
        found = await read_leader(self.storage)
        if found is None:
            raise TransportError("no leader is elected yet")
        record, _revision = found
        return record

    async def _session(self, agent: Agent, leader: LeaderRecord, *, snapshot_timeout: float = SNAPSHOT_TIMEOUT,
                       on_connected=None) -> None:
        heartbeat_interval = max(0.5, self.config.agent.ttl / 4)
        address = leader.address
        async with self.channel(leader) as channel:
            stub = pb_grpc.AgentTransportStub(channel)
            call = stub.Connect()
            hello = pb.AgentHello(
                machine=machine_to_pb(agent.machine), states=[state_to_pb(state) for state in agent.full_state()],
            )
            await call.write(pb.AgentMessage(hello=hello))
            async with asyncio.timeout(snapshot_timeout):
                first = await call.read()
            if first is grpc.aio.EOF:
                raise TransportError(f"leader at {address} closed the stream")
            agent.apply(engine_message_from_pb(first))
            log.info("agent connected to the leader at %s", address)
            if on_connected is not None:
                on_connected()

            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._receive(call, agent, address))
                    group.create_task(self._send(call, agent, heartbeat_interval))
            except ExceptionGroup as group:
                # Either task ending ends the session; report its error, not the group.
                raise _first_error(group) from None

    @staticmethod
    async def _receive(call, agent: Agent, address: str) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise TransportError(f"leader at {address} ended the stream")
            agent.apply(engine_message_from_pb(message))

    @staticmethod
    async def _send(call, agent: Agent, heartbeat_interval: float) -> None:
        sequence = 0
        while True:
            try:
                async with asyncio.timeout(heartbeat_interval):
                    changed, removed = await agent.next_updates()
            except TimeoutError:
                sequence += 1
                await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(sequence=sequence)))
                continue
            update = pb.StateUpdate(changed=[state_to_pb(state) for state in changed], removed=removed)
            await call.write(pb.AgentMessage(states=update))


def _first_error(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError):
        return "the leader did not send a snapshot in time"
    return str(error)

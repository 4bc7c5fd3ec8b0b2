"""The ``etcd-watch`` transport: engine and agents talk through storage, as classic fleet did.

The leader writes each machine's desired units under that machine's own
prefix, ``machines/<id>/units/<name>``, with fenced writes, so a change wakes
only the agent it concerns. Each agent follows its prefix, and publishes its
presence (``machines/<id>/presence``, re-written every third of ``[agent]
ttl`` as a heartbeat) and the state of each unit it runs
(``machines/<id>/states/<name>``) on a lease of its own. Only changed states
are written. The leader follows ``machines/`` to learn presence and states.
No agent reads more than its own prefix in steady state.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fleetkit.core import keys
from fleetkit.core.agent import Agent
from fleetkit.core.errors import FencingError, LeaseExpired, StorageError
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.states import ChangeMessage, DesiredUnit, MachineInfo, SnapshotMessage, UnitState
from fleetkit.core.storage import EventType, Storage
from fleetkit.core.transport import EngineHost, Transport
from fleetkit.core.watching import Snapshot, follow

log = logging.getLogger(__name__)

MACHINES = keys.MACHINES
# Engine writes to one machine's prefix in flight at once.
MAX_WRITES_IN_FLIGHT = 64


def units_prefix(machine: str) -> str:
    return f"{MACHINES}{machine}/units/"


def states_prefix(machine: str) -> str:
    return f"{MACHINES}{machine}/states/"


def presence_key(machine: str) -> str:
    return f"{MACHINES}{machine}/presence"


def _split(key: str) -> tuple[str, str, str]:
    """Return (machine, kind, name) of a key under ``machines/``; kind is units, states or presence."""
    machine, _, rest = key[len(MACHINES):].partition("/")
    kind, _, name = rest.partition("/")
    return machine, kind, name


def _desired_json(unit: DesiredUnit) -> bytes:
    return json.dumps({"name": unit.name, "unit_file": unit.unit_file, "hash": unit.hash,
                       "desired_state": unit.desired_state}).encode()


def _desired_from_json(data: bytes) -> DesiredUnit:
    raw = json.loads(data)
    return DesiredUnit(name=raw["name"], unit_file=raw["unit_file"], hash=raw["hash"],
                       desired_state=raw["desired_state"])


def _state_json(state: UnitState) -> bytes:
    return json.dumps({"name": state.name, "hash": state.hash, "load": state.load_state,
                       "active": state.active_state, "sub": state.sub_state}).encode()


def _state_from_json(data: bytes) -> UnitState:
    raw = json.loads(data)
    return UnitState(name=raw["name"], hash=raw["hash"], load_state=raw["load"], active_state=raw["active"],
                     sub_state=raw["sub"])


# Written by the engine under a machine's units prefix once that prefix contains
# a complete snapshot for the agent session named in the value.
SYNCED = ".synced"


def _presence_json(info: MachineInfo, beat: int, session: str) -> bytes:
    return json.dumps({"id": info.id, "ip": info.ip, "metadata": info.metadata, "version": info.version,
                       "heartbeat": beat, "session": session}).encode()


def _presence_from_json(data: bytes) -> tuple[MachineInfo, str]:
    raw = json.loads(data)
    info = MachineInfo(id=raw["id"], ip=raw.get("ip", ""), metadata=dict(raw.get("metadata", {})),
                       version=raw.get("version", ""))
    return info, str(raw.get("session", ""))


class _MachineWriter:
    """Applies the engine's messages for one machine to its prefix in storage, in order."""

    def __init__(self, storage: Storage, machine: str, fence, session: str):
        self._storage = storage
        self._machine = machine
        self._fence = fence
        self.session = session
        self._queue: asyncio.Queue = asyncio.Queue()

    def send(self, message: SnapshotMessage | ChangeMessage | None) -> None:
        self._queue.put_nowait(message)

    async def run(self) -> None:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            try:
                await self._apply(message)
            except FencingError:
                log.warning("stopped writing the schedule of %s: this engine no longer leads", self._machine)
                return
            except StorageError as error:
                log.error("could not write the units of %s, they are sent again next pass: %s", self._machine, error)

    async def _apply(self, message: SnapshotMessage | ChangeMessage) -> None:
        prefix = units_prefix(self._machine)
        if isinstance(message, SnapshotMessage):
            items, _revision = await self._storage.list(prefix)
            present = {item.key[len(prefix):]: item.value for item in items if item.key[len(prefix):] != SYNCED}
            puts = [unit for unit in message.units if present.get(unit.name) != _desired_json(unit)]
            wanted = {unit.name for unit in message.units}
            deletes = [name for name in present if name not in wanted]
        else:
            puts, deletes = message.upserted, message.removed
        limit = asyncio.Semaphore(MAX_WRITES_IN_FLIGHT)

        async def put(unit: DesiredUnit) -> None:
            async with limit:
                await self._storage.put(prefix + unit.name, _desired_json(unit), fence=self._fence)

        async def delete(name: str) -> None:
            async with limit:
                await self._storage.delete(prefix + name, fence=self._fence)

        await asyncio.gather(*(put(unit) for unit in puts), *(delete(name) for name in deletes))
        if isinstance(message, SnapshotMessage):
            # Only now is the prefix complete for this agent session.
            await self._storage.put(prefix + SYNCED, self.session.encode(), fence=self._fence)


class EtcdWatchTransport(Transport):
    """Engine and agents exchange the schedule, presence and states through storage watches."""

    name = "etcd-watch"
    speaks = ("etcd-watch",)
    required_capabilities = frozenset({"native_watch", "lease_ttl", "linearizable_writes"})

    # -- engine side -------------------------------------------------------

    async def serve(self, host: EngineHost) -> None:
        while True:
            engine = host.engine
            changed = host.changed
            if engine is None:
                await changed.wait()
                continue
            try:
                async with asyncio.TaskGroup() as group:
                    serving = group.create_task(self._serve_engine(engine))
                    await changed.wait()
                    serving.cancel()
            except* StorageError as failure:
                log.error("following agents through storage failed: %s", failure.exceptions[0])
                await asyncio.sleep(1.0)

    async def _serve_engine(self, engine) -> None:
        """Attach every agent that publishes presence, and feed its states to `engine`."""
        await engine.wait_ready()
        writers: dict[str, tuple[_MachineWriter, asyncio.Task, object]] = {}
        states: dict[str, dict[str, UnitState]] = {}
        async with asyncio.TaskGroup() as group:
            try:
                async for update in follow(self.storage, MACHINES):
                    events = self._as_events(update)
                    for machine, kind, name, value in events:
                        if kind == "states":
                            self._on_state(engine, states, machine, name, value, writers)
                        elif kind == "presence":
                            await self._on_presence(engine, group, writers, states, machine, value)
            finally:
                for machine, (_writer, task, send) in writers.items():
                    engine.detach_agent(machine, send)
                    task.cancel()

    @staticmethod
    def _as_events(update) -> list[tuple[str, str, str, bytes | None]]:
        if isinstance(update, Snapshot):
            # States first, so a presence attaches with the states it already published.
            items = sorted(update.items.values(), key=lambda item: _split(item.key)[1] != "states")
            return [(*_split(item.key), item.value) for item in items]
        return [(*_split(event.key), event.value if event.type is EventType.PUT else None) for event in update]

    @staticmethod
    def _on_state(engine, states, machine: str, name: str, value: bytes | None, writers) -> None:
        known = states.setdefault(machine, {})
        # Report only for agents attached through storage: an agent that moved to
        # gRPC withdraws its storage states, which must not erase what it reports now.
        presence = engine.machines.get(machine)
        attached = machine in writers and presence is not None and presence.sender == writers[machine][2]
        if value is None:
            known.pop(name, None)
            if attached:
                engine.report_states(machine, [], [name])
            return
        try:
            state = _state_from_json(value)
        except (ValueError, KeyError) as error:
            log.warning("ignoring unreadable state %s of %s: %s", name, machine, error)
            return
        known[name] = state
        if attached:
            engine.report_states(machine, [state], [])

    async def _on_presence(self, engine, group, writers, states, machine: str, value: bytes | None) -> None:
        if value is None:
            entry = writers.pop(machine, None)
            if entry is not None:
                writer, _task, send = entry
                engine.detach_agent(machine, send)
                send(None)
            return
        try:
            info, session = _presence_from_json(value)
        except (ValueError, KeyError) as error:
            log.warning("ignoring unreadable presence of %s: %s", machine, error)
            return
        if machine in writers:
            if writers[machine][0].session == session:
                engine.touch(machine)
                return
            # A new agent session: it waits for a fresh snapshot, so attach it again.
            old_writer, _task, old_send = writers.pop(machine)
            engine.detach_agent(machine, old_send)
            old_send(None)
        writer = _MachineWriter(self.storage, machine, engine.fence, session)
        send = writer.send
        writers[machine] = (writer, group.create_task(writer.run()), send)
        await engine.attach_agent(info, list(states.get(machine, {}).values()), send, transport=self.name)

    # -- agent side --------------------------------------------------------

    async def run_agent(self, agent: Agent) -> None:
        await agent.wait_adopted()
        attempts = Attempts(Backoff(initial=0.5, cap=5.0))
        while True:
            try:
                await self._agent_session(agent)
            except (StorageError, LeaseExpired) as error:
                if attempts.failures == 0:
                    log.warning("agent lost storage, retrying: %s", error)
                await attempts.sleep()

    async def _agent_session(self, agent: Agent) -> None:
        ttl = self.config.agent.ttl
        lease = await self.storage.grant_lease(ttl)
        try:
            await self._run_session(agent, lease, ttl)
        except asyncio.CancelledError:
            # Leaving storage on purpose: withdraw the presence and states at once.
            await self._revoke_quietly(lease)
            raise

    async def _run_session(self, agent: Agent, lease: int, ttl: float) -> None:
        machine = agent.machine.id
        session = f"{lease:x}"
        try:
            await self._publish_all(agent, lease)
            await self.storage.put(presence_key(machine), _presence_json(agent.machine, 0, session), lease=lease)
            log.info("agent publishes to storage (transport etcd-watch)")
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat(agent, lease, ttl, session))
                group.create_task(self._publish_changes(agent, lease))
                group.create_task(self._follow_units(agent, session))
        except* (StorageError, LeaseExpired) as failure:
            raise failure.exceptions[0] from None

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self.storage.revoke_lease(lease)
        except (StorageError, TimeoutError):
            pass

    async def _publish_all(self, agent: Agent, lease: int) -> None:
        prefix = states_prefix(agent.machine.id)
        items, _revision = await self.storage.list(prefix)
        current = {state.name: state for state in agent.full_state()}
        for item in items:
            if item.key[len(prefix):] not in current:
                await self.storage.delete(item.key)
        for state in current.values():
            await self.storage.put(prefix + state.name, _state_json(state), lease=lease)

    async def _heartbeat(self, agent: Agent, lease: int, ttl: float, session: str) -> None:
        beat = 0
        while True:
            await asyncio.sleep(ttl / 3)
            beat += 1
            await self.storage.refresh_lease(lease)
            await self.storage.put(
                presence_key(agent.machine.id), _presence_json(agent.machine, beat, session), lease=lease,
            )

    async def _publish_changes(self, agent: Agent, lease: int) -> None:
        prefix = states_prefix(agent.machine.id)
        while True:
            changed, removed = await agent.next_updates()
            for state in changed:
                await self.storage.put(prefix + state.name, _state_json(state), lease=lease)
            for name in removed:
                await self.storage.delete(prefix + name)

    async def _follow_units(self, agent: Agent, session: str) -> None:
        """Apply the machine's units once the engine marked them complete for this session, then each change."""
        prefix = units_prefix(agent.machine.id)
        units: dict[str, DesiredUnit] = {}
        synced = False
        async for update in follow(self.storage, prefix):
            if isinstance(update, Snapshot):
                units = {}
                marker = b""
                for item in update.items.values():
                    name = item.key[len(prefix):]
                    if name == SYNCED:
                        marker = item.value
                    elif (unit := self._decode(item.key, item.value)) is not None:
                        units[name] = unit
                synced = marker == session.encode()
                if synced:
                    agent.apply(SnapshotMessage(units=list(units.values())))
                continue
            upserted, removed = [], []
            for event in update:
                name = event.key[len(prefix):]
                if name == SYNCED:
                    if not synced and event.type is EventType.PUT and event.value == session.encode():
                        synced = True
                        agent.apply(SnapshotMessage(units=list(units.values())))
                    continue
                if event.type is EventType.PUT and event.value is not None:
                    unit = self._decode(event.key, event.value)
                    if unit is None:
                        continue
                    units[name] = unit
                    upserted.append(unit)
                else:
                    units.pop(name, None)
                    removed.append(name)
            if synced and (upserted or removed):
                agent.apply(ChangeMessage(upserted=upserted, removed=removed))

    @staticmethod
    def _decode(key: str, value: bytes) -> DesiredUnit | None:
        try:
            return _desired_from_json(value)
        except (ValueError, KeyError) as error:
            log.warning("ignoring unreadable desired unit %s: %s", key, error)
            return None

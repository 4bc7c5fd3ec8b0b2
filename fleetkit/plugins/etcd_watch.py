"""The ``etcd-watch`` transport: engine and agents talk through storage, as classic fleet did.

The leader writes each machine's desired units under that machine's own
prefix, ``machines/<id>/units/<name>``, with fenced writes, so a change wakes
only the agent it concerns. Each agent follows its prefix, and publishes its
presence (``machines/<id>/presence``, re-written every third of ``[agent]
ttl`` as a heartbeat) and the state of each unit it runs
(``machines/<id>/states/<name>``) on a lease of its own; only changed states
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


def _presence_json(info: MachineInfo, beat: int) -> bytes:
    return json.dumps({"id": info.id, "ip": info.ip, "metadata": info.metadata, "version": info.version,
                       "heartbeat": beat}).encode()


def _presence_from_json(data: bytes) -> MachineInfo:
    raw = json.loads(data)
    return MachineInfo(id=raw["id"], ip=raw.get("ip", ""), metadata=dict(raw.get("metadata", {})),
                       version=raw.get("version", ""))


class _MachineWriter:
    """Applies the engine's messages for one machine to its prefix in storage, in order."""

    def __init__(self, storage: Storage, machine: str, fence):
        self._storage = storage
        self._machine = machine
        self._fence = fence
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
            present = {item.key[len(prefix):]: item.value for item in items}
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


class EtcdWatchTransport(Transport):
    """Engine and agents exchange the schedule, presence and states through storage watches."""

    name = "etcd-watch"
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
                            self._on_state(engine, states, machine, name, value)
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
    def _on_state(engine, states, machine: str, name: str, value: bytes | None) -> None:
        known = states.setdefault(machine, {})
        if value is None:
            known.pop(name, None)
            engine.report_states(machine, [], [name])
            return
        try:
            state = _state_from_json(value)
        except (ValueError, KeyError) as error:
            log.warning("ignoring unreadable state %s of %s: %s", name, machine, error)
            return
        known[name] = state
        engine.report_states(machine, [state], [])

    async def _on_presence(self, engine, group, writers, states, machine: str, value: bytes | None) -> None:
        if value is None:
            entry = writers.pop(machine, None)
            if entry is not None:
                writer, _task, send = entry
                engine.detach_agent(machine, send)
                send(None)
            return
        if machine in writers:
            engine.touch(machine)
            return
        try:
            info = _presence_from_json(value)
        except (ValueError, KeyError) as error:
            log.warning("ignoring unreadable presence of %s: %s", machine, error)
            return
        writer = _MachineWriter(self.storage, machine, engine.fence)
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
        machine = agent.machine.id
        ttl = self.config.agent.ttl
        lease = await self.storage.grant_lease(ttl)
        await self._publish_all(agent, lease)
        await self.storage.put(presence_key(machine), _presence_json(agent.machine, 0), lease=lease)
        log.info("agent publishes to storage (transport etcd-watch)")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat(agent, lease, ttl))
                group.create_task(self._publish_changes(agent, lease))
                group.create_task(self._follow_units(agent))
        except* (StorageError, LeaseExpired) as failure:
            raise failure.exceptions[0] from None

    async def _publish_all(self, agent: Agent, lease: int) -> None:
        prefix = states_prefix(agent.machine.id)
        items, _revision = await self.storage.list(prefix)
        current = {state.name: state for state in agent.full_state()}
        for item in items:
            if item.key[len(prefix):] not in current:
                await self.storage.delete(item.key)
        for state in current.values():
            await self.storage.put(prefix + state.name, _state_json(state), lease=lease)

    async def _heartbeat(self, agent: Agent, lease: int, ttl: float) -> None:
        beat = 0
        while True:
            await asyncio.sleep(ttl / 3)
            beat += 1
            await self.storage.refresh_lease(lease)
            await self.storage.put(presence_key(agent.machine.id), _presence_json(agent.machine, beat), lease=lease)

    async def _publish_changes(self, agent: Agent, lease: int) -> None:
        prefix = states_prefix(agent.machine.id)
        while True:
            changed, removed = await agent.next_updates()
            for state in changed:
                await self.storage.put(prefix + state.name, _state_json(state), lease=lease)
            for name in removed:
                await self.storage.delete(prefix + name)

    async def _follow_units(self, agent: Agent) -> None:
        prefix = units_prefix(agent.machine.id)
        async for update in follow(self.storage, prefix):
            if isinstance(update, Snapshot):
                units = []
                for item in update.items.values():
                    try:
                        units.append(_desired_from_json(item.value))
                    except (ValueError, KeyError) as error:
                        log.warning("ignoring unreadable desired unit %s: %s", item.key, error)
                agent.apply(SnapshotMessage(units=units))
                continue
            upserted, removed = [], []
            for event in update:
                name = event.key[len(prefix):]
                if event.type is EventType.PUT and event.value is not None:
                    try:
                        upserted.append(_desired_from_json(event.value))
                    except (ValueError, KeyError) as error:
                        log.warning("ignoring unreadable desired unit %s: %s", event.key, error)
                else:
                    removed.append(name)
            agent.apply(ChangeMessage(upserted=upserted, removed=removed))

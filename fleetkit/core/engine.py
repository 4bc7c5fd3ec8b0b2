"""The engine: the leader's scheduler and the owner of the cluster's transient state.

One engine runs at a time, on the node that has the leadership. It mirrors
the unit records from storage, keeps machine presence and unit states in
memory (agents report them over the transport), places units with
`fleetkit.core.scheduler.plan`, persists the schedule with fenced writes and
tells each agent which units it must run.

A reconcile pass runs when something changed (debounced) and at least every
``[engine] reconcile_interval``. Passes never block lease renewal, which runs
in the election's own task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetkit.core import keys
from fleetkit.core.election import Leadership
from fleetkit.core.errors import FencingError, StorageError, UnitError
from fleetkit.core.hooks import call_safely
from fleetkit.core.scheduler import Machine, Plan, plan, summarize
from fleetkit.core.states import ChangeMessage, DesiredUnit, MachineInfo, SnapshotMessage, UnitState
from fleetkit.core.storage import EventType, Storage
from fleetkit.core.units import Unit
from fleetkit.core.watching import Snapshot, follow

log = logging.getLogger(__name__)

# Engine writes in flight at once; keeps a large reschedule from flooding the store.
MAX_WRITES_IN_FLIGHT = 64
# A pass starts once no change arrived for DEBOUNCE_SECONDS, or at the latest
# MAX_DEBOUNCE_SECONDS after the first change, so a burst of submits becomes one pass.
DEBOUNCE_SECONDS = 0.05
MAX_DEBOUNCE_SECONDS = 0.5

# Queues a message on an agent's stream; None ends the stream.
Sender = Callable[[SnapshotMessage | ChangeMessage | None], None]


class LeadershipLost(Exception):
    """The engine must stop: another node leads now."""


@dataclass
class MachinePresence:
    """The engine's record of one machine."""

    info: MachineInfo
    last_contact: float
    connected: bool = False
    states: dict[str, UnitState] = field(default_factory=dict)
    sender: Sender | None = None
    sent: dict[str, DesiredUnit] = field(default_factory=dict)
    transport: str = ""


class Engine:
    """Runs while this node leads; see the module docstring."""

    def __init__(
        self,
        storage: Storage,
        leadership: Leadership,
        *,
        machine_ttl: float,
        reconcile_interval: float,
        clock: Callable[[], float] = time.monotonic,
        hooks=None,
    ):
        self._storage = storage
        self._hooks = hooks
        self._leadership = leadership
        self._machine_ttl = machine_ttl
        self._interval = reconcile_interval
        self._clock = clock

        self.units: dict[str, Unit] = {}
        self.schedule: dict[str, str] = {}
        self.machines: dict[str, MachinePresence] = {}
        self.last_plan: Plan | None = None

        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._started_at = clock()
        # Machines named in the stored schedule that have not reconnected yet.
        # Their units stay put until [agent] ttl after this engine started.
        self._awaited: set[str] = set()

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Run until leadership is lost (raises `LeadershipLost`) or the task is cancelled."""
        await self._load_schedule()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_units())
            group.create_task(self._watch_leadership())
            await self._ready.wait()
            log.info(
                "engine ready: %d units, %d scheduled, waiting up to %.0fs for %d machines to reconnect",
                len(self.units), len(self.schedule), self._machine_ttl, len(self._awaited),
            )
            group.create_task(self._reconcile_loop())

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def fence(self):
        """The fence that every write of this engine must carry."""
        return self._leadership.fence

    async def _watch_leadership(self) -> None:
        await self._leadership.wait_lost()
        raise LeadershipLost("leadership lost")

    async def _load_schedule(self) -> None:
        items, _revision = await self._storage.list(keys.SCHEDULE)
        for item in items:
            name = keys.name_from_key(keys.SCHEDULE, item.key)
            self.schedule[name] = item.value.decode()
        self._awaited = set(self.schedule.values())

    async def _follow_units(self) -> None:
        async for update in follow(self._storage, keys.UNITS):
            if isinstance(update, Snapshot):
                self.units = {}
                for item in update.items.values():
                    self._store_unit(item.key, item.value)
                self._ready.set()
            else:
                for event in update:
                    if event.type is EventType.PUT and event.value is not None:
                        self._store_unit(event.key, event.value)
                    else:
                        self.units.pop(keys.name_from_key(keys.UNITS, event.key), None)
            self.wake()

    def _store_unit(self, key: str, value: bytes) -> None:
        name = keys.name_from_key(keys.UNITS, key)
        try:
            self.units[name] = Unit.from_json(value)
        except (UnitError, ValueError, KeyError) as error:
            log.error("ignoring unreadable unit record %s: %s", key, error)
            self.units.pop(name, None)

    # -- agents (called by the transport) ----------------------------------

    async def attach_agent(
        self, info: MachineInfo, states: list[UnitState], sender: Sender, *, transport: str = "grpc",
    ) -> None:
        """Register a connected agent and send it its snapshot before any change."""
        await self._ready.wait()
        presence = self.machines.get(info.id)
        if presence is None:
            presence = MachinePresence(info=info, last_contact=self._clock())
            self.machines[info.id] = presence
        presence.info = info
        presence.connected = True
        presence.last_contact = self._clock()
        presence.states = {state.name: state for state in states}
        presence.sender = sender
        presence.transport = transport
        self._awaited.discard(info.id)

        # Global units apply by metadata and conflicts, so place them for this machine now:
        # a snapshot without them would make the agent stop them.
        self.last_plan = self._plan()[0]
        desired = self._desired_for(info.id)
        presence.sent = desired
        sender(SnapshotMessage(units=sorted(desired.values(), key=lambda unit: unit.name)))
        log.info(
            "machine %s connected (%s) over %s, %d units desired there",
            info.id, info.ip or "no ip", transport, len(desired),
        )
        self.wake()

    def report_states(self, machine_id: str, changed: list[UnitState], removed: list[str]) -> None:
        presence = self.machines.get(machine_id)
        if presence is None:
            return
        presence.last_contact = self._clock()
        for state in changed:
            presence.states[state.name] = state
        for name in removed:
            presence.states.pop(name, None)

    def touch(self, machine_id: str) -> None:
        presence = self.machines.get(machine_id)
        if presence is not None:
            presence.last_contact = self._clock()

    def detach_agent(self, machine_id: str, sender: Sender) -> None:
        presence = self.machines.get(machine_id)
        # Bound methods are equal, not identical, when they wrap the same queue.
        if presence is None or presence.sender != sender:
            return
        presence.connected = False
        presence.sender = None
        presence.last_contact = self._clock()
        log.warning(
            "machine %s disconnected; its units move if it does not return within %.0fs",
            machine_id, self._machine_ttl,
        )
        self.wake()

    # -- reconciliation ----------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            await self._settle()
            await self.reconcile()

    async def _settle(self) -> None:
        """Wait until changes stop arriving for a moment, within a bound."""
        deadline = self._clock() + MAX_DEBOUNCE_SECONDS
        while True:
            self._wake.clear()
            await asyncio.sleep(DEBOUNCE_SECONDS)
            if not self._wake.is_set() or self._clock() >= deadline:
                self._wake.clear()
                return

    def _live_machines(self) -> dict[str, Machine]:
        now = self._clock()
        live: dict[str, Machine] = {}
        for machine_id, presence in list(self.machines.items()):
            if now - presence.last_contact >= self._machine_ttl:
                log.warning("machine %s expired after %.0fs without contact", machine_id, self._machine_ttl)
                if presence.sender is not None:
                    # A stream that stays silent is dead; ending it makes a live agent reconnect.
                    presence.sender(None)
                del self.machines[machine_id]
                continue
            live[machine_id] = Machine(id=machine_id, ip=presence.info.ip, metadata=dict(presence.info.metadata))
        return live

    def _pinned_units(self) -> set[str]:
        """Return units scheduled on machines still within their reconnect grace after a leader change."""
        if not self._awaited:
            return set()
        if self._clock() - self._started_at >= self._machine_ttl:
            log.warning("machines %s did not reconnect to the new leader; moving their units", sorted(self._awaited))
            self._awaited.clear()
            return set()
        return {name for name, machine in self.schedule.items() if machine in self._awaited}

    async def reconcile(self) -> Plan:
        """Run one pass: plan, persist the schedule, tell the agents."""
        if not self._leadership.is_held():
            raise LeadershipLost("leadership lease expired before the reconcile pass")

        result, pinned = self._plan()
        await self._persist(result, pinned)
        self.last_plan = result
        self._push_to_agents()

        log.info("reconcile: %s", summarize(result))
        if self._hooks is not None:
            call_safely(self._hooks.hook.fleetkit_reconcile_finished, plan=result, statistics=self.statistics())
        return result

    def _plan(self) -> tuple[Plan, set[str]]:
        """Plan over the live machines, leaving units on machines still in their reconnect grace alone."""
        machines = self._live_machines()
        pinned = self._pinned_units()
        units = {name: unit for name, unit in self.units.items() if name not in pinned}
        schedule = {name: machine for name, machine in self.schedule.items() if name not in pinned}
        return plan(units, machines, schedule), pinned

    async def _persist(self, result: Plan, pinned: set[str]) -> None:
        fence = self._leadership.fence
        limit = asyncio.Semaphore(MAX_WRITES_IN_FLIGHT)
        failures: list[str] = []

        async def write(decision) -> None:
            async with limit:
                key = keys.schedule_key(decision.unit)
                try:
                    if decision.new_machine is None:
                        await self._storage.delete(key, fence=fence)
                        self.schedule.pop(decision.unit, None)
                    else:
                        await self._storage.put(key, decision.new_machine.encode(), fence=fence)
                        self.schedule[decision.unit] = decision.new_machine
                except FencingError:
                    raise
                except StorageError as error:
                    failures.append(f"{decision.unit}: {error}")

        try:
            async with asyncio.TaskGroup() as group:
                for decision in result.changes:
                    group.create_task(write(decision))
        except* FencingError as group_error:
            raise LeadershipLost("a fenced schedule write was rejected") from group_error.exceptions[0]

        if failures:
            log.warning(
                "could not persist %d schedule changes, retrying next pass: %s",
                len(failures), "; ".join(failures[:3]),
            )
        # Drop stale entries of pinned-free units the plan no longer has.
        for name in list(self.schedule):
            if name not in pinned and name not in result.schedule and name not in self.units:
                self.schedule.pop(name, None)

    def _desired_for(self, machine_id: str) -> dict[str, DesiredUnit]:
        """Return the units this machine must run, from the persisted schedule and the last plan."""
        names = {name for name, machine in self.schedule.items() if machine == machine_id}
        if self.last_plan is not None:
            names |= {name for name in self.last_plan.units_for_machine(machine_id) if self._is_global(name)}
        desired = {}
        for name in names:
            unit = self.units.get(name)
            if unit is None or unit.desired_state == "inactive":
                continue
            desired[name] = DesiredUnit(
                name=name, unit_file=unit.text, hash=unit.hash, desired_state=unit.desired_state,
            )
        return desired

    def _is_global(self, name: str) -> bool:
        unit = self.units.get(name)
        return unit is not None and unit.options.is_global

    def _push_to_agents(self) -> None:
        for machine_id, presence in self.machines.items():
            if presence.sender is None:
                continue
            desired = self._desired_for(machine_id)
            upserted = [unit for name, unit in desired.items() if presence.sent.get(name) != unit]
            removed = [name for name in presence.sent if name not in desired]
            if not upserted and not removed:
                continue
            presence.sent = desired
            presence.sender(ChangeMessage(upserted=sorted(upserted, key=lambda u: u.name), removed=sorted(removed)))

    # -- introspection -----------------------------------------------------

    def statistics(self) -> dict[str, int]:
        return {
            "units": len(self.units),
            "scheduled": len(self.schedule),
            "machines": len(self.machines),
            "connected": sum(1 for presence in self.machines.values() if presence.connected),
        }

    def seconds_since_contact(self, machine_id: str) -> float:
        presence = self.machines.get(machine_id)
        return 0.0 if presence is None else max(0.0, self._clock() - presence.last_contact)

"""Decide which machine runs each unit: the engine's pure scheduling function.

`plan` takes the units, the machines that are present and the current schedule,
and returns the complete new schedule with the list of changes. It does no I/O
and keeps no state between calls, so the engine can run it on every reconcile
pass. The same input always gives the same plan.

One pass works in four steps:

1. Keep: each scheduled unit stays on its machine while the machine is present
   and the unit still meets all its constraints there (no rebalancing).
2. Global units: each applies on every machine whose metadata matches and
   where it does not conflict with the units already there.
3. Kept units whose MachineOf peer is a global unit that does not apply on
   their machine are moved.
4. Place: the remaining units go, in name order with MachineOf peers first, to
   the least-loaded eligible machine (ties: smallest machine id). Each decision
   is applied before the next one is made.

Load is the number of non-global units scheduled on a machine plus the global
units that apply there; it is kept in counters, never recounted.

The placement state of a pass, with the Conflicts and Replaces checks that
depend on it, is `_Cluster` in `fleetkit.core.placement`.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fleetkit.core.placement import _Cluster, _metadata_ok
from fleetkit.core.units import INACTIVE, Unit

_SHOWN_REASONS = 3
_SHOWN_CHANGES = 5
_DEFER = object()


@dataclass(frozen=True)
class Machine:
    """A machine that is present in the cluster, as the scheduler sees it."""

    id: str
    ip: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.id, self.ip, frozenset(self.metadata.items())))


@dataclass(frozen=True)
class Decision:
    """One change to the schedule: a unit scheduled, moved or unscheduled."""

    unit: str
    old_machine: str | None
    new_machine: str | None
    reason: str


@dataclass
class Plan:
    """The result of one scheduling pass.

    `schedule` contains every non-global unit that has a machine; `changes` what
    differs from the input schedule, sorted by unit name; `unplaceable` the
    units that should run but fit no machine, with the reason; and
    `global_machines` the machines each active global unit applies on.
    """

    schedule: dict[str, str]
    changes: list[Decision]
    unplaceable: dict[str, str]
    global_machines: dict[str, list[str]] = field(default_factory=dict)

    def units_for_machine(self, machine_id: str) -> set[str]:
        """The units that should be loaded on `machine_id`: scheduled and global."""
        names = {unit for unit, machine in self.schedule.items() if machine == machine_id}
        names.update(g for g, machines in self.global_machines.items() if machine_id in machines)
        return names


def plan(
    units: Mapping[str, Unit], machines: Mapping[str, Machine], schedule: Mapping[str, str]
) -> Plan:
    """Compute the new schedule; see the module docstring for the rules."""
    return _Planner(units, machines, schedule).run()


def global_targets(
    unit: Unit, machines: Mapping[str, Machine], placed: Mapping[str, Iterable[Unit]]
) -> list[str]:
    """Return the machine ids, sorted, on which the global `unit` applies.

    `placed` maps a machine id to the units already on it: the non-global units
    scheduled there and the global units accepted there before this one. A
    template or a unit with desired state inactive applies nowhere.
    """
    if not unit.options.is_global:
        raise ValueError(f"{unit.name} is not a global unit; only Global=true units apply this way")
    if unit.unit_name.is_template or unit.desired_state == INACTIVE:
        return []
    placed = {machine_id: list(units) for machine_id, units in placed.items()}
    universe = {u.name: u for units in placed.values() for u in units}
    universe[unit.name] = unit
    cluster = _Cluster(universe, machines)
    for machine_id in sorted(placed):
        if machine_id in cluster.slots:
            for other in placed[machine_id]:
                if other.name != unit.name:
                    cluster.add(other.name, machine_id)
    return cluster.apply_global(unit.name)


def summarize(result: Plan) -> str:
    """Describe `result` in one line for the engine's INFO log: counts, then the first changes."""
    moved = sum(1 for d in result.changes if d.old_machine and d.new_machine)
    added = sum(1 for d in result.changes if d.old_machine is None)
    removed = sum(1 for d in result.changes if d.new_machine is None)
    if not result.changes and not result.unplaceable:
        count = len(result.schedule)
        return f"no changes; {count} unit{'' if count == 1 else 's'} scheduled"
    items = [
        f"{d.unit} {d.old_machine + ' ' if d.old_machine else ''}-> {d.new_machine or 'none'}"
        f" ({d.reason})"
        for d in result.changes
    ]
    changed = {d.unit for d in result.changes}
    items += [
        f"{name} unplaceable ({reason})"
        for name, reason in sorted(result.unplaceable.items())
        if name not in changed
    ]
    text = (
        f"scheduled {added}, moved {moved}, unscheduled {removed}, "
        f"unplaceable {len(result.unplaceable)}: " + ", ".join(items[:_SHOWN_CHANGES])
    )
    if len(items) > _SHOWN_CHANGES:
        text += f" ... and {len(items) - _SHOWN_CHANGES} more"
    return text


def _format_metadata(required: Mapping[str, frozenset[str]]) -> str:
    return ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in sorted(required.items()))


def _listing(items: list[str], shown: int = _SHOWN_REASONS) -> str:
    text = "; ".join(items[:shown])
    return text + (f" (and {len(items) - shown} more)" if len(items) > shown else "")


def _placement_order(wanted: Mapping[str, Unit]) -> tuple[list[str], dict[str, str]]:
    """Sort the names, each after its MachineOf peers, and find the units caught in a cycle."""

    def peers(name: str) -> Iterable[str]:
        return iter(sorted(p for p in wanted[name].options.machine_of if p in wanted))

    order: list[str] = []
    done: set[str] = set()
    cycles: dict[str, str] = {}
    for root in sorted(wanted):
        if root in done:
            continue
        path, stack = [root], [peers(root)]
        while stack:
            peer = next(stack[-1], None)
            if peer is None:
                stack.pop()
                done.add(path[-1])
                order.append(path.pop())
            elif peer in path:
                loop = path[path.index(peer) :] + [peer]
                for member in loop[:-1]:
                    cycles.setdefault(member, "MachineOf cycle: " + " -> ".join(loop))
            elif peer not in done:
                path.append(peer)
                stack.append(peers(peer))
    return order, cycles


class _Planner:
    """The state of one `plan` call."""

    def __init__(
        self, units: Mapping[str, Unit], machines: Mapping[str, Machine], schedule: Mapping[str, str]
    ):
        self.units = units
        self.schedule = dict(schedule)
        self.wanted: dict[str, Unit] = {}
        self.globals: list[str] = []
        for name in sorted(units):
            unit = units[name]
            if unit.unit_name.is_template or unit.desired_state == INACTIVE:
                continue
            if unit.options.is_global:
                self.globals.append(name)
            else:
                self.wanted[name] = unit
        universe = {**self.wanted, **{g: units[g] for g in self.globals}}
        self.cluster = _Cluster(universe, machines)
        self.machine_ids = list(self.cluster.slots)
        self.followers: dict[str, list[str]] = {}
        for name, unit in self.wanted.items():
            for peer in unit.options.machine_of:
                self.followers.setdefault(peer, []).append(name)
        self.left: dict[str, str] = {}  # unit -> why it left its machine in the input schedule
        self.placed_by: dict[str, str] = {}  # unit -> how its new machine was chosen
        self.unplaceable: dict[str, str] = {}
        self.displacements = 0  # units moved by Replaces in this pass, capped as a safety net
        self.max_displacements = 4 * len(self.wanted) + 16
        self.queue: deque[str] = deque()
        self.pending: set[str] = set()
        self._ids: dict[str, list[str]] = {}
        self._metadata: dict[tuple, frozenset[str]] = {}

    def run(self) -> Plan:
        order, cycles = _placement_order(self.wanted)
        self._drop_unwanted()
        self._keep(order, cycles)
        for name in self.globals:
            self.cluster.apply_global(name)
        self._check_global_peers(order)
        self._place(order)
        return self._result()

    def _drop_unwanted(self) -> None:
        for name in self.schedule:
            if name in self.wanted:
                continue
            unit = self.units.get(name)
            if unit is None:
                self.left[name] = "unit was destroyed"
            elif unit.unit_name.is_template:
                self.left[name] = "template units are never scheduled"
            elif unit.desired_state == INACTIVE:
                self.left[name] = "desired state is inactive"
            else:
                self.left[name] = "unit is global; global units are not scheduled"

    def _keep(self, order: list[str], cycles: dict[str, str]) -> None:
        for name in order:
            machine_id = self.schedule.get(name)
            if name in cycles:
                self.unplaceable[name] = cycles[name]
                if machine_id is not None:
                    self.left[name] = cycles[name]
                continue
            if machine_id is None:
                continue
            reason = self._keep_blocker(name, machine_id)
            victims: list[str] = []
            if reason is None:
                victims, reason = self.cluster.victims(name, machine_id)
            if reason is not None:
                self.left[name] = reason
                continue
            self.displacements += len(victims)
            for victim in victims:
                self._evict(victim, f"replaced by {name} on {machine_id}")
            self.cluster.add(name, machine_id)

    def _keep_blocker(self, name: str, machine_id: str) -> str | None:
        options = self.wanted[name].options
        if machine_id not in self.cluster.slots:
            return f"machine {machine_id} is gone"
        # NOTE: an ambiguous MachineID prefix blocks new placements only; a unit
        # already on one of the matching machines stays there.
        if options.machine_id is not None and machine_id not in self._resolve(options.machine_id):
            return f"MachineID {options.machine_id} no longer names machine {machine_id}"
        required = options.machine_metadata
        if required and not _metadata_ok(required, self.cluster.slots[machine_id].metadata):
            return f"machine {machine_id} does not have metadata {_format_metadata(required)}"
        for peer in options.machine_of:
            problem = self._peer_problem(peer)
            if problem:
                return problem
            if peer in self.wanted and self.cluster.where.get(peer) != machine_id:
                return f"MachineOf peer {peer} is not on {machine_id}"
        return self.cluster.blocker(name, machine_id)

    def _check_global_peers(self, order: list[str]) -> None:
        for name in order:
            machine_id = self.cluster.where.get(name)
            for peer in self.wanted[name].options.machine_of:
                if machine_id is None or peer in self.wanted:
                    continue
                if machine_id not in self.cluster.global_on.get(peer, ()):
                    self._evict(name, f"MachineOf peer {peer} does not apply on {machine_id}")
                    break

    def _place(self, order: list[str]) -> None:
        # NOTE: a unit found unplaceable is not retried when a later displacement
        # frees a machine in the same pass; the next pass places it.
        self.queue.extend(n for n in order if n not in self.cluster.where and n not in self.unplaceable)
        self.pending.update(self.queue)
        while self.queue:
            name = self.queue.popleft()
            self.pending.discard(name)
            choice = self._choose(name)
            if choice is _DEFER:
                self._enqueue([name])
                continue
            machine_id, victims, reason = choice  # type: ignore[misc]
            if machine_id is None:
                self.unplaceable[name] = reason
                continue
            self.displacements += len(victims)
            for victim in victims:
                self._enqueue(self._evict(victim, f"replaced by {name} on {machine_id}"))
            self.cluster.add(name, machine_id)
            self.placed_by[name] = reason

    def _choose(self, name: str) -> object:
        """`_DEFER`, or (machine id or None, units to displace, reason)."""
        options = self.wanted[name].options
        if not self.machine_ids:
            return None, [], "no machines are present"
        peer_machine, peer_names, global_peers = None, [], []
        for peer in options.machine_of:
            problem = self._peer_problem(peer)
            if problem:
                return None, [], problem
            if peer not in self.wanted:
                global_peers.append(peer)
            elif peer in self.unplaceable:
                return None, [], f"MachineOf peer {peer} cannot be placed"
            elif peer in self.pending:
                return _DEFER
            elif peer not in self.cluster.where:
                return None, [], f"MachineOf peer {peer} is not scheduled"
            elif peer_machine not in (None, self.cluster.where[peer]):
                return None, [], (
                    f"MachineOf peers {peer_names[0]} and {peer} are on different machines"
                )
            else:
                peer_machine = self.cluster.where[peer]
                peer_names.append(peer)

        how = "least loaded"
        candidates = self.machine_ids
        if options.machine_id is not None:
            candidates = self._resolve(options.machine_id)
            how = f"MachineID {options.machine_id}"
            if not candidates:
                return None, [], f"no machine id is or starts with {options.machine_id}"
            if len(candidates) > 1:
                return None, [], (
                    f"MachineID {options.machine_id} is ambiguous: it starts "
                    f"{len(candidates)} machine ids ({', '.join(candidates[:_SHOWN_REASONS])})"
                )
        elif peer_machine is not None:
            candidates, how = [peer_machine], f"MachineOf {', '.join(peer_names)}"

        required = options.machine_metadata
        if required:
            allowed = self._machines_with(required)
            where = f"machine {candidates[0]}" if len(candidates) == 1 else "no machine"
            candidates = [m for m in candidates if m in allowed]
            if not candidates:
                verb = "does not have" if where != "no machine" else "has"
                return None, [], f"{where} {verb} metadata {_format_metadata(required)}"
        for peer in global_peers:
            candidates = [m for m in candidates if m in self.cluster.global_on.get(peer, ())]
            if not candidates:
                return None, [], f"MachineOf peer {peer} applies on no machine this unit may use"
        return self._least_loaded(name, candidates, how)

    def _least_loaded(self, name: str, candidates: list[str], how: str) -> tuple:
        best: tuple[int, str] | None = None
        best_victims: list[str] = []
        blocked: list[str] = []
        for machine_id in candidates:
            key = (self.cluster.slots[machine_id].load, machine_id)
            if best is not None and key >= best:
                continue
            reason = self.cluster.blocker(name, machine_id)
            victims: list[str] = []
            if reason is None:
                victims, reason = self.cluster.victims(name, machine_id)
            if victims and self.displacements + len(victims) > self.max_displacements:
                reason = (
                    f"would displace {victims[0]} on {machine_id}, but this pass has already "
                    f"displaced {self.displacements} units"
                )
            if reason is not None:
                blocked.append(reason)
            else:
                best, best_victims = key, victims
        if best is None:
            return None, [], "no eligible machine is free: " + _listing(blocked)
        return best[1], best_victims, how

    def _evict(self, name: str, reason: str) -> list[str]:
        """Take `name` and, recursively, its MachineOf followers off their machine."""
        evicted, todo = [], deque([(name, reason)])
        while todo:
            unit, why = todo.popleft()
            machine_id = self.cluster.where.get(unit)
            if machine_id is None:
                continue
            self.cluster.remove(unit)
            self.placed_by.pop(unit, None)
            if self.schedule.get(unit) == machine_id:
                self.left.setdefault(unit, why)
            evicted.append(unit)
            for follower in self.followers.get(unit, ()):
                if self.cluster.where.get(follower) == machine_id:
                    todo.append((follower, f"follows MachineOf peer {unit} off {machine_id}"))
        return evicted

    def _enqueue(self, names: list[str]) -> None:
        for name in names:
            if name not in self.pending:
                self.queue.append(name)
                self.pending.add(name)

    def _peer_problem(self, peer: str) -> str | None:
        unit = self.units.get(peer)
        if unit is None:
            return f"MachineOf peer {peer} does not exist"
        if unit.unit_name.is_template:
            return f"MachineOf peer {peer} is a template, which is never scheduled"
        if unit.desired_state == INACTIVE:
            return f"MachineOf peer {peer} has desired state inactive"
        return None

    def _resolve(self, machine_id: str) -> list[str]:
        """Return the machine ids that `machine_id` names: itself if present, else those it starts."""
        if machine_id not in self._ids:
            if machine_id in self.cluster.slots:
                self._ids[machine_id] = [machine_id]
            else:
                ids = self.machine_ids
                at = bisect.bisect_left(ids, machine_id)
                end = at
                while end < len(ids) and ids[end].startswith(machine_id):
                    end += 1
                self._ids[machine_id] = ids[at:end]
        return self._ids[machine_id]

    def _machines_with(self, required: Mapping[str, frozenset[str]]) -> frozenset[str]:
        key = tuple(sorted((k, tuple(sorted(v))) for k, v in required.items()))
        if key not in self._metadata:
            self._metadata[key] = frozenset(
                mid for mid, slot in self.cluster.slots.items() if _metadata_ok(required, slot.metadata)
            )
        return self._metadata[key]

    def _result(self) -> Plan:
        schedule = dict(sorted(self.cluster.where.items()))
        changes = []
        for name in sorted(set(self.schedule) | set(schedule)):
            old, new = self.schedule.get(name), schedule.get(name)
            if old == new:
                continue
            if new is None:
                reason = self.left.get(name) or self.unplaceable.get(name, "unscheduled")
                if name in self.unplaceable and self.unplaceable[name] != reason:
                    reason += f"; cannot be placed: {self.unplaceable[name]}"
            elif old is None:
                reason = self.placed_by[name]
            else:
                reason = f"{self.left.get(name, 'moved')}; {self.placed_by[name]}"
            changes.append(Decision(name, old, new, reason))
        global_machines = {g: list(self.cluster.global_on.get(g, [])) for g in self.globals}
        return Plan(schedule, changes, dict(sorted(self.unplaceable.items())), global_machines)

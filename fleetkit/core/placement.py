"""Placement state of one scheduling pass: which units are on which machine.

`_Cluster` keeps, for each machine, its units, its load and indexes of the
Conflicts and Replaces patterns that those units match or declare, so that
`blocker` and `victims` check a unit against a machine without scanning every
unit. It also applies global units (`apply_global`). `fleetkit.core.scheduler`
creates one `_Cluster` per `plan` or `global_targets` call. Everything here is
internal to the scheduler.
"""

from __future__ import annotations

import bisect
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Iterable, Mapping

from fleetkit.core.units import Unit

if TYPE_CHECKING:
    from fleetkit.core.scheduler import Machine


def _metadata_ok(required: Mapping[str, frozenset[str]], metadata: Mapping[str, str]) -> bool:
    return all(metadata.get(key) in allowed for key, allowed in required.items())


class _PatternIndex:
    """For each unit name, the Conflicts and Replaces patterns that match it.

    Computed once per pass from the pattern side: a glob's literal prefix
    narrows the sorted names by bisection, so ``web@*.service`` is tested only
    against names starting with ``web@``.
    """

    def __init__(self, units: Mapping[str, Unit]):
        names = sorted(units)
        patterns = {p for u in units.values() for p in (*u.options.conflicts, *u.options.replaces)}
        hits: dict[str, list[str]] = {}
        for pattern in sorted(patterns):
            cut = min((i for i in map(pattern.find, "*?[") if i >= 0), default=-1)
            if cut < 0:
                if pattern in units:
                    hits.setdefault(pattern, []).append(pattern)
                continue
            prefix = pattern[:cut]
            at = bisect.bisect_left(names, prefix)
            while at < len(names) and names[at].startswith(prefix):
                if fnmatchcase(names[at], pattern):
                    hits.setdefault(names[at], []).append(pattern)
                at += 1
        self._hits = {name: tuple(found) for name, found in hits.items()}
        self._sets = {name: frozenset(found) for name, found in hits.items()}

    def matching(self, name: str) -> tuple[str, ...]:
        return self._hits.get(name, ())

    def matches(self, name: str, pattern: str) -> bool:
        return pattern in self._sets.get(name, ())


class _Slot:
    """One machine during a pass: its units, load and pattern indexes."""

    __slots__ = ("id", "metadata", "load", "hits", "conflict_owners", "replace_owners")

    def __init__(self, machine: Machine, machine_id: str):
        self.id = machine_id
        self.metadata = machine.metadata
        self.load = 0
        # pattern -> names on this machine, as insertion-ordered dicts for stable messages
        self.hits: dict[str, dict[str, None]] = {}  # names that the pattern matches
        self.conflict_owners: dict[str, dict[str, None]] = {}  # names declaring Conflicts=pattern
        self.replace_owners: dict[str, dict[str, None]] = {}  # names declaring Replaces=pattern


def _add(index: dict[str, dict[str, None]], key: str, name: str) -> None:
    index.setdefault(key, {})[name] = None


def _discard(index: dict[str, dict[str, None]], key: str, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.pop(name, None)
        if not names:
            del index[key]


def _first_other(names: Iterable[str], name: str) -> str | None:
    return next((other for other in names if other != name), None)


class _Cluster:
    """The placement of units on machines during a pass, with the checks that depend on it."""

    def __init__(self, units: Mapping[str, Unit], machines: Mapping[str, Machine]):
        self.units = units
        self.index = _PatternIndex(units)
        self.replace_group = _replace_groups(units, self.index)
        self.slots = {mid: _Slot(machines[mid], mid) for mid in sorted(machines)}
        self.where: dict[str, str] = {}  # non-global unit -> machine id
        self.global_on: dict[str, list[str]] = {}  # global unit -> machine ids

    def add(self, name: str, machine_id: str) -> None:
        slot, options = self.slots[machine_id], self.units[name].options
        slot.load += 1
        for pattern in self.index.matching(name):
            _add(slot.hits, pattern, name)
        for pattern in options.conflicts:
            _add(slot.conflict_owners, pattern, name)
        for pattern in options.replaces:
            _add(slot.replace_owners, pattern, name)
        if options.is_global:
            self.global_on.setdefault(name, []).append(machine_id)
        else:
            self.where[name] = machine_id

    def remove(self, name: str) -> None:
        slot, options = self.slots[self.where.pop(name)], self.units[name].options
        slot.load -= 1
        for pattern in self.index.matching(name):
            _discard(slot.hits, pattern, name)
        for pattern in options.conflicts:
            _discard(slot.conflict_owners, pattern, name)
        for pattern in options.replaces:
            _discard(slot.replace_owners, pattern, name)

    def replaces(self, a: str, b: str) -> bool:
        """Return whether `a` displaces `b`: a Replaces pattern matches and no cycle links them."""
        if a == b or self.replace_group.get(a, a) == self.replace_group.get(b, b):
            return False
        return any(self.index.matches(b, p) for p in self.units[a].options.replaces)

    def blocker(self, name: str, machine_id: str) -> str | None:
        """Why `name` may not join `machine_id`, ignoring units it would displace."""
        slot = self.slots[machine_id]
        for pattern in self.units[name].options.conflicts:
            other = _first_other(slot.hits.get(pattern, ()), name)
            if other:
                return f"conflicts with {other} on {machine_id}"
        matching = self.index.matching(name)
        for pattern in matching:
            other = _first_other(slot.conflict_owners.get(pattern, ()), name)
            if other:
                return f"conflicts with {other} on {machine_id}"
        for pattern in matching:
            for owner in slot.replace_owners.get(pattern, ()):
                if self.replaces(owner, name):
                    return f"replaced by {owner} on {machine_id}"
        return None

    def victims(self, name: str, machine_id: str) -> tuple[list[str], str | None]:
        """Return the units `name` would displace on `machine_id`, or why it may not."""
        slot, found = self.slots[machine_id], []
        for pattern in self.units[name].options.replaces:
            for other in slot.hits.get(pattern, ()):
                if other in found or not self.replaces(name, other):
                    continue
                if self.units[other].options.is_global:
                    return [], f"would replace global unit {other} on {machine_id}, which cannot move"
                found.append(other)
        return found, None

    def apply_global(self, name: str) -> list[str]:
        """Add the global unit `name` to every machine it applies on; return those ids."""
        required = self.units[name].options.machine_metadata
        for machine_id, slot in self.slots.items():
            if _metadata_ok(required, slot.metadata) and self.blocker(name, machine_id) is None:
                self.add(name, machine_id)
        return list(self.global_on.get(name, []))


def _replace_groups(units: Mapping[str, Unit], index: _PatternIndex) -> dict[str, str]:
    """Map each unit in the graph of Replaces matches to a representative unit.

    Units with the same representative are on a cycle (a strongly connected
    component); Replaces between them is circular and ignored, which keeps the
    relation acyclic so that displacements always come to an end.
    """
    owners: dict[str, list[str]] = {}
    for name, unit in units.items():
        for pattern in unit.options.replaces:
            owners.setdefault(pattern, []).append(name)
    edges: dict[str, list[str]] = {}
    reverse: dict[str, list[str]] = {}
    for name in units if owners else ():
        for pattern in index.matching(name):
            for owner in owners.get(pattern, ()):
                if owner != name:
                    edges.setdefault(owner, []).append(name)
                    reverse.setdefault(name, []).append(owner)

    finished: list[str] = []  # Kosaraju: depth-first finish order, then the reversed graph
    seen: set[str] = set()
    for root in edges:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(edges[root]))]
        while stack:
            node, successors = stack[-1]
            successor = next(successors, None)
            if successor is None:
                finished.append(stack.pop()[0])
            elif successor not in seen:
                seen.add(successor)
                stack.append((successor, iter(edges.get(successor, ()))))
    group: dict[str, str] = {}
    for root in reversed(finished):
        if root not in group:
            group[root], todo = root, [root]
            while todo:
                for predecessor in reverse.get(todo.pop(), ()):
                    if predecessor not in group:
                        group[predecessor] = root
                        todo.append(predecessor)
    return group

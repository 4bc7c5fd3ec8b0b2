"""Records exchanged between engine and agents, independent of the transport."""

from __future__ import annotations

from dataclasses import dataclass, field

# systemd ActiveState values that mean the unit runs or is about to.
RUNNING_ACTIVE_STATES = frozenset({"active", "activating", "reloading"})


@dataclass(frozen=True, slots=True)
class DesiredUnit:
    """A unit the engine wants on one machine, with the desired state there."""

    name: str
    unit_file: str
    hash: str
    desired_state: str


@dataclass(frozen=True, slots=True)
class UnitState:
    """The current state of one unit on one machine, as its agent reports it."""

    name: str
    hash: str
    load_state: str
    active_state: str
    sub_state: str


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """What an agent announces about its machine."""

    id: str
    ip: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    version: str = ""


def current_state(state: UnitState | None) -> str:
    """Return fleet's coarse current state (inactive, loaded or launched) for a reported state."""
    if state is None:
        return "inactive"
    if state.active_state in RUNNING_ACTIVE_STATES:
        return "launched"
    return "loaded"


@dataclass(frozen=True, slots=True)
class SnapshotMessage:
    """Every unit desired on a machine; replaces whatever the agent had."""

    units: list[DesiredUnit]


@dataclass(frozen=True, slots=True)
class ChangeMessage:
    """Units added to or changed on a machine, and names removed from it."""

    upserted: list[DesiredUnit]
    removed: list[str]

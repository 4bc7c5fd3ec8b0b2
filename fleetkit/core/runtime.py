"""The runtime contract: how an agent drives its local service manager.

A runtime is registered under the entry-point group ``fleetkit.runtime``; the
entry-point name is ``[runtime] backend``. The agent is its only caller, and
it only ever names units that fleetkit placed on this machine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UnitStatus:
    """The service manager's view of one unit (systemd's LoadState, ActiveState, SubState)."""

    name: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int = 0


class Runtime(abc.ABC):
    """Abstract local service manager."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect to the manager; raises `RuntimeBackendError` naming the bus when it fails."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; units keep running."""

    @abc.abstractmethod
    async def installed_units(self) -> dict[str, str]:
        """Return the units fleetkit installed on this machine, as name to content hash."""

    @abc.abstractmethod
    async def install(self, files: Mapping[str, tuple[str, str]]) -> None:
        """Write unit files, given as name to (content, hash), and reload the manager once."""

    @abc.abstractmethod
    async def uninstall(self, names: Iterable[str]) -> None:
        """Remove unit files fleetkit installed and reload the manager once."""

    @abc.abstractmethod
    async def start(self, names: Iterable[str]) -> dict[str, str]:
        """Start units and return each one's job result ("done", "failed", ...)."""

    @abc.abstractmethod
    async def stop(self, names: Iterable[str]) -> dict[str, str]:
        """Stop units and return each one's job result."""

    @abc.abstractmethod
    async def statuses(self, names: Iterable[str]) -> dict[str, UnitStatus]:
        """Return the current status of each named unit."""

    @abc.abstractmethod
    def status_changes(self) -> AsyncIterator[UnitStatus]:
        """Yield a status each time the manager reports a unit's state changed."""

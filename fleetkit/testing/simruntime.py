"""A runtime that simulates a service manager in memory, for scale benchmarks of fleetkit itself.

It keeps unit files, load and active states in a dict and starts a unit
after `start_delay` seconds, so thousands of units cost fleetkit's own work
and almost nothing else. Each activation is appended, with its wall-clock
time, to the JSON-lines file named by ``[runtime] bus`` (``sim:/path``), so
a benchmark can read when every unit became active. It never runs a process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping

from fleetkit.core.runtime import Runtime, UnitStatus


class SimulatedRuntime(Runtime):
    """In-memory units; see the module docstring."""

    def __init__(self, journal: str, *, start_delay: float = 0.001):
        self._journal_path = journal
        self._start_delay = start_delay
        self._files: dict[str, str] = {}
        self._states: dict[str, UnitStatus] = {}
        self._changes: asyncio.Queue[UnitStatus] = asyncio.Queue()
        self._journal = None

    @classmethod
    def from_config(cls, runtime_config) -> SimulatedRuntime:
        bus = runtime_config.bus
        return cls(bus.removeprefix("unix:path=") if bus.startswith("unix:path=") else bus)

    async def connect(self) -> None:
        if self._journal is None:
            self._journal = open(self._journal_path, "a", buffering=1)

    async def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    async def installed_units(self) -> dict[str, str]:
        return dict(self._files)

    async def install(self, files: Mapping[str, tuple[str, str]]) -> None:
        for name, (_text, unit_hash) in files.items():
            self._files[name] = unit_hash
            self._set(name, "loaded", "inactive", "dead")

    async def uninstall(self, names: Iterable[str]) -> None:
        for name in names:
            self._files.pop(name, None)
            self._states.pop(name, None)

    async def start(self, names: Iterable[str]) -> dict[str, str]:
        names = list(names)
        await asyncio.sleep(self._start_delay)
        now = time.time()
        for name in names:
            self._set(name, "loaded", "active", "running")
            self._journal.write(json.dumps({"unit": name, "active_at": now}) + "\n")
        return {name: "done" for name in names}

    async def stop(self, names: Iterable[str]) -> dict[str, str]:
        names = list(names)
        for name in names:
            self._set(name, "loaded", "inactive", "dead")
        return {name: "done" for name in names}

    async def statuses(self, names: Iterable[str]) -> dict[str, UnitStatus]:
        return {name: self._states[name] for name in names if name in self._states}

    def _set(self, name: str, load: str, active: str, sub: str) -> None:
        status = UnitStatus(name, load, active, sub)
        self._states[name] = status
        self._changes.put_nowait(status)

    async def status_changes(self) -> AsyncIterator[UnitStatus]:
        while True:
            yield await self._changes.get()

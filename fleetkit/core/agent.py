"""The agent: makes the local service manager run what the engine wants here.

The transport feeds the agent a snapshot of the units desired on this machine
and then changes. The agent converges the runtime in batches (one reload per
batch, starts and stops issued together), tracks unit states from the
runtime's change signals and reports only what changed. It touches only the
units fleetkit installed, and after a restart it adopts the units that still
run instead of restarting them: nothing happens until the first snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from fleetkit.core.errors import RuntimeBackendError
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.runtime import Runtime, UnitStatus
from fleetkit.core.states import (
    RUNNING_ACTIVE_STATES,
    ChangeMessage,
    DesiredUnit,
    MachineInfo,
    SnapshotMessage,
    UnitState,
)

log = logging.getLogger(__name__)

# Seconds between full state resyncs from the runtime; signals cover the rest.
RESYNC_INTERVAL = 30.0
# Seconds to wait before retrying a batch that the runtime rejected.
RETRY_DELAY = 2.0
# A converge pass starts once no change arrived for BATCH_SECONDS, or at the
# latest MAX_BATCH_SECONDS after the first, so each reload covers many units.
BATCH_SECONDS = 0.03
MAX_BATCH_SECONDS = 0.3


class Agent:
    """Converges one machine; see the module docstring."""

    def __init__(self, machine: MachineInfo, runtime: Runtime, *, resync_interval: float = RESYNC_INTERVAL):
        self.machine = machine
        self._runtime = runtime
        self._resync_interval = resync_interval

        self.desired: dict[str, DesiredUnit] = {}
        self.installed: dict[str, str] = {}
        self.status: dict[str, UnitStatus] = {}
        self._has_snapshot = False
        self._start_requested: dict[str, str] = {}

        self._dirty = asyncio.Event()
        self._outbox_changed: dict[str, UnitState] = {}
        self._outbox_removed: set[str] = set()
        self._outbox_ready = asyncio.Event()
        self._adopted = asyncio.Event()
        self._jobs: asyncio.TaskGroup | None = None

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Connect to the runtime, adopt what runs, then converge until cancelled.

        A lost connection to the service manager is retried with backoff;
        the units keep running meanwhile, and the agent adopts them again.
        """
        attempts = Attempts(Backoff(initial=0.5, cap=5.0))
        while True:
            try:
                await self._connect_and_adopt()
            except RuntimeBackendError as error:
                if attempts.failures == 0:
                    log.error("cannot reach the service manager, retrying: %s", error)
                await self._runtime.close()
                await attempts.sleep()
                continue
            attempts.reset()
            try:
                async with asyncio.TaskGroup() as group:
                    self._jobs = group
                    group.create_task(self._follow_status_changes())
                    group.create_task(self._resync_loop())
                    group.create_task(self._converge_loop())
            except* RuntimeBackendError as group:
                log.error("lost the connection to the service manager, reconnecting: %s", group.exceptions[0])
            await self._runtime.close()

    async def _connect_and_adopt(self) -> None:
        await self._runtime.connect()
        self.installed = await self._runtime.installed_units()
        await self._refresh(self.installed)
        log.info("agent on %s adopted %d installed units", self.machine.id, len(self.installed))
        self._adopted.set()
        # Converge again: changes may have arrived while the connection was down.
        self._dirty.set()

    async def wait_adopted(self) -> None:
        await self._adopted.wait()

    # -- transport-facing --------------------------------------------------

    def full_state(self) -> list[UnitState]:
        """Return the state of every installed unit, for a (re)connect."""
        return [self._state_of(name) for name in sorted(self.installed)]

    def apply(self, message: SnapshotMessage | ChangeMessage) -> None:
        """Take a snapshot or change from the engine and schedule a converge pass."""
        if isinstance(message, SnapshotMessage):
            self.desired = {unit.name: unit for unit in message.units}
            self._has_snapshot = True
        else:
            for unit in message.upserted:
                self.desired[unit.name] = unit
            for name in message.removed:
                self.desired.pop(name, None)
        self._dirty.set()

    async def next_updates(self) -> tuple[list[UnitState], list[str]]:
        """Wait for state changes and return them, changed first then removed names."""
        await self._outbox_ready.wait()
        self._outbox_ready.clear()
        changed = list(self._outbox_changed.values())
        removed = sorted(self._outbox_removed)
        self._outbox_changed.clear()
        self._outbox_removed.clear()
        return changed, removed

    # -- state tracking ----------------------------------------------------

    def _state_of(self, name: str) -> UnitState:
        status = self.status.get(name)
        return UnitState(
            name=name,
            hash=self.installed.get(name, ""),
            load_state=status.load_state if status else "",
            active_state=status.active_state if status else "",
            sub_state=status.sub_state if status else "",
        )

    def _record(self, status: UnitStatus) -> None:
        if status.name not in self.installed:
            return
        previous = self.status.get(status.name)
        self.status[status.name] = status
        same = (
            previous is not None
            and (previous.load_state, previous.active_state, previous.sub_state)
            == (status.load_state, status.active_state, status.sub_state)
        )
        if not same:
            self._queue_changed(status.name)

    def _queue_changed(self, name: str) -> None:
        self._outbox_removed.discard(name)
        self._outbox_changed[name] = self._state_of(name)
        self._outbox_ready.set()

    def _queue_removed(self, name: str) -> None:
        self._outbox_changed.pop(name, None)
        self._outbox_removed.add(name)
        self._outbox_ready.set()

    async def _refresh(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        for status in (await self._runtime.statuses(names)).values():
            self._record(status)

    async def _follow_status_changes(self) -> None:
        async for status in self._runtime.status_changes():
            self._record(status)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            try:
                await self._refresh(self.installed)
            except RuntimeBackendError as error:
                log.warning("state resync failed: %s", error)

    # -- convergence -------------------------------------------------------

    async def _converge_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await self._settle()
            if not self._has_snapshot:
                continue
            try:
                await self.converge()
            except RuntimeBackendError as error:
                log.error("converging failed, retrying in %.0fs: %s", RETRY_DELAY, error)
                await asyncio.sleep(RETRY_DELAY)
                self._dirty.set()

    async def _settle(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_BATCH_SECONDS
        while True:
            self._dirty.clear()
            await asyncio.sleep(BATCH_SECONDS)
            if not self._dirty.is_set() or loop.time() >= deadline:
                self._dirty.clear()
                return

    def _is_running(self, name: str) -> bool:
        status = self.status.get(name)
        return status is not None and status.active_state in RUNNING_ACTIVE_STATES

    async def converge(self) -> None:
        """Run one batch: stop and remove what is no longer wanted, install, then start and stop."""
        desired = dict(self.desired)
        removed = [name for name in self.installed if name not in desired]
        replaced = [name for name, unit in desired.items() if name in self.installed and self.installed[name] != unit.hash]
        added = [name for name in desired if name not in self.installed]

        stop_first = [name for name in removed + replaced if self._is_running(name)]
        if stop_first:
            await self._runtime.stop(stop_first)
        if removed:
            await self._runtime.uninstall(removed)
            for name in removed:
                self.installed.pop(name, None)
                self.status.pop(name, None)
                self._start_requested.pop(name, None)
                self._queue_removed(name)
        if replaced or added:
            files = {name: (desired[name].unit_file, desired[name].hash) for name in replaced + added}
            await self._runtime.install(files)
            for name in replaced + added:
                self.installed[name] = desired[name].hash
                self.status.pop(name, None)
                self._start_requested.pop(name, None)
            await self._refresh(replaced + added)
            for name in replaced + added:
                self._queue_changed(name)

        to_start = []
        to_stop = []
        for name, unit in desired.items():
            if unit.desired_state == "launched":
                if not self._is_running(name) and self._start_requested.get(name) != unit.hash:
                    to_start.append(name)
            else:
                self._start_requested.pop(name, None)
                if self._is_running(name):
                    to_stop.append(name)

        # Jobs run in the background, so the next batch can be installed while
        # systemd still works through this one.
        if to_stop:
            self._jobs.create_task(self._run_jobs("stop", to_stop))
        if to_start:
            for name in to_start:
                self._start_requested[name] = desired[name].hash
            self._jobs.create_task(self._run_jobs("start", to_start))

        if removed or replaced or added or to_start or to_stop:
            log.info(
                "converged: %d removed, %d replaced, %d added, %d started, %d stopped",
                len(removed), len(replaced), len(added), len(to_start), len(to_stop),
            )

    async def _run_jobs(self, verb: str, names: list[str]) -> None:
        """Start or stop `names`, then record their states; a failure is logged, not raised."""
        call = self._runtime.start if verb == "start" else self._runtime.stop
        try:
            results = await call(names)
            self._log_job_failures(verb, results)
            await self._refresh(names)
        except RuntimeBackendError as error:
            log.error("%s of %d units failed: %s", verb, len(names), error)
            if verb == "start":
                for name in names:
                    self._start_requested.pop(name, None)
            self._dirty.set()

    @staticmethod
    def _log_job_failures(verb: str, results: dict[str, str]) -> None:
        failed = {name: result for name, result in results.items() if result != "done"}
        if failed:
            sample = ", ".join(f"{name}={result}" for name, result in sorted(failed.items())[:5])
            log.warning("%s job did not complete for %d units: %s", verb, len(failed), sample)

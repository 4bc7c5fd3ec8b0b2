"""The systemd runtime: drives a local systemd manager over D-Bus.

Registered as the ``systemd`` entry point of ``fleetkit.runtime``. It works
with the system manager (``bus = "system"``), a user manager (``bus = "user"``,
from DBUS_SESSION_BUS_ADDRESS) or any manager reachable at a D-Bus address.

Design, for speed at thousands of units:

* Unit files are written into one unit directory and the manager is reloaded
  once per batch, instead of one ``LinkUnitFiles`` call per unit.
* Starts and stops go out concurrently, at most `max_in_flight` calls at a
  time on one connection. Job results come from the ``JobRemoved`` signal,
  matched by job object path.
* Status changes come from one ``PropertiesChanged`` match rule covering every
  unit object path, so nothing polls. On ``UnitRemoved`` the status streams
  only forget a unit that systemd unloaded. ``JobRemoved`` carries job
  results and no state, so it feeds `start` and `stop` only.

Time budget: each D-Bus call is bounded by `call_timeout` (30 s by default)
and `Reload` by `reload_timeout`. A job that has no result after
`job_timeout` (90 s by default) is reported as "timeout" and left to systemd.
Every failure to reach the manager raises `RuntimeBackendError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from dbus_fast import Message, MessageType

from fleetkit.core.errors import RuntimeBackendError
from fleetkit.core.runtime import Runtime, UnitStatus
from fleetkit.plugins import systemd_units
from fleetkit.plugins.systemd_dbus import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_MAX_IN_FLIGHT,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    PROPERTIES_INTERFACE,
    SERVICE_INTERFACE,
    SYSTEMD_SERVICE,
    UNIT_INTERFACE,
    UNIT_PATH_PREFIX,
    SystemdBus,
    SystemdCallError,
    describe_bus,
    unit_name_from_path,
    unit_path,
)
from fleetkit.plugins.systemd_status import StatusStream, disconnected_error, states_from_signal

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_JOB_TIMEOUT = 90.0
DEFAULT_RELOAD_TIMEOUT = 90.0
# Names per ListUnitsByNames call; keeps each reply well below the D-Bus message size limit.
STATUS_CHUNK = 256
# Job results are kept for this many jobs whose call has not returned yet.
_EARLY_RESULTS_MAX = 4096

# A start/stop call that systemd rejects (unknown unit, bad unit file) gets this result.
RESULT_REJECTED = "rejected"
RESULT_TIMEOUT = "timeout"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"

_MATCH_RULES = (
    f"type='signal',sender='{SYSTEMD_SERVICE}',path='{MANAGER_PATH}',interface='{MANAGER_INTERFACE}',member='JobRemoved'",
    f"type='signal',sender='{SYSTEMD_SERVICE}',path='{MANAGER_PATH}',interface='{MANAGER_INTERFACE}',member='UnitRemoved'",
    f"type='signal',sender='{SYSTEMD_SERVICE}',interface='{PROPERTIES_INTERFACE}',member='PropertiesChanged',"
    f"path_namespace='{UNIT_PATH_PREFIX.rstrip('/')}'",
)


async def _gather(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the coroutines concurrently; on failure cancel the rest and raise the first error itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as failures:
        # Callers expect RuntimeBackendError, not an ExceptionGroup around it.
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


class _JobTracker:
    """Pairs job object paths returned by StartUnit/StopUnit with their JobRemoved results.

    JobRemoved can be handled before the coroutine that made the call has
    seen the call's reply, so results for unknown jobs are kept while any
    call is still in flight.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._early: OrderedDict[str, str] = OrderedDict()
        self._calls = 0

    def begin_call(self) -> None:
        self._calls += 1

    def end_call(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._early.clear()

    def register(self, job_path: str) -> asyncio.Future[str]:
        future = asyncio.get_running_loop().create_future()
        result = self._early.pop(job_path, None)
        if result is not None:
            future.set_result(result)
        else:
            self._waiting[job_path] = future
        return future

    def forget(self, job_path: str) -> None:
        self._waiting.pop(job_path, None)

    def job_removed(self, job_path: str, result: str) -> None:
        future = self._waiting.pop(job_path, None)
        if future is not None:
            if not future.done():
                future.set_result(result)
        elif self._calls:
            self._early[job_path] = result
            if len(self._early) > _EARLY_RESULTS_MAX:
                self._early.popitem(last=False)

    def fail_all(self, error: BaseException) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        self._early.clear()

    @property
    def waiting(self) -> int:
        return len(self._waiting)


class SystemdRuntime(Runtime):
    """`Runtime` backed by a systemd manager over one D-Bus connection."""

    def __init__(
        self,
        bus: str,
        unit_directory: str,
        *,
        job_timeout: float = DEFAULT_JOB_TIMEOUT,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        reload_timeout: float = DEFAULT_RELOAD_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ):
        """Configure, without connecting.

        `bus` is "system", "user" or a D-Bus address such as ``unix:path=/x/bus``.
        `unit_directory` must be in the manager's unit search path, for example
        ``/run/systemd/system`` or ``$XDG_RUNTIME_DIR/systemd/user``.
        """
        self.bus = bus
        self.unit_directory = unit_directory
        self.job_timeout = job_timeout
        self.reload_timeout = reload_timeout
        self._dbus = SystemdBus(bus, max_in_flight=max_in_flight, call_timeout=call_timeout)
        self._jobs = _JobTracker()
        self._streams: set[StatusStream] = set()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, runtime_config: Any, env: Mapping[str, str] | None = None) -> SystemdRuntime:
        """Build from a ``[runtime]`` config section (its `bus`, `resolved_unit_directory(env)` and optional `job_timeout`)."""
        environment = os.environ if env is None else env
        return cls(
            runtime_config.bus,
            runtime_config.resolved_unit_directory(environment),
            job_timeout=getattr(runtime_config, "job_timeout", DEFAULT_JOB_TIMEOUT),
        )

    # Connection

    async def connect(self) -> None:
        """Connect, add the signal match rules and subscribe to systemd's signals.

        May be called again after `close` or a lost connection. Raises
        `RuntimeBackendError` naming the bus when the manager cannot be reached.
        """
        if self._dbus.connected:
            return
        await self._dbus.connect(self._on_message)
        try:
            for rule in _MATCH_RULES:
                await self._dbus.add_match(rule)
            # Without Subscribe systemd emits no JobRemoved or PropertiesChanged signals.
            await self._dbus.call("Subscribe")
        except BaseException:
            self._dbus.disconnect()
            raise
        self._watcher = asyncio.create_task(self._watch_connection(), name=f"systemd-runtime-watch {self.bus}")
        logger.info("connected to systemd on %s, unit directory %s", describe_bus(self.bus), self.unit_directory)

    async def close(self) -> None:
        """Disconnect; units keep running. Pending jobs and status streams fail with `RuntimeBackendError`."""
        self._dbus.disconnect()
        if self._watcher is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._watcher
            except TimeoutError:
                self._watcher.cancel()
            self._watcher = None

    async def wait_closed(self) -> None:
        """Return once the connection is closed, by `close` or because the bus went away."""
        if self._watcher is not None:
            await asyncio.shield(self._watcher)

    async def _watch_connection(self) -> None:
        await self._dbus.wait_closed()
        error = disconnected_error(describe_bus(self.bus))
        self._jobs.fail_all(error)
        for stream in list(self._streams):
            stream.fail(error)
        self._streams.clear()

    def _on_message(self, message: Message) -> None:
        # This runs inside dbus-fast's reader callback, so it only resolves
        # futures and queues events, without I/O or awaiting.
        if message.message_type is not MessageType.SIGNAL:
            return
        if message.member == "JobRemoved" and message.interface == MANAGER_INTERFACE:
            _job_id, job_path, _unit, result = message.body
            self._jobs.job_removed(job_path, result)
        elif message.member == "PropertiesChanged" and message.interface == PROPERTIES_INTERFACE:
            if not self._streams or message.body[0] != UNIT_INTERFACE:
                return
            name = unit_name_from_path(message.path)
            if name is None:
                return
            changed = message.body[1]
            invalidated = message.body[2]
            states = states_from_signal(changed)
            if not states and not any(prop in invalidated for prop in ("LoadState", "ActiveState", "SubState")):
                return
            for stream in self._streams:
                stream.feed(name, states)
        elif message.member == "UnitRemoved" and message.interface == MANAGER_INTERFACE:
            # systemd freed an inactive unit. Its last state was already
            # reported, so the streams only drop what they remember of it.
            for stream in self._streams:
                stream.feed(message.body[0], None)

    # Unit files

    async def installed_units(self) -> dict[str, str]:
        """Return name to hash for the unit files fleetkit wrote into the unit directory; other files are ignored."""
        return await asyncio.to_thread(systemd_units.scan, self.unit_directory)

    async def install(self, files: Mapping[str, tuple[str, str]]) -> None:
        """Write the unit files atomically and reload the manager once.

        Raises `UnitError` for an invalid name or hash and `RuntimeBackendError`
        when a file that fleetkit did not write is in the way (nothing is
        written then), when writing fails or when the reload fails.
        """
        files = dict(files)
        if not files:
            return
        await asyncio.to_thread(systemd_units.write_units, self.unit_directory, files)
        await self.reload()
        logger.debug("installed %d unit file(s) into %s", len(files), self.unit_directory)

    async def uninstall(self, names: Iterable[str]) -> None:
        """Remove fleetkit's unit files and reload the manager once; stopping the units is the caller's job."""
        removed = await asyncio.to_thread(systemd_units.remove_units, self.unit_directory, list(names))
        if removed:
            await self.reload()
        logger.debug("uninstalled %d unit file(s) from %s", len(removed), self.unit_directory)

    async def reload(self) -> None:
        """Make the manager reread all unit files (``Reload``); returns when the reload is done."""
        await self._dbus.call("Reload", timeout=self.reload_timeout)

    # Jobs

    async def start(self, names: Iterable[str]) -> dict[str, str]:
        """Start the units concurrently and return each one's job result.

        Results are systemd's (``done``, ``failed``, ``canceled``,
        ``dependency``, ``skipped`` ...) or fleetkit's own. ``timeout`` means
        the job did not finish within `job_timeout`. ``rejected`` means systemd
        rejected the call, for example for an unknown unit, and the log has
        systemd's message.
        """
        return await self._run_jobs("StartUnit", names)

    async def stop(self, names: Iterable[str]) -> dict[str, str]:
        """Stop the units concurrently and return each one's job result, as `start` does.

        A unit that systemd has not loaded is reported as ``done``, because none of it runs.
        """
        return await self._run_jobs("StopUnit", names)

    async def _run_jobs(self, method: str, names: Iterable[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(names))
        results = await _gather([self._run_job(method, name) for name in unique])
        return dict(zip(unique, results))

    async def _run_job(self, method: str, name: str) -> str:
        self._jobs.begin_call()
        try:
            try:
                (job_path,) = await self._dbus.call(method, "ss", [name, "replace"])
            except SystemdCallError as exc:
                if method == "StopUnit" and exc.dbus_error == NO_SUCH_UNIT:
                    # systemd has no such unit in memory, so nothing of it runs.
                    logger.debug("StopUnit of %s: not loaded, nothing to stop", name)
                    return "done"
                logger.warning("%s of %s rejected: %s", method, name, exc)
                return RESULT_REJECTED
            future = self._jobs.register(job_path)
        finally:
            self._jobs.end_call()

        try:
            async with asyncio.timeout(self.job_timeout):
                return await future
        except TimeoutError:
            self._jobs.forget(job_path)
            logger.warning("%s of %s: job %s did not finish within %.0f s", method, name, job_path, self.job_timeout)
            return RESULT_TIMEOUT

    # Status

    async def statuses(self, names: Iterable[str]) -> dict[str, UnitStatus]:
        """Return each unit's load, active and sub state (``ListUnitsByNames``, in concurrent chunks).

        Units without a unit file are reported with load state ``not-found``.
        `main_pid` is left 0; see `main_pid`.
        """
        unique = list(dict.fromkeys(names))
        chunks = [unique[i : i + STATUS_CHUNK] for i in range(0, len(unique), STATUS_CHUNK)]
        replies = await _gather([self._dbus.call("ListUnitsByNames", "as", [chunk]) for chunk in chunks])
        result: dict[str, UnitStatus] = {}
        for (rows,) in replies:
            for row in rows:
                result[row[0]] = UnitStatus(name=row[0], load_state=row[2], active_state=row[3], sub_state=row[4])
        return result

    async def main_pid(self, name: str) -> int:
        """Return the main process id of service `name`, or 0 when it has none or is not loaded."""
        try:
            (path,) = await self._dbus.call("GetUnit", "s", [name])
        except SystemdCallError as exc:
            if exc.dbus_error == NO_SUCH_UNIT:
                return 0
            raise
        (value,) = await self._dbus.call(
            "Get", "ss", [SERVICE_INTERFACE, "MainPID"], path=path, interface=PROPERTIES_INTERFACE
        )
        return int(value.value)

    def status_changes(self) -> StatusStream:
        """Return a stream of the state changes of every unit, for one consumer task.

        Events are queued from the moment this is called, so call it before
        starting the units whose changes matter. The stream ends with
        `RuntimeBackendError` when the connection is lost; call `aclose()` on
        it when done.
        """
        stream = StatusStream(self._fetch_states, self._streams.discard)
        self._streams.add(stream)
        return stream

    async def _fetch_states(self, name: str, properties: tuple[str, ...]) -> dict[str, str]:
        path = unit_path(name)
        try:
            replies = await _gather(
                [self._dbus.call("Get", "ss", [UNIT_INTERFACE, prop], path=path, interface=PROPERTIES_INTERFACE) for prop in properties]
            )
        except SystemdCallError as exc:
            # The stream still reports the properties the signal carried.
            logger.warning("cannot read the state of %s after a change signal: %s", name, exc)
            return {}
        return {prop: reply[0].value for prop, reply in zip(properties, replies)}

    def statistics(self) -> dict[str, int]:
        """Return counters for monitoring: calls in flight (and the maximum seen), jobs waiting, events dropped."""
        return {
            "calls_in_flight": self._dbus.in_flight,
            "max_calls_in_flight": self._dbus.max_in_flight_seen,
            "jobs_waiting": self._jobs.waiting,
            "status_streams": len(self._streams),
            "status_events_dropped": sum(stream.dropped for stream in self._streams),
        }

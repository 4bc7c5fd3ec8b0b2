"""The stream of unit status changes that `SystemdRuntime.status_changes` returns.

The runtime's message handler feeds each stream from signals, without
blocking. A stream is consumed by one task. Each stream has a bounded queue:
when the consumer falls behind and the queue is full, new events are dropped,
counted in `dropped`, and logged, and the consumer should resynchronise with
`SystemdRuntime.statuses`. The first event seen for a unit is always
yielded, later ones only when the state differs from the last one yielded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fleetkit.core.errors import RuntimeBackendError
from fleetkit.core.runtime import UnitStatus

logger = logging.getLogger(__name__)

STATE_PROPERTIES = ("LoadState", "ActiveState", "SubState")
DEFAULT_QUEUE_SIZE = 10_000

# Fetches the missing state properties of one unit; returns them by property name.
FetchStates = Callable[[str, tuple[str, ...]], Awaitable[dict[str, str]]]


class StatusStream:
    """Async iterator of `UnitStatus`, one per change of a unit's (load, active, sub) state."""

    def __init__(self, fetch: FetchStates, on_close: Callable[[StatusStream], None], *, maxsize: int = DEFAULT_QUEUE_SIZE):
        self._fetch = fetch
        self._on_close = on_close
        self._queue: asyncio.Queue[tuple[str, dict[str, str] | None] | BaseException] = asyncio.Queue(maxsize)
        # Last state yielded per unit, as (load, active, sub).
        self._last: dict[str, tuple[str, str, str]] = {}
        self._closed = False
        self.dropped = 0

    def feed(self, name: str, states: dict[str, str] | None) -> None:
        """Queue a change of unit `name`.

        `states` contains the state properties that the signal carried, or is
        None when systemd unloaded the unit, so its last state is forgotten.
        """
        if self._closed:
            return
        try:
            self._queue.put_nowait((name, states))
        except asyncio.QueueFull:
            self.dropped += 1
            # Log the first drop and then every thousandth, so a flood does not flood the log too.
            if self.dropped % 1000 == 1:
                logger.warning(
                    "status stream queue is full (%d events); dropped %d event(s) so far, latest for %s; "
                    "the consumer should resynchronise with statuses()",
                    self._queue.maxsize, self.dropped, name,
                )

    def fail(self, error: BaseException) -> None:
        """End the stream: the consumer's next read raises `error` after the queued events."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put_nowait(error)
        except asyncio.QueueFull:
            # The error must reach the consumer, so it replaces the oldest event.
            self._queue.get_nowait()
            self.dropped += 1
            self._queue.put_nowait(error)

    def __aiter__(self) -> StatusStream:
        return self

    async def __anext__(self) -> UnitStatus:
        # Each pass consumes one queued item, so the loop ends once the queue
        # yields a real change or the stream's end.
        while True:
            if self._closed and self._queue.empty():
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            name, states = item
            if states is None:
                self._last.pop(name, None)
                continue
            missing = tuple(prop for prop in STATE_PROPERTIES if prop not in states)
            if missing:
                states = {**states, **await self._fetch(name, missing)}
            status = UnitStatus(
                name=name,
                load_state=states.get("LoadState", ""),
                active_state=states.get("ActiveState", ""),
                sub_state=states.get("SubState", ""),
            )
            # systemd repeats the state properties whenever any unit property
            # changes, so only a different state counts as a change.
            key = (status.load_state, status.active_state, status.sub_state)
            if self._last.get(name) == key:
                continue
            self._last[name] = key
            return status

    async def aclose(self) -> None:
        """Stop receiving events; events still queued are discarded and a blocked read ends."""
        if not self._closed:
            self._closed = True
            self._on_close(self)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(StopAsyncIteration())


def states_from_signal(changed: dict[str, Any]) -> dict[str, str]:
    """Pick the state properties out of a PropertiesChanged body's changed-properties dict."""
    return {prop: changed[prop].value for prop in STATE_PROPERTIES if prop in changed}


def disconnected_error(bus_description: str) -> RuntimeBackendError:
    return RuntimeBackendError(
        f"the connection to {bus_description} closed, so this status stream ended; "
        "reconnect, resynchronise with statuses() and call status_changes() again"
    )

"""D-Bus plumbing for the systemd runtime: addresses, object paths and bounded calls.

`SystemdBus` owns the one connection that a `SystemdRuntime` uses. Every
method call goes through `SystemdBus.call`, which caps the calls in flight,
bounds each call with a timeout and translates failures into
`RuntimeBackendError`. The default cap of 64 stays below the 128 pending
replies per connection that the system bus's dbus-daemon allows by default
(``max_replies_per_connection`` in dbus 1.14's system.conf), and keeps a burst
of thousands of starts from swamping systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from fleetkit.core.errors import RuntimeBackendError

logger = logging.getLogger(__name__)

SYSTEMD_SERVICE = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
SERVICE_INTERFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"

DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_CALL_TIMEOUT = 30.0


class SystemdCallError(RuntimeBackendError):
    """systemd replied to a method call with a D-Bus error; `dbus_error` is its name."""

    def __init__(self, message: str, *, dbus_error: str):
        super().__init__(message)
        self.dbus_error = dbus_error


def escape_path_label(text: str) -> str:
    """Escape a unit name into the last element of its systemd object path.

    ASCII letters and digits stay; every other byte of the UTF-8 encoding
    becomes ``_xx`` (lower-case hex), and the empty string becomes ``_``.
    """
    if not text:
        return "_"
    parts = []
    for byte in text.encode():
        char = chr(byte)
        if char.isascii() and char.isalnum():
            parts.append(char)
        else:
            parts.append(f"_{byte:02x}")
    return "".join(parts)


def unescape_path_label(label: str) -> str:
    """Invert `escape_path_label`; raises ValueError on a malformed ``_xx`` escape."""
    if label == "_":
        return ""
    out = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_":
            hex_digits = label[i + 1 : i + 3]
            if len(hex_digits) != 2:
                raise ValueError(f"truncated escape in object path label {label!r}")
            out.append(int(hex_digits, 16))
            i += 3
        else:
            out.append(ord(label[i]))
            i += 1
    return out.decode()


def unit_name_from_path(path: str) -> str | None:
    """Return the unit name encoded in a unit object path, or None for any other path."""
    if not path.startswith(UNIT_PATH_PREFIX):
        return None
    label = path[len(UNIT_PATH_PREFIX) :]
    if "/" in label:
        return None
    try:
        return unescape_path_label(label)
    except ValueError:
        return None


def unit_path(name: str) -> str:
    """Return the object path of the unit called `name`."""
    return UNIT_PATH_PREFIX + escape_path_label(name)


def describe_bus(bus: str) -> str:
    """Return a human-readable name of a bus setting for error messages."""
    if bus == "system":
        return "the system bus"
    if bus == "user":
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS", "<unset>")
        return f"the user bus ({address})"
    return f"the bus at {bus}"


def make_bus(bus: str) -> MessageBus:
    """Create (not connect) a dbus-fast bus for a ``[runtime] bus`` setting.

    "system" is the system bus socket, "user" reads DBUS_SESSION_BUS_ADDRESS,
    and anything else is taken as a D-Bus address such as ``unix:path=/x/bus``.
    """
    if bus == "system":
        return MessageBus(bus_type=BusType.SYSTEM)
    if bus == "user":
        if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            raise RuntimeBackendError(
                "[runtime] bus = 'user' needs DBUS_SESSION_BUS_ADDRESS, which is not set; "
                "export it or set [runtime] bus to the address, e.g. unix:path=$XDG_RUNTIME_DIR/bus"
            )
        return MessageBus(bus_type=BusType.SESSION)
    if ":" not in bus:
        raise RuntimeBackendError(
            f"[runtime] bus = {bus!r} is neither 'system', 'user' nor a D-Bus address like unix:path=/run/x/bus"
        )
    return MessageBus(bus_address=bus)


class SystemdBus:
    """One connection to a systemd manager with bounded, timed method calls."""

    def __init__(self, bus: str, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, call_timeout: float = DEFAULT_CALL_TIMEOUT):
        self.bus_setting = bus
        self.call_timeout = call_timeout
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._bus: MessageBus | None = None
        self.in_flight = 0
        self.max_in_flight_seen = 0

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def connect(self, handler: Callable[[Message], Any]) -> None:
        """Connect, and pass every incoming message to `handler` (which must not block)."""
        bus = make_bus(self.bus_setting)
        try:
            async with asyncio.timeout(self.call_timeout):
                await bus.connect()
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            raise RuntimeBackendError(
                f"connecting to {describe_bus(self.bus_setting)} timed out after {self.call_timeout:.0f} s; "
                "check that dbus-daemon is running"
            ) from exc
        except Exception as exc:
            raise RuntimeBackendError(
                f"cannot connect to {describe_bus(self.bus_setting)}: {exc}; "
                "check that dbus-daemon is running and [runtime] bus is right"
            ) from exc
        bus.add_message_handler(handler)
        self._bus = bus

    def disconnect(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()

    async def wait_closed(self) -> None:
        """Return when the connection is closed, by `disconnect` or by the peer."""
        if self._bus is None:
            return
        try:
            await self._bus.wait_for_disconnect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.info("connection to %s lost: %s", describe_bus(self.bus_setting), exc)

    async def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_INTERFACE,
        destination: str = SYSTEMD_SERVICE,
        timeout: float | None = None,
    ) -> list[Any]:
        """Call a method and return the reply body.

        Waits for a free slot first (at most `max_in_flight` calls in flight);
        `timeout` (default `call_timeout`) starts once the call is sent. Raises
        `SystemdCallError` when systemd replies with an error, and
        `RuntimeBackendError` on a timeout or a lost connection.
        """
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            # Never let dbus-daemon try to activate systemd from a service file.
            flags=MessageFlag.NO_AUTOSTART,
        )
        seconds = self.call_timeout if timeout is None else timeout
        async with self._semaphore:
            bus = self._bus
            if bus is None or not bus.connected:
                raise RuntimeBackendError(
                    f"not connected to {describe_bus(self.bus_setting)} (calling {member}); "
                    "call connect() again once the manager is back"
                )
            self.in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
            try:
                async with asyncio.timeout(seconds):
                    reply = await bus.call(message)
            except asyncio.CancelledError:
                raise
            except TimeoutError as exc:
                raise RuntimeBackendError(
                    f"systemd did not reply to {interface}.{member} on {describe_bus(self.bus_setting)} "
                    f"within {seconds:.0f} s; check that the manager is running and not overloaded"
                ) from exc
            except Exception as exc:
                raise RuntimeBackendError(
                    f"calling {interface}.{member} on {describe_bus(self.bus_setting)} failed: {exc}; "
                    "reconnect once the bus is back"
                ) from exc
            finally:
                self.in_flight -= 1

        if reply is None:
            raise RuntimeBackendError(
                f"the connection to {describe_bus(self.bus_setting)} closed during {member}; reconnect and retry"
            )
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise SystemdCallError(f"systemd rejected {member}{tuple(body or ())}: {reply.error_name}: {text}", dbus_error=reply.error_name or "")
        return reply.body

    async def add_match(self, rule: str) -> None:
        """Add a match rule on the bus daemon, so that the matching signals reach this connection."""
        await self.call(
            "AddMatch",
            "s",
            [rule],
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            destination="org.freedesktop.DBus",
        )

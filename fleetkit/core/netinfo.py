"""Network helpers: the machine's public IP address (found without sending any traffic) and free ports."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915


def default_route_interface(route_table: str = "/proc/net/route") -> str | None:
    """Return the interface of the IPv4 default route, or None."""
    try:
        with open(route_table) as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except (OSError, StopIteration):
        return None
    return None


def interface_address(interface: str) -> str | None:
    """Return the IPv4 address of `interface`, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def detect_public_ip() -> str:
    """Return the IPv4 address of the default-route interface, or "" when there is none."""
    interface = default_route_interface()
    if interface is None:
        return ""
    return interface_address(interface) or ""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

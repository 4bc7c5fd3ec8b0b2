"""Claiming the storage prefix: fleetkit refuses to mix its state with foreign data.

A daemon checks the prefix before anything else touches it. A prefix that
carries the format marker is fleetkit's, and an empty one is claimed by
writing the marker. A prefix that contains other keys is rejected, so a typo
in ``[storage] prefix`` can never make fleetkit read or overwrite another
application's data.
"""

from __future__ import annotations

import json

from fleetkit.core import keys
from fleetkit.core.errors import StorageError
from fleetkit.core.storage import Storage

FORMAT_VERSION = 1
_FORMAT_FIELD = "fleetkit_format"


def is_fleetkit_key(key: str) -> bool:
    """Return True for keys of fleetkit's layout and for backend-internal keys."""
    return (
        key.startswith((*keys.PERSISTENT_PREFIXES, keys.NODES, keys.MACHINES))
        or key in (keys.LEADER, keys.FORMAT)
        or key.startswith(".")
    )


def format_marker() -> bytes:
    return json.dumps({_FORMAT_FIELD: FORMAT_VERSION}).encode()


async def claim_prefix(storage: Storage, prefix: str) -> None:
    """Check that `prefix` contains only fleetkit data of a known format, and mark it.

    Raises `StorageError` naming the prefix and an example key when it holds
    foreign data or data of a newer layout; writes nothing in that case.
    """
    marker = await storage.get(keys.FORMAT)
    if marker is not None:
        _check_marker(marker.value, prefix)
        return

    items, _revision = await storage.list("")
    foreign = [item.key for item in items if not is_fleetkit_key(item.key)]
    if foreign:
        raise StorageError(
            f"storage.prefix = {prefix!r} holds {len(foreign)} keys that are not fleetkit's, "
            f"for example {foreign[0]!r}; set storage.prefix to a prefix that only fleetkit uses"
        )
    created = await storage.compare_and_swap(keys.FORMAT, format_marker(), expected_revision=0)
    if created is None:
        # Another daemon claimed the prefix at the same moment; check what it wrote.
        marker = await storage.get(keys.FORMAT)
        if marker is not None:
            _check_marker(marker.value, prefix)


def _check_marker(value: bytes, prefix: str) -> None:
    try:
        version = json.loads(value)[_FORMAT_FIELD]
    except (ValueError, KeyError, TypeError):
        raise StorageError(
            f"storage.prefix = {prefix!r} has a {keys.FORMAT!r} key that fleetkit did not write; "
            "set storage.prefix to a prefix that only fleetkit uses"
        ) from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StorageError(
            f"the data under storage.prefix = {prefix!r} has layout version {version}, but this fleetkit "
            f"reads up to version {FORMAT_VERSION}; upgrade fleetkit on this machine"
        )

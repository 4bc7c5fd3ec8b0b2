"""Leases for the etcd v2 backend, which etcd's v2 API does not have.

A lease is a value node with a TTL, ``<namespace>/.leases/<id>``, created
with a POST so that etcd picks the name: the zero-padded store index of the
creation, which is also the lease id. Its value is a JSON record of the
granted TTL and of every key ever attached to it.

Attaching a key first adds it to the record with a compare-and-swap on the
lease node (which fails with `LeaseExpired` once the lease is gone), then the
backend writes the key with a TTL equal to the lease's remaining TTL.
Refreshing renews the lease node and then each recorded key that still names
this lease in its value, with etcd's ``refresh`` flag, which keeps the value
and wakes no watcher. Revoking deletes the lease node and then each recorded
key that still names this lease.

The lease node and its keys expire on their own clocks, so a key may outlive
its lease by up to one second of TTL rounding, or by the time between two
requests of a refresh or revoke.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from fleetkit.core.errors import LeaseExpired, StorageError
from fleetkit.plugins.etcd2_codec import KeySpace, decode_value
from fleetkit.plugins.etcd2_http import COMPARE_FAILED, KEY_NOT_FOUND, Etcd2Error, V2Client

log = logging.getLogger(__name__)

# Compare-and-swap rounds on a lease record before attaching gives up.
_ATTACH_ROUNDS = 16


def _record(node: dict[str, Any], lease: int) -> tuple[int, list[str]]:
    """Return the granted TTL and the attached keys of a lease node."""
    try:
        record = json.loads(node.get("value", ""))
        return int(record["ttl"]), [str(key) for key in record["keys"]]
    except (ValueError, KeyError, TypeError) as error:
        raise StorageError(f"lease {lease:x} has a malformed record in etcd ({error}); revoke it and grant a new one") from error


def _remaining(node: dict[str, Any], fallback: int) -> int:
    """Return the whole seconds a node has left (etcd rounds up), at least 1."""
    ttl = node.get("ttl")
    return max(1, int(ttl)) if isinstance(ttl, int) else max(1, fallback)


class LeaseBook:
    """Grants, refreshes and revokes emulated leases of one key space."""

    def __init__(self, client: V2Client, space: KeySpace):
        self._client = client
        self._space = space
        self._ttls: dict[int, int] = {}

    async def grant(self, ttl: float) -> int:
        """Create a lease of `ttl` seconds, rounded up to whole seconds, and return its id."""
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        seconds = max(1, math.ceil(ttl))
        answer = await self._client.request(
            "POST", self._space.lease_path(), action=f"grant lease of {ttl:g}s",
            form={"value": json.dumps({"ttl": seconds, "keys": []}), "ttl": str(seconds)},
        )
        node = (answer.body or {}).get("node", {})
        try:
            lease = int(str(node["key"]).rsplit("/", 1)[1])
        except (KeyError, IndexError, ValueError) as error:
            raise StorageError(f"etcd returned no lease node name for the grant of a lease: {answer.body!r}") from error
        self._ttls[lease] = seconds
        return lease

    async def attach(self, lease: int, key: str) -> int:
        """Record `key` in the lease and return the TTL in seconds that the key must be written with.

        Raises `LeaseExpired` when the lease no longer exists.
        """
        path = self._space.lease_path(lease)
        for _ in range(_ATTACH_ROUNDS):
            node = await self._lease_node(lease)
            granted, keys = _record(node, lease)
            remaining = _remaining(node, granted)
            if key in keys:
                return remaining
            # NOTE: keys are never removed from a record; refresh and revoke skip the ones that moved on.
            value = json.dumps({"ttl": granted, "keys": [*keys, key]})
            try:
                await self._client.request(
                    "PUT", path, action=f"attach {key!r} to lease {lease:x}",
                    form={"value": value, "ttl": str(remaining), "prevIndex": str(node["modifiedIndex"])},
                )
            except Etcd2Error as error:
                if error.code == KEY_NOT_FOUND:
                    raise self._expired(lease) from error
                if error.code == COMPARE_FAILED:
                    continue  # another key was attached at the same time
                raise
            return remaining
        raise StorageError(f"attaching {key!r} to lease {lease:x} lost {_ATTACH_ROUNDS} races in a row; retry")

    async def refresh(self, lease: int) -> float:
        """Renew the lease and its keys; return the lease's remaining TTL. Raises `LeaseExpired`."""
        seconds = self._ttls.get(lease)
        if seconds is None:
            seconds, _ = _record(await self._lease_node(lease), lease)
        try:
            answer = await self._client.request(
                "PUT", self._space.lease_path(lease), action=f"refresh lease {lease:x}",
                params={"refresh": "true", "prevExist": "true", "ttl": str(seconds)},
            )
        except Etcd2Error as error:
            if error.code == KEY_NOT_FOUND:
                self._ttls.pop(lease, None)
                raise self._expired(lease) from error
            raise
        node = (answer.body or {}).get("node", {})
        _, keys = _record(node, lease)
        await asyncio.gather(*(self._refresh_key(key, lease, seconds) for key in keys))
        return float(_remaining(node, seconds))

    async def revoke(self, lease: int) -> None:
        """Delete the lease and the keys still attached to it; an absent lease is ignored."""
        self._ttls.pop(lease, None)
        try:
            answer = await self._client.request("DELETE", self._space.lease_path(lease), action=f"revoke lease {lease:x}")
        except Etcd2Error as error:
            if error.code == KEY_NOT_FOUND:
                return
            raise
        previous = (answer.body or {}).get("prevNode", {})
        _, keys = _record(previous, lease)
        await asyncio.gather(*(self._delete_key(key, lease) for key in keys))

    # -- helpers -----------------------------------------------------------------

    def _expired(self, lease: int) -> LeaseExpired:
        return LeaseExpired(f"lease {lease:x} has expired or was revoked; grant a new lease")

    async def _lease_node(self, lease: int) -> dict[str, Any]:
        try:
            answer = await self._client.request("GET", self._space.lease_path(lease), action=f"read lease {lease:x}",
                                                params={"quorum": "true"})
        except Etcd2Error as error:
            if error.code == KEY_NOT_FOUND:
                raise self._expired(lease) from error
            raise
        return (answer.body or {}).get("node", {})

    async def _attached_node(self, key: str, lease: int) -> dict[str, Any] | None:
        """Return the node of `key` when it still names `lease`, else None."""
        try:
            answer = await self._client.request("GET", self._space.key_path(key), action=f"get {key!r}",
                                                params={"quorum": "true"})
        except Etcd2Error as error:
            if error.code == KEY_NOT_FOUND:
                return None
            raise
        node = (answer.body or {}).get("node", {})
        if node.get("dir") or decode_value(node.get("value", ""))[1] != lease:
            return None
        return node

    async def _refresh_key(self, key: str, lease: int, seconds: int) -> None:
        node = await self._attached_node(key, lease)
        if node is None:
            return
        try:
            # Conditional, so a key rewritten without the lease in the meantime keeps no TTL.
            await self._client.request(
                "PUT", self._space.key_path(key), action=f"refresh {key!r} of lease {lease:x}",
                params={"refresh": "true", "prevIndex": str(node["modifiedIndex"]), "ttl": str(seconds)},
            )
        except Etcd2Error as error:
            if error.code not in (KEY_NOT_FOUND, COMPARE_FAILED):
                raise
            log.debug("key %r changed while lease %x was refreshed; the writer set its TTL", key, lease)

    async def _delete_key(self, key: str, lease: int) -> None:
        node = await self._attached_node(key, lease)
        if node is None:
            return
        try:
            await self._client.request("DELETE", self._space.key_path(key), action=f"delete {key!r} of lease {lease:x}",
                                       params={"prevIndex": str(node["modifiedIndex"])})
        except Etcd2Error as error:
            if error.code not in (KEY_NOT_FOUND, COMPARE_FAILED):
                raise


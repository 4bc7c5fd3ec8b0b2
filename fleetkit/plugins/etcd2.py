"""The etcd v2 storage backend.

`Etcd2Storage` keeps fleetkit's state in etcd's v2 key tree over HTTP, for
clusters whose etcd serves the v2 API (etcd 2.x, or 3.x started with
``--enable-v2``). etcd's store index is the contract's revision: a node's
``createdIndex`` and ``modifiedIndex`` are its create and mod revisions, and
the ``X-Etcd-Index`` header of a quorum read is the revision of a listing.

What etcd v2 lacks is emulated, with the gaps documented in
docs/storage-etcd2.md:

- leases are value nodes with a TTL (`fleetkit.plugins.etcd2_leases`);
- fencing reads the fence key right before the write, because v2 has no
  transaction that spans two keys, so the check and the write are two
  requests, not one atomic step;
- `put` on an existing key is an update (``prevExist=true``), so that the
  key keeps its create revision, as a plain v2 set would not.

Watches long-poll ``?wait=true&recursive=true&waitIndex=N`` on the prefix's
directory, one poll at a time, and resume at the index after the last event
seen. etcd keeps only the last 1000 events; a watch that falls further behind
gets "event index cleared", which is raised as `CompactedError`.

Key and value encoding: `fleetkit.plugins.etcd2_codec`. Requests, failover
and error translation: `fleetkit.plugins.etcd2_http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fleetkit.core.errors import CompactedError, ConfigError, FencingError, StorageError, StorageUnavailable
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.storage import Capabilities, EventType, Fence, KeyValue, Storage, WatchEvent
from fleetkit.plugins.etcd2_codec import KeySpace, decode_value, encode_value
from fleetkit.plugins.etcd2_http import (
    COMPARE_FAILED,
    EVENT_INDEX_CLEARED,
    KEY_NOT_FOUND,
    NODE_EXISTS,
    Etcd2Error,
    V2Client,
    parse_endpoint,
    ssl_context,
)
from fleetkit.plugins.etcd2_leases import LeaseBook

log = logging.getLogger(__name__)

_PUT_ACTIONS = {"set", "create", "update", "compareAndSwap"}
_DELETE_ACTIONS = {"delete", "expire", "compareAndDelete"}
# Rounds of update-then-create in put() before it gives up; only a delete racing every round exhausts them.
_PUT_ROUNDS = 8
_CLEARED = re.compile(r"\[(\d+)/(\d+)\]")


class Etcd2Storage(Storage):
    """Storage on etcd's v2 API; keys live under `prefix`, which callers never see.

    `username` and `password` authenticate with HTTP basic auth (credentials
    in an endpoint URL take precedence for that endpoint). `ca_file`,
    `cert_file` and `key_file` configure TLS for https endpoints.
    `dial_timeout` bounds connecting to one endpoint and `request_timeout`
    each request, in seconds. `poll_timeout` is how long one watch poll
    waits for an event before it is sent again.
    """

    name = "etcd2"
    capabilities = Capabilities(linearizable_writes=True, native_watch=True, lease_ttl=True,
                                multi_key_transactions=False)

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/fleetkit/",
        username: str = "",
        password: str = "",
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        dial_timeout: float = 5.0,
        request_timeout: float = 5.0,
        poll_timeout: float = 60.0,
        watch_backoff: Backoff | None = None,
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError(["[storage] endpoints is empty; list at least one etcd URL such as http://127.0.0.1:2379"])
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._space = KeySpace(self.prefix)
        self._client = V2Client(
            [parse_endpoint(text) for text in endpoints],
            username=username,
            password=password,
            tls=ssl_context(ca_file, cert_file, key_file),
            dial_timeout=float(dial_timeout),
            request_timeout=float(request_timeout),
        )
        self._leases = LeaseBook(self._client, self._space)
        self._poll_timeout = float(poll_timeout)
        self._watch_backoff = watch_backoff or Backoff(initial=0.1, cap=2.0)
        self._closed = asyncio.Event()

    @classmethod
    def from_config(cls, storage_config: Any) -> Etcd2Storage:
        """Build the backend from the ``[storage]`` config section."""
        return cls(
            list(storage_config.endpoints),
            prefix=getattr(storage_config, "prefix", "/fleetkit/"),
            username=getattr(storage_config, "username", ""),
            password=getattr(storage_config, "password", ""),
            ca_file=getattr(storage_config, "ca_file", ""),
            cert_file=getattr(storage_config, "cert_file", ""),
            key_file=getattr(storage_config, "key_file", ""),
            dial_timeout=getattr(storage_config, "dial_timeout", 5.0),
            request_timeout=getattr(storage_config, "request_timeout", 5.0),
        )

    def describe(self) -> str:
        return f"etcd2 at {self._client.urls()} (prefix {self.prefix!r})"

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self) -> None:
        """Open the session and read the prefix's directory, which checks reachability, v2 and credentials."""
        self._closed.clear()
        self._client.open()
        try:
            await self._client.request("GET", self._space.namespace_path(), action="connect",
                                       params={"quorum": "true"})
        except Etcd2Error as error:
            if error.code != KEY_NOT_FOUND:
                await self._client.close()
                raise
        except BaseException:
            await self._client.close()
            raise

    async def close(self) -> None:
        self._closed.set()
        await self._client.close()

    # -- reads -------------------------------------------------------------------

    async def _read(self, path: str, action: str) -> dict[str, Any] | None:
        try:
            answer = await self._client.request("GET", path, action=action, params={"quorum": "true"})
        except Etcd2Error as error:
            if error.code == KEY_NOT_FOUND:
                return None
            raise
        return (answer.body or {}).get("node")

    async def get(self, key: str) -> KeyValue | None:
        node = await self._read(self._space.key_path(key), f"get {key!r}")
        return self._space.key_value(node) if node else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        # NOTE: v2 cannot read part of a directory, so every key under the storage prefix is read and filtered.
        try:
            answer = await self._client.request("GET", self._space.namespace_path(), action=f"list {prefix!r}",
                                                params={"quorum": "true"})
        except Etcd2Error as error:
            if error.code == KEY_NOT_FOUND:
                return [], error.index
            raise
        nodes = ((answer.body or {}).get("node") or {}).get("nodes") or []
        items = [kv for kv in map(self._space.key_value, nodes) if kv is not None and kv.key.startswith(prefix)]
        items.sort(key=lambda kv: kv.key)
        return items, answer.index

    # -- writes ------------------------------------------------------------------

    async def _check_fence(self, fence: Fence | None, action: str) -> None:
        """Raise FencingError unless the fence key still has the fence's create revision.

        NOTE: this read and the write after it are two requests; a fence
        deleted between them does not stop the write.
        """
        if fence is None:
            return
        node = await self._read(self._space.key_path(fence.key), f"read fence {fence.key!r}")
        current = int(node["createdIndex"]) if node and not node.get("dir") else 0
        if current != fence.create_revision:
            now = f"was re-created at revision {current}" if current else "no longer exists"
            raise FencingError(
                f"{action} rejected: fence key {fence.key!r} created at revision {fence.create_revision} {now}, "
                "so this process is no longer the leader; stop writing and campaign again"
            )

    async def _write(self, key: str, value: bytes, *, lease: int, fence: Fence | None,
                     condition: Mapping[str, str], action: str) -> int:
        """Write `key` under `condition` (v2 prevExist / prevIndex) and return its new mod revision."""
        form = {"value": encode_value(value, lease)}
        if lease:
            form["ttl"] = str(await self._leases.attach(lease, key))
        await self._check_fence(fence, action)
        answer = await self._client.request("PUT", self._space.key_path(key), action=action,
                                            params=condition, form=form)
        return int(((answer.body or {}).get("node") or {})["modifiedIndex"])

    async def put(self, key: str, value: bytes, *, lease: int = 0, fence: Fence | None = None) -> int:
        action = f"put {key!r}"
        for _ in range(_PUT_ROUNDS):
            # An update keeps the create revision; a v2 "set" would replace the node and reset it.
            try:
                return await self._write(key, value, lease=lease, fence=fence, condition={"prevExist": "true"},
                                         action=action)
            except Etcd2Error as error:
                if error.code != KEY_NOT_FOUND:
                    raise
            try:
                return await self._write(key, value, lease=lease, fence=fence, condition={"prevExist": "false"},
                                         action=action)
            except Etcd2Error as error:
                if error.code != NODE_EXISTS:
                    raise
        raise StorageError(f"{action} raced with {_PUT_ROUNDS} concurrent creates and deletes of the key; retry")

    async def compare_and_swap(self, key: str, value: bytes, *, expected_revision: int, lease: int = 0,
                               fence: Fence | None = None) -> int | None:
        condition = {"prevExist": "false"} if expected_revision == 0 else {"prevIndex": str(expected_revision)}
        try:
            return await self._write(key, value, lease=lease, fence=fence, condition=condition,
                                     action=f"compare-and-swap {key!r}")
        except Etcd2Error as error:
            if error.code in (KEY_NOT_FOUND, COMPARE_FAILED, NODE_EXISTS):
                return None
            raise

    async def delete(self, key: str, *, expected_revision: int | None = None, fence: Fence | None = None) -> bool:
        action = f"delete {key!r}"
        path = self._space.key_path(key)
        await self._check_fence(fence, action)
        if expected_revision == 0:
            return False  # "must not exist": there is nothing to delete
        params = {} if expected_revision is None else {"prevIndex": str(expected_revision)}
        try:
            await self._client.request("DELETE", path, action=action, params=params)
        except Etcd2Error as error:
            if error.code in (KEY_NOT_FOUND, COMPARE_FAILED):
                return False
            raise
        return True

    # -- leases ------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        return await self._leases.grant(ttl)

    async def refresh_lease(self, lease: int) -> float:
        return await self._leases.refresh(lease)

    async def revoke_lease(self, lease: int) -> None:
        await self._leases.revoke(lease)

    # -- watch -------------------------------------------------------------------

    async def _sleep_unless_closed(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closed.wait()

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Yield one batch per change under `prefix`; see `Storage.watch`.

        Polls again with backoff after connection loss and resumes at the
        index after the last event seen. Ends when the storage is closed.
        """
        next_index = max(1, start_revision)
        attempts = Attempts(self._watch_backoff, sleep=self._sleep_unless_closed)
        outage = False
        action = f"watch {prefix!r}"
        while not self._closed.is_set():
            params = {"wait": "true", "recursive": "true", "waitIndex": str(next_index)}
            try:
                answer = await self._client.poll(self._space.namespace_path(), action=action, params=params,
                                                 poll_timeout=self._poll_timeout)
            except Etcd2Error as error:
                if error.code == EVENT_INDEX_CLEARED:
                    raise self._compacted(prefix, next_index, error) from error
                raise
            except StorageUnavailable as error:
                if self._closed.is_set():
                    return
                if not outage:
                    log.warning("watch of %r lost etcd at revision %d, retrying with backoff: %s",
                                prefix, next_index, error)
                    outage = True
                await attempts.sleep()
                continue
            except StorageError:
                if self._closed.is_set():
                    return
                raise
            if outage:
                log.info("watch of %r resumed at revision %d", prefix, next_index)
                outage = False
            if answer is None:
                continue  # no event within the poll timeout: ask again from the same index
            if answer.body is None:
                # etcd dropped the watcher without an event; wait a little so this cannot spin.
                await attempts.sleep()
                continue
            attempts.reset()
            node = answer.body.get("node") or {}
            index = int(node.get("modifiedIndex", 0))
            if index < next_index:
                raise StorageError(f"etcd returned index {index} for the {action} from index {next_index}; "
                                   "check that every endpoint belongs to one etcd cluster")
            next_index = index + 1
            event = self._event(answer.body, node, prefix, index)
            if event is not None:
                yield [event]

    def _event(self, body: dict[str, Any], node: dict[str, Any], prefix: str, index: int) -> WatchEvent | None:
        """Return the contract event of a v2 event, or None when it is not about a key under `prefix`."""
        if node.get("dir"):
            return None
        key = self._space.key_of(str(node.get("key", "")))
        if key is None or not key.startswith(prefix):
            return None
        action = body.get("action")
        if action in _PUT_ACTIONS:
            return WatchEvent(EventType.PUT, key, decode_value(node.get("value", ""))[0], index)
        if action in _DELETE_ACTIONS:
            return WatchEvent(EventType.DELETE, key, None, index)
        log.debug("ignoring etcd v2 event %r on %r at index %d", action, key, index)
        return None

    def _compacted(self, prefix: str, index: int, error: Etcd2Error) -> CompactedError:
        found = _CLEARED.search(error.cause)
        oldest = int(found.group(1)) if found else error.index + 1
        return CompactedError(
            f"watch of {prefix!r} cannot resume at revision {index}: etcd keeps only its last 1000 events, "
            f"the oldest now at revision {oldest}; list the prefix again and watch from there",
            compact_revision=oldest - 1,
        )

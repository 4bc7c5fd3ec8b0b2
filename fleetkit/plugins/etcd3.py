"""The etcd v3 storage backend.

`Etcd3Storage` keeps fleetkit's state in etcd 3.4 or later over gRPC, through
the generated stubs that aetcd ships. aetcd's own client is not used: its
high-level calls drop response headers (the store revision of a write or list)
and split watch responses into single events, and it opens plaintext channels
only.

TLS: the backend dials ``https://`` endpoints over TLS, verifies etcd's
certificate with ``[storage] ca_file`` (the system CAs when empty), and
presents the client certificate of ``cert_file`` and ``key_file`` when set,
as etcd's ``--client-cert-auth`` requires. The files are read at every dial.
All endpoints must use the same scheme, so no request falls back to plaintext.

Connections: the backend talks to one endpoint at a time. When a request to
it fails with "unavailable" or times out, the connection is dropped, and the
next request dials the endpoints in order, starting after the one that failed.
Requests never retry by themselves; `watch` does, as the storage contract
requires. `fleetkit.plugins.etcd3_endpoints` parses the endpoint URLs and
opens the connection to one endpoint.

Errors of grpc are translated here, once, into `StorageUnavailable`,
`LeaseExpired`, `FencingError`, `CompactedError` or `StorageError`, with the
original chained as the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from aetcd import rpc

from fleetkit.core.errors import (
    CompactedError,
    ConfigError,
    FencingError,
    LeaseExpired,
    StorageError,
    StorageUnavailable,
)
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.storage import Capabilities, EventType, Fence, KeyValue, Storage, WatchEvent
from fleetkit.plugins.etcd3_endpoints import (  # noqa: F401 (DEFAULT_PORT and Endpoint are re-exported)
    DEFAULT_PORT,
    Endpoint,
    TlsFileError,
    TlsFiles,
    _Connection,
    describe_tls_failure,
    open_connection,
    parse_endpoint,
)

log = logging.getLogger(__name__)

_CREDENTIAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def _range_end(prefix: bytes) -> bytes:
    """Return the etcd range end that selects every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # etcd reads "\0" as "to the end of the keyspace"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _failure_reason(error: BaseException, timeout: float) -> str:
    """Return a short human reason for a failed call, such as "connection refused"."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(error, asyncio.CancelledError):
        return "connection closed"
    if isinstance(error, grpc.aio.AioRpcError):
        details = error.details() or ""
        if "refused" in details.lower():
            return "connection refused"
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"timed out after {timeout:g}s"
        return f"{error.code().name.lower()}: {details}" if details else error.code().name.lower()
    return str(error) or type(error).__name__


def _lost_stream(error: BaseException) -> bool:
    """Return True unless `error` is a cancellation of the current task itself.

    grpc raises CancelledError from a call whose channel was closed, which must
    not be mistaken for the task being cancelled.
    """
    if not isinstance(error, asyncio.CancelledError):
        return True
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class Etcd3Storage(Storage):
    """Storage on etcd v3; keys are stored under `prefix`, which callers never see.

    `dial_timeout` bounds connecting to one endpoint, `request_timeout` bounds
    each request, both in seconds. A prefix without a trailing "/" gets one.
    `ca_file`, `cert_file` and `key_file` are PEM files for ``https://``
    endpoints: the CAs that verify etcd ("" for the system CAs) and the client
    certificate with its key.
    """

    name = "etcd3"
    capabilities = Capabilities(linearizable_writes=True, native_watch=True, lease_ttl=True, multi_key_transactions=True)

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/fleetkit/",
        dial_timeout: float = 5.0,
        request_timeout: float = 5.0,
        watch_backoff: Backoff | None = None,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError(["[storage] endpoints is empty; list at least one etcd URL such as http://127.0.0.1:2379"])
        self.endpoints = [parse_endpoint(text) for text in endpoints]
        self.tls_files = TlsFiles(ca_file, cert_file, key_file)
        _check_tls_settings(self.endpoints, self.tls_files)
        self.prefix = prefix if prefix == "" or prefix.endswith("/") else prefix + "/"
        self._prefix_bytes = self.prefix.encode()
        self.dial_timeout = float(dial_timeout)
        self.request_timeout = float(request_timeout)
        self._watch_backoff = watch_backoff or Backoff(initial=0.1, cap=2.0)
        self._current: _Connection | None = None
        self._next_index = 0
        self._dial_lock = asyncio.Lock()
        # Before the first successful dial, a TLS problem is a configuration
        # mistake and raises StorageError. After it, the likely cause is a server
        # or file being replaced, so it raises StorageUnavailable and callers retry.
        self._dialled_once = False
        self._closed = asyncio.Event()
        self._watch_calls: set[Any] = set()
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, storage_config: Any) -> Etcd3Storage:
        """Build the backend from the ``[storage]`` config section.

        `username` and `password` apply to every endpoint URL that carries no
        credentials of its own.
        """
        return cls(
            [_with_credentials(url, getattr(storage_config, "username", ""), getattr(storage_config, "password", ""))
             for url in storage_config.endpoints],
            prefix=storage_config.prefix,
            dial_timeout=storage_config.dial_timeout,
            request_timeout=storage_config.request_timeout,
            ca_file=getattr(storage_config, "ca_file", ""),
            cert_file=getattr(storage_config, "cert_file", ""),
            key_file=getattr(storage_config, "key_file", ""),
        )

    def describe(self) -> str:
        urls = ", ".join(endpoint.url for endpoint in self.endpoints)
        return f"etcd3 at {urls} (prefix {self.prefix!r})"

    # -- connections -----------------------------------------------------------

    async def connect(self) -> None:
        self._closed.clear()
        await self._connection()

    async def close(self) -> None:
        self._closed.set()
        for call in list(self._watch_calls):
            call.cancel()
        if self._current is not None:
            connection, self._current = self._current, None
            await self._close_connection(connection)

    async def _connection(self) -> _Connection:
        if self._closed.is_set():
            raise StorageError(f"{self.describe()} is closed; call connect() before using it")
        current = self._current
        if current is not None:
            return current
        async with self._dial_lock:
            if self._current is None:
                self._current = await self._dial()
            return self._current

    async def _dial(self) -> _Connection:
        """Connect to the first endpoint that responds, trying each once in order."""
        count = len(self.endpoints)
        reasons: list[str] = []
        tls_problems: list[str] = []
        last_error: BaseException | None = None
        for offset in range(count):
            index = (self._next_index + offset) % count
            endpoint = self.endpoints[index]
            try:
                async with asyncio.timeout(self.dial_timeout):
                    connection = await open_connection(endpoint, index, self.tls_files, timeout=self.request_timeout)
                    try:
                        await connection.maintenance.Status(rpc.StatusRequest(), metadata=connection.metadata)
                    except BaseException:
                        await self._close_connection(connection)
                        raise
            except TlsFileError as error:
                # The same files serve every endpoint, so trying the others cannot help.
                raise self._dial_failure(str(error)) from None
            except (grpc.aio.AioRpcError, TimeoutError, OSError) as error:
                reason = _failure_reason(error, self.dial_timeout)
                if isinstance(error, grpc.aio.AioRpcError) and error.code() in _CREDENTIAL_CODES:
                    raise StorageError(
                        f"etcd at {endpoint.url} rejected the credentials ({reason}); check storage.username "
                        "and storage.password, or the user and password in storage.endpoints"
                    ) from error
                details = (error.details() or "") if isinstance(error, grpc.aio.AioRpcError) else ""
                tls_problem = describe_tls_failure(details, endpoint, self.tls_files)
                if tls_problem:
                    tls_problems.append(tls_problem)
                    reasons.append(tls_problem)  # names the endpoint itself
                else:
                    if not endpoint.tls and "socket closed" in details.lower():
                        reason += "; if etcd serves TLS on this port, use https:// endpoints"
                    reasons.append(reason if count == 1 else f"{endpoint.url}: {reason}")
                log.debug("etcd endpoint %s failed to respond: %s", endpoint.url, reason)
                last_error = error
                continue
            for problem in tls_problems:
                log.warning("skipped an etcd endpoint: %s", problem)
            if offset or reasons:
                log.info("connected to etcd at %s", endpoint.url)
            self._dialled_once = True
            return connection
        if tls_problems:
            raise self._dial_failure("; ".join(reasons)) from last_error
        urls = ", ".join(endpoint.url for endpoint in self.endpoints)
        raise StorageUnavailable(
            f"etcd at {urls} is unreachable ({'; '.join(reasons)}); "
            "check [storage] endpoints and that etcd is running"
        ) from last_error

    def _dial_failure(self, message: str) -> StorageError:
        """Return the error of a dial that failed because of TLS; see `_dialled_once`."""
        if self._dialled_once:
            return StorageUnavailable(message)
        return StorageError(message)

    def _discard(self, connection: _Connection) -> None:
        """Forget a failed connection so that the next request dials again."""
        if self._current is connection:
            self._current = None
            self._next_index = (connection.index + 1) % len(self.endpoints)
            # Closing cancels the other calls still open on this channel, and
            # they fail over to the new connection as well.
            task = asyncio.get_running_loop().create_task(self._close_connection(connection))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    @staticmethod
    async def _close_connection(connection: _Connection) -> None:
        try:
            async with asyncio.timeout(2.0):
                await connection.close()
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, OSError) as error:
            log.debug("closing the etcd channel to %s failed: %s", connection.endpoint.url, error)

    @contextlib.asynccontextmanager
    async def _request(self, action: str) -> AsyncIterator[_Connection]:
        """Run one request on the current connection and translate its errors."""
        connection = await self._connection()
        try:
            async with asyncio.timeout(self.request_timeout):
                yield connection
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError) as error:
            if not _lost_stream(error):
                raise
            raise self._translate(error, action, connection) from error

    def _translate(self, error: BaseException, action: str, connection: _Connection) -> StorageError:
        reason = _failure_reason(error, self.request_timeout)
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
        # etcd's auth tokens expire (--auth-token-ttl, 300 s by default in
        # etcd 3.4), and dialing again authenticates again.
        expired_token = "invalid auth token" in (error.details() or "") if code else False
        if code is None or code in _UNAVAILABLE_CODES or expired_token:
            self._discard(connection)
            details = (error.details() or "") if code else ""
            tls_problem = describe_tls_failure(details, connection.endpoint, self.tls_files)
            if tls_problem:
                return StorageUnavailable(f"etcd {action} failed: {tls_problem}")
            return StorageUnavailable(
                f"etcd {action} failed at {connection.endpoint.url} ({reason}); "
                "check that etcd is running, then retry"
            )
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in (error.details() or ""):
            return LeaseExpired(f"etcd {action} failed: the lease no longer exists; grant a new lease")
        return StorageError(f"etcd {action} failed at {connection.endpoint.url} ({reason})")

    # -- keys ------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode()

    def _key_value(self, kv: Any) -> KeyValue:
        return KeyValue(
            key=kv.key[len(self._prefix_bytes):].decode(),
            value=bytes(kv.value),
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            lease=kv.lease,
        )

    async def get(self, key: str) -> KeyValue | None:
        async with self._request(f"get {key!r}") as connection:
            response = await connection.kv.Range(rpc.RangeRequest(key=self._full(key)), metadata=connection.metadata)
        return self._key_value(response.kvs[0]) if response.kvs else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        full = self._full(prefix)
        # NOTE: one unpaged range; a prefix over 256 MiB of data fails.
        request = rpc.RangeRequest(
            key=full,
            range_end=_range_end(full),
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        async with self._request(f"list {prefix!r}") as connection:
            response = await connection.kv.Range(request, metadata=connection.metadata)
        return [self._key_value(kv) for kv in response.kvs], response.header.revision

    # -- writes ------------------------------------------------------------------

    def _compare(self, key: str, target: str, revision: int) -> Any:
        """Build "the create (or mod) revision of `key` equals `revision`"; absent keys have 0."""
        if target == "create":
            return rpc.Compare(key=self._full(key), result=rpc.Compare.EQUAL,
                               target=rpc.Compare.CREATE, create_revision=revision)
        return rpc.Compare(key=self._full(key), result=rpc.Compare.EQUAL,
                           target=rpc.Compare.MOD, mod_revision=revision)

    def _read_op(self, key: str) -> Any:
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._full(key)))

    async def _txn(self, action: str, compares: list[Any], success: list[Any], failure: list[Any]) -> Any:
        request = rpc.TxnRequest(compare=compares, success=success, failure=failure)
        async with self._request(action) as connection:
            return await connection.kv.Txn(request, metadata=connection.metadata)

    async def _fenced_txn(self, action: str, operation: Any, fence: Fence | None, compares: list[Any]) -> Any:
        """Run `operation` in a transaction guarded by `fence` and `compares`.

        Raises `FencingError` when the comparison failed because of the fence.
        When another comparison failed, the response's `succeeded` is False.
        """
        guards = [self._compare(fence.key, "create", fence.create_revision)] if fence else []
        failure = [self._read_op(fence.key)] if fence else []
        response = await self._txn(action, guards + compares, [operation], failure)
        if response.succeeded or fence is None:
            return response
        kvs = response.responses[0].response_range.kvs
        current = kvs[0].create_revision if kvs else 0
        if current != fence.create_revision:
            now = f"was re-created at revision {current}" if current else "no longer exists"
            raise FencingError(
                f"{action} rejected: fence key {fence.key!r} created at revision {fence.create_revision} {now}, "
                "so this process is no longer the leader; stop writing and campaign again"
            )
        return response

    def _put_op(self, key: str, value: bytes, lease: int) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=self._full(key), value=value, lease=lease))

    async def put(self, key: str, value: bytes, *, lease: int = 0, fence: Fence | None = None) -> int:
        response = await self._fenced_txn(f"put {key!r}", self._put_op(key, value, lease), fence, [])
        if not response.succeeded:
            # Unreachable: without other comparisons only the fence can fail,
            # and the fence check above raised.
            raise FencingError(f"put {key!r} rejected by fence {fence!r}; stop writing and campaign again")
        return response.header.revision

    async def compare_and_swap(self, key: str, value: bytes, *, expected_revision: int, lease: int = 0,
                               fence: Fence | None = None) -> int | None:
        compares = [self._compare(key, "mod", expected_revision)]
        response = await self._fenced_txn(f"compare-and-swap {key!r}", self._put_op(key, value, lease), fence, compares)
        return response.header.revision if response.succeeded else None

    async def delete(self, key: str, *, expected_revision: int | None = None, fence: Fence | None = None) -> bool:
        compares = [] if expected_revision is None else [self._compare(key, "mod", expected_revision)]
        remove = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._full(key)))
        response = await self._fenced_txn(f"delete {key!r}", remove, fence, compares)
        return response.succeeded and response.responses[0].response_delete_range.deleted > 0

    # -- leases ------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        # etcd counts lease TTLs in whole seconds, so round up to never expire early.
        request = rpc.LeaseGrantRequest(TTL=math.ceil(ttl), ID=0)
        async with self._request(f"grant lease of {ttl:g}s") as connection:
            response = await connection.lease.LeaseGrant(request, metadata=connection.metadata)
        if response.error:
            raise StorageError(f"etcd rejected a lease of {ttl:g}s: {response.error}")
        return response.ID

    async def refresh_lease(self, lease: int) -> float:
        async with self._request(f"refresh lease {lease:x}") as connection:
            call = connection.lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                                   metadata=connection.metadata)
            try:
                response = await call.read()
            finally:
                call.cancel()
        if response is grpc.aio.EOF:
            raise StorageUnavailable(f"etcd at {connection.endpoint.url} closed the keep-alive of lease {lease:x}; retry")
        if response.TTL <= 0:
            raise LeaseExpired(f"lease {lease:x} has expired or was revoked; grant a new lease")
        return float(response.TTL)

    async def revoke_lease(self, lease: int) -> None:
        try:
            async with self._request(f"revoke lease {lease:x}") as connection:
                await connection.lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), metadata=connection.metadata)
        except LeaseExpired:
            pass  # already gone, which is what revoking wants

    # -- watch -------------------------------------------------------------------

    async def _sleep_unless_closed(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closed.wait()

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Yield one batch per store revision; see `Storage.watch`.

        Reconnects with backoff after connection loss and resumes at the
        revision after the last one yielded. Ends when the storage is closed.
        """
        full = self._full(prefix)
        next_revision = start_revision
        attempts = Attempts(self._watch_backoff, sleep=self._sleep_unless_closed)
        outage: str | None = None
        while not self._closed.is_set():
            try:
                connection = await self._connection()
                call = await self._open_watch(connection, prefix, full, next_revision)
            except StorageUnavailable as error:
                if self._closed.is_set():
                    return
                if outage is None:
                    log.warning("watch of %r lost etcd, retrying with backoff: %s", prefix, error)
                outage = str(error)
                await attempts.sleep()
                continue
            if outage is not None:
                log.info("watch of %r resumed at revision %d", prefix, next_revision)
                outage = None
            try:
                async for batch in self._read_watch(call, connection, prefix, next_revision):
                    yield batch
                    next_revision = batch[-1].revision + 1
                    attempts.reset()
            except StorageUnavailable as error:
                log.warning("watch of %r lost etcd at revision %d, retrying with backoff: %s",
                            prefix, next_revision, error)
                outage = str(error)
            finally:
                call.cancel()
                self._watch_calls.discard(call)
            if not self._closed.is_set():
                await attempts.sleep()

    async def _open_watch(self, connection: _Connection, prefix: str, full: bytes, start_revision: int) -> Any:
        """Open a watch stream and wait until etcd confirms that it was created."""
        create = rpc.WatchCreateRequest(key=full, range_end=_range_end(full), start_revision=start_revision)
        call = connection.watch.Watch(iter([rpc.WatchRequest(create_request=create)]), metadata=connection.metadata)
        self._watch_calls.add(call)
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await call.read()
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError) as error:
            call.cancel()
            self._watch_calls.discard(call)
            if not _lost_stream(error):
                raise
            raise self._translate(error, f"watch {prefix!r}", connection) from error
        if response is grpc.aio.EOF or not response.created:
            call.cancel()
            self._watch_calls.discard(call)
            self._discard(connection)
            raise StorageUnavailable(f"etcd at {connection.endpoint.url} ended the watch of {prefix!r} unexpectedly; retrying")
        self._raise_if_compacted(response, prefix, start_revision)
        return call

    async def _read_watch(self, call: Any, connection: _Connection, prefix: str,
                          next_revision: int) -> AsyncIterator[list[WatchEvent]]:
        # No timeout on reads: a quiet prefix sends nothing for hours, and the
        # channel's keepalive pings detect a dead connection instead.
        while True:
            try:
                response = await call.read()
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
                if not _lost_stream(error):
                    raise
                if self._closed.is_set():
                    return
                raise self._translate(error, f"watch {prefix!r}", connection) from error
            if response is grpc.aio.EOF:
                raise StorageUnavailable(f"etcd at {connection.endpoint.url} closed the watch of {prefix!r}")
            self._raise_if_compacted(response, prefix, next_revision)
            if response.canceled:
                raise StorageError(f"etcd cancelled the watch of {prefix!r}: {response.cancel_reason or 'no reason given'}")
            batches: list[list[WatchEvent]] = []
            for event in response.events:
                if event.kv.mod_revision < next_revision:
                    continue  # yielded before; etcd never sends these, so this is only a guard
                if batches and batches[-1][-1].revision == event.kv.mod_revision:
                    batches[-1].append(self._watch_event(event))
                else:
                    batches.append([self._watch_event(event)])
            for batch in batches:
                yield batch
                next_revision = batch[-1].revision + 1

    def _raise_if_compacted(self, response: Any, prefix: str, start_revision: int) -> None:
        if response.compact_revision:
            raise CompactedError(
                f"watch of {prefix!r} cannot resume at revision {start_revision}: etcd has compacted "
                f"its history up to revision {response.compact_revision}; list the prefix again and watch from there",
                compact_revision=response.compact_revision,
            )

    def _watch_event(self, event: Any) -> WatchEvent:
        key = event.kv.key[len(self._prefix_bytes):].decode()
        if event.type == rpc.Event.DELETE:
            return WatchEvent(EventType.DELETE, key, None, event.kv.mod_revision)
        return WatchEvent(EventType.PUT, key, bytes(event.kv.value), event.kv.mod_revision)


def _check_tls_settings(endpoints: list[Endpoint], files: TlsFiles) -> None:
    """Raise `ConfigError` when endpoints mix http and https, or TLS files come with http endpoints only."""
    plain = [endpoint.url for endpoint in endpoints if not endpoint.tls]
    if plain and len(plain) < len(endpoints):
        raise ConfigError([
            f"storage.endpoints mixes https:// and http:// URLs ({', '.join(plain)} without TLS); use https:// "
            "for every etcd endpoint, so that no request or password falls back to plaintext"
        ])
    if plain and files.any:
        settings = [f"storage.{name}" for name in ("ca_file", "cert_file", "key_file") if getattr(files, name)]
        verb = "needs" if len(settings) == 1 else "need"
        raise ConfigError([
            f"{' and '.join(settings)} {verb} https:// endpoints, but storage.endpoints are plain http "
            f"({', '.join(plain)}); write https:// URLs, or remove the TLS settings"
        ])
    if bool(files.cert_file) != bool(files.key_file):
        raise ConfigError(["storage.cert_file and storage.key_file must be set together: a client certificate "
                           "needs its private key"])


def _with_credentials(url: str, username: str, password: str) -> str:
    """Return `url` with `username` and `password` in it, unless it has credentials already."""
    parts = urllib.parse.urlsplit(url)
    if not username or parts.username:
        return url
    credentials = urllib.parse.quote(username, safe="")
    if password:
        credentials += ":" + urllib.parse.quote(password, safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@{parts.netloc}"))

"""The redis storage backend.

`RedisStorage` keeps fleetkit's state on one redis server (5.0 or later; 7.0
is tested) through redis-py's asyncio client. Every change is one Lua script,
so compare-and-swap, fencing and lease expiry are atomic on the server. The
scripts and the key layout are in `fleetkit.plugins.redis_scripts`. Each
change is also appended to a redis stream whose entry ids carry the revision,
which is what watches read (`fleetkit.plugins.redis_watch`).

Leases: a lease is a deadline in redis server time. Reads treat the keys of a
lease whose deadline has passed as absent at once. A sweeper task in every
client ends such leases soon after and deletes their keys, with events that
watches see. Writes end expired leases before they apply, so every change is
ordered after the expiries that precede it.

Errors of redis-py are translated here, once, into `StorageUnavailable`,
`LeaseExpired`, `FencingError` or `StorageError`, with the original chained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions

from fleetkit.core.errors import ConfigError, FencingError, LeaseExpired, StorageError, StorageUnavailable
from fleetkit.core.retry import Backoff
from fleetkit.core.storage import Capabilities, Fence, KeyValue, Storage, WatchEvent
from fleetkit.plugins import redis_scripts
from fleetkit.plugins.redis_endpoints import Endpoint, build_client, parse_endpoint
from fleetkit.plugins.redis_watch import watch_changes

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_HISTORY_LIMIT = 100_000
# Seconds between sweeps when no lease deadline is near, and the shortest pause between two sweeps.
DEFAULT_SWEEP_INTERVAL = 1.0
MIN_SWEEP_INTERVAL = 0.2


@dataclass(frozen=True)
class KeyNames:
    """The redis keys of one namespace (the configured prefix); see `fleetkit.plugins.redis_scripts`."""

    namespace: bytes

    @property
    def meta(self) -> bytes:
        return self.namespace + b"#meta"

    @property
    def index(self) -> bytes:
        return self.namespace + b"#index"

    @property
    def changes(self) -> bytes:
        return self.namespace + b"#changes"

    @property
    def leases(self) -> bytes:
        return self.namespace + b"#leases"

    @property
    def lease_ttls(self) -> bytes:
        return self.namespace + b"#lease-ttl"

    def data(self, key: str) -> bytes:
        return self.namespace + b"kv/" + key.encode()

    def common(self) -> list[bytes]:
        """Return the five keys that every script receives first."""
        return [self.meta, self.index, self.changes, self.leases, self.lease_ttls]


def lex_range(prefix: str) -> tuple[bytes, bytes]:
    """Return the ZRANGEBYLEX bounds that select every member starting with `prefix`."""
    raw = prefix.encode()
    if not raw:
        return b"-", b"+"
    stripped = raw.rstrip(b"\xff")
    if not stripped:
        return b"[" + raw, b"+"
    return b"[" + raw, b"(" + stripped[:-1] + bytes([stripped[-1] + 1])


def _certificate_rejected(error: BaseException) -> bool:
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "certificate verify failed" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class RedisStorage(Storage):
    """Storage on a single redis server; keys live under `prefix`, which callers never see.

    Only the first endpoint is used. `dial_timeout` bounds connecting,
    `request_timeout` each request, both in seconds. `history_limit` is the
    approximate number of changes the change stream keeps; a watch that falls
    further behind gets `CompactedError`. `sweep_interval` is the longest
    pause between two sweeps for expired leases.
    """

    name = "redis"
    capabilities = Capabilities(linearizable_writes=True, native_watch=True, lease_ttl=True, multi_key_transactions=True)

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
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        watch_backoff: Backoff | None = None,
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigError(["storage.endpoints is empty; give one redis URL such as redis://127.0.0.1:6379/0"])
        self.endpoints = [parse_endpoint(text) for text in endpoints]
        if len(self.endpoints) > 1:
            log.warning("the redis backend uses only the first of %d endpoints, %s",
                        len(self.endpoints), self.endpoints[0].url)
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit}")
        self.prefix = prefix if prefix == "" or prefix.endswith("/") else prefix + "/"
        self.keys = KeyNames(self.prefix.encode())
        self.username = username
        self._password = password
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.dial_timeout = float(dial_timeout)
        self.request_timeout = float(request_timeout)
        self.history_limit = int(history_limit)
        self.sweep_interval = max(float(sweep_interval), MIN_SWEEP_INTERVAL)
        self.watch_backoff = watch_backoff or Backoff(initial=0.1, cap=2.0)
        self._client: redis.asyncio.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._closed = asyncio.Event()
        self._closed.set()
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, storage_config: Any) -> RedisStorage:
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

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint in use: the first one configured."""
        return self.endpoints[0]

    def describe(self) -> str:
        return f"redis at {self.endpoint.url} (prefix {self.prefix!r})"

    # -- connection ----------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        client = build_client(self.endpoint, username=self.username, password=self._password, ca_file=self.ca_file,
                              cert_file=self.cert_file, key_file=self.key_file, dial_timeout=self.dial_timeout)
        try:
            async with asyncio.timeout(self.dial_timeout):
                await client.ping()
        except asyncio.CancelledError:
            await self._close_client(client)
            raise
        except (redis.exceptions.RedisError, TimeoutError, OSError) as error:
            await self._close_client(client)
            raise self._translate(error, "connect", self.dial_timeout) from error
        self._client = client
        self._scripts = {
            name: client.register_script(getattr(redis_scripts, name))
            for name in ("PUT", "DELETE", "GRANT", "REFRESH", "REVOKE", "SWEEP", "GET", "LIST", "POSITION")
        }
        self._closed.clear()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="redis-lease-sweeper")
        log.debug("connected to %s", self.describe())

    async def close(self) -> None:
        self._closed.set()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)

    @staticmethod
    async def _close_client(client: redis.asyncio.Redis) -> None:
        try:
            async with asyncio.timeout(2.0):
                await client.aclose()
        except (redis.exceptions.RedisError, TimeoutError, OSError) as error:
            log.debug("closing the redis client failed: %s", error)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def sleep_unless_closed(self, delay: float) -> None:
        """Sleep `delay` seconds, or less when the storage is closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closed.wait()

    def client(self) -> redis.asyncio.Redis:
        """Return the connected client; raises StorageError after close() or before connect()."""
        if self._client is None:
            raise StorageError(f"{self.describe()} is closed; call connect() before using it")
        return self._client

    async def call(self, action: str, operation: Callable[[], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Await `operation()` within the request timeout, translating redis errors; `action` names it in messages."""
        limit = self.request_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await operation()
        except (redis.exceptions.RedisError, TimeoutError, OSError) as error:
            raise self._translate(error, action, limit) from error

    async def script(self, name: str, action: str, keys: list[bytes], args: list[Any]) -> Any:
        """Run the Lua script `name` of `fleetkit.plugins.redis_scripts` (EVALSHA, loading it when missing)."""
        self.client()
        script = self._scripts[name]
        return await self.call(action, lambda: script(keys=self.keys.common() + keys, args=[self.keys.namespace, *args]))

    def _translate(self, error: BaseException, action: str, timeout: float) -> StorageError:
        url = self.endpoint.url
        if isinstance(error, redis.exceptions.AuthenticationError):
            user = f" as user {self.endpoint.username or self.username!r}" if self.endpoint.username or self.username else ""
            return StorageError(f"authentication to redis at {url}{user} failed; check storage.password"
                                f"{' and storage.username' if user else ''}")
        if isinstance(error, redis.exceptions.NoPermissionError) or "can't run this command" in str(error):
            return StorageError(f"{action} failed: redis at {url} denied permission ({error}); grant the user the "
                                f"keys {self.prefix}* and the commands +@read +@write +@scripting +@connection +time")
        if _certificate_rejected(error):
            authority = f"storage.ca_file {self.ca_file!r}" if self.ca_file else "the system CAs (storage.ca_file is empty)"
            return StorageError(f"TLS connection to redis at {url} failed: its certificate is not signed by a CA in "
                                f"{authority}; set storage.ca_file to the CA that signed the server certificate")
        if isinstance(error, redis.exceptions.BusyLoadingError):
            return StorageUnavailable(f"{action} failed: redis at {url} is still loading its data after a restart; "
                                      "retry in a moment")
        if isinstance(error, (TimeoutError, redis.exceptions.TimeoutError)):
            return StorageUnavailable(f"{action} failed: redis at {url} did not respond within {timeout:g}s; "
                                      "check that redis-server is running and not overloaded, then retry")
        if isinstance(error, (redis.exceptions.ConnectionError, OSError)):
            reason = str(error).rstrip(".") or type(error).__name__
            return StorageUnavailable(f"{action} failed: redis at {url} is unreachable ({reason}); "
                                      "check storage.endpoints and that redis-server is running, then retry")
        return StorageError(f"{action} failed at redis {url}: {error}")

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        item = await self.script("GET", f"get {key!r}", [self.keys.data(key)], [])
        if item is None:
            return None
        value, create, mod, lease = item
        return KeyValue(key, bytes(value), int(create), int(mod), int(lease))

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        low, high = lex_range(prefix)
        reply = await self.script("LIST", f"list {prefix!r}", [], [low, high])
        revision = int(reply[0])
        items = [
            KeyValue(reply[i].decode(), bytes(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3]), int(reply[i + 4]))
            for i in range(1, len(reply), 5)
        ]
        return items, revision

    # -- writes --------------------------------------------------------------

    def _fence_args(self, key: str, fence: Fence | None) -> tuple[bytes, str]:
        if fence is None:
            return self.keys.data(key), ""
        return self.keys.data(fence.key), str(fence.create_revision)

    def _check_outcome(self, reply: list[Any], action: str, fence: Fence | None, lease: int = 0) -> int | None:
        """Return the new revision, or None when a comparison failed; raise for a broken fence or missing lease."""
        status = bytes(reply[0])
        if status == b"ok":
            return int(reply[1])
        if status == b"fenced" and fence is not None:
            current = int(reply[1])
            now = f"was re-created at revision {current}" if current else "no longer exists"
            raise FencingError(
                f"{action} rejected: fence key {fence.key!r} created at revision {fence.create_revision} {now}, "
                "so this process is no longer the leader; stop writing and campaign again"
            )
        if status == b"nolease":
            raise LeaseExpired(f"{action} failed: lease {lease:x} has expired or was revoked; grant a new lease")
        return None

    async def put(self, key: str, value: bytes, *, lease: int = 0, fence: Fence | None = None) -> int:
        revision = await self._put(f"put {key!r}", key, value, lease=lease, expected=-1, fence=fence)
        if revision is None:  # without an expected revision only the fence or the lease can fail, and both raise
            raise StorageError(f"put {key!r} was not applied by redis at {self.endpoint.url}; retry it")
        return revision

    async def compare_and_swap(self, key: str, value: bytes, *, expected_revision: int, lease: int = 0,
                               fence: Fence | None = None) -> int | None:
        if expected_revision < 0:
            raise ValueError(f"expected_revision must be 0 (absent) or a revision, got {expected_revision}")
        return await self._put(f"compare-and-swap {key!r}", key, value, lease=lease, expected=expected_revision,
                               fence=fence)

    async def _put(self, action: str, key: str, value: bytes, *, lease: int, expected: int,
                   fence: Fence | None) -> int | None:
        fence_key, fence_revision = self._fence_args(key, fence)
        reply = await self.script("PUT", action, [self.keys.data(key), fence_key],
                                  [self.history_limit, key, value, str(lease), str(expected), fence_revision])
        return self._check_outcome(reply, action, fence, lease)

    async def delete(self, key: str, *, expected_revision: int | None = None, fence: Fence | None = None) -> bool:
        action = f"delete {key!r}"
        fence_key, fence_revision = self._fence_args(key, fence)
        expected = -1 if expected_revision is None else expected_revision
        reply = await self.script("DELETE", action, [self.keys.data(key), fence_key],
                                  [self.history_limit, key, str(expected), fence_revision])
        return self._check_outcome(reply, action, fence) is not None

    # -- leases --------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        ttl_ms = max(1, math.ceil(ttl * 1000))
        for _ in range(8):
            lease = secrets.randbits(63) or 1
            granted = await self.script("GRANT", f"grant lease of {ttl:g}s", [], [self.history_limit, str(lease), ttl_ms])
            if granted:
                return lease
        raise StorageError(f"redis at {self.endpoint.url} found 8 random lease ids taken in a row; check the store")

    async def refresh_lease(self, lease: int) -> float:
        ttl_ms = await self.script("REFRESH", f"refresh lease {lease:x}", [], [self.history_limit, str(lease)])
        if ttl_ms < 0:
            raise LeaseExpired(f"lease {lease:x} has expired or was revoked; grant a new lease")
        return ttl_ms / 1000

    async def revoke_lease(self, lease: int) -> None:
        await self.script("REVOKE", f"revoke lease {lease:x}", [], [self.history_limit, str(lease)])

    async def _sweep_forever(self) -> None:
        """End expired leases until closed: shortly after the next deadline, at least every `sweep_interval`."""
        delay = MIN_SWEEP_INTERVAL
        while not self._closed.is_set():
            await self.sleep_unless_closed(delay)
            if self._closed.is_set():
                return
            try:
                ended, next_ms = await self.script("SWEEP", "sweep expired leases", [], [self.history_limit])
            except StorageError as error:
                log.debug("sweeping expired leases failed, trying again in %gs: %s", self.sweep_interval, error)
                delay = self.sweep_interval
                continue
            except Exception:
                # Keep sweeping: without sweeps, watches would miss lease expiries.
                log.exception("sweeping expired leases under %r failed unexpectedly", self.prefix)
                delay = self.sweep_interval
                continue
            if ended:
                log.debug("ended %d expired lease(s) under %r", ended, self.prefix)
            if ended >= redis_scripts.SWEEP_BATCH:
                delay = 0.0
            elif next_ms < 0:
                delay = self.sweep_interval
            else:
                # Just past the deadline, so that the next sweep finds the lease expired.
                delay = min(max(next_ms / 1000 + 0.005, MIN_SWEEP_INTERVAL), self.sweep_interval)

    # -- change feed ---------------------------------------------------------

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """See `Storage.watch` and `fleetkit.plugins.redis_watch.watch_changes`."""
        return watch_changes(self, prefix, start_revision)

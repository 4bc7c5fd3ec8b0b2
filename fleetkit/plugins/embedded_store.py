"""The database file, lock and worker thread behind the embedded storage backend.

One `StoreFile` exists per database path in a process; every
`EmbeddedStorage` client on that path shares it (see `acquire`). It owns:

* the `StoreLock` of the path, so that a second process on the same file
  is rejected;
* one SQLite connection in WAL mode with ``synchronous=FULL``, used only by
  one worker thread, so every call is serialized and the event loop never
  waits for fsync;
* lease deadlines on a monotonic clock, and a sweeper thread that deletes the
  keys of expired leases.

Methods ending in ``_sync`` run on the worker thread only; `call` schedules
them. Keys are stored as UTF-8 bytes including the client's prefix, so that
byte order is key order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from fleetkit.core.errors import CompactedError, FencingError, LeaseExpired, StorageError, StorageUnavailable
from fleetkit.plugins.embedded_lock import StoreLock, create_file

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key BLOB PRIMARY KEY, value BLOB NOT NULL,
    create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL, lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_lease ON keys (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, key BLOB NOT NULL, value BLOB,
    PRIMARY KEY (revision, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL, deadline REAL NOT NULL);
"""

Row = tuple[bytes, bytes, int, int, int]  # key, value, create_revision, mod_revision, lease
Change = tuple[int, str, bytes, bytes | None]  # revision, "put" or "delete", key, value


def range_end(prefix: bytes) -> bytes | None:
    """Return the smallest key above every key starting with `prefix`, or None for no bound."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _prefix_clause(prefix: bytes) -> tuple[str, tuple[bytes, ...]]:
    end = range_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


class _Write:
    """One write transaction: the revision it creates and the change-log rows it appends."""

    def __init__(self, db: sqlite3.Connection, revision: int):
        self.db = db
        self.base = revision
        self.revision = revision
        self._seq = 0

    def record(self, kind: str, key: bytes, value: bytes | None) -> int:
        """Append a change at this transaction's revision (one revision per transaction) and return it."""
        self.revision = self.base + 1
        self._seq += 1
        self.db.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?)", (self.revision, self._seq, kind, key, value))
        return self.revision


class StoreFile:
    """The shared state of one database path; see the module docstring.

    `history` is how many revisions of the change log are kept. `clock` is
    monotonic and decides lease expiry; `wall_clock` gives the persisted
    deadlines that survive a restart. `sweep_interval` bounds the sleep of the
    sweeper thread, `request_timeout` the wait for the worker thread.
    """

    def __init__(self, path: str, *, history: int, clock: Callable[[], float], wall_clock: Callable[[], float],
                 sweep_interval: float, request_timeout: float):
        self.path = path
        self._lock = StoreLock(path)
        self.history = history
        self.request_timeout = request_timeout
        self._clock = clock
        self._wall_clock = wall_clock
        self._sweep_interval = sweep_interval
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetkit-embedded")
        self._db: sqlite3.Connection | None = None
        self.revision = 0
        self.compact_revision = 0
        self._deadlines: dict[int, tuple[float, float]] = {}  # lease -> (deadline on clock, ttl)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._waiters_lock = threading.Lock()
        self._sweeper_wake = threading.Event()
        self._sweeper_stop = threading.Event()
        self.users = 0

    # -- calls from the event loop ------------------------------------------------

    async def call(self, action: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function(*args)` on the worker thread after expiring due leases.

        Raises `StorageUnavailable` when the worker does not finish within
        `request_timeout` seconds; the operation may still complete later.
        """
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._run, action, function, args)
        except RuntimeError as error:  # the executor was shut down
            raise StorageError(f"embedded store at {self.path} is closed; {action} needs connect() first") from error
        try:
            async with asyncio.timeout(self.request_timeout):
                return await future
        except TimeoutError as error:
            raise StorageUnavailable(
                f"embedded store at {self.path}: {action} did not finish within {self.request_timeout:g}s; "
                "check that the disk responds, then retry"
            ) from error

    def add_waiter(self) -> asyncio.Event:
        """Return an event that is set, on the caller's loop, after every commit and state change."""
        event = asyncio.Event()
        with self._waiters_lock:
            self._waiters.add((asyncio.get_running_loop(), event))
        return event

    def remove_waiter(self, event: asyncio.Event) -> None:
        with self._waiters_lock:
            self._waiters = {entry for entry in self._waiters if entry[1] is not event}

    def notify(self) -> None:
        """Wake every waiter; safe from any thread."""
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed already
                loop.call_soon_threadsafe(event.set)

    def shutdown_executor(self) -> None:
        self._executor.shutdown(wait=False)

    # -- worker thread: opening and closing -----------------------------------

    def _run(self, action: str, function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        lifecycle = function in (self.open_sync, self.close_sync, self.crash_sync)
        if self._db is None and not lifecycle:
            raise StorageUnavailable(
                f"embedded store at {self.path} is not open, so {action} failed; retry after it is reopened"
            )
        try:
            if not lifecycle:
                self._expire_due_sync()
            return function(*args)
        except sqlite3.OperationalError as error:
            raise StorageUnavailable(
                f"embedded store at {self.path}: {action} failed ({error}); "
                "check free space and permissions of the file, then retry"
            ) from error
        except sqlite3.Error as error:
            raise StorageError(
                f"embedded store at {self.path}: {action} failed ({error}); the file may be damaged: "
                "stop the daemon, move the file away and start with an empty store"
            ) from error

    def open_sync(self) -> None:
        """Lock the path, open or create the database and load the lease deadlines."""
        if self._db is not None:
            return
        create_file(self.path)
        self._lock.acquire()
        try:
            self._open_database()
        except BaseException:
            self._lock.release()
            raise
        self._sweeper_stop = threading.Event()
        threading.Thread(target=self._sweep_loop, args=(self._sweeper_stop,), name="fleetkit-embedded-sweeper",
                         daemon=True).start()
        log.info("opened embedded store at %s (revision %d, %d lease(s))", self.path, self.revision, len(self._deadlines))
        self.notify()

    def crash_sync(self) -> None:
        """Close the file and drop the lock as if this process had ended; clients stay attached (for tests).

        SQLite still checkpoints when the connection closes; a real crash is
        only reproduced by killing a process.
        """
        self.close_sync(checkpoint=False)

    def close_sync(self, *, checkpoint: bool = True) -> None:
        """Stop the sweeper, close the database and release the lock; idempotent."""
        self._sweeper_stop.set()
        self._sweeper_wake.set()
        db, self._db = self._db, None
        if db is not None:
            if checkpoint:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
        self._lock.release()
        self._deadlines.clear()
        self.notify()

    def _open_database(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StorageError(f"cannot open the embedded store at {self.path} ({error}); "
                               "check that the path is a file fleetkit may write") from error
        try:
            self._prepare(db)
        except sqlite3.DatabaseError as error:
            db.close()
            raise StorageError(
                f"{self.path} is not a fleetkit embedded store ({error}); "
                "move the file away or set [storage] path to another file"
            ) from error
        except BaseException:
            db.close()
            raise
        self._db = db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Switch to WAL, create or check the schema, and load the revisions and leases."""
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"embedded store at {self.path} cannot use WAL mode (SQLite chose {mode!r}); "
                               "put the file on a local file system")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                raise StorageError(f"{self.path} is an SQLite database of another program (tables: "
                                   f"{', '.join(sorted(tables))}); set [storage] path to another file")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
            if not meta:
                meta = {"schema_version": SCHEMA_VERSION, "revision": 1, "compact_revision": 0}
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            elif meta.get("schema_version") != SCHEMA_VERSION:
                raise StorageError(
                    f"embedded store at {self.path} has schema version {meta.get('schema_version')}, and this "
                    f"fleetkit reads version {SCHEMA_VERSION}; run the fleetkit version that wrote it"
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.revision = meta["revision"]
        self.compact_revision = meta["compact_revision"]

        # A lease keeps the time it had left when the previous process last
        # wrote its deadline, so a daemon restarted within the TTL keeps it.
        now, wall = self._clock(), self._wall_clock()
        self._deadlines = {
            lease: (now + min(ttl, deadline - wall), ttl)
            for lease, ttl, deadline in db.execute("SELECT id, ttl, deadline FROM leases")
        }

    # -- worker thread: transactions ----------------------------------------------

    @contextlib.contextmanager
    def _transaction(self):
        """Run the body in one SQLite transaction; commit bumps the revision at most once."""
        db = self._db
        write = _Write(db, self.revision)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield write
            if write.revision != write.base:
                db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (write.revision,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if write.revision != write.base:
            self.revision = write.revision
            self._trim_if_due()
            self.notify()

    def _check_fence(self, action: str, fence: tuple[bytes, int] | None) -> None:
        if fence is None:
            return
        key, create_revision = fence
        row = self._db.execute("SELECT create_revision FROM keys WHERE key = ?", (key,)).fetchone()
        current = row[0] if row else 0
        if current != create_revision:
            now = f"was re-created at revision {current}" if current else "no longer exists"
            raise FencingError(
                f"{action} rejected: fence key {key.decode()!r} created at revision {create_revision} {now}, "
                "so this process is no longer the leader; stop writing and campaign again"
            )

    def put_sync(self, action: str, key: bytes, value: bytes, lease: int, fence: tuple[bytes, int] | None,
                 expected_revision: int | None) -> int | None:
        """Write `key`; None when `expected_revision` does not match its mod revision (0 when absent)."""
        with self._transaction() as write:
            self._check_fence(action, fence)
            row = self._db.execute("SELECT create_revision, mod_revision FROM keys WHERE key = ?", (key,)).fetchone()
            if expected_revision is not None and (row[1] if row else 0) != expected_revision:
                return None
            if lease and lease not in self._deadlines:
                raise LeaseExpired(f"{action} failed: lease {lease:x} has expired or was revoked; grant a new lease")
            revision = write.record("put", key, value)
            self._db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?)",
                             (key, value, row[0] if row else revision, revision, lease))
        return revision

    def delete_sync(self, action: str, key: bytes, fence: tuple[bytes, int] | None,
                    expected_revision: int | None) -> bool:
        with self._transaction() as write:
            self._check_fence(action, fence)
            row = self._db.execute("SELECT mod_revision FROM keys WHERE key = ?", (key,)).fetchone()
            if row is None or (expected_revision is not None and row[0] != expected_revision):
                return False
            write.record("delete", key, None)
            self._db.execute("DELETE FROM keys WHERE key = ?", (key,))
        return True

    # -- worker thread: reads ---------------------------------------------------

    def get_sync(self, key: bytes) -> Row | None:
        return self._db.execute("SELECT * FROM keys WHERE key = ?", (key,)).fetchone()

    def list_sync(self, prefix: bytes) -> tuple[list[Row], int]:
        clause, params = _prefix_clause(prefix)
        rows = self._db.execute(f"SELECT * FROM keys WHERE {clause} ORDER BY key", params).fetchall()
        return rows, self.revision

    def changes_sync(self, shown_prefix: str, prefix: bytes, start: int, window: int) -> tuple[list[Change], int]:
        """Return the changes under `prefix` in revisions [start, start + window) and the next revision to read.

        Raises `CompactedError` when `start` was trimmed from the change log.
        """
        if start <= self.compact_revision:
            raise CompactedError(
                f"watch of {shown_prefix!r} cannot resume at revision {start}: the embedded store at {self.path} "
                f"has trimmed its change log up to revision {self.compact_revision}; "
                "list the prefix again and watch from there",
                compact_revision=self.compact_revision,
            )
        upper = min(self.revision, start + window - 1)
        if upper < start:
            return [], start
        clause, params = _prefix_clause(prefix)
        rows = self._db.execute(
            f"SELECT revision, type, key, value FROM changes WHERE revision BETWEEN ? AND ? AND {clause} "
            "ORDER BY revision, seq", (start, upper, *params),
        ).fetchall()
        return rows, upper + 1

    def compact_sync(self, revision: int | None) -> int:
        """Drop the change log up to `revision` (default: the current one); return the compact revision."""
        target = self.revision if revision is None else min(revision, self.revision)
        if target <= self.compact_revision:
            return self.compact_revision
        with self._transaction():
            self._db.execute("DELETE FROM changes WHERE revision <= ?", (target,))
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (target,))
        self.compact_revision = target
        return target

    def _trim_if_due(self) -> None:
        # Trimming in steps of 1 % of the history keeps the delete cost off most writes.
        if self.revision - self.compact_revision > self.history + max(1, self.history // 100):
            self.compact_sync(self.revision - self.history)

    # -- worker thread: leases ------------------------------------------------------

    def grant_sync(self, ttl: float) -> int:
        lease = 0
        for _ in range(8):
            lease = secrets.randbits(62)
            if lease and lease not in self._deadlines:
                break
        with self._transaction():
            self._db.execute("INSERT INTO leases VALUES (?, ?, ?)", (lease, ttl, self._wall_clock() + ttl))
        self._deadlines[lease] = (self._clock() + ttl, ttl)
        self._sweeper_wake.set()
        return lease

    def refresh_sync(self, lease: int) -> float:
        if lease not in self._deadlines:
            raise LeaseExpired(f"lease {lease:x} has expired or was revoked; grant a new lease")
        ttl = self._deadlines[lease][1]
        with self._transaction():
            self._db.execute("UPDATE leases SET deadline = ? WHERE id = ?", (self._wall_clock() + ttl, lease))
        self._deadlines[lease] = (self._clock() + ttl, ttl)
        return ttl

    def revoke_sync(self, lease: int) -> None:
        """Delete the lease and its keys in one revision; absent leases are ignored."""
        if lease not in self._deadlines:
            return
        with self._transaction() as write:
            keys = self._db.execute("SELECT key FROM keys WHERE lease = ? ORDER BY key", (lease,)).fetchall()
            for (key,) in keys:
                write.record("delete", key, None)
            self._db.execute("DELETE FROM keys WHERE lease = ?", (lease,))
            self._db.execute("DELETE FROM leases WHERE id = ?", (lease,))
        del self._deadlines[lease]

    def _expire_due_sync(self) -> None:
        now = self._clock()
        for lease, (deadline, ttl) in list(self._deadlines.items()):
            if deadline <= now:
                log.info("lease %x (ttl %gs) expired in the embedded store at %s; deleting its keys",
                         lease, ttl, self.path)
                self.revoke_sync(lease)

    def noop_sync(self) -> None:
        """Do nothing; `_run` expires due leases before calling it."""

    # -- sweeper thread -----------------------------------------------------------

    def _next_delay(self) -> float:
        try:
            deadlines = [deadline for deadline, _ in list(self._deadlines.values())]
        except RuntimeError:  # changed while copying; look again soon
            return 0.01
        if not deadlines:
            return self._sweep_interval
        return min(self._sweep_interval, max(0.005, min(deadlines) - self._clock()))

    def _sweep_loop(self, stop: threading.Event) -> None:
        """Expire leases close to their deadline, until `stop` is set."""
        while not stop.is_set():
            self._sweeper_wake.wait(self._next_delay())
            self._sweeper_wake.clear()
            if stop.is_set():
                return
            try:
                self._executor.submit(self._run, "expire leases", self.noop_sync, ()).result(self.request_timeout)
            except RuntimeError:
                return  # the executor was shut down
            except Exception as error:
                if not stop.is_set():
                    log.warning("expiring leases of the embedded store at %s failed: %s", self.path, error)


_registry: dict[str, StoreFile] = {}
_registry_lock = threading.Lock()


def find(path: str) -> StoreFile | None:
    """Return the `StoreFile` of `path` that clients in this process share, or None."""
    with _registry_lock:
        return _registry.get(os.path.realpath(path))


async def acquire(path: str, **options: Any) -> StoreFile:
    """Return the open `StoreFile` of `path`, opening it for the first user in this process.

    `options` are `StoreFile` arguments and count only when this call opens
    the file. Raises `StorageError` when another process has the file open.
    """
    key = os.path.realpath(path)
    with _registry_lock:
        store = _registry.get(key)
        if store is None:
            store = _registry[key] = StoreFile(key, **options)
        store.users += 1
    try:
        await store.call("open", store.open_sync)
    except BaseException:
        await release(store)
        raise
    return store


async def release(store: StoreFile) -> None:
    """Give up one use of `store`; the last user closes the file and releases the lock."""
    with _registry_lock:
        store.users -= 1
        if store.users > 0:
            return
    try:
        await store.call("close", store.close_sync)
    finally:
        with _registry_lock:
            if store.users == 0 and _registry.get(store.path) is store:
                del _registry[store.path]
                store.shutdown_executor()

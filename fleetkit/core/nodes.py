"""Node records: what every daemon advertises about itself in storage.

Each daemon keeps ``nodes/<machine>`` (see `fleetkit.core.keys`) attached to
a lease of ``[agent] ttl``: its fleetkit version, the transport modes its
build can run and the one it runs, whether it runs an engine candidate and
its transport address. The record
vanishes when the daemon stops renewing it. Engines use the versions to
gate leadership during a rolling upgrade, and ``fleetkit cluster status``
shows them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field

from fleetkit.core import keys
from fleetkit.core.errors import LeaseExpired, StorageError
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRecord:
    """One daemon's advertisement."""

    machine: str
    version: str
    # Every transport mode this build can run, and the one it runs now.
    transports: tuple[str, ...] = ()
    engine: bool = True
    address: str = ""
    started: float = field(default=0.0)
    mode: str = ""
    # Whether the transport listener takes TLS, and when the earliest of its certificates expires (0: none).
    tls: bool = False
    certificate_expires: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "transports": list(self.transports)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeRecord:
        raw = json.loads(data)
        return cls(
            machine=str(raw["machine"]), version=str(raw["version"]),
            transports=tuple(str(name) for name in raw.get("transports", ())),
            engine=bool(raw.get("engine", True)), address=str(raw.get("address", "")),
            started=float(raw.get("started", 0.0)), mode=str(raw.get("mode", "")),
            tls=bool(raw.get("tls", False)), certificate_expires=float(raw.get("certificate_expires", 0.0)),
        )


def parse_version(text: str) -> tuple[int, ...]:
    """Return a comparable version: the leading dot-separated numbers of `text` ("0.2.1rc1" gives (0, 2, 1))."""
    numbers = []
    for part in text.split("."):
        digits = ""
        for character in part:
            if not character.isdigit():
                break
            digits += character
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(numbers)


def newer_engines(nodes: dict[str, NodeRecord], version: str) -> list[NodeRecord]:
    """Return the engine candidates whose version is newer than `version`, newest first."""
    mine = parse_version(version)
    newer = [node for node in nodes.values() if node.engine and parse_version(node.version) > mine]
    return sorted(newer, key=lambda node: parse_version(node.version), reverse=True)


async def read_nodes(storage: Storage) -> dict[str, NodeRecord]:
    """Return the current node records by machine; unreadable ones are logged and skipped."""
    items, _revision = await storage.list(keys.NODES)
    nodes = {}
    for item in items:
        try:
            record = NodeRecord.from_json(item.value)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable node record %s: %s", item.key, error)
            continue
        nodes[record.machine] = record
    return nodes


class NodeAdvertiser:
    """Keeps this daemon's node record in storage while it runs."""

    def __init__(self, storage: Storage, record: NodeRecord, *, ttl: float):
        self._storage = storage
        self._record = record
        self._ttl = ttl
        self._changed = asyncio.Event()

    @property
    def record(self) -> NodeRecord:
        return self._record

    def update(self, record: NodeRecord) -> None:
        """Advertise `record` instead, on the same lease, as soon as possible."""
        if record != self._record:
            self._record = record
            self._changed.set()

    async def run(self) -> None:
        """Write the record on a lease and renew it every third of the TTL; re-create it after any loss."""
        attempts = Attempts(Backoff(initial=0.5, cap=5.0))
        while True:
            lease = 0
            try:
                lease = await self._storage.grant_lease(self._ttl)
                self._changed.clear()
                await self._storage.put(keys.node_key(self._record.machine), self._record.to_json(), lease=lease)
                attempts.reset()
                while True:
                    try:
                        async with asyncio.timeout(self._ttl / 3):
                            await self._changed.wait()
                    except TimeoutError:
                        await self._storage.refresh_lease(lease)
                        continue
                    self._changed.clear()
                    await self._storage.put(keys.node_key(self._record.machine), self._record.to_json(),
                                            lease=lease)
            except LeaseExpired:
                log.warning("the node record of %s expired; writing it again", self._record.machine)
            except StorageError as error:
                if attempts.failures == 0:
                    log.warning("cannot advertise this node in storage, retrying: %s", error)
                await attempts.sleep()
            except asyncio.CancelledError:
                if lease:
                    await self._revoke_quietly(lease)
                raise

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self._storage.revoke_lease(lease)
        except (StorageError, TimeoutError):
            pass


def new_record(
    machine: str, version: str, transports: tuple[str, ...], *, engine: bool, address: str, mode: str,
    tls: bool = False, certificate_expires: float = 0.0,
) -> NodeRecord:
    return NodeRecord(
        machine=machine, version=version, transports=transports, engine=engine, address=address,
        started=time.time(), mode=mode, tls=tls, certificate_expires=certificate_expires,
    )

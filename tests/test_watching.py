"""Tests for follow() and Mirror."""

import asyncio
import contextlib
import logging

import aetcd

from fleetkit.core.retry import Backoff
from fleetkit.core.storage import EventType, KeyValue, WatchEvent
from fleetkit.core.watching import Mirror, Snapshot, follow
from fleetkit.plugins.etcd3 import Etcd3Storage


async def compact(url: str, revision: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    async with aetcd.Client(host, int(port)) as client:
        await client.compact(revision, physical=True)


async def next_update(updates):
    async with asyncio.timeout(10):
        return await anext(updates)


async def test_follow_yields_snapshot_then_events(etcd_storage):
    await etcd_storage.put("f/a", b"1")

    async with contextlib.aclosing(follow(etcd_storage, "f/")) as updates:
        snapshot = await next_update(updates)
        await etcd_storage.put("f/b", b"2")
        batch = await next_update(updates)

    assert isinstance(snapshot, Snapshot)
    assert list(snapshot.items) == ["f/a"]
    assert [(event.type, event.key) for event in batch] == [(EventType.PUT, "f/b")]
    assert batch[0].revision == snapshot.revision + 1


async def test_follow_relists_after_compaction(etcd_server, etcd_storage):
    await etcd_storage.put("f/old", b"1")

    async with contextlib.aclosing(follow(etcd_storage, "f/")) as updates:
        first = await next_update(updates)
        await etcd_storage.delete("f/old")
        latest = await etcd_storage.put("f/new", b"2")
        await compact(etcd_server.client_url, latest)
        second = await next_update(updates)
        await etcd_storage.put("f/newer", b"3")
        batch = await next_update(updates)

    assert list(first.items) == ["f/old"]
    assert isinstance(second, Snapshot)
    assert list(second.items) == ["f/new"]
    assert second.revision >= latest
    assert [event.key for event in batch] == ["f/newer"]


async def test_follow_retries_list_while_unavailable(etcd_factory, caplog):
    server = etcd_factory()
    storage = Etcd3Storage([server.client_url], prefix="/outage/", dial_timeout=1, request_timeout=1)
    await storage.connect()
    await storage.put("k", b"v")
    server.kill()
    caplog.set_level(logging.WARNING, logger="fleetkit.core.watching")

    try:
        async with contextlib.aclosing(follow(storage, "", backoff=Backoff(initial=0.05, cap=0.2))) as updates:
            pending = asyncio.ensure_future(next_update(updates))
            await asyncio.sleep(1.5)
            assert not pending.done()
            await asyncio.to_thread(server.start)
            snapshot = await pending
    finally:
        await storage.close()

    assert list(snapshot.items) == ["k"]
    warnings = [record for record in caplog.records if record.name == "fleetkit.core.watching"]
    assert len(warnings) == 1, [record.getMessage() for record in warnings]


async def test_mirror_matches_store_after_follow(etcd_storage):
    await etcd_storage.put("m/a", b"1")
    await etcd_storage.put("m/b", b"1")
    mirror = Mirror()

    async with contextlib.aclosing(follow(etcd_storage, "m/")) as updates:
        mirror.apply(await next_update(updates))
        await etcd_storage.put("m/a", b"2")
        await etcd_storage.delete("m/b")
        last = await etcd_storage.put("m/c", b"3")
        while mirror.revision < last:
            mirror.apply(await next_update(updates))

    items, _ = await etcd_storage.list("m/")
    expected = {kv.key: kv for kv in items}
    assert mirror.items == expected


def kv(key: str, revision: int, value: bytes = b"v", created: int | None = None) -> KeyValue:
    return KeyValue(key, value, created or revision, revision)


def test_mirror_apply_reports_changed_keys():
    mirror = Mirror()
    mirror.apply(Snapshot({"a": kv("a", 2), "b": kv("b", 3)}, revision=3))

    changed = mirror.apply([
        WatchEvent(EventType.PUT, "a", b"new", 4),
        WatchEvent(EventType.DELETE, "b", None, 5),
    ])

    assert changed == {"a", "b"}
    assert mirror.items == {"a": KeyValue("a", b"new", 2, 4)}
    assert mirror.revision == 5


def test_mirror_skips_events_in_snapshot():
    mirror = Mirror()
    mirror.apply(Snapshot({"a": kv("a", 7)}, revision=7))

    assert mirror.apply([WatchEvent(EventType.PUT, "a", b"stale", 6)]) == set()
    assert mirror.items["a"].value == b"v"


def test_mirror_snapshot_replaces_everything():
    mirror = Mirror()
    mirror.apply(Snapshot({"gone": kv("gone", 2), "same": kv("same", 3), "moved": kv("moved", 4)}, revision=4))

    changed = mirror.apply(Snapshot({"same": kv("same", 3), "moved": kv("moved", 9), "new": kv("new", 10)}, revision=10))

    assert changed == {"gone", "moved", "new"}
    assert set(mirror.items) == {"same", "moved", "new"}
    assert mirror.revision == 10

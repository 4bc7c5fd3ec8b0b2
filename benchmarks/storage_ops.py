"""Measure each storage backend's write, compare-and-swap and watch rates on this machine.

Run with ``python benchmarks/storage_ops.py`` (all backends) or
``--backends etcd3,redis``. Each backend's real server is started fresh by
its conformance harness on loopback (or a temporary directory for the
embedded store), so the figures include the network round trip and the
server's own durability settings. Every figure is printed; nothing is
asserted.

Measured per backend:

- single writer: sequential ``put`` calls from one client;
- 20 writers: 20 clients, each with its own connection, putting at once;
- CAS: sequential ``compare_and_swap`` on one key, each with the revision the
  previous one returned;
- watch, live: one watcher while 20 writers put; events received per second;
- watch, replay: a watch started at an old revision receiving events already
  written.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import time
import uuid

HARNESSES = {
    "etcd3": "fleetkit.testing.etcd3_harness:Etcd3Harness",
    "etcd2": "fleetkit.testing.etcd2_harness:Etcd2Harness",
    "redis": "fleetkit.testing.redis_harness:RedisHarness",
    "embedded": "fleetkit.testing.embedded_harness:EmbeddedHarness",
}
WRITERS = 20
VALUE = b"x" * 200
WATCH_TIMEOUT = 300.0


def load_harness(backend: str):
    module_name, _, class_name = HARNESSES[backend].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


async def single_writer(harness, count: int) -> float:
    storage = await harness.new_storage(f"/bench/{uuid.uuid4().hex}/")
    try:
        started = time.perf_counter()
        for index in range(count):
            await storage.put(f"single/{index}", VALUE)
        return count / (time.perf_counter() - started)
    finally:
        await storage.close()


async def many_writers(harness, count: int, prefix: str | None = None) -> float:
    prefix = prefix or f"/bench/{uuid.uuid4().hex}/"
    clients = [await harness.new_storage(prefix) for _ in range(WRITERS)]
    share = count // WRITERS

    async def write(client, writer: int) -> None:
        for index in range(share):
            await client.put(f"many/{writer}/{index}", VALUE)

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for writer, client in enumerate(clients):
                group.create_task(write(client, writer))
        return share * WRITERS / (time.perf_counter() - started)
    finally:
        for client in clients:
            await client.close()


async def cas_rate(harness, count: int) -> float:
    storage = await harness.new_storage(f"/bench/{uuid.uuid4().hex}/")
    try:
        revision = await storage.compare_and_swap("cas", b"0", expected_revision=0)
        started = time.perf_counter()
        for index in range(count):
            revision = await storage.compare_and_swap("cas", str(index).encode(), expected_revision=revision)
            if revision is None:
                raise RuntimeError("a compare-and-swap lost with no other writer; the backend is broken")
        return count / (time.perf_counter() - started)
    finally:
        await storage.close()


async def _collect(watcher, prefix_key: str, start_revision: int, count: int, first_event: list[float]) -> float:
    received = 0
    async with asyncio.timeout(WATCH_TIMEOUT):
        async for batch in watcher.watch(prefix_key, start_revision=start_revision):
            if received == 0:
                first_event.append(time.perf_counter())
            received += len(batch)
            if received >= count:
                return time.perf_counter()
    raise RuntimeError(f"the watch ended after {received} of {count} events")


async def watch_live(harness, count: int) -> float:
    prefix = f"/bench/{uuid.uuid4().hex}/"
    watcher = await harness.new_storage(prefix)
    try:
        _items, revision = await watcher.list("")
        first: list[float] = []
        collector = asyncio.create_task(_collect(watcher, "many/", revision + 1, count // WRITERS * WRITERS, first))
        started = time.perf_counter()
        await many_writers(harness, count, prefix)
        finished = await collector
        return count // WRITERS * WRITERS / (finished - started)
    finally:
        await watcher.close()


async def watch_replay(harness, count: int) -> float:
    prefix = f"/bench/{uuid.uuid4().hex}/"
    writer = await harness.new_storage(prefix)
    try:
        _items, revision = await writer.list("")
        for index in range(count):
            await writer.put(f"replay/{index}", VALUE)
        first: list[float] = []
        started = time.perf_counter()
        finished = await _collect(writer, "replay/", revision + 1, count, first)
        return count / (finished - started)
    finally:
        await writer.close()


async def lost_history_as_none(measurement) -> float | None:
    """Return the rate, or None when the watch fell out of the store's history (etcd v2 keeps 1000 events)."""
    from fleetkit.core.errors import CompactedError

    try:
        return await measurement
    except CompactedError as error:
        print(f"  watch fell behind: {error}", file=sys.stderr)
        return None


async def measure(backend: str, count: int) -> dict:
    from fleetkit.testing.conformance import started_harness

    async with started_harness(load_harness(backend)) as harness:
        return {
            "backend": backend,
            "single_writer_puts_per_s": await single_writer(harness, count),
            "writers_20_puts_per_s": await many_writers(harness, count),
            "cas_per_s": await cas_rate(harness, count),
            "watch_live_events_per_s": await lost_history_as_none(watch_live(harness, count)),
            "watch_replay_events_per_s": await lost_history_as_none(watch_replay(harness, count)),
        }


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "cpu": model, "memory_gib": round(memory, 1), "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(HARNESSES), help="comma-separated backends to measure")
    parser.add_argument("--count", type=int, default=2000, help="operations per measurement (default: 2000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = [name for name in backends if name not in HARNESSES]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r}; choose from {', '.join(HARNESSES)}")

    results = []
    for backend in backends:
        print(f"measuring {backend} ({args.count} operations per figure)...", file=sys.stderr)
        results.append(asyncio.run(measure(backend, args.count)))

    if args.json:
        print(json.dumps({"machine": machine(), "count": args.count, "results": results}, indent=2))
        return 0
    info = machine()
    print(f"machine: {info['cpus']} cpus, {info['cpu']}, {info['memory_gib']} GiB, Python {info['python']}")
    print(f"operations per figure: {args.count}; rates in operations (or events) per second\n")
    header = ("backend", "1 writer put", "20 writers put", "CAS", "watch live", "watch replay")
    print("  ".join(f"{name:>14}" for name in header))
    for row in results:
        values = [row["single_writer_puts_per_s"], row["writers_20_puts_per_s"], row["cas_per_s"],
                  row["watch_live_events_per_s"], row["watch_replay_events_per_s"]]
        cells = [f"{value:>14,.0f}" if value is not None else f"{'fell behind':>14}" for value in values]
        print(f"{row['backend']:>14}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

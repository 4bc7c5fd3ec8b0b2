"""Node records and engine version gating, on real etcd and real daemons."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fleetkit.core import keys
from fleetkit.core.nodes import NodeAdvertiser, NodeRecord, newer_engines, parse_version, read_nodes
from fleetkit.plugins.etcd3 import Etcd3Storage
from fleetkit.testing.scenario import SLEEPER, main_pids, placements, wait_until


@pytest.mark.parametrize(("text", "expected"), [
    ("0.1.0", (0, 1, 0)),
    ("1.10.2", (1, 10, 2)),
    ("0.2.1rc1", (0, 2, 1)),
    ("2", (2,)),
    ("dev", ()),
])
def test_parse_version_table(text, expected):
    assert parse_version(text) == expected


def test_newer_engines_ignores_agents_only():
    nodes = {
        "a": NodeRecord("a", "0.1.0"),
        "b": NodeRecord("b", "0.3.0", engine=False),
        "c": NodeRecord("c", "0.2.0"),
        "d": NodeRecord("d", "0.10.0"),
    }

    newer = newer_engines(nodes, "0.1.0")

    assert [node.machine for node in newer] == ["d", "c"]
    assert newer_engines(nodes, "0.10.0") == []


async def test_advertiser_writes_and_revokes(etcd_server):
    storage = Etcd3Storage([etcd_server.client_url], prefix=f"/nodes-test/{uuid.uuid4().hex}/")
    await storage.connect()
    record = NodeRecord("m1", "0.1.0", ("grpc",), address="127.0.0.1:1")
    try:
        async with asyncio.TaskGroup() as group:
            task = group.create_task(NodeAdvertiser(storage, record, ttl=3).run())
            seen = await wait_until(lambda: _read(storage), timeout=5, interval=0.1)
            await asyncio.sleep(4)
            still = await read_nodes(storage)
            task.cancel()
        after = await read_nodes(storage)
    finally:
        await storage.close()

    assert seen == {"m1": record}
    assert still == {"m1": record}
    assert after == {}


async def _read(storage):
    return await read_nodes(storage)


async def test_newer_engine_takes_leadership_away(cluster_factory, tmp_path):
    cluster = await cluster_factory({"node1": {}, "node2": {}})
    (tmp_path / "keep@.service").write_text(SLEEPER)
    arguments = [str(tmp_path / f"keep@{index}.service") for index in (1, 2)]
    assert (await cluster.cli("start", *arguments)).code == 0
    found = await placements(cluster)
    before = await main_pids(cluster, found)
    storage = Etcd3Storage([cluster.etcd_url], prefix="/fleetkit/")
    await storage.connect()
    try:
        assert await cluster.leader() in ("node1", "node2")
        lease = await storage.grant_lease(30)
        newer = NodeRecord("node9", "999.0.0", ("grpc",), address="127.0.0.1:9")
        await storage.put(keys.node_key("node9"), newer.to_json(), lease=lease)

        async def no_leader():
            return await cluster.leader() == ""

        gone = await wait_until(no_leader, timeout=4 + 6)
        await asyncio.sleep(3)
        still_gone = await cluster.leader() == ""
        await storage.revoke_lease(lease)

        async def some_leader():
            return await cluster.leader() != ""

        back = await wait_until(some_leader, timeout=4 + 6)
    finally:
        await storage.close()

    assert gone, cluster.logs()
    assert still_gone, cluster.logs()
    assert back, cluster.logs()
    assert "newer engine version 999.0.0" in cluster.nodes["node1"].log_tail(200) + cluster.nodes["node2"].log_tail(200)
    assert await main_pids(cluster, found) == before

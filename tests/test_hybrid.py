"""The hybrid transport falls back to storage when gRPC to the leader fails, and returns when it works."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleetkit.cli.devcluster import free_port
from fleetkit.testing.proxy import TcpProxy
from fleetkit.testing.scenario import SLEEPER, main_pids, placements, wait_until

pytestmark = pytest.mark.slow


async def test_agent_falls_back_and_returns(backend_cluster_factory, tmp_path):
    # Each node advertises its proxy; the proxy forwards to the node's real listen port.
    proxies = {name: TcpProxy(free_port(), 0) for name in ("node1", "node2")}
    cluster = await _hybrid_cluster(backend_cluster_factory, proxies)
    (tmp_path / "work@.service").write_text(SLEEPER)
    first = [str(tmp_path / f"work@{index}.service") for index in (1, 2)]
    assert (await cluster.cli("start", *first)).code == 0, cluster.logs()
    found = await placements(cluster)
    before = await main_pids(cluster, found)
    leader = await cluster.leader()
    follower = "node2" if leader == "node1" else "node1"

    await proxies[leader].cut()

    async def fell_back():
        return "falling back to storage" in cluster.nodes[follower].log_tail(300)

    assert await wait_until(fell_back, timeout=2 + 10), cluster.logs()
    # Work still reaches the agents, now through storage.
    more = [str(tmp_path / f"work@{index}.service") for index in (3, 4, 5, 6)]
    started = await cluster.cli("start", "--block-timeout", "30", *more, endpoint=cluster.nodes[leader].endpoint)
    assert started.code == 0, started.stderr + cluster.logs()
    status = json.loads((await cluster.cli("cluster", "status", "--output", "json",
                                           endpoint=cluster.nodes[leader].endpoint)).stdout)
    in_use = {node["machine"]: node["transport_in_use"] for node in status["nodes"]}

    await proxies[leader].open()

    async def returned():
        return "returning to gRPC" in cluster.nodes[follower].log_tail(300)

    assert await wait_until(returned, timeout=20), cluster.logs()

    async def all_grpc():
        result = await cluster.cli("cluster", "status", "--output", "json", endpoint=cluster.nodes[leader].endpoint)
        nodes = json.loads(result.stdout)["nodes"] if result.code == 0 else []
        return nodes and all(node["transport_in_use"] == "grpc" for node in nodes)

    assert await wait_until(all_grpc, timeout=20), cluster.logs()
    assert in_use[follower] == "etcd-watch"
    after = await main_pids(cluster, found)
    assert after == before
    for proxy in proxies.values():
        await proxy.cut()


async def _hybrid_cluster(backend_cluster_factory, proxies):
    extra = {name: f'advertise = "127.0.0.1:{proxy.port}"\nfallback_after = "2s"' for name, proxy in proxies.items()}
    cluster = await backend_cluster_factory(
        "etcd3", {}, transport="hybrid",
    )
    for name in proxies:
        node = await cluster.add_node(name, {}, transport="hybrid", transport_extra=extra[name])
        proxies[name].target_port = node.config_args[0]
        await proxies[name].open()
    await cluster.start()
    return cluster

"""A live cluster moves from etcd-watch through hybrid to grpc, one node at a time, with no unit restarted."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleetkit.testing.scenario import SLEEPER, wait_until

pytestmark = pytest.mark.slow

INSTANCES = 60


async def snapshot(cluster) -> dict[tuple[str, str], str]:
    """Return (node, unit) to MainPID for every active fleetkit test unit."""
    found = {}
    for name, node in cluster.nodes.items():
        for unit, pid in (await node.main_pids("*.service")).items():
            if unit.startswith(("web@", "agent.")):
                found[(name, unit)] = pid
    return found


async def listed(cluster, endpoint: str) -> set[tuple[str, str]]:
    result = await cluster.cli("list-units", "--output", "json", endpoint=endpoint)
    if result.code != 0:
        return set()
    return {(row["machine"], row["unit"]) for row in json.loads(result.stdout) if row["active"] == "active"}


async def check_stage(cluster, before, stage: str) -> None:
    """Every unit runs with its original MainPID, no unit runs twice, and list-units lists them all."""
    expected = set(before)

    async def converged():
        endpoint = cluster.endpoint()
        return await listed(cluster, endpoint) >= {(node, unit) for node, unit in expected}

    assert await wait_until(converged, timeout=40, interval=1), f"{stage}: list-units incomplete\n" + cluster.logs()
    now = await snapshot(cluster)
    assert now == before, f"{stage}: units restarted or moved"
    placed: dict[str, str] = {}
    for node, unit in now:
        if unit.startswith("web@"):
            assert unit not in placed, f"{stage}: {unit} runs on {placed[unit]} and {node}"
            placed[unit] = node


async def restart_into(cluster, name: str, mode: str) -> None:
    node = cluster.nodes[name]
    await node.stop()
    cluster.set_transport(name, mode)
    await node.start()
    await asyncio.sleep(1)


async def test_etcd_watch_to_grpc_keeps_units(backend_cluster_factory, tmp_path):
    nodes = {"node1": {}, "node2": {}, "node3": {}}
    cluster = await backend_cluster_factory("etcd3", nodes, transport="etcd-watch")
    (tmp_path / "web@.service").write_text(SLEEPER)
    (tmp_path / "agent.service").write_text(SLEEPER + "\n[X-Fleet]\nGlobal=true\n")
    arguments = [str(tmp_path / f"web@{index}.service") for index in range(1, INSTANCES + 1)]
    arguments.append(str(tmp_path / "agent.service"))
    started = await cluster.cli("start", "--block-timeout", "90", *arguments)
    assert started.code == 0, started.stderr + cluster.logs()
    before = await snapshot(cluster)
    assert len(before) == INSTANCES + 3
    await check_stage(cluster, before, "etcd-watch")

    await restart_into(cluster, "node1", "hybrid")
    await check_stage(cluster, before, "node1 hybrid")
    leader = await cluster.leader()
    await cluster.nodes[leader].kill()
    await cluster.nodes[leader].start()
    await check_stage(cluster, before, f"leader {leader} killed")
    for name in ("node2", "node3"):
        await restart_into(cluster, name, "hybrid")
        await check_stage(cluster, before, f"{name} hybrid")

    status = json.loads((await cluster.cli("cluster", "status", "--output", "json")).stdout)
    assert status["next_stage"] == "grpc"

    for name in ("node1", "node2", "node3"):
        await restart_into(cluster, name, "grpc")
        await check_stage(cluster, before, f"{name} grpc")

    async def all_grpc():
        result = await cluster.cli("cluster", "status", "--output", "json")
        final = json.loads(result.stdout) if result.code == 0 else {}
        return final if final.get("ready") and final.get("next_stage") == "" else None

    final = await wait_until(all_grpc, timeout=30)
    assert final, cluster.logs()
    assert all(node["transport_in_use"] == "grpc" for node in final["nodes"])

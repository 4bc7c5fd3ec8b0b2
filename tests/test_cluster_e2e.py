"""End-to-end: real daemons, real etcd and real systemd user managers, driven through the CLI."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleetkit.testing.scenario import (
    NODES,
    SLEEPER,
    check_scenario,
    kill_leader,
    main_pids,
    placements,
    start_scenario,
    wait_until,
)

pytestmark = pytest.mark.slow

async def test_scenario_runs_on_right_machines(cluster_factory, tmp_path):
    cluster = await cluster_factory(NODES)

    found = await start_scenario(cluster, tmp_path)

    check_scenario(found)
    listing = await cluster.cli("list-units", "--output", "json")
    assert listing.code == 0, listing.stderr + cluster.logs()
    rows = json.loads(listing.stdout)
    assert {"unit", "machine", "load", "active", "sub", "desired"} <= set(rows[0])
    listed = {(row["unit"], row["machine"]) for row in rows if row["active"] == "active"}
    expected = {(unit, node) for unit, nodes in found.items() for node in nodes if unit in {r["unit"] for r in rows}}
    assert listed == expected
    machines = json.loads((await cluster.cli("list-machines", "--output", "json")).stdout)
    assert {machine["machine"] for machine in machines} == set(NODES)
    assert {"machine", "ip", "metadata"} <= set(machines[0])


async def test_leader_kill_keeps_units_running(cluster_factory, tmp_path):
    cluster = await cluster_factory(NODES)
    found = await start_scenario(cluster, tmp_path)
    before = await main_pids(cluster, found)
    old_leader, leader = await kill_leader(cluster)
    # The new engine must not move or restart anything while the old node's agent is away briefly.
    await cluster.nodes[old_leader].start()
    await asyncio.sleep(3)
    listing = await cluster.cli("list-units", "--output", "json", endpoint=cluster.nodes[leader].endpoint)
    assert listing.code == 0, listing.stderr
    after = await main_pids(cluster, found)
    assert after == before, cluster.logs()


async def test_stopped_agent_units_move(cluster_factory, tmp_path):
    cluster = await cluster_factory({"node1": {}, "node2": {}}, agent_ttl="5s")
    (tmp_path / "work@.service").write_text(SLEEPER)
    arguments = [str(tmp_path / f"work@{index}.service") for index in range(1, 5)]
    result = await cluster.cli("start", "--block-timeout", "60", *arguments)
    assert result.code == 0, result.stderr + cluster.logs()
    found = await placements(cluster)
    leader = await cluster.leader()
    other = "node2" if leader == "node1" else "node1"
    moving = {unit for unit, nodes in found.items() if nodes == {other}}
    assert moving, found

    await cluster.nodes[other].stop()

    async def moved():
        now = await cluster.nodes[leader].active_units("work@*")
        return moving <= now

    assert await wait_until(moved, timeout=5 + 20), cluster.logs()

    # Back again: the returning agent stops its stale copies.
    await cluster.nodes[other].start()

    async def cleaned():
        return not (await cluster.nodes[other].active_units("work@*")) & moving

    assert await wait_until(cleaned, timeout=20), cluster.logs()


async def test_etcd_restart_keeps_units_running(cluster_factory, tmp_path):
    cluster = await cluster_factory({"node1": {}, "node2": {}})
    (tmp_path / "svc@.service").write_text(SLEEPER)
    result = await cluster.cli("start", "--block-timeout", "60", *(str(tmp_path / f"svc@{i}.service") for i in (1, 2)))
    assert result.code == 0, result.stderr + cluster.logs()
    found = await placements(cluster)
    before = await main_pids(cluster, found)

    cluster.etcd.kill()
    await asyncio.sleep(3)
    during = await main_pids(cluster, found)
    unavailable = await cluster.cli("start", "--no-block", str(tmp_path / "svc@3.service"), timeout=60)
    cluster.etcd.start()

    assert during == before
    assert unavailable.code == 1
    assert "unreachable" in unavailable.stderr or "unavailable" in unavailable.stderr.lower()

    async def converged():
        again = await cluster.cli("start", "--block-timeout", "30", str(tmp_path / "svc@3.service"))
        return again.code == 0

    assert await wait_until(converged, timeout=60, interval=1), cluster.logs()
    after = await main_pids(cluster, found)
    assert after == before


async def test_destroy_then_new_content_runs_new(cluster_factory, tmp_path):
    cluster = await cluster_factory({"node1": {}})
    node = cluster.nodes["node1"]
    path = tmp_path / "swap.service"
    path.write_text("[Service]\nExecStart=/bin/sleep 1111\n")
    assert (await cluster.cli("start", str(path))).code == 0
    first_pid = await node.unit_property("swap.service", "MainPID")

    destroyed = await cluster.cli("destroy", "swap.service")
    path.write_text("[Service]\nExecStart=/bin/sleep 2222\n")
    started = await cluster.cli("start", str(path))

    assert destroyed.code == 0, destroyed.stderr
    assert started.code == 0, started.stderr + cluster.logs()
    assert "2222" in await node.unit_property("swap.service", "ExecStart")
    assert await node.unit_property("swap.service", "MainPID") != first_pid


async def test_agent_restart_adopts_units(cluster_factory, tmp_path):
    cluster = await cluster_factory({"node1": {}, "node2": {}})
    (tmp_path / "keep@.service").write_text(SLEEPER)
    arguments = [str(tmp_path / f"keep@{index}.service") for index in range(1, 5)]
    assert (await cluster.cli("start", *arguments)).code == 0
    found = await placements(cluster)
    before = await main_pids(cluster, found)
    leader = await cluster.leader()
    follower = "node2" if leader == "node1" else "node1"

    await cluster.nodes[follower].kill()
    await asyncio.sleep(1)
    await cluster.nodes[follower].start()

    async def reported():
        listing = await cluster.cli("list-units", "--output", "json")
        rows = json.loads(listing.stdout) if listing.code == 0 else []
        return sum(1 for row in rows if row["machine"] == follower and row["active"] == "active")

    expected = sum(1 for unit, nodes in found.items() if unit.startswith("keep@") and follower in nodes)
    assert expected > 0, found
    assert await wait_until(lambda: _equals(reported, expected), timeout=20), cluster.logs()
    assert await main_pids(cluster, found) == before
    assert "adopted" in cluster.nodes[follower].log_tail(200)


async def _equals(probe, expected) -> bool:
    return await probe() == expected

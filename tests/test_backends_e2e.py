"""End-to-end on every storage backend: the same cluster scenario, failover and a store migration."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleetkit.testing.cluster import storage_section
from fleetkit.testing.scenario import (
    NODES,
    SLEEPER,
    check_scenario_and_failover,
    main_pids,
    placements,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("backend", "transport"), [
    ("etcd3", "grpc"), ("etcd2", "grpc"), ("redis", "grpc"), ("etcd3", "etcd-watch"), ("etcd3", "hybrid"),
])
async def test_scenario_and_failover_on_backend(backend_cluster_factory, tmp_path, backend, transport):
    cluster = await backend_cluster_factory(backend, NODES, transport=transport)

    await check_scenario_and_failover(cluster, tmp_path)


async def test_one_node_on_embedded(backend_cluster_factory, tmp_path):
    cluster = await backend_cluster_factory("embedded", {"solo": {"role": "db"}})
    node = cluster.nodes["solo"]
    (tmp_path / "app@.service").write_text(SLEEPER)
    (tmp_path / "everywhere.service").write_text(SLEEPER + "\n[X-Fleet]\nGlobal=true\n")
    (tmp_path / "db.service").write_text(SLEEPER + "\n[X-Fleet]\nMachineMetadata=role=db\n")
    arguments = [str(tmp_path / name) for name in ("app@1.service", "app@2.service", "everywhere.service", "db.service")]

    result = await cluster.cli("start", *arguments)
    assert result.code == 0, result.stderr + cluster.logs()
    units = {"app@1.service", "app@2.service", "everywhere.service", "db.service"}
    assert units <= await node.active_units("*.service")
    before = {unit: await node.unit_property(unit, "MainPID") for unit in units}

    await node.kill()
    await node.start()

    async def reported():
        listing = await cluster.cli("list-units", "--output", "json")
        rows = json.loads(listing.stdout) if listing.code == 0 else []
        return {row["unit"] for row in rows if row["active"] == "active"} >= units

    assert await wait_until(reported, timeout=20), cluster.logs()
    assert {unit: await node.unit_property(unit, "MainPID") for unit in units} == before


async def test_migrate_etcd2_to_etcd3_keeps_units(backend_cluster_factory, store_factory, tmp_path):
    cluster = await backend_cluster_factory("etcd2", {"node1": {}, "node2": {}})
    (tmp_path / "svc@.service").write_text(SLEEPER)
    arguments = [str(tmp_path / f"svc@{index}.service") for index in range(1, 7)]
    result = await cluster.cli("start", *arguments)
    assert result.code == 0, result.stderr + cluster.logs()
    found = await placements(cluster)
    before = await main_pids(cluster, found)
    target = await store_factory("etcd3")
    source_file = tmp_path / "from.toml"
    target_file = tmp_path / "to.toml"
    source_file.write_text("[storage]\n" + cluster.storage_section + "\n")
    target_section = storage_section(target.storage_config("/fleetkit/"))
    target_file.write_text("[storage]\n" + target_section + "\n")

    for node in cluster.nodes.values():
        await node.stop()
    migrated = await cluster.cli(
        "storage", "migrate", "--from", str(source_file), "--to", str(target_file), endpoint="unix:///unused",
    )
    cluster.set_storage(target_section, lambda: target.new_storage("/fleetkit/"))
    await cluster.start()

    assert migrated.code == 0, migrated.stdout + migrated.stderr

    async def all_active():
        listing = await cluster.cli("list-units", "--output", "json")
        rows = json.loads(listing.stdout) if listing.code == 0 else []
        return sum(1 for row in rows if row["unit"].startswith("svc@") and row["active"] == "active") == 6

    assert await wait_until(all_active, timeout=30), cluster.logs()
    await asyncio.sleep(2)
    assert await main_pids(cluster, found) == before
    assert await placements(cluster) == found

"""The cluster scenario shared by the end-to-end tests: unit files, placements and checks.

Each function drives a `fleetkit.testing.cluster.TestCluster` through the real
CLI, or reads what each node's systemd reports.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

NODES = {
    "node1": {"role": "web", "disk": "ssd"},
    "node2": {"role": "web"},
    "node3": {"role": "db"},
}

SLEEPER = "[Service]\nExecStart=/bin/sleep 3600\n"


def write_units(directory: Path) -> list[str]:
    """Write the scenario's unit files and return the CLI arguments that start them."""
    files = {
        "app@.service": "[Unit]\nDescription=App instance %i\n\n" + SLEEPER,
        "monitor.service": SLEEPER + "\n[X-Fleet]\nGlobal=true\n",
        "alpha.service": SLEEPER + "\n[X-Fleet]\nConflicts=beta.service\n",
        "beta.service": SLEEPER,
        "database.service": SLEEPER + "\n[X-Fleet]\nMachineMetadata=role=db\n",
        "cache.service": SLEEPER + "\n[X-Fleet]\nMachineMetadata=role=web\nMachineMetadata=disk=ssd\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    instances = [str(directory / f"app@{index}.service") for index in (1, 2, 3)]
    others = [str(directory / name) for name in files if "@" not in name]
    return instances + others


async def wait_until(predicate, timeout: float, interval: float = 0.5):
    """Await `predicate()` until it returns a true value or `timeout` seconds pass; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def placements(cluster) -> dict[str, set[str]]:
    """Return unit name to the set of nodes where systemd reports it active."""
    found: dict[str, set[str]] = {}
    for name, node in cluster.nodes.items():
        for unit in await node.active_units("*.service"):
            found.setdefault(unit, set()).add(name)
    return found


async def main_pids(cluster, units) -> dict[tuple[str, str], str]:
    pids = {}
    for name, node in cluster.nodes.items():
        for unit in units:
            if await node.unit_property(unit, "ActiveState") == "active":
                pids[(name, unit)] = await node.unit_property(unit, "MainPID")
    return pids


def check_scenario(found: dict[str, set[str]]) -> None:
    for index in (1, 2, 3):
        assert len(found.get(f"app@{index}.service", set())) == 1, found
    assert found.get("monitor.service") == {"node1", "node2", "node3"}
    assert len(found.get("alpha.service", set())) == 1
    assert len(found.get("beta.service", set())) == 1
    assert found["alpha.service"] != found["beta.service"]
    assert found.get("database.service") == {"node3"}
    assert found.get("cache.service") == {"node1"}


async def kill_leader(cluster, timeout: float = 4 + 6) -> tuple[str, str]:
    """SIGKILL the leader's daemon and return (old leader, new leader) once another node leads.

    The default `timeout` is the test cluster's lease_ttl of 4 s and a few
    seconds more. Fails the test when no other node leads by then.
    """
    old_leader = await cluster.leader()
    assert old_leader in cluster.nodes, f"no leader among {sorted(cluster.nodes)}\n" + cluster.logs()
    started = time.monotonic()
    await cluster.nodes[old_leader].kill()

    async def new_leader():
        name = await cluster.leader()
        return name if name and name != old_leader else ""

    leader = await wait_until(new_leader, timeout=timeout)
    assert leader, f"no new leader {time.monotonic() - started:.1f}s after the kill\n" + cluster.logs()
    return old_leader, leader


async def start_scenario(cluster, tmp_path: Path) -> dict[str, set[str]]:
    arguments = write_units(tmp_path)
    result = await cluster.cli("start", "--block-timeout", "60", *arguments)
    assert result.code == 0, result.stderr + cluster.logs()
    return await placements(cluster)


async def check_scenario_and_failover(cluster, tmp_path: Path) -> None:
    """Run the scenario on a cluster of the `NODES`, kill the leader, and check the failover.

    A new leader must take over within the lease TTL plus a few seconds, every
    unit must be reported active again, and no unit may have been restarted
    (its MainPID is unchanged). The cluster's lease_ttl must be 4 s, the test
    cluster's default.
    """
    found = await start_scenario(cluster, tmp_path)
    check_scenario(found)
    before = await main_pids(cluster, found)
    old_leader, leader = await kill_leader(cluster)
    await cluster.nodes[old_leader].start()

    async def all_reported():
        listing = await cluster.cli("list-units", "--output", "json", endpoint=cluster.nodes[leader].endpoint)
        if listing.code != 0:
            return False
        active = {(row["unit"], row["machine"]) for row in json.loads(listing.stdout) if row["active"] == "active"}
        return active >= {(unit, node) for unit, nodes in found.items() if unit.endswith(".service")
                          and not unit.startswith(("dbus", "systemd")) for node in nodes}

    assert await wait_until(all_reported, timeout=20), cluster.logs()
    assert await main_pids(cluster, found) == before

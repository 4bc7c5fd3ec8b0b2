"""fleetkit cluster status: the verdict rules, and the command against a real cluster."""

from __future__ import annotations

import json

from fleetkit.core.cluster_status import NodeView, judge
from fleetkit.core.nodes import NodeRecord
from fleetkit.testing.scenario import wait_until


ALL = ("etcd-watch", "grpc", "hybrid")


def view(machine, version="0.1.0", mode="grpc", transports=ALL, connected=True, in_use=None):
    record = NodeRecord(machine, version, transports, mode=mode) if version else None
    used = in_use if in_use is not None else ("grpc" if mode != "etcd-watch" else "etcd-watch")
    return NodeView(machine, record, connected=connected, transport_in_use=used if connected else "")


def test_all_grpc_is_ready():
    verdict = judge([view("a"), view("b")], leader="a")

    assert verdict.ready
    assert verdict.next_stage == ""
    assert "no transport migration is pending" in verdict.findings[0]


def test_disconnected_agent_blocks():
    verdict = judge([view("a"), view("b", connected=False)], leader="a")

    assert not verdict.ready
    assert any("b" in finding and "not connected" in finding for finding in verdict.findings)


def test_mixed_versions_reported():
    verdict = judge([view("a", "0.1.0"), view("b", "0.2.0")], leader="a")

    assert not verdict.ready
    assert any("0.1.0 on a" in finding and "0.2.0 on b" in finding for finding in verdict.findings)


def test_etcd_watch_stage_needs_hybrid_everywhere():
    nodes = [view("a", mode="etcd-watch"), view("b", mode="etcd-watch", transports=("etcd-watch",))]

    verdict = judge(nodes, leader="a")

    assert verdict.next_stage == "hybrid"
    assert not verdict.ready
    assert any("cannot run hybrid" in finding and "b" in finding for finding in verdict.findings)


def test_hybrid_stage_needs_agents_on_grpc():
    nodes = [view("a", mode="hybrid"), view("b", mode="hybrid", in_use="etcd-watch")]

    verdict = judge(nodes, leader="a")

    assert verdict.next_stage == "grpc"
    assert not verdict.ready
    assert any("not on grpc yet: b" in finding for finding in verdict.findings)


def test_etcd_watch_stage_ready_when_capable():
    verdict = judge([view("a", mode="etcd-watch"), view("b", mode="etcd-watch")], leader="a")

    assert verdict.ready
    assert verdict.next_stage == "hybrid"


def test_missing_record_and_leader_reported():
    verdict = judge([view("a", version="")], leader="")

    assert not verdict.ready
    assert any("no leader" in finding for finding in verdict.findings)
    assert any("no node record for a" in finding for finding in verdict.findings)


async def test_cluster_status_command(cluster_factory):
    cluster = await cluster_factory({"node1": {}, "node2": {}})

    async def settled():
        result = await cluster.cli("cluster", "status", "--output", "json")
        status = json.loads(result.stdout) if result.code == 0 else {}
        return status if status.get("ready") else None

    status = await wait_until(settled, timeout=20)
    table = await cluster.cli("cluster", "status")
    await cluster.nodes["node2"].stop()
    after = await cluster.cli("cluster", "status", "--check", endpoint=cluster.nodes["node1"].endpoint)

    assert status, cluster.logs()
    assert {node["machine"] for node in status["nodes"]} == {"node1", "node2"}
    assert all(node["mode"] == "grpc" and node["transport_in_use"] == "grpc" for node in status["nodes"])
    assert all("hybrid" in node["transports"] for node in status["nodes"])
    assert sum(1 for node in status["nodes"] if node["leader"]) == 1
    assert table.code == 0
    assert "verdict: ready" in table.stdout
    assert after.code == 1
    assert "not ready" in after.stdout


async def test_cluster_status_on_etcd_watch(backend_cluster_factory):
    cluster = await backend_cluster_factory("etcd3", {"node1": {}, "node2": {}}, transport="etcd-watch")

    async def settled():
        result = await cluster.cli("cluster", "status", "--output", "json")
        status = json.loads(result.stdout) if result.code == 0 else {}
        connected = [node for node in status.get("nodes", []) if node["connected"]]
        return status if len(connected) == 2 else None

    status = await wait_until(settled, timeout=20)

    assert status, cluster.logs()
    assert all(node["transport_in_use"] == "etcd-watch" for node in status["nodes"])
    assert all(node["mode"] == "etcd-watch" for node in status["nodes"])
    assert status["next_stage"] == "hybrid"
    assert status["ready"], status["findings"]

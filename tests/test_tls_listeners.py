"""Mutual TLS on the daemon's listeners, with real daemons, real certificates and real gRPC clients.

Every bad client must be rejected at the listener, logged once with its
address and reason, and leave the daemon serving others. Roles decide what
a verified client may call.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from fleetkit.core.tls import init_ca, issue
from fleetkit.testing.certificates import expired_certificate
from fleetkit.rpc import control_pb2, control_pb2_grpc, transport_pb2, transport_pb2_grpc
from fleetkit.cli.devcluster import issue_dev_certificates
from fleetkit.testing.scenario import (
    NODES, SLEEPER, check_scenario, kill_leader, main_pids, start_scenario, wait_until,
)

ONE_NODE = {"n1": {}}


def _credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


async def _list_machines(target: str, credentials: grpc.ChannelCredentials | None, **options):
    """Call ListMachines once; return the gRPC status code (OK on success)."""
    channel_options = list(options.items())
    channel = (grpc.aio.secure_channel(target, credentials, options=channel_options) if credentials
               else grpc.aio.insecure_channel(target))
    async with channel:
        try:
            await control_pb2_grpc.ControlStub(channel).ListMachines(control_pb2.ListRequest(), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def _rejections(node) -> list[str]:
    return [line for line in node.log_path.read_text().splitlines() if "rejected a connection from" in line]


async def test_listener_rejects_bad_clients_once(cluster_factory, tmp_path):
    cluster = await cluster_factory(ONE_NODE, tls=True)
    node = cluster.nodes["n1"]
    tls_dir = cluster.tls_dir
    ca = tls_dir / "ca.pem"
    other = tmp_path / "other-ca"
    init_ca(other)
    stranger = issue(other, other, name="stranger", role="admin", ips=[], dns=[])
    expired = expired_certificate(tls_dir, tmp_path, "expired-admin")
    misnamed = issue(tls_dir, tmp_path, name="misnamed", role="node", ips=["127.0.0.2"], dns=[])
    api = node.endpoint
    transport = f"127.0.0.1:{node.config_args[0]}"

    attempts = {
        "no certificate": (api, _credentials(ca), "the client sent no certificate"),
        "another CA": (api, _credentials(ca, *stranger), "the client certificate failed verification: unable to "
                       "get local issuer certificate (it was not issued by this cluster's CA)"),
        "expired": (api, _credentials(ca, *expired), "the client certificate failed verification: certificate "
                    "has expired"),
        "plaintext": (api, None, "the client speaks plaintext, but this listener requires TLS"),
    }
    for label, (target, credentials, _reason) in attempts.items():
        code, _details = await _list_machines(target, credentials)
        assert code is grpc.StatusCode.UNAVAILABLE, label

    # A node certificate that does not name the address its connection comes from.
    async with grpc.aio.secure_channel(transport, _credentials(ca, *misnamed)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await transport_pb2_grpc.AgentTransportStub(channel).GetClusterState(
                transport_pb2.ClusterStateRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

    # The client side checks the daemon's certificate against the name it dials.
    code, details = await _list_machines(api, _credentials(ca, *(cluster.client_files[k] for k in ("admin", "admin-key"))),
                                         **{"grpc.ssl_target_name_override": "wrong.example"})
    assert code is grpc.StatusCode.UNAVAILABLE

    async def logged():
        return len(_rejections(node)) >= 5

    assert await wait_until(logged, timeout=10), node.log_tail()
    lines = _rejections(node)
    for label, (target, _credentials_, reason) in attempts.items():
        matching = [line for line in lines if reason in line]
        assert len(matching) == 1, (label, *lines)
        assert re.search(r"api\.listen: rejected a connection from 127\.0\.0\.1:\d+: ", matching[0]), matching[0]
    misnamed_lines = [line for line in lines if "'misnamed' does not name 127.0.0.1" in line]
    assert len(misnamed_lines) == 1, lines
    assert "transport.listen: rejected a connection from 127.0.0.1:" in misnamed_lines[0]

    # The daemon still serves clients with good certificates.
    result = await cluster.cli("list-machines", "--output", "json")
    assert result.code == 0, result.stderr
    assert [row["machine"] for row in json.loads(result.stdout)] == ["n1"]
    assert node.running


async def test_roles_limit_calls(cluster_factory, tmp_path):
    cluster = await cluster_factory(ONE_NODE, tls=True)
    unit = tmp_path / "hello.service"
    unit.write_text(SLEEPER)

    started = await cluster.cli("start", str(unit))
    assert started.code == 0, started.stderr

    viewer = cluster.client_env("viewer")
    listing = await cluster.cli("list-units", "--output", "json", env=viewer)
    assert listing.code == 0, listing.stderr
    assert [row["unit"] for row in json.loads(listing.stdout)] == ["hello.service"]
    rejected = await cluster.cli("stop", "hello.service", env=viewer)
    assert rejected.code == 1
    assert rejected.stderr.strip() == (
        "error: certificate 'viewer' has role read-only, which may only list and show; SetDesiredState, used by "
        "load, start, stop and unload needs an admin certificate")

    tls_dir = cluster.tls_dir
    node_env = {"FLEETKIT_CERT_FILE": str(tls_dir / "n1.pem"), "FLEETKIT_KEY_FILE": str(tls_dir / "n1-key.pem")}
    as_node = await cluster.cli("list-units", env=node_env)
    assert as_node.code == 1
    assert as_node.stderr.strip() == (
        "error: certificate 'n1' has role node, which may use the engine-agent transport only; the control API "
        "(ListUnitStates, used by list-units and status) needs an admin certificate, or a read-only one to list "
        "and show")

    # An admin certificate may not act as an agent.
    admin = _credentials(tls_dir / "ca.pem", cluster.client_files["admin"], cluster.client_files["admin-key"])
    transport = f"127.0.0.1:{cluster.nodes['n1'].config_args[0]}"
    async with grpc.aio.secure_channel(transport, admin) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await transport_pb2_grpc.AgentTransportStub(channel).GetClusterState(
                transport_pb2.ClusterStateRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == ("certificate 'admin' has role admin; the engine-agent transport "
                                      "(GetClusterState) needs a node certificate")
    pids = await cluster.nodes["n1"].main_pids()
    assert pids.get("hello.service") not in (None, "0")
    # The plaintext gRPC servers behind the gates are reachable by the daemon's user only.
    gate = cluster.nodes["n1"].directory / "state" / "gate"
    assert stat.S_IMODE(gate.stat().st_mode) == 0o700
    assert sorted(path.name for path in gate.iterdir()) == ["api.sock", "transport.sock"]

    # SIGHUP reloads the certificates at once and nothing else.
    node = cluster.nodes["n1"]
    node.process.send_signal(signal.SIGHUP)

    async def reloaded():
        return "for new connections (SIGHUP)" in node.log_path.read_text()

    assert await wait_until(reloaded, timeout=10), node.log_tail()
    assert node.running
    assert await cluster.nodes["n1"].main_pids() == pids


async def test_rotation_keeps_units_running(cluster_factory, tmp_path):
    cluster = await cluster_factory(NODES, tls=True, tls_extra='reload_interval = "1s"')
    found = await start_scenario(cluster, tmp_path)
    check_scenario(found)
    before = await main_pids(cluster, found)
    old_client = tmp_path / "old-client"
    shutil.copytree(cluster.tls_dir, old_client)
    old_env = {"FLEETKIT_CA_FILE": str(old_client / "ca.pem"), "FLEETKIT_CERT_FILE": str(old_client / "admin.pem"),
               "FLEETKIT_KEY_FILE": str(old_client / "admin-key.pem")}

    # A new chain: a new CA, new node certificates and a new admin certificate, written over the old files.
    new = tmp_path / "new-chain"
    issue_dev_certificates(new, list(cluster.nodes))
    for path in sorted(new.glob("*.pem")):
        os.replace(path, cluster.tls_dir / path.name)

    async def reloaded():
        return all("for new connections (the files changed)" in node.log_path.read_text()
                   for node in cluster.nodes.values())

    assert await wait_until(reloaded, timeout=15), cluster.logs()
    rejected = await cluster.cli("list-machines", env=old_env)
    assert rejected.code == 1, rejected.stdout
    assert "cannot reach the fleetkit daemon" in rejected.stderr

    # Open streams keep working; a new leader makes every agent dial again, with the new chain.
    old_leader, _leader = await kill_leader(cluster)
    await cluster.nodes[old_leader].start()
    await cluster.start()
    assert await main_pids(cluster, found) == before
    status = await cluster.cli("cluster", "status", "--output", "json")
    assert status.code == 0, status.stderr
    nodes = json.loads(status.stdout)["nodes"]
    assert all(node["tls"] and node["connected"] for node in nodes), nodes


async def test_dev_cluster_tls_serves_cli(tmp_path):
    directory = Path(tempfile.mkdtemp(prefix="fk-dev-"))
    ready = tmp_path / "ready"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetkit", "dev-cluster", "up", "--tls", "--nodes", "2", "--storage", "etcd3",
        "--dir", str(directory), "--ready-file", str(ready),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async def up():
            if process.returncode is not None:
                raise AssertionError((await process.stderr.read()).decode())
            return ready.exists() and ready.read_text().strip()

        endpoint = await wait_until(up, timeout=60)
        assert endpoint.startswith("127.0.0.1:"), endpoint
        tls_dir = directory / "tls"
        env = {**os.environ, "FLEETKIT_ENDPOINT": endpoint, "FLEETKIT_CA_FILE": str(tls_dir / "ca.pem"),
               "FLEETKIT_CERT_FILE": str(tls_dir / "admin.pem"), "FLEETKIT_KEY_FILE": str(tls_dir / "admin-key.pem")}

        async def listed():
            result = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fleetkit", "list-machines", "--output", "json", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, _ = await result.communicate()
            rows = json.loads(stdout or b"[]") if result.returncode == 0 else []
            return sorted(row["machine"] for row in rows if row["connected"]) == ["node1", "node2"]

        assert await wait_until(listed, timeout=30)
        plaintext = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkit", "list-machines", "--insecure",
            env={**os.environ, "FLEETKIT_ENDPOINT": endpoint}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        _, stderr = await plaintext.communicate()
        assert plaintext.returncode == 1
        assert "its listener probably requires TLS: pass --ca-file, --cert-file and --key-file" in stderr.decode()
        for name in ("node1", "node2"):
            assert "[tls]" in (directory / name / "cluster.toml").read_text()
            assert "WITHOUT TLS" not in (directory / name / "daemon.log").read_text()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(90):
                await process.wait()
        shutil.rmtree(directory, ignore_errors=True)


async def test_running_cluster_moves_to_tls(cluster_factory, tmp_path):
    cluster = await cluster_factory(NODES)
    found = await start_scenario(cluster, tmp_path)
    before = await main_pids(cluster, found)

    async def restart_each(*, plaintext: bool) -> None:
        for name, node in cluster.nodes.items():
            cluster.set_security(name, certificates=True, plaintext=plaintext)
            await node.stop()
            await node.start()
            await cluster.start()
            assert await main_pids(cluster, found) == before, name

    # Stage 1: certificates beside plaintext, node by node; stage 2: TLS only, node by node.
    await restart_each(plaintext=True)
    await restart_each(plaintext=False)

    status = await cluster.cli("cluster", "status", "--output", "json")
    assert status.code == 0, status.stderr
    nodes = json.loads(status.stdout)["nodes"]
    assert [(node["machine"], node["tls"], node["connected"]) for node in nodes] == [
        (name, True, True) for name in sorted(NODES)]
    for node in cluster.nodes.values():
        starts = node.log_path.read_text().split(" starting on machine ")
        assert len(starts) == 4, node.name  # plaintext, both, TLS only
        assert "WITHOUT TLS" in starts[1]
        assert "also accepts plaintext connections" in starts[2]
        assert "with TLS" in starts[3]
        assert "plaintext" not in starts[3]
    assert await main_pids(cluster, found) == before


@pytest.mark.parametrize("transport", ["etcd-watch", "hybrid"])
async def test_other_transports_with_tls(cluster_factory, tmp_path, transport):
    cluster = await cluster_factory(NODES, tls=True, transport=transport)
    found = await start_scenario(cluster, tmp_path)
    check_scenario(found)

    # Every daemon that does not lead asks the leader for unit states over the TLS listener.
    for node in cluster.nodes.values():
        listing = await cluster.cli("list-units", "--output", "json", endpoint=node.endpoint)
        assert listing.code == 0, listing.stderr
        active = {(row["unit"], row["machine"].split("/")[0]) for row in json.loads(listing.stdout)
                  if row["active"] == "active"}
        expected = {(unit, machine) for unit, machines in found.items() for machine in machines
                    if not unit.startswith(("dbus", "systemd"))}
        assert active >= expected, node.name
        assert "WITHOUT TLS" not in node.log_path.read_text()


async def test_expiring_certificates_are_reported(cluster_factory):
    # Every certificate of the test cluster is valid for 365 days, so a window of 9000 hours covers them.
    cluster = await cluster_factory(ONE_NODE, tls=True, tls_extra='expiry_warning = "9000h"')

    status = await cluster.cli("cluster", "status")
    as_json = await cluster.cli("cluster", "status", "--output", "json")

    assert status.code == 0, status.stderr
    assert "\nwarnings:\n  - n1: a certificate expires in " in status.stdout
    report = json.loads(as_json.stdout)
    assert len(report["warnings"]) == 1
    assert report["warnings"][0].startswith("n1: a certificate expires in ")
    assert report["nodes"][0]["certificate_expires"].endswith("Z")
    log = cluster.nodes["n1"].log_path.read_text()
    assert f"certificate {cluster.tls_dir}/n1.pem ('n1') expires in " in log
    assert f"certificate {cluster.tls_dir}/ca.pem ('fleetkit dev-cluster CA')" not in log


async def test_agent_may_only_speak_for_its_machine(cluster_factory):
    cluster = await cluster_factory({"n1": {}, "n2": {}}, tls=True)
    leader = cluster.nodes[await cluster.leader()]
    tls_dir = cluster.tls_dir
    own = _credentials(tls_dir / "ca.pem", tls_dir / "n1.pem", tls_dir / "n1-key.pem")
    hello = transport_pb2.AgentMessage(hello=transport_pb2.AgentHello(machine=transport_pb2.MachineInfo(id="n2")))

    async with grpc.aio.secure_channel(f"127.0.0.1:{leader.config_args[0]}", own) as channel:
        call = transport_pb2_grpc.AgentTransportStub(channel).Connect()
        await call.write(hello)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()

    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == ("certificate 'n1' may only connect as machine 'n1', not 'n2'; issue the agent "
                                      "a certificate named 'n2', or set tls.check_machine_name = false")
    machines = await cluster.cli("list-machines", "--output", "json")
    assert sorted(row["machine"] for row in json.loads(machines.stdout) if row["connected"]) == ["n1", "n2"]

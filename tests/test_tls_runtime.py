"""Certificate loading, reloading and expiry warnings, the unix socket's permissions and the CLI's TLS options."""

from __future__ import annotations

import asyncio
import datetime
import grp
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleetkit.cli.main import main
from fleetkit.core.api import ApiServer
from fleetkit.core.cluster_status import certificate_warnings
from fleetkit.core.config import check_config, parse_config
from fleetkit.core.errors import ConfigError
from fleetkit.core.gate import PeerRegistry, TlsGate
from fleetkit.core.credentials import (
    ExpiryWarnings, ListenerSecurity, ServerCredentials, TlsFiles, earliest_expiry, open_channel,
)
from fleetkit.core.nodes import NodeRecord
from fleetkit.core.tls import TlsError, init_ca, issue
from fleetkit.core.transport import EngineHost
from fleetkit.testing.certificates import expired_certificate


@pytest.fixture
def pki(tmp_path) -> Path:
    init_ca(tmp_path)
    issue(tmp_path, tmp_path, name="node-1", role="node", ips=["127.0.0.1"], dns=[])
    issue(tmp_path, tmp_path, name="node-2", role="node", ips=["127.0.0.1"], dns=[])
    issue(tmp_path, tmp_path, name="ops", role="admin", ips=[], dns=[])
    return tmp_path


def _files(pki: Path, name: str = "node-1", key: str | None = None) -> TlsFiles:
    return TlsFiles(str(pki / "ca.pem"), str(pki / f"{name}.pem"), str(pki / f"{key or name}-key.pem"))


def test_server_credentials_name_file(pki):
    with pytest.raises(TlsError) as caught:
        ServerCredentials(_files(pki, "node-1", key="node-2"), "transport.listen")
    assert str(caught.value).startswith(f"transport.listen: cannot use the certificate {pki}/node-1.pem with the "
                                        f"key {pki}/node-2-key.pem: ")
    assert str(caught.value).endswith("; check that the key belongs to the certificate")

    with pytest.raises(TlsError) as caught:
        ServerCredentials(_files(pki, "ops"), "api.listen")
    assert str(caught.value) == (f"api.listen: the certificate {pki}/ops.pem has role 'admin', but a listener serves "
                                 "with a node certificate; issue one with fleetkit tls issue --role node")

    with pytest.raises(TlsError) as caught:
        ServerCredentials(TlsFiles(str(pki / "missing.pem"), *_files(pki).paths()[1:]), "api.listen")
    assert "missing.pem" in str(caught.value)
    assert "BEGIN" not in str(caught.value)


def test_reload_keeps_old_context(pki, caplog):
    credentials = ServerCredentials(_files(pki), "transport.listen")
    first = credentials.context
    assert credentials.reload_if_changed() is False

    # The certificate is replaced first; the key that belongs to it comes later.
    issue(pki, pki / "next", name="node-1", role="node", ips=["127.0.0.1"], dns=[])
    os.replace(pki / "next" / "node-1.pem", pki / "node-1.pem")
    with caplog.at_level(logging.INFO, logger="fleetkit.core.credentials"):
        assert credentials.reload_if_changed() is False
        assert credentials.context is first
        assert credentials.reload_if_changed() is False  # logged once, not at every check
        os.replace(pki / "next" / "node-1-key.pem", pki / "node-1-key.pem")
        assert credentials.reload_if_changed() is True
    assert credentials.context is not first
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "keeping the certificates in use" in errors[0]
    assert any("for new connections (the files changed)" in record.getMessage() for record in caplog.records)


def test_expiry_warnings_repeat_daily(pki, caplog):
    issue(pki, pki, name="soon", role="node", ips=["127.0.0.1"], dns=[], days=10)
    clock = [0.0]
    warnings = ExpiryWarnings(30 * 86400, clock=lambda: clock[0])
    paths = [str(pki / "soon.pem"), str(pki / "node-1.pem"), str(pki / "ca.pem")]

    with caplog.at_level(logging.WARNING, logger="fleetkit.core.credentials"):
        first = warnings.check(paths)
        clock[0] = 3600
        again = warnings.check(paths)
        clock[0] = 86400 + 1
        next_day = warnings.check(paths)

    assert len(first) == 1
    assert again == []
    assert len(next_day) == 1
    assert first[0].startswith(f"certificate {pki}/soon.pem ('soon') expires in 240h, on ")
    assert first[0].endswith("; issue a new one with fleetkit tls issue and replace the file, which the daemon "
                             "reloads")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=11)
    assert "expired on" in ExpiryWarnings(86400).check(paths[:1], now=later)[0]
    assert earliest_expiry(paths) < earliest_expiry(paths[1:])


def test_cluster_status_expiry_warnings():
    now = 1_800_000_000.0
    records = [
        NodeRecord("a", "1", certificate_expires=now + 5 * 86400),
        NodeRecord("b", "1", certificate_expires=now + 90 * 86400),
        NodeRecord("c", "1"),
        NodeRecord("d", "1", certificate_expires=now - 60),
    ]

    warnings = certificate_warnings(records, 30 * 86400, now=now)

    assert warnings == [
        "a: a certificate expires in 120h, on 2027-01-20 08:00 UTC; issue a new one with fleetkit tls issue and "
        "replace the file on that node, which reloads it",
        "d: a certificate expired on 2027-01-15 07:59 UTC; issue a new one with fleetkit tls issue and replace "
        "the file on that node",
    ]


def test_open_channel_needs_common_way(pki):
    tls_only = ListenerSecurity("transport.listen", _files(pki), plaintext=False)
    plaintext_only = ListenerSecurity("transport.listen", None, plaintext=True)

    with pytest.raises(TlsError) as caught:
        open_channel("127.0.0.1:1", tls_only, peer_tls=False, peer_plaintext=True)
    assert str(caught.value) == ("127.0.0.1:1 accepts plaintext connections only and this node requires TLS; give "
                                 "that node certificates, or set transport.insecure = true here while the cluster "
                                 "moves to TLS")
    with pytest.raises(TlsError) as caught:
        open_channel("127.0.0.1:1", plaintext_only, peer_tls=True, peer_plaintext=False)
    assert str(caught.value) == ("127.0.0.1:1 accepts TLS connections only and transport has no certificate here; "
                                 "set tls.ca, tls.cert and tls.key")


@pytest.mark.parametrize(("group", "mode"), [("", 0o600), ("daemon", 0o660)])
async def test_unix_socket_owner_and_group(tmp_path, group, mode):
    path = tmp_path / "api.sock"
    config = parse_config({"api": {"listen": f"unix://{path}", "socket_group": group}}, env={})
    server = ApiServer(config, storage=None, host=EngineHost("m1"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not path.exists() or stat.S_IMODE(path.stat().st_mode) != mode:
                await asyncio.sleep(0.05)
        owner_group = path.stat().st_gid
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert owner_group == (grp.getgrnam(group).gr_gid if group else os.getegid())


def test_daemon_mismatched_key_stops(pki, tmp_path):
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'[runtime]\nbus = "unix:path={tmp_path}/bus"\nunit_directory = "{tmp_path}/units"\n'
        f'[api]\nlisten = "unix://{tmp_path}/api.sock"\n[node]\nstate_dir = "{tmp_path}/state"\n'
        f'[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/node-1.pem"\nkey = "{pki}/node-2-key.pem"\n'
    )
    result = subprocess.run([sys.executable, "-m", "fleetkit", "daemon", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert "check that the key belongs to the certificate" in result.stderr
    assert "PRIVATE KEY" not in result.stderr
    assert not (tmp_path / "api.sock").exists()


def test_config_check_loads_certificates(pki, tmp_path):
    expired_cert, expired_key = expired_certificate(pki, pki, "old-node", role="node")
    wrong_role = {"FLEETKIT_TLS_CA": str(pki / "ca.pem"), "FLEETKIT_TLS_CERT": str(pki / "ops.pem"),
                  "FLEETKIT_TLS_KEY": str(pki / "ops-key.pem")}
    expired = {**wrong_role, "FLEETKIT_TLS_CERT": str(expired_cert), "FLEETKIT_TLS_KEY": str(expired_key)}
    config = tmp_path / "cluster.toml"
    config.write_text("")

    with pytest.raises(ConfigError) as caught:
        check_config(config, env=wrong_role)
    _, warnings = check_config(config, env={**expired, "FLEETKIT_NODE_NAME": "old-node"})

    assert caught.value.problems == [
        f"transport.listen: the certificate {pki}/ops.pem has role 'admin', but a listener serves with a node "
        "certificate; issue one with fleetkit tls issue --role node"]
    with pytest.raises(ConfigError) as caught:
        check_config(config, env={**wrong_role, "FLEETKIT_NODE_NAME": "web-1", "FLEETKIT_TLS_CERT": str(pki / "node-1.pem"),
                                  "FLEETKIT_TLS_KEY": str(pki / "node-1-key.pem")})
    assert caught.value.problems == [
        f"transport.listen: the certificate {pki}/node-1.pem is named 'node-1', but node.name is 'web-1'; with "
        "tls.check_machine_name an agent may only connect as the machine its certificate names, so issue it with "
        "--name web-1, or set node.name = 'node-1'"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"certificate {expired_cert} ('old-node') expired on ")


def test_cli_tcp_needs_tls_or_insecure(capsys, pki):
    code = main(["--endpoint", "127.0.0.1:1", "list-units"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: endpoint '127.0.0.1:1' is a TCP address: pass --ca-file, --cert-file and --key-file (or set "
        "FLEETKIT_CA_FILE, FLEETKIT_CERT_FILE and FLEETKIT_KEY_FILE) to use its TLS listener, or --insecure if the "
        "daemon accepts plaintext (api.insecure = true)")

    code = main(["list-units", "--endpoint", "127.0.0.1:1", "--cert-file", str(pki / "ops.pem")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --ca-file and --key-file are missing: a TLS endpoint needs the cluster CA, a client certificate and "
        "its key")


def test_cli_rejects_contradicting_or_mismatched_files(capsys, pki):
    files = ["--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / "ops.pem")]

    contradicting = main(["list-units", "--endpoint", "127.0.0.1:1", "--insecure", *files,
                          "--key-file", str(pki / "ops-key.pem")])
    contradiction = capsys.readouterr().err
    mismatched = main(["list-units", "--endpoint", "127.0.0.1:1", *files, "--key-file", str(pki / "node-1-key.pem")])
    mismatch = capsys.readouterr().err

    assert contradicting == 2
    assert "--insecure and the TLS files" in contradiction
    assert mismatched == 2
    assert mismatch.strip() == (f"error: cannot use the certificate {pki}/ops.pem with the key {pki}/node-1-key.pem: "
                                "key values mismatch; check that the key belongs to the certificate")
    assert "PRIVATE KEY" not in mismatch


async def test_gate_caps_connections_in_handshake(pki, tmp_path, caplog):
    gate = TlsGate("127.0.0.1:0", str(tmp_path / "inner.sock"), PeerRegistry(), setting="api.listen",
                   credentials=ServerCredentials(_files(pki), "api.listen"), plaintext=False,
                   handshake_timeout=5, max_admitting=2)
    port = gate.bind()
    serving = asyncio.create_task(gate.serve())
    silent = []
    try:
        for _ in range(2):
            silent.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(2):
            closed = await reader.read(1)
        writer.close()
        for _reader, silent_writer in silent:
            silent_writer.close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await reader.read(1)  # waiting in its handshake, not closed
        writer.close()
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving

    assert closed == b""
    rejected = [record.getMessage() for record in caplog.records if "already in their handshake" in record.getMessage()]
    assert len(rejected) == 1
    assert rejected[0].startswith("api.listen: rejected a connection from 127.0.0.1:")

"""TLS from fleetkit to its stores, against real servers: etcd with client certificates, redis with a password.

The etcd servers here serve clients over TLS only and require a client
certificate signed by their test CA (``--client-cert-auth``), so every request
that succeeds went over TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aetcd import rpc

from fleetkit.core.config import parse_config
from fleetkit.core.errors import ConfigError, StorageError, StorageUnavailable
from fleetkit.core.netinfo import free_port
from fleetkit.core.storage import EventType
from fleetkit.core.tls import init_ca, issue
from fleetkit.plugins.etcd3 import Etcd3Storage
from fleetkit.plugins.etcd3_endpoints import TlsFiles, open_channel, parse_endpoint
from fleetkit.testing.conformance import StorageConformance, started_harness, unique_prefix
from fleetkit.testing.etcd import ETCD_BINARY_ENV, find_etcd_binary
from fleetkit.testing.etcd3_harness import Etcd3TlsHarness
from fleetkit.testing.scenario import NODES, check_scenario_and_failover

ROOT_PASSWORD = "tls-only-Passw0rd"


@pytest.fixture
def etcd_needed():
    if find_etcd_binary() is None:
        pytest.skip(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")


@pytest.fixture
async def etcd_tls(etcd_needed, store_factory) -> Etcd3TlsHarness:
    """A started etcd that accepts only TLS clients with a certificate of its test CA."""
    return await store_factory("etcd3-tls")


def tls_storage(harness: Etcd3TlsHarness, **changes) -> Etcd3Storage:
    """Return an unconnected client of `harness` with its config's TLS settings, some replaced by `changes`."""
    config = dataclasses.replace(harness.storage_config(unique_prefix()), **changes)
    return Etcd3Storage.from_config(config)


async def connect_error(storage: Etcd3Storage) -> StorageError:
    """Connect `storage`, expecting a failure, and return the error."""
    with pytest.raises(StorageError) as caught:
        try:
            await storage.connect()
        finally:
            await storage.close()
    return caught.value


def key_lines(*paths: Path) -> list[str]:
    """Return the base64 lines of the PEM private keys in `paths`, to search logs and messages for."""
    lines = []
    for path in paths:
        lines += [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
    return lines


def other_ca(directory: Path) -> tuple[Path, Path, Path]:
    """Create a CA unrelated to the server's and a client certificate it signed; return (CA, cert, key)."""
    ca_file = init_ca(directory, name="unrelated CA", days=2)
    cert, key = issue(directory, directory, name="stranger", role="node", ips=["127.0.0.1"], dns=[], days=2)
    return ca_file, cert, key


# ---------------------------------------------------------------- etcd over TLS


async def test_etcd3_tls_put_get_watch(etcd_tls):
    storage = await etcd_tls.new_storage(unique_prefix())
    try:
        first = await storage.put("jobs/a", b"1")
        item = await storage.get("jobs/a")
        items, revision = await storage.list("jobs/")

        watch = storage.watch("jobs/", start_revision=revision + 1)
        pending = asyncio.ensure_future(anext(watch))
        second = await storage.put("jobs/b", b"2")
        async with asyncio.timeout(10):
            batch = await pending
        await watch.aclose()
    finally:
        await storage.close()

    assert storage.describe().startswith(f"etcd3 at https://127.0.0.1:{etcd_tls.server.client_port}")
    assert item.value == b"1"
    assert item.create_revision == first
    assert [kv.key for kv in items] == ["jobs/a"]
    assert [(event.type, event.key, event.value) for event in batch] == [(EventType.PUT, "jobs/b", b"2")]
    assert batch[0].revision == second


async def test_missing_client_certificate_rejected(etcd_tls):
    storage = tls_storage(etcd_tls, cert_file="", key_file="")

    error = await connect_error(storage)

    assert not isinstance(error, StorageUnavailable)
    assert etcd_tls.server.client_url in str(error)
    assert "client certificate" in str(error)
    assert "storage.cert_file and storage.key_file" in str(error)


async def test_foreign_client_certificate_rejected(etcd_tls, tmp_path):
    _, cert, key = other_ca(tmp_path / "other")
    storage = tls_storage(etcd_tls, cert_file=str(cert), key_file=str(key))

    error = await connect_error(storage)

    assert f"storage.cert_file {str(cert)!r}" in str(error)
    assert "--trusted-ca-file" in str(error)
    for line in key_lines(key):
        assert line not in str(error)


async def test_wrong_ca_file_rejected(etcd_tls, tmp_path):
    ca_file, _, _ = other_ca(tmp_path / "other")
    storage = tls_storage(etcd_tls, ca_file=str(ca_file))

    error = await connect_error(storage)

    assert not isinstance(error, StorageUnavailable)
    assert f"storage.ca_file {str(ca_file)!r}" in str(error)
    assert "set storage.ca_file to the CA that signed etcd's certificate" in str(error)
    for line in key_lines(etcd_tls.tls_files.client_key, etcd_tls.tls_files.server_key):
        assert line not in str(error)


async def test_system_cas_reject_test_ca(etcd_tls):
    storage = tls_storage(etcd_tls, ca_file="")

    error = await connect_error(storage)

    assert "the system CAs (storage.ca_file is empty)" in str(error)


async def test_hostname_mismatch_rejected(etcd_tls):
    # The server certificate names 127.0.0.1 only, not "localhost".
    url = f"https://localhost:{etcd_tls.server.client_port}"
    storage = tls_storage(etcd_tls, endpoints=(url,))

    error = await connect_error(storage)

    assert f"the TLS certificate of etcd at {url} is not valid for localhost" in str(error)
    assert "storage.endpoints" in str(error)


async def test_tls_files_read_at_each_dial(etcd_tls, tmp_path):
    ca_copy = tmp_path / "ca.pem"
    wrong_ca, _, _ = other_ca(tmp_path / "other")
    shutil.copy(wrong_ca, ca_copy)
    storage = tls_storage(etcd_tls, ca_file=str(ca_copy))
    await connect_error(storage)

    shutil.copy(etcd_tls.tls_files.ca_file, ca_copy)
    await storage.connect()
    try:
        revision = await storage.put("k", b"v")
    finally:
        await storage.close()

    assert revision > 0


async def test_mismatched_key_file_rejected(etcd_tls, tmp_path):
    _, _, foreign_key = other_ca(tmp_path / "other")
    storage = tls_storage(etcd_tls, key_file=str(foreign_key))

    error = await connect_error(storage)

    assert f"storage.key_file {str(foreign_key)!r} is not the private key of the certificate" in str(error)
    for line in key_lines(foreign_key, etcd_tls.tls_files.client_key):
        assert line not in str(error)


async def test_missing_ca_file_named(etcd_tls, tmp_path):
    storage = tls_storage(etcd_tls, ca_file=str(tmp_path / "gone.pem"))

    error = await connect_error(storage)

    assert f"cannot read storage.ca_file {str(tmp_path / 'gone.pem')!r}" in str(error)


async def test_plain_client_gets_https_hint(etcd_tls):
    url = f"http://127.0.0.1:{etcd_tls.server.client_port}"
    storage = Etcd3Storage([url], dial_timeout=2.0)

    with pytest.raises(StorageUnavailable) as caught:
        try:
            await storage.connect()
        finally:
            await storage.close()

    assert "use https:// endpoints" in str(caught.value)


async def enable_root_auth(harness: Etcd3TlsHarness, password: str) -> None:
    """Turn on etcd's authentication with a user "root" that has `password`, over a TLS channel."""
    files = harness.tls_files
    channel = open_channel(parse_endpoint(harness.server.client_url),
                           TlsFiles(str(files.ca_file), str(files.client_cert), str(files.client_key)))
    auth = rpc.AuthStub(channel)
    try:
        async with asyncio.timeout(10):
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
            await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password))
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
            await auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        await channel.close()


async def test_password_authentication_over_tls(etcd_tls):
    await enable_root_auth(etcd_tls, ROOT_PASSWORD)
    storage = tls_storage(etcd_tls, username="root", password=ROOT_PASSWORD)
    await storage.connect()
    try:
        revision = await storage.put("k", b"v")
        item = await storage.get("k")
    finally:
        await storage.close()
    wrong = tls_storage(etcd_tls, username="root", password="not-" + ROOT_PASSWORD)

    error = await connect_error(wrong)

    assert item.mod_revision == revision
    assert "rejected the credentials" in str(error)
    assert "storage.password" in str(error)
    assert ROOT_PASSWORD not in str(error)
    assert ROOT_PASSWORD not in storage.describe() + repr(storage.endpoints)


async def test_daemon_reports_wrong_etcd_ca(etcd_tls, tmp_path):
    ca_file, _, _ = other_ca(tmp_path / "other")
    files = etcd_tls.tls_files
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'[storage]\nbackend = "etcd3"\nendpoints = ["{etcd_tls.server.client_url}"]\n'
        f'ca_file = "{ca_file}"\ncert_file = "{files.client_cert}"\nkey_file = "{files.client_key}"\n'
        f'[runtime]\nbus = "unix:path={tmp_path}/bus"\nunit_directory = "{tmp_path}/units"\n'
        f'[api]\nlisten = "unix://{tmp_path}/api.sock"\n'
        f'[transport]\nlisten = "127.0.0.1:{free_port()}"\ninsecure = true\n'
    )

    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "fleetkit", "daemon", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1, result.stderr
    assert f"storage.ca_file {str(ca_file)!r}" in result.stderr
    for line in key_lines(files.client_key):
        assert line not in result.stdout + result.stderr


# ---------------------------------------------------------------- settings


def etcd3_section(tmp_path: Path, **keys) -> dict:
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        (tmp_path / name).write_text("placeholder\n")
    return {"storage": {"backend": "etcd3", **keys}}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={}, source="test")
    return caught.value.problems


def test_config_accepts_https_with_files(tmp_path):
    data = etcd3_section(tmp_path, endpoints=["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
                         ca_file=str(tmp_path / "ca.pem"), cert_file=str(tmp_path / "client.pem"),
                         key_file=str(tmp_path / "client-key.pem"))

    storage = parse_config(data, env={}, source="test").storage

    assert storage.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert storage.ca_file == str(tmp_path / "ca.pem")
    assert storage.cert_file == str(tmp_path / "client.pem")
    assert storage.key_file == str(tmp_path / "client-key.pem")


def test_config_accepts_https_system_cas(tmp_path):
    data = etcd3_section(tmp_path, endpoints=["https://etcd.example:2379"])

    storage = parse_config(data, env={}, source="test").storage

    assert storage.endpoints == ("https://etcd.example:2379",)
    assert storage.ca_file == ""


def test_config_rejects_ca_file_with_http(tmp_path):
    data = etcd3_section(tmp_path, endpoints=["https://10.0.0.1:2379", "http://10.0.0.2:2379"],
                         ca_file=str(tmp_path / "ca.pem"))

    problems = problems_of(data)

    assert len(problems) == 1
    assert problems[0].startswith('storage.endpoints[1] = "http://10.0.0.2:2379": ')
    assert 'write "https://10.0.0.2:2379", or remove storage.ca_file' in problems[0]


def test_config_rejects_cert_without_key(tmp_path):
    data = etcd3_section(tmp_path, endpoints=["https://10.0.0.1:2379"], cert_file=str(tmp_path / "client.pem"))

    problems = problems_of(data)

    assert len(problems) == 1
    assert "storage.key_file is not set" in problems[0]


def test_backend_rejects_mixed_http_and_https():
    with pytest.raises(ConfigError) as caught:
        Etcd3Storage(["https://10.0.0.1:2379", "http://root:s3cret@10.0.0.2:2379"])

    assert "mixes https:// and http:// URLs (http://root:***@10.0.0.2:2379 without TLS)" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_backend_rejects_tls_files_over_http():
    with pytest.raises(ConfigError) as caught:
        Etcd3Storage(["http://10.0.0.1:2379"], ca_file="/etc/fleetkit/etcd-ca.pem")

    assert "storage.ca_file needs https:// endpoints, but storage.endpoints are plain http (http://10.0.0.1:2379)" \
        in str(caught.value)


def test_backend_rejects_cert_without_key():
    with pytest.raises(ConfigError) as caught:
        Etcd3Storage(["https://10.0.0.1:2379"], cert_file="/etc/fleetkit/etcd-client.pem")

    assert "storage.cert_file and storage.key_file must be set together" in str(caught.value)


# ---------------------------------------------------------------- conformance over TLS


@pytest.fixture
async def harness(etcd_needed):
    async with started_harness(Etcd3TlsHarness) as running:
        yield running


class TestEtcd3TlsConformance(StorageConformance):
    pass


# ---------------------------------------------------------------- clusters


def secrets_of(harness) -> list[str]:
    """Return the password and the private key lines of `harness`, which no log or message may contain."""
    found = key_lines(*sorted(Path(harness.directory).rglob("*key*.pem")))
    password = harness.storage_config("/").password
    if password:
        found.append(password)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", ["etcd3-tls", "redis-tls"])
async def test_scenario_and_failover_over_tls(backend_cluster_factory, tmp_path, name):
    if name.startswith("etcd3") and find_etcd_binary() is None:
        pytest.skip(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")
    cluster = await backend_cluster_factory(name, NODES)
    store_url = cluster.harness.storage_config("/").endpoints[0]
    secrets = secrets_of(cluster.harness)
    assert secrets, "the harness has no password or private key to look for"

    await check_scenario_and_failover(cluster, tmp_path)

    assert store_url.startswith(("https://", "rediss://"))
    for node in cluster.nodes.values():
        log_text = node.log_path.read_text(errors="replace")
        assert store_url in log_text, f"{node.log_path} does not name the store it uses"
        for secret in secrets:
            assert secret not in log_text, f"a password or key line appears in {node.log_path}"

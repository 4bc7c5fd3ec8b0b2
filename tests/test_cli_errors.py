"""Bad input through the real CLI against a real one-node cluster: clear errors, nothing stored."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

GOOD = "[Unit]\nDescription=good\n\n[Service]\nExecStart=/bin/sleep 3600\n"


@pytest.fixture
async def cluster(cluster_factory):
    return await cluster_factory({"solo": {"role": "web"}})


async def stored_units(cluster) -> dict[str, str]:
    result = await cluster.cli("list-unit-files", "--output", "json")
    assert result.code == 0, result.stderr
    return {row["unit"]: row["hash"] for row in json.loads(result.stdout)}


async def test_submit_rejects_bad_input_without_storing(cluster, tmp_path):
    (tmp_path / "keep.service").write_text(GOOD)
    assert (await cluster.cli("submit", str(tmp_path / "keep.service"))).code == 0
    before = await stored_units(cluster)

    cases = {
        "broken.service": ("[Service]\nExecStart=/bin/true\nthis line has no equals sign\n", "line 3"),
        "unknown.service": (GOOD + "\n[X-Fleet]\nMachineMetdata=role=web\n", "MachineMetadata"),
        "contradict.service": (GOOD + "\n[X-Fleet]\nGlobal=true\nMachineID=solo\n", "Global"),
        "badmeta.service": (GOOD + "\n[X-Fleet]\nMachineMetadata=role\n", "role"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        # A valid unit in the same request must not be stored either.
        (tmp_path / "other.service").write_text(GOOD)
        result = await cluster.cli("start", "--no-block", str(tmp_path / "other.service"), str(path))
        assert result.code == 2, (name, result.stderr)
        assert name in result.stderr
        assert expected in result.stderr, (name, result.stderr)

    assert await stored_units(cluster) == before


async def test_invalid_unit_name_rejected(cluster, tmp_path):
    result = await cluster.cli("start", "web$1.service")

    assert result.code == 2
    assert "web$1.service" in result.stderr
    assert await stored_units(cluster) == {}


async def test_replace_with_broken_file_keeps_stored(cluster, tmp_path):
    path = tmp_path / "app.service"
    path.write_text(GOOD)
    assert (await cluster.cli("submit", str(path))).code == 0
    original = (await cluster.cli("cat", "app.service")).stdout

    path.write_text("[Service\nExecStart=/bin/true\n")
    result = await cluster.cli("submit", "--replace", str(path))

    assert result.code == 2
    assert "line 1" in result.stderr
    assert (await cluster.cli("cat", "app.service")).stdout == original


async def test_missing_units_fail_clearly(cluster):
    destroy = await cluster.cli("destroy", "ghost.service")
    stop = await cluster.cli("stop", "ghost.service")
    cat = await cluster.cli("cat", "ghost.service")

    assert destroy.code == 1 and "ghost.service" in destroy.stderr and "not found" in destroy.stderr
    assert stop.code == 1 and "not found" in stop.stderr
    assert cat.code == 1 and "not found" in cat.stderr


async def test_unknown_field_is_error(cluster):
    result = await cluster.cli("list-units", "--fields", "unit,colour")

    assert result.code == 1
    assert "colour" in result.stderr
    assert "unit,machine,active,sub" in result.stderr


def run_cli(*args: str, env_endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if env_endpoint:
        env["FLEETKIT_ENDPOINT"] = env_endpoint
    return subprocess.run(
        [sys.executable, "-m", "fleetkit", *args], capture_output=True, text=True, timeout=60, env=env,
    )


def test_unreachable_endpoint_is_clear(tmp_path):
    socket = tmp_path / "none.sock"

    result = run_cli("--endpoint", f"unix://{socket}", "list-units")

    assert result.returncode == 1
    assert str(socket) in result.stderr
    assert "FLEETKIT_ENDPOINT" in result.stderr


def test_malformed_endpoint_is_usage_error():
    result = run_cli("--endpoint", "unix://relative/path.sock", "list-units")

    assert result.returncode == 2
    assert "absolute path" in result.stderr


def test_unknown_config_key_suggests(tmp_path):
    config = tmp_path / "cluster.toml"
    config.write_text('[storage]\nendpoint = ["http://127.0.0.1:2379"]\n[engine]\nlease_ttl = "10"\n')

    result = run_cli("config", "check", "--config", str(config))

    assert result.returncode == 1
    assert "storage.endpoint" in result.stderr
    assert "storage.endpoints" in result.stderr
    assert "engine.lease_ttl" in result.stderr


def test_usage_errors_exit_two():
    assert run_cli("start").returncode == 2
    assert run_cli("no-such-command").returncode == 2
    assert run_cli().returncode == 2


async def test_unplaceable_unit_says_why(cluster, tmp_path):
    path = tmp_path / "nowhere.service"
    path.write_text(GOOD + "\n[X-Fleet]\nMachineMetadata=role=db\n")

    result = await cluster.cli("start", "--block-timeout", "4", str(path))
    status = await cluster.cli("status", "nowhere.service")

    assert result.code == 1
    assert "timed out" in result.stderr
    assert "cannot be placed" in result.stderr
    assert "role" in result.stderr
    assert "cannot be placed" in status.stdout


async def test_daemon_rejects_foreign_prefix(etcd_server, tmp_path):
    from fleetkit.plugins.etcd3 import Etcd3Storage

    prefix = "/foreign-app/"
    client = Etcd3Storage([etcd_server.client_url], prefix=prefix)
    await client.connect()
    await client.put("settings/colour", b"blue")
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'[storage]\nbackend = "etcd3"\nendpoints = ["{etcd_server.client_url}"]\nprefix = "{prefix}"\n'
        f'[runtime]\nbus = "unix:path={tmp_path}/bus"\nunit_directory = "{tmp_path}/units"\n'
        f'[api]\nlisten = "unix://{tmp_path}/api.sock"\n[transport]\ninsecure = true\n'
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fleetkit", "daemon", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )
        items, _ = await client.list("")
    finally:
        await client.close()

    assert result.returncode == 1
    assert "settings/colour" in result.stderr
    assert prefix in result.stderr
    assert [item.key for item in items] == ["settings/colour"]

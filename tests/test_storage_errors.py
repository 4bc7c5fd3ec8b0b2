"""A daemon given bad storage settings: a clear error naming the setting, nothing written, no secret shown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from fleetkit.testing import logscan
from fleetkit.testing.redis_harness import redis_server_factory, write_tls_files  # noqa: F401 - fixture

SECRET = "s3cret-Passw0rd"
logscan.register_secret(SECRET)


def write_config(directory: Path, storage: str) -> Path:
    config = directory / "cluster.toml"
    config.write_text(
        f"[storage]\n{storage}\n"
        f'[runtime]\nbus = "unix:path={directory}/bus"\nunit_directory = "{directory}/units"\n'
        f'[api]\nlisten = "unix://{directory}/api.sock"\n[transport]\ninsecure = true\n'
    )
    return config


def run_daemon(config: Path, *, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fleetkit", "daemon", "--config", str(config)],
        capture_output=True, text=True, timeout=timeout,
    )
    logscan.archive_text(result.stdout + result.stderr, "storage-errors")
    return result


async def stored_keys(server) -> int:
    client = server.client()
    try:
        return await client.dbsize()
    finally:
        await client.aclose()


async def test_wrong_redis_password_rejected(redis_server_factory, tmp_path):  # noqa: F811
    server = await redis_server_factory(password="the-right-one")
    config = write_config(tmp_path, f'backend = "redis"\nendpoints = ["{server.url}"]\npassword = "{SECRET}"')

    result = await asyncio.to_thread(run_daemon, config)

    assert result.returncode == 1
    assert "storage.password" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert await stored_keys(server) == 0


async def test_wrong_redis_ca_rejected(redis_server_factory, tmp_path):  # noqa: F811
    ca, cert, key, other_ca = write_tls_files(tmp_path / "tls")
    server = await redis_server_factory(tls=(cert, key, ca))
    config = write_config(tmp_path, f'backend = "redis"\nendpoints = ["{server.url}"]\nca_file = "{other_ca}"')

    result = await asyncio.to_thread(run_daemon, config)

    assert result.returncode == 1
    assert "storage.ca_file" in result.stderr
    assert str(other_ca) in result.stderr


async def test_foreign_redis_prefix_rejected(redis_server_factory, tmp_path):  # noqa: F811
    server = await redis_server_factory()
    client = server.client()
    await client.set("unrelated-key", "value")
    await client.aclose()
    from fleetkit.plugins.redis import RedisStorage

    storage = RedisStorage([server.url], prefix="/shared/")
    await storage.connect()
    await storage.put("sessions/42", b"someone else's")
    await storage.close()
    before = await stored_keys(server)
    config = write_config(tmp_path, f'backend = "redis"\nendpoints = ["{server.url}"]\nprefix = "/shared/"')

    result = await asyncio.to_thread(run_daemon, config)

    assert result.returncode == 1
    assert "sessions/42" in result.stderr
    assert "storage.prefix" in result.stderr
    assert await stored_keys(server) == before


async def test_unreachable_store_retried_with_clear_error(tmp_path):
    config = write_config(tmp_path, 'backend = "redis"\nendpoints = ["redis://127.0.0.1:9/0"]')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetkit", "daemon", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(4)
    still_running = process.returncode is None
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        _stdout, stderr = await process.communicate()

    assert still_running
    assert process.returncode == 0
    assert "redis://127.0.0.1:9" in stderr.decode()
    assert "unreachable" in stderr.decode()


def test_empty_endpoints_rejected(tmp_path):
    config = write_config(tmp_path, 'backend = "etcd3"\nendpoints = []')

    result = run_daemon(config)

    assert result.returncode == 1
    assert "storage.endpoints" in result.stderr
    assert "etcd3" in result.stderr

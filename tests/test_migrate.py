"""`fleetkit storage migrate` against real etcd servers: copy, checks, refusal, resume and the CLI."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from fleetkit.cli import storage as storage_cli
from fleetkit.core import keys, migrate
from fleetkit.core.migrate import MigrateOptions, MigrationError, SourceChanged, migrate_files
from fleetkit.core.units import make_unit
from fleetkit.testing.etcd import EtcdServer

PREFIX = "/fleetkit/"
UNIT_TEXT = "[Unit]\nDescription=app {index}\n\n[Service]\nExecStart=/bin/sleep {index}\n"
CLI_TIMEOUT = 60.0


def write_config(path: Path, server: EtcdServer, *, backend: str = "etcd3") -> str:
    path.write_text(f"""\
[storage]
backend = "{backend}"
endpoints = ["{server.client_url}"]
prefix = "{PREFIX}"
dial_timeout = "2s"
request_timeout = "1s"
""")
    return str(path)


async def connected(path: str):
    store = migrate.open_storage(migrate.load_storage_config(path, "--test"))
    await store.connect()
    return store


async def fill(path: str, count: int, *, leader: bool = True) -> None:
    """Store `count` units, a schedule entry for each even one and a leader key on a lease."""
    store = await connected(path)
    try:
        writes = []
        for index in range(count):
            unit = make_unit(f"app{index}.service", UNIT_TEXT.format(index=index))
            writes.append((keys.unit_key(unit.name), unit.to_json()))
            if index % 2 == 0:
                writes.append((keys.schedule_key(unit.name), f"machine{index % 3}".encode()))
        for start in range(0, len(writes), 64):
            await asyncio.gather(*(store.put(key, value) for key, value in writes[start:start + 64]))
        if leader:
            lease = await store.grant_lease(60)
            await store.put(keys.LEADER, b'{"machine":"machine0"}', lease=lease)
    finally:
        await store.close()


async def snapshot(path: str) -> list[tuple]:
    """Every key under the prefix with its value, revisions and lease."""
    store = await connected(path)
    try:
        items, _ = await store.list("")
    finally:
        await store.close()
    return [(item.key, item.value, item.create_revision, item.mod_revision, item.lease) for item in items]


async def contents(path: str) -> dict[str, bytes]:
    return {key: value for key, value, *_ in await snapshot(path)}


def persistent(items: dict[str, bytes]) -> dict[str, bytes]:
    return {key: value for key, value in items.items() if key.startswith(migrate.PERSISTENT_PREFIXES)}


async def put(path: str, key: str, value: bytes) -> None:
    store = await connected(path)
    try:
        await store.put(key, value)
    finally:
        await store.close()


@pytest.fixture
def stores(etcd_factory, tmp_path):
    """(source config path, target config path, source server, target server)."""
    source, target = etcd_factory(), etcd_factory()
    return (write_config(tmp_path / "a.toml", source), write_config(tmp_path / "b.toml", target), source, target)


# ---------------------------------------------------------------- library

def test_prefixes_cover_keys_module():
    declared = {value for name, value in vars(keys).items()
                if name.isupper() and isinstance(value, str) and value.endswith("/")}

    # Node records are leased and written again by every daemon, so they are not migrated.
    assert declared - {keys.NODES, keys.MACHINES} <= set(migrate.PERSISTENT_PREFIXES)
    assert keys.NODES not in migrate.PERSISTENT_PREFIXES
    assert keys.LEADER not in migrate.PERSISTENT_PREFIXES


def test_digest_changes_with_any_pair():
    base = migrate.content_digest([("units/a", b"1"), ("units/b", b"2")])

    assert base == migrate.content_digest([("units/b", b"2"), ("units/a", b"1")])
    assert base != migrate.content_digest([("units/a", b"1"), ("units/b", b"3")])
    assert migrate.content_digest([("ab", b"c")]) != migrate.content_digest([("a", b"bc")])


def test_cli_default_concurrency_matches_library():
    assert storage_cli.WRITE_CONCURRENCY == MigrateOptions().concurrency


async def test_migrate_copies_and_verifies(stores):
    source, target, *_ = stores
    await fill(source, 30)
    before = await snapshot(source)

    report = await migrate_files(source, target)

    assert report.verified
    assert report.copied == 30 + 15
    copied = await contents(target)
    assert copied == persistent(await contents(source))
    assert keys.LEADER not in copied
    for prefix in migrate.PERSISTENT_PREFIXES:
        entry = report.prefixes[prefix]
        assert entry.target_keys == entry.source_keys
        assert entry.target_digest == entry.source_digest
    assert await snapshot(source) == before


async def test_migrate_skips_leased_keys(stores):
    source, target, *_ = stores
    await fill(source, 2, leader=False)
    store = await connected(source)
    try:
        await store.put("units/leased.service", b"{}", lease=await store.grant_lease(60))
    finally:
        await store.close()

    report = await migrate_files(source, target)

    assert report.verified
    assert "units/leased.service" not in await contents(target)
    assert [entry["key"] for entry in report.skipped] == ["units/leased.service"]


async def test_side_variables_override_one_side(stores):
    source, target, *_ = stores
    await fill(source, 2)
    environ = {"FLEETKIT_TO_STORAGE_PREFIX": "/moved/", "FLEETKIT_STORAGE_PREFIX": "/ignored/"}

    report = await migrate_files(source, target, environ=environ)

    assert report.verified
    moved = migrate.open_storage(migrate.load_storage_config(target, "--to", {"FLEETKIT_STORAGE_PREFIX": "/moved/"}))
    await moved.connect()
    try:
        items, _ = await moved.list("")
    finally:
        await moved.close()
    assert len(items) == 3
    assert await contents(target) == {}


async def test_dry_run_writes_nothing(stores):
    source, target, *_ = stores
    await fill(source, 10)
    target_before = await snapshot(target)

    report = await migrate_files(source, target, MigrateOptions(dry_run=True))

    assert report.to_copy == 15
    assert report.copied == 0
    assert report.prefixes[keys.UNITS].source_keys == 10
    assert await snapshot(target) == target_before == []


async def test_migrate_refuses_non_empty_target(stores):
    source, target, *_ = stores
    await fill(source, 3)
    await put(target, keys.LEADER, b"{}")

    with pytest.raises(MigrationError, match="already holds 1 key") as raised:
        await migrate_files(source, target)

    assert "leader" in str(raised.value)
    assert await contents(target) == {keys.LEADER: b"{}"}


async def test_force_overwrites_and_deletes(stores):
    source, target, *_ = stores
    await fill(source, 4)
    await put(target, "units/stale.service", b"old")
    await put(target, "units/app0.service", b"changed")
    await put(target, "notes", b"outside the migrated prefixes")

    report = await migrate_files(source, target, MigrateOptions(force=True))

    assert report.verified
    assert report.deleted == 1
    result = await contents(target)
    assert persistent(result) == persistent(await contents(source))
    assert result["notes"] == b"outside the migrated prefixes"


async def test_resume_refuses_extra_keys_without_force(stores):
    source, target, *_ = stores
    await fill(source, 2)
    await put(target, "schedule/gone.service", b"machine9")

    with pytest.raises(MigrationError, match="schedule/gone.service"):
        await migrate_files(source, target, MigrateOptions(resume=True))

    assert await contents(target) == {"schedule/gone.service": b"machine9"}


async def test_resume_completes_interrupted_copy(stores):
    source, target, _, target_server = stores
    await fill(source, 200)
    before = await snapshot(source)

    async def pause_target(done: int) -> None:
        if done == 20:
            target_server.pause()

    try:
        with pytest.raises(MigrationError, match="writing to the target failed") as raised:
            await migrate_files(source, target, MigrateOptions(concurrency=8), on_write=pause_target)
    finally:
        target_server.resume()
    assert raised.value.report.writes_started
    partial = await contents(target)
    assert 20 <= len(partial) < 300
    assert await snapshot(source) == before

    report = await migrate_files(source, target, MigrateOptions(resume=True))

    assert report.verified
    assert report.unchanged == len(partial)
    assert report.copied == 300 - len(partial)
    assert await contents(target) == persistent(await contents(source))


async def test_source_change_during_copy_detected(stores):
    source, target, *_ = stores
    await fill(source, 10)
    extra = make_unit("late.service", UNIT_TEXT.format(index=99))

    async def write_to_source(done: int) -> None:
        if done == 1:
            await put(source, keys.unit_key(extra.name), extra.to_json())

    with pytest.raises(SourceChanged, match="--resume"):
        await migrate_files(source, target, MigrateOptions(concurrency=1), on_write=write_to_source)

    assert keys.unit_key(extra.name) not in await contents(target)
    report = await migrate_files(source, target, MigrateOptions(resume=True))
    assert report.verified
    assert report.copied == 1
    assert (await contents(target))[keys.unit_key(extra.name)] == extra.to_json()


async def test_verify_detects_target_difference(stores):
    source, target, *_ = stores
    await fill(source, 4)

    async def lose_a_key(done: int) -> None:
        if done == 6:
            store = await connected(target)
            try:
                await store.delete("units/app3.service")
            finally:
                await store.close()

    with pytest.raises(migrate.VerificationFailed, match="units/") as raised:
        await migrate_files(source, target, on_write=lose_a_key)

    entry = raised.value.report.prefixes[keys.UNITS]
    assert (entry.source_keys, entry.target_keys) == (4, 3)
    assert entry.source_digest != entry.target_digest


async def test_invalid_record_fails_before_writing(stores):
    source, target, *_ = stores
    await fill(source, 3)
    await put(source, "units/bad.service", b"not json")
    wrong = make_unit("right.service", UNIT_TEXT.format(index=1)).to_json()
    await put(source, "units/wrong.service", wrong)

    with pytest.raises(MigrationError, match="--skip-invalid") as raised:
        await migrate_files(source, target)

    assert "units/bad.service" in str(raised.value)
    assert "units/wrong.service" in str(raised.value)
    assert await contents(target) == {}


async def test_skip_invalid_leaves_bad_records_out(stores):
    source, target, *_ = stores
    await fill(source, 3)
    await put(source, "units/bad.service", b"not json")

    report = await migrate_files(source, target, MigrateOptions(skip_invalid=True))

    assert report.verified
    assert "units/bad.service" not in await contents(target)
    assert [entry["key"] for entry in report.invalid] == ["units/bad.service"]


@pytest.mark.skipif(importlib.util.find_spec("fleetkit.plugins.etcd2") is None,
                    reason="fleetkit.plugins.etcd2 is not installed, so there is no etcd2 backend to read")
async def test_migrate_from_etcd2_to_etcd3(tmp_path):
    class EtcdV2Server(EtcdServer):
        def _command(self) -> list[str]:
            return [*super()._command(), "--enable-v2"]

    servers = [EtcdV2Server(tmp_path / "v2"), EtcdServer(tmp_path / "v3")]
    try:
        for server in servers:
            server.start()
        source = write_config(tmp_path / "a.toml", servers[0], backend="etcd2")
        target = write_config(tmp_path / "b.toml", servers[1])
        await fill(source, 12, leader=False)

        report = await migrate_files(source, target)

        assert report.verified
        assert report.source.startswith("etcd2")
        assert await contents(target) == persistent(await contents(source))
    finally:
        for server in servers:
            server.stop()


@pytest.mark.skipif(importlib.util.find_spec("fleetkit.plugins.embedded") is None,
                    reason="fleetkit.plugins.embedded is not installed, so there is no embedded backend to read")
async def test_migrate_from_embedded_to_etcd3(etcd_factory, tmp_path):
    source_path = tmp_path / "a.toml"
    source_path.write_text(f'[storage]\nbackend = "embedded"\npath = "{tmp_path / "store.db"}"\n')
    source = str(source_path)
    target = write_config(tmp_path / "b.toml", etcd_factory())
    await fill(source, 12)
    before = await snapshot(source)

    report = await migrate_files(source, target)

    assert report.verified
    assert report.source.startswith("embedded store at")
    assert await contents(target) == persistent(await contents(source))
    assert await snapshot(source) == before


# ---------------------------------------------------------------- CLI

async def run_cli(*arguments: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetkit", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )
    async with asyncio.timeout(CLI_TIMEOUT):
        stdout, stderr = await process.communicate()
    return process.returncode, stdout.decode(), stderr.decode()


def cli_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("FLEETKIT_")}


async def test_cli_migrate_exit_codes_and_output(stores):
    source, target, *_ = stores
    await fill(source, 5)

    code, out, err = await run_cli("storage", "migrate", "--from", source, "--to", target, "--dry-run")
    assert code == 0, err
    assert err.startswith("warning: the source holds a leader record")
    assert "would copy 8 keys" in out
    assert await contents(target) == {}

    code, out, err = await run_cli("--output", "json", "storage", "migrate", "--from", source, "--to", target)
    assert code == 0, err
    body = json.loads(out)
    assert body["ok"] and body["verified"] and body["copied"] == 8
    assert body["prefixes"]["units/"]["target_digest"] == body["prefixes"]["units/"]["source_digest"]

    code, out, err = await run_cli("storage", "migrate", "--from", source, "--to", target)
    assert code == 1
    assert "already holds 8 key(s)" in err

    code, _, err = await run_cli("storage", "migrate", "--from", source, "--to", source)
    assert code == 2
    assert "same store" in err

    code, _, err = await run_cli("storage", "migrate", "--from", source)
    assert code == 2


async def test_cli_interrupt_prints_resume_command(stores):
    source, target, _, target_server = stores
    await fill(source, 1500, leader=False)
    before = await snapshot(source)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetkit", "storage", "migrate", "--from", source, "--to", target,
        "--concurrency", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )
    try:
        async with asyncio.timeout(CLI_TIMEOUT):
            while not (line := await process.stdout.readline()).startswith(b"will copy"):
                assert line, "the migration ended before it started copying"
            target_server.pause()
            process.send_signal(signal.SIGINT)
            out, err = await process.communicate()
    finally:
        target_server.resume()
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 130
    assert "fleetkit storage migrate --from" in err.decode()
    command = err.decode().splitlines()[-1].split()
    assert command[-1] == "--resume"
    assert await snapshot(source) == before

    code, out, err = await run_cli(*command[1:])
    assert code == 0, err
    assert "migration complete" in out
    assert await contents(target) == persistent(await contents(source))
